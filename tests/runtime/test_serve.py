"""``runtime.serve`` + ``runtime.remote`` against a real Triton server (PyTriton), one per test session.

The server runs in its own interpreter (``SEM_SERVE_PYTHON``, default: this one), because PyTriton pins numpy<2;
the client (``tritonclient``) runs here. ``.ci/run`` builds that environment and sets ``SEM_SERVE_REQUIRED=1`` so
that nothing here can skip there. Skips (one line each): the client is not installed in this environment, or the
server's interpreter has no shared libpython (Triton's Python backend cannot load it).
"""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from runtime.errors import InputError

SERVE_PYTHON = os.environ.get("SEM_SERVE_PYTHON") or sys.executable
ROOT = Path(__file__).resolve().parents[2]

from tests.runtime.conftest import require_tritonclient  # noqa: E402
from tests.runtime.conftest import serve_skip_or_fail as _skip_or_fail  # noqa: E402

require_tritonclient()

from runtime.remote import ModelMismatch, RemoteClassifier, ServerUnavailable, model_fingerprint  # noqa: E402
from runtime.serve import libpython_dir  # noqa: E402


def _server_env_problem() -> str | None:
    probe = ("import sysconfig, pytriton; print(sysconfig.get_config_var('Py_ENABLE_SHARED') or 0)")
    r = subprocess.run([SERVE_PYTHON, "-c", probe], capture_output=True, text=True)
    if r.returncode != 0:
        return f"{SERVE_PYTHON} cannot import pytriton (set SEM_SERVE_PYTHON to the serve venv's python)"
    if r.stdout.strip() != "1":
        return f"{SERVE_PYTHON} has no shared libpython, which Triton's Python backend needs"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``python -m runtime.serve`` as a child process; ``start()`` returns once it prints its ready line."""

    def __init__(self, model: Path, log: Path, *extra: str) -> None:
        self.model, self.log, self.extra = model, log, list(extra)
        self.grpc, self.http, self.metrics = free_port(), free_port(), free_port()
        self.proc: subprocess.Popen[str] | None = None
        self.ready: dict[str, Any] = {}

    @property
    def url(self) -> str:
        return f"grpc://127.0.0.1:{self.grpc}/sem_classifier"

    def start(self, timeout: float = 180) -> Server:
        cmd = [SERVE_PYTHON, "-m", "runtime.serve", "--model", str(self.model), "--grpc-port", str(self.grpc),
               "--http-port", str(self.http), "--metrics-port", str(self.metrics), "--log-level", "WARNING",
               *self.extra]
        env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}  # runtime.serve must find it itself
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=self.log.open("a"), text=True,
                                     env=env)
        self.lines: queue.Queue[str] = queue.Queue()
        stdout = self.proc.stdout
        assert stdout is not None
        threading.Thread(target=lambda: [self.lines.put(line) for line in stdout] + [self.lines.put("")],
                         daemon=True).start()  # keeps reading, so the pipe never fills
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            if not line:
                break
            if line.startswith("{") and json.loads(line).get("event") == "ready":
                self.ready = json.loads(line)
                return self
        self.proc.kill()
        raise AssertionError(f"server did not come up; log: {self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        """Leave nothing running, whatever happened (a failed test must not leak a server)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, wait for the exit; ``stdout_tail`` is what it printed after becoming ready."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        tail = []
        while (line := self.lines.get(timeout=10)) != "":
            tail.append(line)
        self.stdout_tail = "".join(tail)
        return rc


@pytest.fixture(scope="session")
def server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    problem = _server_env_problem()
    if problem:
        _skip_or_fail(problem)
    log = tmp_path_factory.mktemp("serve") / "server.log"
    srv = Server(tiny_model, log, "--max-image-bytes", "200000", "--max-batch", "8", "--instances", "2")
    try:
        yield srv.start()
        assert srv.stop() == 0, log.read_text()[-3000:]
    finally:
        srv.kill()


@pytest.fixture
def own_servers() -> Iterator[list[Server]]:
    """Servers a test starts itself; killed at teardown if the test did not stop them."""
    started: list[Server] = []
    yield started
    for srv in started:
        srv.kill()


@pytest.fixture(scope="session")
def remote(server: Server) -> Iterator[RemoteClassifier]:
    with RemoteClassifier(server.url, timeout=30) as r:
        yield r


def png(value: float, size: int = 48, dtype: Any = np.uint8) -> bytes:
    img = np.full((size, size), round(value * np.iinfo(dtype).max), dtype)
    ok, buf = cv2.imencode(".png", img)
    assert ok
    return buf.tobytes()


def assert_same(remote_p: Any, local_p: Any) -> None:
    assert remote_p.label == local_p.label
    assert remote_p.index == local_p.index
    assert remote_p.top_label == local_p.top_label
    assert remote_p.rejected == local_p.rejected
    assert remote_p.confidence == pytest.approx(local_p.confidence, abs=1e-6)
    assert remote_p.score == pytest.approx(local_p.score, abs=1e-5, nan_ok=True)
    np.testing.assert_allclose(remote_p.probs, local_p.probs, atol=1e-6)
    np.testing.assert_allclose(remote_p.logits, local_p.logits, atol=1e-5)  # NaN for invalid frames on both
    assert getattr(remote_p, "reason", "") == getattr(local_p, "reason", "")


# ------------------------------------------------------------------------------------------------ answers
def test_single_requests_match_the_local_classifier(remote: RemoteClassifier, clf: Any, tmp_path: Path,
                                                    server: Server) -> None:
    path = tmp_path / "bright.png"
    path.write_bytes(png(0.9))
    cases = [png(0.1), path, str(path), np.full((40, 60), 30, np.uint8), np.full((40, 60), 60000, np.uint16),
             np.full((40, 60, 3), 200, np.uint8), np.full((50, 50), 0.3, np.float32)]
    for x in cases:
        r, lo = remote.predict(x), clf.predict(x)
        assert_same(r, lo)
    assert remote.predict(png(0.1)).label == "clean" and remote.predict(png(0.9)).label == "bridges"
    mid = remote.predict(png(0.5))  # uniform probabilities: rejected by the model's own threshold, on the server
    assert mid.rejected and mid.label == "other" and mid.confidence == pytest.approx(1 / 8, abs=0.01)
    assert remote.predict(path).source == str(path)
    assert remote.fingerprint == model_fingerprint(server.model) == server.ready["fingerprint"]
    assert remote.meta == clf.meta


def test_classifier_url_gives_the_remote_client(server: Server, clf: Any) -> None:
    from runtime.classifier import Classifier

    c = Classifier(server.url)
    assert isinstance(c, RemoteClassifier) and c.labels == clf.labels
    assert_same(c.predict(png(0.2)), clf.predict(png(0.2)))
    grey = c.prepare(png(0.8, size=200))  # the decode-thread half runs here, at the model's size
    assert grey.shape == clf.meta.input_size
    assert_same(c.predict(grey), clf.predict(png(0.8, size=200)))
    off = Classifier(server.url, "auto", "off")  # a client-side threshold re-decides from the returned score
    p = off.predict(png(0.5))
    assert not p.rejected and p.label == p.top_label
    with pytest.raises(ValueError, match="does not apply to a remote model"):
        Classifier(server.url, "trt")


def test_runtime_run_cli_through_the_server(server: Server, tiny_model: Path, image_dir: Path,
                                            tmp_path: Path) -> None:
    recs = {}
    for name, model in (("remote", server.url), ("local", str(tiny_model))):
        out = tmp_path / f"{name}.jsonl"
        r = subprocess.run([sys.executable, "-m", "runtime.run", "--source", str(image_dir), "--model", model,
                            "--headless", "--quiet", "--no-status", "--output", str(out)],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode == 3, r.stderr  # exit 3: one unreadable input, as locally
        recs[name] = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(recs["remote"]) == len(recs["local"]) == 6
    for a, b in zip(recs["remote"], recs["local"]):
        assert (a["source"], a["label"], a["rejected"]) == (b["source"], b["label"], b["rejected"])
        assert a["confidence"] == pytest.approx(b["confidence"], abs=1e-5)
        assert bool(a["error"]) == bool(b["error"])


def test_batched_requests_keep_order(remote: RemoteClassifier, clf: Any) -> None:
    values = np.linspace(0, 1, 21)
    items = [png(v) for v in values]
    got = remote.predict_batch(items, batch_size=8)
    want = clf.predict_batch(items)
    assert len(got) == 21
    for r, lo in zip(got, want):
        assert_same(r, lo)


def test_eight_concurrent_clients(server: Server, clf: Any) -> None:
    values = np.linspace(0, 1, 12)
    want = [clf.predict(png(v)) for v in values]
    failures: list[BaseException] = []
    results: dict[int, list[Any]] = {}

    def client(k: int) -> None:
        try:
            with RemoteClassifier(server.url) as c:
                results[k] = [c.predict(png(v)) for v in values] + c.predict_batch([png(v) for v in values])
        except BaseException as e:  # noqa: BLE001 - reported below
            failures.append(e)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not failures, failures
    assert sorted(results) == list(range(8))
    for preds in results.values():
        for r, lo in zip(preds, want + want):
            assert_same(r, lo)
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics}/metrics", timeout=10).read().decode()
    ok = [line for line in metrics.splitlines()
          if line.startswith("nv_inference_request_success") and 'model="sem_classifier"' in line]
    assert ok and float(ok[0].rsplit(" ", 1)[1]) >= 8 * 13


def test_health_endpoints_and_loopback_default(server: Server) -> None:
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/sem_classifier/ready"):
        assert urllib.request.urlopen(f"http://127.0.0.1:{server.http}{path}", timeout=10).status == 200
    assert server.ready["grpc"] == f"127.0.0.1:{server.grpc}"
    import tritonclient.grpc as grpcclient

    cfg = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc}").get_model_config("sem_classifier",
                                                                                        as_json=True)["config"]
    assert cfg["max_batch_size"] == 8 and "dynamic_batching" in cfg
    assert [int(g["count"]) for g in cfg["instance_group"]] == [2]
    addrs = {a[4][0] for a in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)} - {"127.0.0.1"}
    for addr in addrs:  # not listening on the machine's other addresses
        with socket.socket() as s:
            s.settimeout(2)
            assert s.connect_ex((addr, server.grpc)) != 0, f"server reachable on {addr}"


# ------------------------------------------------------------------------------------------------ faults
def test_malformed_image_fails_alone_with_the_local_message(remote: RemoteClassifier, clf: Any,
                                                            tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(png(0.9)[:40])
    bomb = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + (60000).to_bytes(4, "big") * 2 + b"\x08\x00\x00\x00\x00"
    items = [png(0.1), b"not an image", corrupt, bomb, np.full((3, 3), 7, np.uint8),
             np.full((20, 20), np.nan, np.float32), png(0.9), tmp_path / "missing.png"]
    got = remote.predict_batch(items, on_error="keep")
    want = clf.predict_batch(items, on_error="keep")
    for r, lo in zip(got, want):
        if isinstance(lo, Exception):
            assert type(r) is type(lo) and str(r) == str(lo), (r, lo)
        else:
            assert_same(r, lo)
    assert sum(isinstance(r, Exception) for r in got) == 6
    with pytest.raises(InputError, match="cannot decode image"):
        remote.predict(b"not an image")
    with pytest.raises(InputError, match=str(corrupt)):
        remote.predict(corrupt)


def test_size_limits_are_checked_before_decoding(remote: RemoteClassifier) -> None:
    big = np.random.default_rng(0).integers(0, 255, (600, 600), np.uint8)  # ~360 kB: over --max-image-bytes
    ok, buf = cv2.imencode(".png", big)
    with pytest.raises(InputError, match="over this server's 195 KiB limit"):
        remote.predict(buf.tobytes())
    import io

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": (50000, 50000)})
    with pytest.raises(InputError, match="over the 100 MP limit"):  # claims 2.5 GB, sends a few bytes
        remote.predict(header.getvalue() + b"\x00" * 16)


def test_client_disconnect_mid_request_leaves_the_server_serving(server: Server, remote: RemoteClassifier,
                                                                 tmp_path: Path) -> None:
    script = tmp_path / "client.py"
    script.write_text(
        "import sys, numpy as np, cv2\n"
        "from runtime.remote import RemoteClassifier\n"
        "c = RemoteClassifier(sys.argv[1])\n"
        "img = cv2.imencode('.png', np.random.default_rng(1).integers(0, 255, (300, 300), np.uint8))[1].tobytes()\n"
        "print('sending', flush=True)\n"
        "c.predict_batch([img] * 400)\n")
    proc = subprocess.Popen([sys.executable, str(script), server.url], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "sending"
    time.sleep(0.3)
    proc.kill()  # gone mid-request: the server must answer the next client as before
    proc.wait()
    impatient = RemoteClassifier(server.url, retry_timeout=0)
    impatient.timeout = 0.001  # gives up mid-request: the server finishes the work for nobody
    with pytest.raises(TimeoutError, match="no answer within 0.001 s"):
        impatient.predict_batch([png(0.2)] * 64)
    assert remote.predict(png(0.9)).label == "bridges"


def test_wrong_model_name_and_fingerprint(server: Server) -> None:
    with pytest.raises(ModelMismatch, match="no ready model 'resnet'"):
        RemoteClassifier(server.url.replace("sem_classifier", "resnet"), retry_timeout=1)
    with pytest.raises(ModelMismatch, match="expected 0123456789abcdef"):
        RemoteClassifier(server.url + "?fingerprint=0123456789abcdef")
    c = RemoteClassifier(server.url, fingerprint=server.ready["fingerprint"])
    assert c.predict(png(0.1)).label == "clean"


def test_sigterm_drains_in_flight_requests_and_a_retrying_client_survives_a_restart(
        tmp_path: Path, clf: Any, make_model: Any, own_servers: list[Server]) -> None:
    """Also the frame-quality gate on the server: this model has it on, so flat frames come back ``invalid``."""
    from runtime.classifier import Classifier
    from runtime.contract import INVALID_LABEL

    problem = _server_env_problem()
    if problem:
        _skip_or_fail(problem)
    gated = make_model("gated.onnx", meta=clf.meta.with_updates(quality=None))  # default gate limits
    with pytest.warns(RuntimeWarning, match="no frame-quality statistics"):
        local = Classifier(gated, "ort", threads=1)
    srv = Server(gated, tmp_path / "server.log", "--max-batch", "8")
    own_servers.append(srv)
    srv.start()
    busy = png(0.8, size=4000)  # a few kB to send, 16 MP to decode: requests arrive at once and take a while
    want = local.predict(busy)
    assert want.label == INVALID_LABEL and want.reason == "blank"
    in_flight: list[Any] = []
    errors: list[BaseException] = []

    connected = threading.Barrier(4)
    finished: list[float] = []

    def heavy() -> None:
        try:
            with RemoteClassifier(srv.url, timeout=120, retry_timeout=0) as c:  # one request, no retry
                connected.wait(30)
                in_flight.extend(c.predict_batch([busy] * 8, batch_size=8))
                finished.append(time.monotonic())
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    survivor = RemoteClassifier(srv.url, retry_timeout=120)
    workers = [threading.Thread(target=heavy) for _ in range(3)]
    for t in workers:
        t.start()
    connected.wait(30)
    time.sleep(0.4)  # the three requests are on the server now; together they take over a second
    t0 = time.monotonic()
    assert srv.stop() == 0
    for t in workers:
        t.join(60)
    assert not errors, errors
    assert len(in_flight) == 24
    for p in in_flight:
        assert_same(p, want)
    assert max(finished) > t0, "no request was in flight at SIGTERM: the test proved nothing"
    assert '"event": "stopped"' in srv.stdout_tail
    assert time.monotonic() - t0 < 60

    # The server is down: a connected client retries with backoff, and the restarted server (same ports) answers.
    done: list[Any] = []

    def client() -> None:
        try:
            done.append(survivor.predict(png(0.9)))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    t = threading.Thread(target=client)
    t.start()
    time.sleep(1.5)
    assert not done and not errors  # still retrying
    srv.start()
    t.join(120)
    assert not errors, errors
    textured = np.random.default_rng(3).integers(60, 200, (32, 32), np.uint8)
    textured = cv2.GaussianBlur(textured, (3, 3), 0)
    assert done
    assert_same(done[0], local.predict(png(0.9)))
    assert_same(survivor.predict(textured), local.predict(textured))
    assert srv.stop() == 0

    # Restarted with another model on the same address: the fingerprint in every answer gives it away.
    srv.model = clf.model_path
    srv.start()
    with pytest.raises(ModelMismatch, match=f"now serves model fingerprint {model_fingerprint(clf.model_path)}, "
                                            f"not {model_fingerprint(gated)}"):
        survivor.predict(textured)
    assert srv.stop() == 0


def test_libpython_problem_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    import sysconfig

    real = sysconfig.get_config_var
    monkeypatch.setattr(sysconfig, "get_config_var",
                        lambda k: 0 if k == "Py_ENABLE_SHARED" else real(k))
    where, why = libpython_dir()
    assert where is None and "without a shared libpython" in why and "--enable-shared" in why


def test_server_down_is_a_clear_error() -> None:
    t0 = time.monotonic()
    with pytest.raises(ServerUnavailable, match=r"no Triton server answers at 127\.0\.0\.1:\d+ .*runtime\.serve"):
        RemoteClassifier(f"grpc://127.0.0.1:{free_port()}/sem_classifier", retry_timeout=1)
    assert time.monotonic() - t0 < 10
