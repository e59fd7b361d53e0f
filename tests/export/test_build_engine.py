"""Engine build: TensorRT-free helpers, the TensorRT call sequence against a fake module, and the CLI here."""

from __future__ import annotations

import json
from pathlib import Path
from unittest.mock import MagicMock

import pytest
from tiny_models import tiny_meta, trained_tiny, write_dataset

from export import build_engine as be
from export.onnx_export import export_onnx
from export.tensorrt_build import EngineBuildError, GpuInfo, build_serialized_engine
from runtime.contract import read_sidecar


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


def _fake_trt(parse_ok: bool = True, engine: bytes | None = b"ENGINE") -> MagicMock:
    trt = MagicMock(name="trt")
    trt.__version__ = "10.3.0"
    trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED = 0
    parser = trt.OnnxParser.return_value
    parser.parse_from_file.return_value = parse_ok
    parser.num_errors = 0 if parse_ok else 2
    parser.get_error.side_effect = lambda i: f"node {i}: unsupported op"
    builder = trt.Builder.return_value
    builder.build_serialized_network.return_value = engine
    config = builder.create_builder_config.return_value
    config.get_timing_cache.return_value.serialize.return_value = b"CACHE"
    return trt


def test_tensorrt_call_sequence_with_fake_module(tmp_path: Path) -> None:
    trt = _fake_trt()
    cache = tmp_path / "tc.bin"
    cache.write_bytes(b"OLD")
    prof = {"input": "images", "min": [1, 3, 32, 32], "opt": [8, 3, 32, 32], "max": [32, 3, 32, 32]}
    blob = build_serialized_engine(trt, tmp_path / "m.onnx", prof, 1 << 30, cache)
    assert blob == b"ENGINE"
    builder = trt.Builder.return_value
    builder.create_network.assert_called_once_with(1 << 0)  # STRONGLY_TYPED
    trt.OnnxParser.return_value.parse_from_file.assert_called_once_with(str(tmp_path / "m.onnx"))
    config = builder.create_builder_config.return_value
    config.set_memory_pool_limit.assert_called_once_with(trt.MemoryPoolType.WORKSPACE, 1 << 30)
    builder.create_optimization_profile.return_value.set_shape.assert_called_once_with(
        "images", (1, 3, 32, 32), (8, 3, 32, 32), (32, 3, 32, 32))
    config.add_optimization_profile.assert_called_once()
    config.create_timing_cache.assert_called_once_with(b"OLD")
    config.set_timing_cache.assert_called_once_with(config.create_timing_cache.return_value, False)
    builder.build_serialized_network.assert_called_once_with(builder.create_network.return_value, config)
    assert cache.read_bytes() == b"CACHE"
    names = {c[0] for c in builder.method_calls}
    assert not any("fp16" in n.lower() or "int8" in n.lower() for n in names)  # no BuilderFlag precision in 11.x
    assert not config.set_flag.called


def test_parse_failure_reports_parser_errors(tmp_path: Path) -> None:
    trt = _fake_trt(parse_ok=False)
    prof = {"input": "images", "min": [1, 3, 8, 8], "opt": [1, 3, 8, 8], "max": [1, 3, 8, 8]}
    with pytest.raises(EngineBuildError, match=r"(?s)2 error.*node 0: unsupported op.*node 1"):
        build_serialized_engine(trt, tmp_path / "m.onnx", prof, 1 << 20)
    trt.Builder.return_value.build_serialized_network.assert_not_called()
    with pytest.raises(EngineBuildError, match="failed to build"):
        build_serialized_engine(_fake_trt(engine=None), tmp_path / "m.onnx", prof, 1 << 20)


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("eng")
    return export_onnx(trained_tiny(), tiny_meta(), d / "tiny.onnx")


def test_engine_and_sidecar_written_with_fake_tensorrt(tiny_onnx: Path, tmp_path: Path) -> None:
    trt = _fake_trt()
    engine = tmp_path / "tiny.fp16.engine"
    meta = be.read_onnx_metadata(tiny_onnx)
    be.build_tensorrt_engine(trt, GpuInfo("Orin", "8.7"), tiny_onnx, engine, meta, "fp16", (1, 4, 8), 1.0, "CMD")
    assert engine.read_bytes() == b"ENGINE"
    smeta, extra = read_sidecar(engine)
    assert smeta.precision == "fp16" and extra["model_sha256"] == be.sha256_file(tiny_onnx)
    assert extra["tensorrt_version"] == "10.3.0" and extra["gpu_name"] == "Orin"
    assert extra["profile"]["max"] == [8, 3, 32, 32] and extra["build_command"] == "CMD"
    assert list(tmp_path.glob("timing-cache-trt10.3.0-orin-sm87.bin"))


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


def test_fake_module_names_are_trt_attributes() -> None:
    # The names build_serialized_engine touches, spelled as in the real bindings (checked by tests/trt_api_check).
    src = Path(be.__file__).with_name("tensorrt_build.py").read_text()
    for name in ("trt.Builder", "trt.OnnxParser", "trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED",
                 "trt.MemoryPoolType.WORKSPACE", "trt.Logger"):
        assert name in src
    assert "trt.BuilderFlag" not in src and "int8_calibrator" not in src
