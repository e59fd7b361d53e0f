"""``python -m benchmarks.mqtt_restart``: MQTT results across a broker crash, end to end through ``runtime.run``.

Starts Debian's ``mosquitto`` (password file, persistence) on a free port, a persistent QoS 1 subscriber, then
``python -m runtime.run --source <N generated images> --output mqtt://...``; kills the broker with SIGKILL once
results flow, starts it again ``--down`` seconds later, and counts: records written, messages received, distinct
``seq``, messages the broker re-delivered itself (DUP flag), and messages published twice (a ``seq`` seen twice
without DUP). A result in flight when the broker died (forwarded by it, its PUBACK never back) is re-sent by the
client after reconnecting and reaches the subscriber again from the new broker: QoS 1 is at least once. Those are
counted apart (``repeated_in_flight``); a repeat of anything else is a fault (``published_twice_unexplained``). Also
checks that no file or line written holds the password.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import sem_extras

USER, PASSWORD = "bench", "bench-Pa55-restart"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(exe: str, conf: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([exe, "-c", str(conf)], stdout=open(log, "ab"), stderr=subprocess.STDOUT)
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"mosquitto did not start: {log.read_text(errors='replace')[-500:]}")


def _require_extras() -> None:
    """Import what the benchmark needs first, so a missing extra is reported (exit 3) before anything starts."""
    import cv2  # noqa: F401
    import numpy  # noqa: F401
    import paho.mqtt.client  # noqa: F401


def _write_images(folder: Path, n: int) -> None:
    import cv2
    import numpy as np

    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        cv2.imwrite(str(folder / f"{i:05d}.png"), rng.integers(0, 255, (64, 64), np.uint8))


def _broker_conf(root: Path, port: int) -> Path:
    """A mosquitto config under ``root``: password file, persistence saved every change, one local listener."""
    pw = root / "passwd"
    subprocess.run([shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd", "-b", "-c", str(pw), USER,
                    PASSWORD], check=True, capture_output=True)
    conf = root / "mosquitto.conf"
    conf.write_text("\n".join([f"persistence true\npersistence_location {root}/\nautosave_interval 1",
                               "autosave_on_changes true\nallow_anonymous false", f"password_file {pw}",
                               f"listener {port} 127.0.0.1"] + (["user root"] if os.geteuid() == 0 else [])) + "\n")
    return conf


def _subscribe(port: int) -> tuple[Any, list[tuple[int, bool]], threading.Event]:
    """A persistent QoS 1 subscriber to ``bench/results``: (client, (seq, dup) per message, subscribed event)."""
    import paho.mqtt.client as mqtt

    got: list[tuple[int, bool]] = []
    subscribed = threading.Event()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-count", clean_session=False)
    c.username_pw_set(USER, PASSWORD)
    c.reconnect_delay_set(0.2, 1)
    c.on_connect = lambda cl, u, f, rc, pr=None: cl.subscribe("bench/results", qos=1)
    c.on_subscribe = lambda *a: subscribed.set()
    c.on_message = lambda cl, u, m: got.append((json.loads(m.payload)["seq"], bool(m.dup)))
    c.connect("127.0.0.1", port)
    c.loop_start()
    subscribed.wait(5)
    return c, got, subscribed


def _launch_run(root: Path, port: int) -> subprocess.Popen[str]:
    """``python -m runtime.run`` over ``root/imgs`` into the broker (spooling while it is down) and a JSONL file."""
    env = {**os.environ, "SEM_MQTT_USERNAME": USER, "SEM_MQTT_PASSWORD": PASSWORD}
    mqtt_url = f"mqtt://127.0.0.1:{port}/bench/results?spool={root}/spool&drain=30"
    return subprocess.Popen([sys.executable, "-m", "runtime.run", "--source", str(root / "imgs"), "--headless",
                             "--quiet", "--output", mqtt_url, "--output", str(root / "res.jsonl")],
                            env=env, stderr=subprocess.PIPE, text=True)


def _tally(root: Path, got: list[tuple[int, bool]], records: int, err: str,
           from_old_broker: int | None = None) -> tuple[dict[str, Any], bool]:
    """Counts from the received (seq, dup) pairs, and whether any file or line written holds the password. The first
    ``from_old_broker`` pairs came before the broker was restarted: a seq first received among them and again, without
    DUP, from the new broker was in flight at the crash."""
    seqs = [s for s, _ in got]
    fresh = [s for s, d in got if not d]
    old = {s for s, _ in got[:from_old_broker]} if from_old_broker is not None else set()
    seen: set[int] = set()
    in_flight = unexplained = 0
    for i, (s, dup) in enumerate(got):
        if not dup and s in seen:
            if from_old_broker is not None and i >= from_old_broker and s in old:
                in_flight += 1
            else:
                unexplained += 1
        seen.add(s)
    written = [err] + [f.read_text(errors="replace") for f in root.rglob("*") if f.is_file() and f.name != "passwd"
                       and f.suffix != ".db" and f.name != "mosquitto.conf"]
    return {"records": records, "received": len(seqs), "distinct": len(set(seqs)),
            "broker_redeliveries": len(seqs) - len(fresh), "published_twice": len(fresh) - len(set(fresh)),
            "repeated_in_flight": in_flight, "published_twice_unexplained": unexplained,
            "lost": records - len(set(seqs))}, any(PASSWORD in t for t in written)


def restart_benchmark(exe: str, frames: int = 2000, kill_after: float = 1.0, down: float = 3.0) -> dict[str, Any]:
    """Run ``runtime.run`` into the broker at ``exe``, SIGKILL the broker once results flow, restart it ``down`` s
    later; the counts the module docstring lists."""
    root = Path(tempfile.mkdtemp(prefix="mqtt_restart_"))
    _write_images(root / "imgs", frames)
    port = _free_port()
    conf = _broker_conf(root, port)
    broker = _start(exe, conf, port, root / "broker.log")
    c, got, subscribed = _subscribe(port)
    run = _launch_run(root, port)
    t0 = time.time()
    while not got and time.time() - t0 < 120:
        time.sleep(0.05)
    time.sleep(kill_after)
    before = len(got)
    subscribed.clear()
    broker.send_signal(signal.SIGKILL)
    broker.wait()
    time.sleep(down)
    from_old_broker = len(got)  # the dead broker's connection is drained by now; the next ones come from the new one
    broker = _start(exe, conf, port, root / "broker.log")
    subscribed.wait(10)
    err = run.communicate(timeout=1200)[1]
    deadline = time.time() + 30
    records = sum(1 for _ in open(root / "res.jsonl"))
    while len({s for s, _ in got}) < records and time.time() < deadline:
        time.sleep(0.1)
    c.disconnect()
    c.loop_stop()
    broker.terminate()
    broker.wait()
    counts, password_written = _tally(root, got, records, err, from_old_broker)
    shutil.rmtree(root, ignore_errors=True)
    return {**counts, "received_before_kill": before, "broker_down_s": down, "run_exit": run.returncode,
            "password_written": password_written}


@sem_extras.cli("benchmarks.mqtt_restart")
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.mqtt_restart", description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, default=2000, help="generated 64x64 images to classify (default 2000)")
    p.add_argument("--kill-after", type=float, default=1.0, help="seconds of flowing results before the kill")
    p.add_argument("--down", type=float, default=3.0, help="seconds the broker stays dead (default 3)")
    args = p.parse_args(argv)
    _require_extras()
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not os.path.exists(exe):
        print("needs Debian's mosquitto (apt-get install mosquitto)", file=sys.stderr)
        return 2
    result = restart_benchmark(exe, args.frames, args.kill_after, args.down)
    print(json.dumps(result, indent=1))
    ok = result["lost"] == 0 and result["published_twice_unexplained"] == 0 and not result["password_written"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
