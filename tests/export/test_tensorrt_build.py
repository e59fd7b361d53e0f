"""``export.tensorrt_build`` against a stateful fake TensorRT (10.3 and 11.x) and a fake cuda-python.

The fake (tests/fake_gpu.py) validates what the real builder validates: the network must be strongly typed with
each version's flag value, a profile is checked and copied when added, an invalid range raises from ``set_shape``,
a refused or corrupt timing cache leaves ``get_timing_cache()`` returning None, and a cache only helps when it is
attached before the build.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from export import build_engine as be
from export import tensorrt_build as tb

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fake_gpu import FakeCudart, cudaError_t, fake_tensorrt, install_cudart, tiny_onnx, unpack_engine  # noqa: E402

VERSIONS = ["10.3.0.30", "11.4.0.106"]
PROFILE = {"input": "images", "min": [1, 3, 32, 32], "opt": [4, 3, 32, 32], "max": [8, 3, 32, 32]}


@pytest.fixture
def onnx_file(tmp_path: Path) -> Path:
    return tiny_onnx(tmp_path / "tiny.onnx")


@pytest.mark.parametrize("version", VERSIONS)
def test_builds_a_strongly_typed_network_with_each_versions_flag(version: str, onnx_file: Path) -> None:
    trt = fake_tensorrt(version)
    blob = tb.build_serialized_engine(trt, onnx_file, PROFILE, 1 << 28)
    header, _ = unpack_engine(blob)
    assert header["strongly_typed"] and header["onnx_path"] == str(onnx_file)
    assert header["profile"]["images"] == [PROFILE["min"], PROFILE["opt"], PROFILE["max"]]


def test_the_10_3_flag_value_is_not_the_11_value() -> None:
    """10.3: STRONGLY_TYPED = 1 (EXPLICIT_BATCH = 0); 11.x: STRONGLY_TYPED = 0 (NvInfer.h release/10.3 vs main)."""
    assert int(fake_tensorrt("10.3.0").NetworkDefinitionCreationFlag.STRONGLY_TYPED) == 1
    assert int(fake_tensorrt("11.4.0").NetworkDefinitionCreationFlag.STRONGLY_TYPED) == 0
    assert not hasattr(fake_tensorrt("11.4.0").BuilderFlag, "FP16")


@pytest.mark.parametrize("version", VERSIONS)
def test_timing_cache_is_written_and_reused(version: str, onnx_file: Path, tmp_path: Path) -> None:
    trt = fake_tensorrt(version)
    cache = tmp_path / "tc.bin"
    tb.build_serialized_engine(trt, onnx_file, PROFILE, 1 << 28, cache)
    assert cache.read_bytes().startswith(b"TC1")
    builder_runs = []
    orig = trt.Builder

    def spy(logger):
        b = orig(logger)
        builder_runs.append(b)
        return b

    trt.Builder = spy
    tb.build_serialized_engine(trt, onnx_file, PROFILE, 1 << 28, cache)
    assert builder_runs[0].timed_layers == [0]  # every layer's timing came from the cache


def test_a_cache_from_another_device_is_refused_and_the_build_still_writes(onnx_file: Path, tmp_path: Path,
                                                                           caplog: pytest.LogCaptureFixture) -> None:
    cache = tmp_path / "tc.bin"
    tb.build_serialized_engine(fake_tensorrt(device="AGX-Orin-16sm"), onnx_file, PROFILE, 1 << 28, cache)
    trt = fake_tensorrt(device="Orin-Nano-8sm")
    blob = tb.build_serialized_engine(trt, onnx_file, PROFILE, 1 << 28, cache)  # today: None.serialize() raised
    assert unpack_engine(blob) is not None
    assert b"Orin-Nano-8sm" in cache.read_bytes()  # a fresh cache for this device replaced the refused one
    assert "refused" in caplog.text


def test_a_corrupt_cache_file_is_replaced(onnx_file: Path, tmp_path: Path) -> None:
    cache = tmp_path / "tc.bin"
    cache.write_bytes(b"garbage")
    blob = tb.build_serialized_engine(fake_tensorrt(), onnx_file, PROFILE, 1 << 28, cache)
    assert unpack_engine(blob) is not None and cache.read_bytes().startswith(b"TC1")


def test_get_timing_cache_returning_none_after_the_build_keeps_the_engine(onnx_file: Path, tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from fake_gpu import _Config

    monkeypatch.setattr(_Config, "get_timing_cache", lambda self: None)
    blob = tb.build_serialized_engine(fake_tensorrt(), onnx_file, PROFILE, 1 << 28, tmp_path / "tc.bin")
    assert unpack_engine(blob) is not None and not (tmp_path / "tc.bin").exists()


@pytest.mark.parametrize("profile, match", [
    ({**PROFILE, "min": [9, 3, 32, 32]}, r"invalid optimisation profile for input 'images'.*min \[9, 3, 32, 32\]"),
    ({**PROFILE, "input": "pixels"}, r"'pixels'.*network's inputs are \['images'\]"),
    ({**PROFILE, "min": [1, 3, 64, 64], "opt": [4, 3, 64, 64], "max": [8, 3, 64, 64]},
     r"TensorRT refused the optimisation profile"),
])
def test_an_invalid_profile_is_an_engine_build_error(profile: dict, match: str, onnx_file: Path) -> None:
    with pytest.raises(tb.EngineBuildError, match=match):
        tb.build_serialized_engine(fake_tensorrt(), onnx_file, profile, 1 << 28)


def test_parse_failure_reports_parser_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx")
    trt = fake_tensorrt()
    with pytest.raises(tb.EngineBuildError, match=r"(?s)1 error.*cannot read"):
        tb.build_serialized_engine(trt, bad, PROFILE, 1 << 20)
    assert trt.build_log == []


def test_query_gpu_reads_cuda_python_and_names_the_driver_error(monkeypatch: pytest.MonkeyPatch) -> None:
    install_cudart(monkeypatch, FakeCudart(name="Orin", sms=8, memory=7 << 30))
    gpu = tb.query_gpu()
    assert gpu == tb.GpuInfo("Orin", "8.7", 8, 7 << 30)
    install_cudart(monkeypatch, FakeCudart(error=cudaError_t.cudaErrorInsufficientDriver))
    assert tb.query_gpu() is None
    assert "cudaErrorInsufficientDriver" in tb.gpu_problem()


def test_query_gpu_works_with_old_cuda_python(monkeypatch: pytest.MonkeyPatch) -> None:
    """cuda-python < 12.6 has only ``cuda.cudart``: the build must not be skipped for it (the runtime accepts it)."""
    from runtime import cuda_buffers

    fake = FakeCudart()
    monkeypatch.setitem(sys.modules, "cuda.bindings", None)
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", None)
    monkeypatch.setitem(sys.modules, "cuda", types.SimpleNamespace(cudart=fake, __path__=[]))
    monkeypatch.setitem(sys.modules, "cuda.cudart", fake)
    monkeypatch.setattr(cuda_buffers, "_cudart", None)
    assert tb.query_gpu() is not None


def test_timing_cache_key_tells_orin_modules_apart() -> None:
    agx = be.timing_cache_key("10.3.0", "Orin", "8.7", multiprocessors=16, memory_bytes=64 << 30)
    nano = be.timing_cache_key("10.3.0", "Orin", "8.7", multiprocessors=8, memory_bytes=8 << 30)
    assert agx != nano and "/" not in agx
