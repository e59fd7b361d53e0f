"""TensorRT backend: the TensorRT-free logic (sidecar checks, batch plans, dtypes) and behaviour without TensorRT.

The GPU test at the end builds a real engine from the tiny ONNX model and compares it with ONNX Runtime; it only
runs where TensorRT and a CUDA GPU exist (marked ``gpu``).
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from runtime.contract import write_sidecar
from runtime.errors import BackendUnavailable, MetadataError
from runtime.trt_backend import (
    TrtBackend,
    check_engine_compat,
    fallback_onnx,
    is_engine,
    numpy_dtype,
    plan_batches,
    rebuild_command,
    resolve_shape,
    tensorrt_available,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fake_gpu import FakeCudart, cudaError_t, fake_tensorrt, install_cudart  # noqa: E402

SIDECAR = {"tensorrt_version": "10.3.0.30", "gpu_name": "Orin", "compute_capability": "8.7", "precision": "fp16",
           "onnx": "models/sem_classifier.onnx"}


def check(sidecar=None, **running):
    kw = dict(trt_version="10.3.0.30", gpu_name="Orin", compute_capability=(8, 7))
    kw.update(running)
    return check_engine_compat("m.engine", sidecar or SIDECAR, **kw)


def test_matching_engine_passes():
    assert check() == []
    assert check(trt_version="10.3.0.26") == []  # build number differs, same major.minor.patch
    assert check({**SIDECAR, "compute_capability": [8, 7]}) == []
    assert check({**SIDECAR, "compute_capability": "sm_87"}) == []


@pytest.mark.parametrize("running, expect", [
    ({"trt_version": "10.4.0"}, "built with TensorRT 10.3.0.30, running TensorRT 10.4.0"),
    ({"trt_version": "11.4.0"}, "running TensorRT 11.4.0"),
    ({"compute_capability": (8, 6), "gpu_name": "RTX A4000"}, "compute capability 8.7 (Orin)"),
])
def test_mismatch_is_refused_with_the_rebuild_command(running, expect):
    with pytest.raises(MetadataError) as info:
        check(**running)
    msg = str(info.value)
    assert expect in msg and "m.engine" in msg
    assert "python -m export.build_engine --onnx models/sem_classifier.onnx --fp16" in msg


def test_same_compute_capability_other_gpu_only_warns():
    notes = check({**SIDECAR, "compute_capability": "8.6", "gpu_name": "RTX 3090"}, compute_capability=(8, 6),
                  gpu_name="RTX A6000")
    assert len(notes) == 1 and "tuned" in notes[0]


def test_incomplete_sidecar_is_refused():
    with pytest.raises(MetadataError, match="TensorRT version.*compute capability"):
        check({"precision": "fp16"})


def test_stale_engine_and_corrupt_engine_are_detected(tmp_path):
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"model v1")
    side = {**SIDECAR, "onnx": "m.onnx", "model_sha256": hashlib.sha256(b"model v1").hexdigest(),
            "engine_sha256": hashlib.sha256(b"engine").hexdigest()}
    kw = dict(trt_version="10.3.0", gpu_name="Orin", compute_capability=(8, 7))
    assert check_engine_compat(tmp_path / "m.engine", side, engine_bytes=b"engine", **kw) == []
    with pytest.raises(MetadataError, match="sha256 does not match"):
        check_engine_compat(tmp_path / "m.engine", side, engine_bytes=b"engine, bit-flipped", **kw)
    onnx.write_bytes(b"model v2, retrained")
    with pytest.raises(MetadataError, match="stale"):
        check_engine_compat(tmp_path / "m.engine", side, engine_bytes=b"engine", **kw)


def test_rebuild_command():
    assert rebuild_command("out/x.engine", {"onnx": "a.onnx", "precision": "int8"}) == \
        "python -m export.build_engine --onnx a.onnx --int8 --out out"
    # The exporter records the exact command it ran; that one wins.
    assert rebuild_command("x.engine", {"build_command": "python -m export.build_engine --onnx m.onnx --fp16"}) == \
        "python -m export.build_engine --onnx m.onnx --fp16"


def test_batch_plans_stay_inside_the_profile():
    assert plan_batches(1, 1, 8) == [(0, 1, 1)]
    assert plan_batches(19, 1, 8) == [(0, 8, 8), (8, 8, 8), (16, 3, 3)]
    assert plan_batches(3, 4, 8) == [(0, 3, 4)]  # padded up to the profile minimum
    assert plan_batches(5, 2, 2) == [(0, 2, 2), (2, 2, 2), (4, 1, 2)]
    assert plan_batches(0, 1, 8) == []
    with pytest.raises(ValueError):
        plan_batches(4, 5, 2)


def test_shapes_and_dtypes():
    assert resolve_shape((-1, 3, 224, 224), 4) == (4, 3, 224, 224)
    assert resolve_shape((1, 8), 4) == (1, 8)
    with pytest.raises(BackendUnavailable, match="only the batch"):
        resolve_shape((-1, 3, -1, 224), 2)
    fake = lambda name: SimpleNamespace(name=name)  # noqa: E731 - TensorRT DataType members expose .name
    assert numpy_dtype(fake("FLOAT")) == np.float32 and numpy_dtype(fake("HALF")) == np.float16
    assert numpy_dtype(fake("INT8")) == np.int8 and numpy_dtype("DataType.INT32") == np.int32
    with pytest.raises(BackendUnavailable, match="BF16"):
        numpy_dtype(fake("BF16"), "logits")


def test_engine_detection_and_onnx_fallback(tmp_path, tiny_model, meta_factory):
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"\0")
    assert is_engine(engine) and is_engine("x.plan") and not is_engine(tiny_model)
    assert fallback_onnx(engine) is None
    src = tmp_path / "src" / "model.onnx"
    src.parent.mkdir()
    src.write_bytes(tiny_model.read_bytes())
    write_sidecar(engine, meta_factory(), {**SIDECAR, "onnx": "src/model.onnx"})
    assert fallback_onnx(engine) == src


def test_without_tensorrt_the_backend_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt → ImportError, installed or not
    assert not tensorrt_available()
    with pytest.raises(BackendUnavailable) as info:
        TrtBackend(tmp_path / "m.engine")
    msg = str(info.value)
    assert "TensorRT is not installed" in msg and "backend='ort'" in msg


def test_tensorrt_installed_but_gpu_unusable_is_warned_not_silent(monkeypatch):
    """TensorRT 11 / cuda-python 13 on a CUDA-12 driver: backend='auto' falls back, but says why and what to do."""
    install_cudart(monkeypatch, FakeCudart(error=cudaError_t.cudaErrorInsufficientDriver))
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt("11.4.0.106"))
    with pytest.warns(RuntimeWarning, match=r"cudaErrorInsufficientDriver.*cuda-python<13"):
        assert not tensorrt_available()


# ------------------------------------------------------------------------------------- built and run on fakes
BATCHES = [1, 8, 3, 8, 1, 32, 5]  # sizes change back and forth, as a camera station's do


def build_engine_with(trt, onnx_path, engine, meta, device_name: str, cc: tuple[int, int], **extra):
    """Build through export.tensorrt_build (the production path) and write the sidecar build_engine writes."""
    from export.tensorrt_build import build_serialized_engine

    profile = {"input": "images", "min": [1, 3, 32, 32], "opt": [8, 3, 32, 32], "max": [16, 3, 32, 32]}
    blob = build_serialized_engine(trt, onnx_path, profile, 1 << 28, engine.parent / "timing.cache")
    engine.write_bytes(blob)
    write_sidecar(engine, meta, {"tensorrt_version": trt.__version__, "gpu_name": device_name,
                                 "compute_capability": f"{cc[0]}.{cc[1]}", "precision": "fp32",
                                 "onnx": str(onnx_path), "engine_sha256": hashlib.sha256(blob).hexdigest(), **extra})
    return engine


def compare_with_onnxruntime(engine, onnx_path, cuda_graphs: bool) -> None:
    from runtime.classifier import Classifier

    rng = np.random.default_rng(3)
    ref = Classifier(onnx_path, backend="ort")
    with Classifier(engine, backend="trt", cuda_graphs=cuda_graphs) as gpu:
        assert gpu.backend.name == "tensorrt"
        for n in BATCHES:
            images = [rng.integers(0, 256, (40, 40), dtype=np.uint8) for _ in range(n)]
            for a, b in zip(gpu.predict_batch(images), ref.predict_batch(images)):
                np.testing.assert_allclose(a.probs, b.probs, atol=1e-4)


@pytest.mark.parametrize("version", ["10.3.0.30", "11.4.0.106"])
@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_engine_built_and_run_on_fake_tensorrt_matches_onnxruntime(tmp_path, tiny_model, meta_factory, monkeypatch,
                                                                   version, cuda_graphs):
    """The real cuda_buffers on a fake cuda-python, TrtBackend on a fake TensorRT that runs the ONNX: what the GPU
    test below does, over batch sizes that change back and forth (a replayed graph must not see another size)."""
    cudart = install_cudart(monkeypatch, FakeCudart())
    trt = fake_tensorrt(version, cudart)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    engine = build_engine_with(trt, tiny_model, tmp_path / "tiny.engine", meta_factory(), "Orin", (8, 7))
    compare_with_onnxruntime(engine, tiny_model, cuda_graphs)
    assert not cudart.device and not cudart.host and cudart.live_graphs == 0  # everything freed on close


# ---------------------------------------------------------------------------------------------------- GPU only
# ---------------------------------------------------------------------------------------------------- GPU only
def _gpu_ready() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    from runtime.cuda_buffers import cuda_available

    return cuda_available()


@pytest.mark.gpu
@pytest.mark.skipif(not _gpu_ready(), reason="needs TensorRT and a CUDA GPU")
@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_engine_matches_onnxruntime_on_gpu(tmp_path, tiny_model, meta_factory, cuda_graphs):
    import tensorrt as trt

    from runtime.cuda_buffers import device_properties

    name, cc = device_properties(0)
    engine = build_engine_with(trt, tiny_model, tmp_path / "tiny.engine", meta_factory(), name, cc)
    compare_with_onnxruntime(engine, tiny_model, cuda_graphs)
