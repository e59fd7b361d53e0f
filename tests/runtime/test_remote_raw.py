"""``RemoteClassifier`` against a bare model in Triton: the repository ``python -m export.triton`` writes for stock
Triton (float32 ``images`` in, ``logits`` out, metadata and fingerprint in the config's parameters).

PyTriton cannot load ONNX, so ``raw_triton_server.py`` serves the repository with exactly its interface (a Python
model running the ONNX file with ONNX Runtime, the config's parameters included): one real server per module. The
client then preprocesses, gates and rejects here, and must answer exactly as a local ``Classifier``. Skips as in
``test_serve.py`` (no tritonclient here, or no shared libpython for the server); ``SEM_SERVE_REQUIRED=1`` fails them.
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
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from runtime.errors import InputError

SERVE_PYTHON = os.environ.get("SEM_SERVE_PYTHON") or sys.executable
ROOT = Path(__file__).resolve().parents[2]
HELPER = Path(__file__).with_name("raw_triton_server.py")
NAME = "sem_raw"

from tests.runtime.conftest import require_tritonclient  # noqa: E402
from tests.runtime.conftest import serve_skip_or_fail as _skip_or_fail  # noqa: E402

require_tritonclient()

from runtime.classifier import Classifier  # noqa: E402
from runtime.contract import INVALID_LABEL  # noqa: E402
from runtime.remote import ModelMismatch, RemoteClassifier, model_fingerprint  # noqa: E402
from tests.runtime.conftest import build_tiny_onnx, tiny_meta  # noqa: E402


def _libdir() -> str:
    probe = ("import sysconfig, pytriton; print(sysconfig.get_config_var('Py_ENABLE_SHARED') or 0, "
             "sysconfig.get_config_var('LIBDIR'))")
    r = subprocess.run([SERVE_PYTHON, "-c", probe], capture_output=True, text=True)
    if r.returncode != 0:
        _skip_or_fail(f"{SERVE_PYTHON} cannot import pytriton (set SEM_SERVE_PYTHON to the serve venv's python)")
    shared, libdir = r.stdout.split()
    if shared != "1":
        _skip_or_fail(f"{SERVE_PYTHON} has no shared libpython, which Triton's Python backend needs")
    return libdir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # The default frame-quality gate (no fitted statistics): flat frames are refused, textured ones classified; a
    # temperature other than 1, which the client must apply.
    return build_tiny_onnx(tmp_path_factory.mktemp("raw") / "gated.onnx", tiny_meta(quality=None, temperature=0.7))


@pytest.fixture(scope="module")
def local(model: Path) -> Classifier:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "no frame-quality statistics": expected here
        return Classifier(model, "ort", threads=1)


@pytest.fixture(scope="module")
def url(model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from export.triton import write_repository

    libdir = _libdir()
    repo = tmp_path_factory.mktemp("repo")
    folder = write_repository(model, repo, NAME, max_batch=8, kind="KIND_CPU")
    grpc = free_port()
    log = repo / "server.log"
    env = dict(os.environ, LD_LIBRARY_PATH=":".join(p for p in (libdir, os.environ.get("LD_LIBRARY_PATH")) if p),
               PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([SERVE_PYTHON, str(HELPER), str(folder), "--grpc-port", str(grpc), "--http-port",
                             str(free_port()), "--metrics-port", str(free_port())], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=log.open("a"), text=True)
    lines: queue.Queue[str] = queue.Queue()
    assert proc.stdout is not None
    stdout = proc.stdout
    threading.Thread(target=lambda: [lines.put(line) for line in stdout] + [lines.put("")], daemon=True).start()
    try:
        deadline = time.monotonic() + 120
        while True:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            assert line, f"server exited; log: {log.read_text()[-3000:]}"
            if line.startswith("{") and json.loads(line).get("event") == "ready":
                break
        yield f"grpc://127.0.0.1:{grpc}/{NAME}"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


@pytest.fixture(scope="module")
def remote(url: str) -> Iterator[RemoteClassifier]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        client = RemoteClassifier(url, timeout=30)
    with client:
        yield client


def images() -> dict[str, Any]:
    yy, xx = np.mgrid[0:64, 0:64]
    stripes = ((np.sin(xx / 3) + 1) * 60 + 20).astype(np.uint8)  # dark: clean
    bright = ((np.sin(xx / 3) + 1) * 50 + 150).astype(np.uint8)  # bright: bridges
    blobs = np.clip(128 + 60 * np.sin(xx / 5) * np.cos(yy / 7), 0, 255).astype(np.uint8)  # mid: rejected
    ok, png = cv2.imencode(".png", bright)
    assert ok
    return {"stripes": stripes, "bright_png": png.tobytes(), "blobs": blobs,
            "blobs_u16": blobs.astype(np.uint16) * 257, "stripes_bgr": np.dstack([stripes] * 3),
            "stripes_big": cv2.resize(stripes, (200, 150)), "flat": np.full((64, 64), 30, np.uint8)}


def assert_same(r: Any, lo: Any) -> None:
    assert (r.label, r.index, r.top_label, r.top_index, r.rejected, r.reason) == \
        (lo.label, lo.index, lo.top_label, lo.top_index, lo.rejected, lo.reason)
    assert r.confidence == pytest.approx(lo.confidence, abs=1e-5)
    assert r.score == pytest.approx(lo.score, abs=1e-5, nan_ok=True)
    np.testing.assert_allclose(r.probs, lo.probs, atol=1e-5)
    np.testing.assert_allclose(r.logits, lo.logits, atol=1e-5)  # NaN for invalid frames on both
    assert r.source == lo.source


def test_raw_model_answers_as_the_local_classifier(remote: RemoteClassifier, local: Classifier, model: Path,
                                                  tmp_path: Path) -> None:
    assert remote.fingerprint == model_fingerprint(model) and remote.meta == local.meta
    assert "bare model" in remote._local.backend.describe()  # the client-side path, not runtime.serve's
    imgs = images()
    path = tmp_path / "bright.png"
    path.write_bytes(imgs["bright_png"])
    items = [*imgs.values(), path]
    want = [local.predict(x) for x in items]
    assert [w.label for w in want[:3]] == ["clean", "bridges", "other"]
    assert want[-2].label == INVALID_LABEL and want[-2].reason == "blank"
    for x, w in zip(items, want):
        assert_same(remote.predict(x), w)
    for r, w in zip(remote.predict_batch(items, batch_size=5), want):  # float32 batches of the classified ones
        assert_same(r, w)
    prepared = remote.prepare(imgs["flat"])
    assert prepared.reason == "blank" and remote.predict(prepared).label == INVALID_LABEL


def test_malformed_image_fails_alone_with_the_local_message(remote: RemoteClassifier, local: Classifier) -> None:
    imgs = images()
    items = [imgs["stripes"], b"this is not an image", imgs["bright_png"]]
    got, want = remote.predict_batch(items, on_error="keep"), local.predict_batch(items, on_error="keep")
    assert isinstance(got[1], InputError) and str(got[1]) == str(want[1])
    assert_same(got[0], want[0])
    assert_same(got[2], want[2])
    with pytest.raises(InputError, match="not an image|cannot decode|decode") as e:
        remote.predict(b"this is not an image")
    assert str(e.value) == str(want[1])


def test_threshold_override_is_applied_here(url: str, model: Path) -> None:
    blobs = images()["blobs"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        off = Classifier(url, threshold="off")
        local_off = Classifier(model, "ort", threshold="off", threads=1)
    assert isinstance(off, RemoteClassifier)
    r = off.predict(blobs)
    assert not r.rejected and r.label == r.top_label
    assert_same(r, local_off.predict(blobs))


def test_fingerprint_pins_the_model(url: str, model: Path) -> None:
    with pytest.raises(ModelMismatch, match="expected 0123456789abcdef"):
        RemoteClassifier(url + "?fingerprint=0123456789abcdef", retry_timeout=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ok = RemoteClassifier(url, fingerprint=model_fingerprint(model))
    assert ok.predict(images()["stripes"]).label == "clean"
    with pytest.raises(ModelMismatch, match="no ready model 'resnet'"):
        RemoteClassifier(url.replace(NAME, "resnet"), retry_timeout=1)
