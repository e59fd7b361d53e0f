"""The engine sidecar written by export is what the runtime's TensorRT loader reads (they never import each other)."""

from __future__ import annotations

import shlex

import pytest

from export.build_engine import build_command, build_parser, sidecar_extra
from runtime.contract import ModelMetadata, read_sidecar, write_sidecar
from runtime.errors import MetadataError
from runtime.trt_backend import check_engine_compat, rebuild_command


def _engine_with_sidecar(tmp_path, onnx_bytes=b"onnx v1"):
    import hashlib

    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(onnx_bytes)
    engine = tmp_path / "model.int8.engine"
    engine.write_bytes(b"engine")
    cmd = build_command(onnx, "int8", (1, 8, 32), tmp_path)
    profile = {"input": "images", "min": [1, 3, 224, 224], "opt": [8, 3, 224, 224], "max": [32, 3, 224, 224]}
    extra = sidecar_extra(hashlib.sha256(onnx_bytes).hexdigest(), "10.3.0", "Orin", "8.7", "int8", profile, cmd,
                          "model.onnx")
    write_sidecar(engine, ModelMetadata(precision="int8"), extra)
    return onnx, engine


def test_runtime_accepts_a_matching_sidecar_and_rejects_a_stale_one(tmp_path):
    onnx, engine = _engine_with_sidecar(tmp_path)
    _, side = read_sidecar(engine)
    kw = dict(trt_version="10.3.0", gpu_name="Orin", compute_capability=(8, 7))
    check_engine_compat(engine, side, **kw)
    with pytest.raises(MetadataError, match="TensorRT"):
        check_engine_compat(engine, side, trt_version="11.4.0", gpu_name="Orin", compute_capability=(8, 7))
    onnx.write_bytes(b"onnx v2: retrained")
    with pytest.raises(MetadataError, match="stale") as e:
        check_engine_compat(engine, side, **kw)
    # The rebuild command the runtime prints is one the exporter's CLI accepts.
    cmd = str(e.value).split("Rebuild it on this machine: ")[1].rstrip(".")
    args = build_parser().parse_args(shlex.split(cmd)[3:])
    assert args.int8 and str(args.onnx).endswith("model.onnx")


def test_rebuild_command_without_recorded_command_parses(tmp_path):
    cmd = rebuild_command(tmp_path / "m.fp16.engine", {"onnx": "m.onnx", "precision": "fp16"})
    args = build_parser().parse_args(shlex.split(cmd)[3:])
    assert args.fp16 and str(args.onnx) == "m.onnx"
