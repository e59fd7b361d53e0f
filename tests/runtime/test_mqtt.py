"""MQTT output against a real broker: Debian's mosquitto (one per test session, with a password file and a TLS
listener), restarted mid-run by the tests that need it. Skips only when neither mosquitto nor paho-mqtt is here;
SEM_MQTT_REQUIRED=1 (CI) turns that skip into a failure."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from runtime.outputs import FrameResult, OutputError, open_output
from runtime.sources import Frame

USER, PASSWORD = "station7", "s3cret-Pa55word-xyzzy"


def _need(what: str) -> None:
    if os.environ.get("SEM_MQTT_REQUIRED") == "1":
        pytest.fail(f"{what} (SEM_MQTT_REQUIRED=1)")
    pytest.skip(what)


try:
    import paho.mqtt.client as mqtt
except ImportError:
    if os.environ.get("SEM_MQTT_REQUIRED") == "1":
        raise
    pytest.skip("paho-mqtt is not installed (pip install '.[station]')", allow_module_level=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Broker:
    """A mosquitto process on fixed ports that can be killed and started again (same config, same ports)."""

    def __init__(self, folder: Path) -> None:
        exe = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None)
        if exe is None:
            _need("mosquitto is not installed (apt-get install mosquitto)")
        self.exe, self.folder = exe, folder
        self.port, self.tls_port = _free_port(), _free_port()
        pw = folder / "passwd"
        subprocess.run([shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd", "-b", "-c", str(pw), USER,
                        PASSWORD], check=True, capture_output=True)
        pw.chmod(0o600)
        self.ca = self._make_certs()
        # persistence: a subscriber's session and its queued messages survive the restart (as in a plant broker)
        conf = ["persistence true", f"persistence_location {folder}/", "autosave_interval 1",
                "autosave_on_changes true", "per_listener_settings false", "allow_anonymous false",
                f"password_file {pw}", f"listener {self.port} 127.0.0.1"]
        if os.geteuid() == 0:  # as root mosquitto switches to user mosquitto, who cannot read pytest's tmp folder
            conf.append("user root")
        if self.ca:
            conf += [f"listener {self.tls_port} 127.0.0.1", f"cafile {self.ca}", f"certfile {folder}/server.crt",
                     f"keyfile {folder}/server.key"]
        self.conf = folder / "mosquitto.conf"
        self.conf.write_text("\n".join(conf) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def _make_certs(self) -> Path | None:
        openssl = shutil.which("openssl")
        if not openssl:
            return None
        f = self.folder
        run = lambda *a: subprocess.run([openssl, *a], check=True, capture_output=True)  # noqa: E731
        run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
            "-keyout", f"{f}/ca.key", "-out", f"{f}/ca.crt")
        run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-keyout", f"{f}/server.key",
            "-out", f"{f}/server.csr")
        (f / "ext.cnf").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
        run("x509", "-req", "-in", f"{f}/server.csr", "-CA", f"{f}/ca.crt", "-CAkey", f"{f}/ca.key",
            "-CAcreateserial", "-days", "2", "-extfile", f"{f}/ext.cnf", "-out", f"{f}/server.crt")
        return f / "ca.crt"

    def start(self) -> None:
        self.log = open(self.folder / "broker.log", "ab")
        self.proc = subprocess.Popen([self.exe, "-c", str(self.conf)], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError((self.folder / "broker.log").read_text(errors="replace")) from None
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not start listening")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)
        self.proc = None
        self.log.close()


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory):
    b = Broker(tmp_path_factory.mktemp("mosquitto"))
    yield b
    b.stop()


class Subscriber:
    """A persistent-session QoS 1 subscriber that collects every message's seq."""

    def __init__(self, broker: Broker, topic: str, name: str) -> None:
        self.messages: list[dict] = []
        self.topic = topic
        self.subscribed = threading.Event()
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=name, clean_session=False)
        c.username_pw_set(USER, PASSWORD)
        c.reconnect_delay_set(0.2, 1)
        c.on_connect = lambda cl, u, f, rc, p=None: (cl.subscribe(topic, qos=1), None)
        c.on_subscribe = lambda *a: self.subscribed.set()
        c.on_message = lambda cl, u, m: self.messages.append({**json.loads(m.payload), "_dup": bool(m.dup)})
        c.connect("127.0.0.1", broker.port)
        c.loop_start()
        assert self.subscribed.wait(5)
        self.client = c

    def wait_for(self, n: int, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while len({m["seq"] for m in self.messages}) < n and time.monotonic() < deadline:
            time.sleep(0.05)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _result(i: int, source: str = "cam0") -> FrameResult:
    from runtime.classifier import Prediction

    pred = Prediction(label="clean", index=0, top_label="clean", top_index=0, confidence=0.9,
                      probs=np.full(8, 0.1, np.float32), logits=np.zeros(8, np.float32), rejected=False, score=0.9)
    return FrameResult(Frame(image=None, index=i, source=source, timestamp=time.time()), pred, None, 1.0)


@pytest.fixture
def creds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEM_MQTT_USERNAME", USER)
    monkeypatch.setenv("SEM_MQTT_PASSWORD", PASSWORD)


def _uri(broker: Broker, topic: str, spool: Path, **opts: str) -> str:
    q = "&".join(f"{k}={v}" for k, v in {"spool": str(spool), **opts}.items())
    return f"mqtt://127.0.0.1:{broker.port}/{topic}?{q}"


def test_uri_parsing_keeps_password_out_of_everything_shown() -> None:
    from runtime.mqtt import parse_mqtt_uri

    c = parse_mqtt_uri(f"mqtts://{USER}:{PASSWORD}@plant-broker:9999/fab/line2?ca=/etc/ca.pem", env={})
    assert (c.host, c.port, c.topic, c.username, c.password, c.ca) == ("plant-broker", 9999, "fab/line2", USER,
                                                                       PASSWORD, "/etc/ca.pem")
    assert PASSWORD not in repr(c) and PASSWORD not in c.redacted() and USER not in c.redacted()
    assert parse_mqtt_uri("mqtt://h", env={}).port == 1883 and parse_mqtt_uri("mqtts://h", env={}).port == 8883
    env = parse_mqtt_uri("mqtt://h/t", env={"SEM_MQTT_USERNAME": "u", "SEM_MQTT_PASSWORD": "p"})
    assert (env.username, env.password, env.topic) == ("u", "p", "t")
    for bad, why in ((f"mqtt://{USER}:{PASSWORD}@h/t/#", "wildcard"), (f"mqtt://{USER}:{PASSWORD}@h/t?cx=1",
                                                                          "unknown option"),
                     (f"mqtt://{USER}:{PASSWORD}@h/t?ca=x.pem", "mqtts"), (f"mqtt://{USER}:{PASSWORD}@:9/t", "host")):
        with pytest.raises(OutputError, match=why) as e:
            parse_mqtt_uri(bad, env={})
        assert PASSWORD not in str(e.value)
    with pytest.raises(OutputError) as e:
        open_output(f"mqqt://{USER}:{PASSWORD}@h/t")  # a typo in the scheme must not print the password either
    assert PASSWORD not in str(e.value)


def test_broker_restart_mid_run_loses_nothing_and_sends_nothing_twice(broker: Broker, creds: None,
                                                                       tmp_path: Path) -> None:
    sub = Subscriber(broker, "t/restart", "sub-restart")
    spool = tmp_path / "spool"
    out = open_output(_uri(broker, "t/restart", spool))
    n1, n2, n3 = 150, 200, 150
    try:
        for i in range(n1):
            out.write(_result(i))
        sub.wait_for(n1)
        broker.stop(signal.SIGTERM)  # the broker goes away mid-run
        for i in range(n1, n1 + n2):  # these go to the journal
            out.write(_result(i))
        time.sleep(0.3)
        assert not out.connected and out.pending >= n2 and "DOWN" in out.status_text()
        assert any(spool.glob("journal-*.jsonl"))
        broker.start()
        for i in range(n1 + n2, n1 + n2 + n3):
            out.write(_result(i))
            time.sleep(0.002)
    finally:
        out.close()
    n = n1 + n2 + n3
    sub.wait_for(n)
    sub.close()
    seqs = [m["seq"] for m in sub.messages]
    frames = sorted(m["frame"] for m in sub.messages)
    fresh = [m["seq"] for m in sub.messages if not m["_dup"]]  # the broker's own redeliveries carry DUP
    print(f"\nmqtt restart: sent {n}, acknowledged {out.sent}, received {len(seqs)} ({len(seqs) - len(fresh)} "
          f"redelivered by the broker), distinct {len(set(seqs))}")
    assert sorted(set(frames)) == list(range(n)), f"lost: {sorted(set(range(n)) - set(frames))[:10]}"
    assert len(fresh) == len(set(fresh)), "a message was published twice"
    assert len(set(seqs)) == n
    assert out.sent == n and out.pending == 0
    assert sorted(spool.glob("journal-*.jsonl")) == []  # everything acknowledged: the journal is emptied
    assert all(m["source"] == "cam0" and m["label"] == "clean" for m in sub.messages)


def test_unreachable_at_the_end_keeps_results_for_the_next_run(broker: Broker, creds: None, tmp_path: Path) -> None:
    sub = Subscriber(broker, "t/nextrun", "sub-nextrun")
    spool = tmp_path / "spool"
    broker.stop(signal.SIGKILL)  # a hard crash this time
    try:
        logs: list[str] = []
        from runtime.mqtt import MqttOutput

        out = MqttOutput(_uri(broker, "t/nextrun", spool, drain="0.5"), log=logs.append, connect_timeout=1)
        for i in range(40):
            out.write(_result(i))
        out.close()
        assert out.sent == 0 and out.pending == 40
        assert any("unreachable" in m for m in logs) and any("40 not yet" in m for m in logs)
    finally:
        sub.subscribed.clear()
        broker.start()
    assert sub.subscribed.wait(10)  # a killed broker forgot the subscription: the subscriber makes it again
    logs2: list[str] = []
    out2 = MqttOutput(_uri(broker, "t/nextrun", spool), log=logs2.append)
    for i in range(40, 50):
        out2.write(_result(i))
    out2.close()
    assert any("40 results left" in m for m in logs2)
    sub.wait_for(50)
    sub.close()
    frames = [m["frame"] for m in sub.messages]
    assert sorted(frames) == list(range(50))
    assert [m["seq"] for m in sub.messages] == sorted(m["seq"] for m in sub.messages)  # in order


def test_wrong_password_is_a_clear_error_and_never_written(broker: Broker, tiny_model: Path, image_dir: Path,
                                                           tmp_path: Path) -> None:
    """Through the CLI: exit 2 naming the broker and the refusal; no file, record or line holds the password."""
    wrong = "Wr0ng-" + PASSWORD[::-1]
    spool = tmp_path / "spool"
    res = _run_cli(["--source", str(image_dir), "--model", str(tiny_model), "--headless", "--no-self-check",
                    "--output", str(tmp_path / "res.jsonl"),
                    "--output", f"mqtt://{USER}:{wrong}@127.0.0.1:{broker.port}/t/wrong?spool={spool}"], {}, tmp_path)
    assert res.returncode == 2, res.stderr
    assert "refused the login" in res.stderr and f"127.0.0.1:{broker.port}/t/wrong" in res.stderr
    # the right password from the environment, a wrong one nowhere: every byte written or shown is checked
    ok = _run_cli(["--source", str(image_dir), "--model", str(tiny_model), "--headless", "--no-self-check",
                   "--output", str(tmp_path / "ok.jsonl"),
                   "--output", f"mqtt://127.0.0.1:{broker.port}/t/ok?spool={spool}"],
                  {"SEM_MQTT_USERNAME": USER, "SEM_MQTT_PASSWORD": PASSWORD}, tmp_path)
    assert ok.returncode in (0, 3), ok.stderr  # image_dir holds one corrupt image on purpose (exit 3)
    assert "mqtt://127.0.0.1" in ok.stderr and "results acknowledged" in ok.stderr
    helptext = _run_cli(["--help"], {}, tmp_path).stdout
    texts = [res.stdout, res.stderr, ok.stdout, ok.stderr, helptext]
    texts += [p.read_text(errors="replace") for p in tmp_path.rglob("*") if p.is_file()]
    for secret in (wrong, PASSWORD):
        assert not any(secret in t for t in texts), "a password was written or shown"
    assert "mqtt://" in helptext


def _run_cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    root = Path(__file__).resolve().parents[2]
    return subprocess.run([sys.executable, "-m", "runtime.run", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(root), **env}, cwd=cwd)


def test_tls_with_ca_file_and_an_unknown_ca_refused(broker: Broker, creds: None, tmp_path: Path) -> None:
    if broker.ca is None:  # certificates come from the openssl command; the broker itself is required
        pytest.skip("openssl is not installed: no test certificates")
    sub = Subscriber(broker, "t/tls", "sub-tls")
    out = open_output(f"mqtts://localhost:{broker.tls_port}/t/tls?ca={broker.ca}&spool={tmp_path / 's'}")
    for i in range(5):
        out.write(_result(i))
    out.close()
    sub.wait_for(5)
    sub.close()
    assert out.sent == 5 and sorted(m["frame"] for m in sub.messages) == list(range(5))
    with pytest.raises(OutputError, match="TLS|certificate"):  # the system CAs do not know our test CA
        open_output(f"mqtts://localhost:{broker.tls_port}/t/tls?spool={tmp_path / 's2'}")


def test_drift_alarm_reaches_the_broker(broker: Broker, creds: None, make_model, tmp_path: Path) -> None:
    """A run with the drift alarm: every result message says the drift state and the alarm itself arrives on
    <topic>/drift."""
    from test_drift import drift_model, drift_video

    from runtime.drift import DriftConfig
    from runtime.run import run

    sub = Subscriber(broker, "t/dr/#", "sub-drift")
    run(str(drift_video(tmp_path)), model=str(drift_model(make_model)), headless=True, threads=1,
        outputs=[_uri(broker, "t/dr", tmp_path / "spool")], drift_config=DriftConfig(window=100, min_frames=50),
        err=io.StringIO())
    sub.wait_for(351)
    sub.close()
    events = [m for m in sub.messages if "event" in m]
    results = [m for m in sub.messages if "event" not in m]
    assert len(results) == 350 and results[-1]["drift"] == "alarm"
    assert [e["event"] for e in events] == ["drift_raised"] and "rejection rate" in events[0]["reason"]
