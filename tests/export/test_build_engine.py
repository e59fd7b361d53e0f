"""Engine build: TensorRT-free helpers, the TensorRT call sequence against a fake module, and the CLI here."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import onnx
import pytest
from tiny_models import tiny_meta, trained_tiny, write_dataset

from export import build_engine as be
from export.onnx_export import export_onnx
from export.tensorrt_build import GpuInfo, build_serialized_engine
from runtime.contract import read_sidecar
from runtime.files import sha256_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fake_gpu import FakeCudart, cudaError_t, fake_tensorrt, install_cudart, unpack_engine  # noqa: E402
from fake_gpu import tiny_onnx as write_tiny_onnx  # noqa: E402


def test_parse_batches() -> None:
    assert be.parse_batches("1,8,32") == (1, 8, 32)
    assert be.parse_batches("8") == (8, 8, 8)
    assert be.parse_batches("32,1") == (1, 32, 32)
    for bad in ("", "0,4", "a,b"):
        with pytest.raises(ValueError, match="--batch"):
            be.parse_batches(bad)


def test_profile_and_sidecar_fields() -> None:
    prof = be.profile_shapes(tiny_meta(32), (1, 8, 32))
    assert prof == {"input": "images", "min": [1, 3, 32, 32], "opt": [8, 3, 32, 32], "max": [32, 3, 32, 32]}
    extra = be.sidecar_extra("ab", "10.3.0", "Orin", "8.7", "int8", prof, "cmd")
    assert set(extra) == set(be.SIDECAR_KEYS)
    assert extra["compute_capability"] == "8.7" and extra["precision"] == "int8"
    with pytest.raises(ValueError):
        be.sidecar_extra("ab", "10.3.0", "Orin", "8.7", "fp32", prof, "cmd")


def test_timing_cache_key_differs_per_gpu_and_version(tmp_path: Path) -> None:
    a = be.timing_cache_key("10.3.0", "Orin", "8.7")
    assert a != be.timing_cache_key("11.4.0", "Orin", "8.7")
    assert a != be.timing_cache_key("10.3.0", "NVIDIA H100 80GB HBM3", "9.0")
    assert "/" not in be.timing_cache_key("10.3", "A/B weird name", "8.6")
    assert be.timing_cache_path(tmp_path, a).parent == tmp_path


def test_build_command_round_trips_through_the_parser() -> None:
    cmd = be.build_command("m dir/x.onnx", "int8", (1, 8, 32), "out", "data")
    import shlex

    argv = shlex.split(cmd)[3:]
    args = be.build_parser().parse_args(argv)
    assert args.onnx == "m dir/x.onnx" and args.int8 and args.batch == "1,8,32" and args.calib_data == "data"


@pytest.mark.parametrize("version", ["10.3.0.30", "11.4.0.106"])
def test_tensorrt_build_uses_no_precision_flags_and_a_strongly_typed_network(version: str, tmp_path: Path) -> None:
    """11.x has no BuilderFlag.FP16/INT8 (the fake has none either): the build must not touch them."""
    trt = fake_tensorrt(version)
    prof = {"input": "images", "min": [1, 3, 32, 32], "opt": [8, 3, 32, 32], "max": [32, 3, 32, 32]}
    header, _ = unpack_engine(build_serialized_engine(trt, write_tiny_onnx(tmp_path / "m.onnx"), prof, 1 << 30))
    assert header["strongly_typed"] and not header["version_compatible"]


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("eng")
    return export_onnx(trained_tiny(), tiny_meta(), d / "tiny.onnx")


def test_engine_and_sidecar_written_with_fake_tensorrt(tiny_onnx: Path, tmp_path: Path) -> None:
    trt = fake_tensorrt("10.3.0")
    engine = tmp_path / "tiny.fp16.engine"
    meta = be.read_onnx_metadata(tiny_onnx)
    gpu = GpuInfo("Orin", "8.7", 8, 8 << 30)
    be.build_tensorrt_engine(trt, gpu, tiny_onnx, engine, meta, "fp16", (1, 4, 8), 1.0, "CMD")
    assert unpack_engine(engine.read_bytes())[0]["onnx_path"] == str(tiny_onnx)
    smeta, extra = read_sidecar(engine)
    assert smeta.precision == "fp16" and extra["model_sha256"] == sha256_file(tiny_onnx)
    assert extra["tensorrt_version"] == "10.3.0" and extra["gpu_name"] == "Orin"
    assert extra["profile"]["max"] == [8, 3, 32, 32] and extra["build_command"] == "CMD"
    assert extra["engine_sha256"] == hashlib.sha256(engine.read_bytes()).hexdigest()  # the corrupt-copy check
    assert list(tmp_path.glob("timing-cache-trt10.3.0-orin-sm87-8sms-8gib.bin"))


def test_cli_without_tensorrt(tiny_onnx: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                              capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("export.tensorrt_build.import_tensorrt", lambda: None)
    assert be.main(["--onnx", str(tiny_onnx), "--fp16", "--require-tensorrt", "--out", str(tmp_path)]) == 3
    assert "TensorRT is not installed" in capsys.readouterr().err
    data = write_dataset(tmp_path / "data", per_class=3, size=36)
    rc = be.main(["--onnx", str(tiny_onnx), "--int8", "--calib-data", str(data), "--val-data", str(data / "val"),
                  "--out", str(tmp_path / "out"), "--allow-drop", "--calib-method", "minmax"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "TensorRT is not installed: building the CPU/ONNX artifacts only" in out and "accuracy gate" in out
    for name in ("tiny.int8.qdq.onnx", "tiny.int8.cpu.onnx", "tiny.int8.build-report.json"):
        assert (tmp_path / "out" / name).is_file()
    meta = be.read_onnx_metadata(tmp_path / "out" / "tiny.int8.cpu.onnx")
    assert meta.precision == "int8" and "accuracy_gate" in meta.extra and meta.extra["calibration"]["images"] == 24
    report = json.loads((tmp_path / "out" / "tiny.int8.build-report.json").read_text())
    assert set(report["gate"]) == {"int8-cpu", "int8-trt"}


def test_gate_failure_exits_nonzero(tiny_onnx: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("export.tensorrt_build.import_tensorrt", lambda: None)
    data = write_dataset(tmp_path / "data", per_class=2, size=36)
    # A negative limit cannot be met: the gate must fail and say so unless --allow-drop.
    rc = be.main(["--onnx", str(tiny_onnx), "--fp16", "--val-data", str(data / "val"), "--out", str(tmp_path),
                  "--max-drop", "-1"])
    assert rc == be.EXIT_GATE_FAILED


def test_build_artifacts_is_a_library_call(tiny_onnx: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """What main runs, called with options: the report says what was written, judged and rejected."""
    monkeypatch.setattr("export.tensorrt_build.import_tensorrt", lambda: None)
    data = write_dataset(tmp_path / "data", per_class=2, size=36)
    opts = be.BuildOptions(tiny_onnx, "fp16", val_data=str(data / "val"), out=str(tmp_path / "a"), max_drop=-1,
                           keep_rejected=True)
    rep = be.build_artifacts(opts)
    fp16 = tmp_path / "a" / "tiny.fp16.onnx"
    assert rep.exit_code == be.EXIT_GATE_FAILED and rep.gate_failed and rep.rejected == {fp16}
    assert rep.written == [be.rejected_path(fp16), tmp_path / "a" / "tiny.fp16.build-report.json"]
    assert rep.document["gate"]["fp16"]["passed"] is False and rep.engine is None
    assert be.build_artifacts(be.BuildOptions(tiny_onnx, "fp16", out=str(tmp_path / "b"))).exit_code == be.EXIT_OK
    with pytest.raises(be.BuildFailed, match="no such ONNX file") as e:
        be.build_artifacts(be.BuildOptions(tmp_path / "missing.onnx"))
    assert e.value.exit_code == be.EXIT_BAD_INPUT
    with pytest.raises(be.BuildFailed, match="--require-tensorrt") as e:
        be.build_artifacts(be.BuildOptions(tiny_onnx, require_tensorrt=True, out=str(tmp_path / "c")))
    assert e.value.exit_code == be.EXIT_NO_TENSORRT


# ---------------------------------------------------------------------------- main() on its TensorRT branch (fakes)
@pytest.fixture
def fake_gpu_build(monkeypatch: pytest.MonkeyPatch):
    """A fake TensorRT 10.3 that build_engine imports, and a fake cuda-python that its GPU query reads."""
    cudart = install_cudart(monkeypatch, FakeCudart(name="Orin", sms=8, memory=8 << 30))
    trt = fake_tensorrt("10.3.0.30", cudart)
    monkeypatch.setattr("export.tensorrt_build.import_tensorrt", lambda: trt)
    return trt


def test_cli_int8_builds_the_engine_from_the_qdq_file(tiny_onnx: Path, tmp_path: Path, fake_gpu_build) -> None:
    data = write_dataset(tmp_path / "data", per_class=2, size=36)
    out = tmp_path / "out"
    rc = be.main(["--onnx", str(tiny_onnx), "--int8", "--calib-data", str(data), "--out", str(out),
                  "--calib-method", "minmax", "--batch", "1,4,8"])
    assert rc == 0
    engine = out / "tiny.int8.engine"
    header, _ = unpack_engine(engine.read_bytes())
    assert header["onnx_path"] == str(out / "tiny.int8.qdq.onnx")  # not the CPU INT8 file
    from test_tensorrt_build_fp16 import assert_fp16_outside_qdq

    assert_fp16_outside_qdq(onnx.load(str(out / "tiny.int8.qdq.onnx")))  # non-quantised layers run in FP16
    meta, extra = read_sidecar(engine)
    assert meta.precision == "int8" and extra["precision"] == "int8" and extra["onnx"] == "tiny.int8.qdq.onnx"
    assert extra["model_sha256"] == sha256_file(out / "tiny.int8.qdq.onnx")
    assert extra["engine_sha256"] == hashlib.sha256(engine.read_bytes()).hexdigest()
    assert extra["profile"]["min"][0] == 1 and extra["profile"]["max"][0] == 8
    report = json.loads((out / "tiny.int8.build-report.json").read_text())
    assert str(engine) in report["artifacts"]


def test_cli_fp16_builds_the_engine_from_the_fp16_file(tiny_onnx: Path, tmp_path: Path, fake_gpu_build) -> None:
    assert be.main(["--onnx", str(tiny_onnx), "--fp16", "--out", str(tmp_path)]) == 0
    header, _ = unpack_engine((tmp_path / "tiny.fp16.engine").read_bytes())
    assert header["onnx_path"] == str(tmp_path / "tiny.fp16.onnx")


def test_cli_fails_when_tensorrt_is_installed_but_the_gpu_cannot_be_used(
        tiny_onnx: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """TensorRT 11 / cuda-python 13 on a CUDA-12 driver: the build must fail naming the error, not exit 0."""
    install_cudart(monkeypatch, FakeCudart(error=cudaError_t.cudaErrorInsufficientDriver))
    monkeypatch.setattr("export.tensorrt_build.import_tensorrt", lambda: fake_tensorrt("11.4.0.106"))
    rc = be.main(["--onnx", str(tiny_onnx), "--fp16", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == be.EXIT_NO_TENSORRT
    assert "cudaErrorInsufficientDriver" in err and "cuda-python<13" in err
    assert not (tmp_path / "tiny.fp16.engine").exists()


def test_cli_engine_build_error_is_a_clear_message(tiny_onnx: Path, tmp_path: Path, fake_gpu_build,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    rc = be.main(["--onnx", str(tiny_onnx), "--fp16", "--out", str(tmp_path), "--batch", "0,4"])
    assert rc == 2 and "--batch" in capsys.readouterr().err
    from fake_gpu import _Config

    orig = _Config.add_optimization_profile
    try:
        _Config.add_optimization_profile = lambda self, p: -1
        rc = be.main(["--onnx", str(tiny_onnx), "--fp16", "--out", str(tmp_path)])
    finally:
        _Config.add_optimization_profile = orig
    assert rc == 1 and "refused the optimisation profile" in capsys.readouterr().err
