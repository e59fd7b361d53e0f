"""Fixtures for runtime tests: tiny ONNX models built with onnx.helper (no torch), images, videos, fake cameras.

The tiny model is global-average-pool → Gemm, mapping (N, 3, H, W) to (N, 8) logits. With the test metadata
(mean 0.5, std 0.25 on every channel) the pooled value is ``z = (mean brightness - 0.5) / 0.25`` and the logits are
``[-3z, 3z, 0, 0, 0, 0, 0, 0]``: dark images are confidently ``clean``, bright ones confidently ``bridges``, and
mid-grey ones are uniform (MSP 1/8) — so confidence, and therefore rejection, is controlled by brightness.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from runtime.contract import METADATA_KEY, ModelMetadata

SIZE = 32
#: ``.ci/run`` sets SEM_SERVE_REQUIRED=1 in the serve venv, where a missing serving piece is a failure, not a skip.
SERVE_REQUIRED = os.environ.get("SEM_SERVE_REQUIRED") == "1"
SLOPES = np.array([-3.0, 3.0, 0, 0, 0, 0, 0, 0], np.float32)


def tiny_meta(**changes: Any) -> ModelMetadata:
    # The tiny model classifies flat frames by brightness, which the frame-quality gate would refuse: it is off.
    base = dict(input_size=(SIZE, SIZE), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), threshold=0.5,
                arch="tiny_gap_gemm", quality={"gate": "off"})
    base.update(changes)
    return ModelMetadata(**base)


def build_tiny_onnx(path: Path, meta: ModelMetadata | None = None, *, classes: int = 8,
                    input_hw: tuple[Any, Any] = (SIZE, SIZE), batch: Any = "N", input_name: str = "images",
                    score_output: str | None = None, metadata: bool = True) -> Path:
    """Write the tiny model to ``path``. ``batch`` is a symbol (dynamic) or an int (fixed). ``score_output`` adds
    a second output (N,) = max logit under that name. ``metadata`` False leaves metadata_props empty."""
    meta = meta if meta is not None else tiny_meta()
    w = np.zeros((classes, 3), np.float32)
    w[:, 0] = np.resize(SLOPES, classes)
    nodes = [
        helper.make_node("GlobalAveragePool", [input_name], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "W", "B"], ["logits"], transB=1),
    ]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, classes])]
    if score_output:
        nodes.append(helper.make_node("ReduceMax", ["logits"], [score_output], keepdims=0, axes=[1]))
        outputs.append(helper.make_tensor_value_info(score_output, TensorProto.FLOAT, [batch]))
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [batch, 3, *input_hw])], outputs,
        initializer=[numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.zeros(classes, np.float32), "B")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="runtime-tests")
    model.ir_version = 8
    if metadata:
        helper.set_model_props(model, {METADATA_KEY: meta.to_json()})
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def grey(value: float, size: int = 48, dtype: Any = np.uint8) -> np.ndarray:
    """A flat grey image of brightness ``value`` in [0, 1]."""
    if np.dtype(dtype).kind == "f":
        return np.full((size, size), value, dtype)
    top = np.iinfo(dtype).max
    return np.full((size, size), round(value * top), dtype)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_model(model_dir: Path) -> Path:
    return build_tiny_onnx(model_dir / "tiny.onnx")


@pytest.fixture(scope="session")
def clf(tiny_model: Path) -> Any:
    from runtime.classifier import Classifier

    return Classifier(tiny_model, backend="ort", threads=1)


@pytest.fixture
def make_model(tmp_path: Path):
    """Factory: ``make_model(name, **build_tiny_onnx kwargs)`` → path of a fresh tiny model."""
    def make(name: str = "m.onnx", **kw: Any) -> Path:
        return build_tiny_onnx(tmp_path / name, **kw)

    return make


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    """A folder of images: good ones (various depths/channels, nested) and broken ones."""
    d = tmp_path / "images"
    (d / "nested").mkdir(parents=True)
    cv2.imwrite(str(d / "img2_dark.png"), grey(0.05))
    cv2.imwrite(str(d / "img10_bright.png"), grey(0.95))
    cv2.imwrite(str(d / "nested" / "img3_mid.png"), grey(0.5))
    cv2.imwrite(str(d / "img1_rgb.png"), cv2.cvtColor(grey(0.9), cv2.COLOR_GRAY2BGR))
    cv2.imwrite(str(d / "img4_16bit.tif"), grey(0.1, dtype=np.uint16))
    (d / "img5_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    (d / "notes.txt").write_text("not an image")
    (d / ".hidden.png").write_bytes(b"")
    return d


def write_video(path: Path, values: list[float], size: int = 64, fps: float = 10.0) -> Path:
    """A small MJPG video whose frame ``i`` has brightness ``values[i]``."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (size, size))
    assert writer.isOpened(), "OpenCV cannot write MJPG here"
    for v in values:
        writer.write(cv2.cvtColor(grey(v, size), cv2.COLOR_GRAY2BGR))
    writer.release()
    return path


@pytest.fixture
def video_file(tmp_path: Path) -> Path:
    return write_video(tmp_path / "clip.avi", [0.05, 0.95] * 6)


class FakeCapture:
    """A stand-in for cv2.VideoCapture: yields ``frames`` frames, then fails (``read`` → False) or blocks."""

    def __init__(self, frames: int | None = None, value: float = 0.05, then: str = "fail", delay: float = 0.0,
                 unblock: threading.Event | None = None) -> None:
        self.frames, self.value, self.then, self.delay = frames, value, then, delay
        self.unblock = unblock or threading.Event()
        self.count = 0
        self.released = False

    def isOpened(self) -> bool:  # noqa: N802 - OpenCV's name
        return not self.released

    def read(self) -> tuple[bool, np.ndarray | None]:
        if self.delay:
            time.sleep(self.delay)
        if self.frames is not None and self.count >= self.frames:
            if self.then == "block":
                self.unblock.wait(10)
            return False, None
        self.count += 1
        return True, cv2.cvtColor(grey(self.value, 40), cv2.COLOR_GRAY2BGR)

    def get(self, prop: int) -> float:
        return 25.0 if prop == cv2.CAP_PROP_FPS else 0.0

    def release(self) -> None:
        self.released = True


# Helpers as fixtures: test modules cannot import this conftest by name reliably (no packages under tests/).
@pytest.fixture(scope="session")
def fake_capture() -> type[FakeCapture]:
    return FakeCapture


@pytest.fixture(scope="session")
def grey_image():
    return grey


@pytest.fixture(scope="session")
def video_writer():
    return write_video


@pytest.fixture(scope="session")
def meta_factory():
    return tiny_meta


def serve_skip_or_fail(reason: str) -> None:
    """Skip a serving test whose environment is missing; fail it instead under SEM_SERVE_REQUIRED=1."""
    if SERVE_REQUIRED:
        pytest.fail(f"SEM_SERVE_REQUIRED=1 but {reason}", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def require_tritonclient() -> None:
    """Serving tests need the Triton client, which the serve venv has (.ci/run)."""
    try:
        import tritonclient.grpc  # noqa: F401
    except ImportError:
        serve_skip_or_fail("tritonclient is not installed here; serving tests run in the serve venv (.ci/run)")
