"""``export.triton``: the repository's config.pbtxt parsed with Triton's own schema (``model_config_pb2``).

Stock Triton with the ONNX Runtime or TensorRT backend cannot run here (PyTriton's server has only the Python
backend); what is checked is that Triton's parser accepts the config and every value matches the artifact.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from export.triton import main, write_repository
from runtime.contract import METADATA_KEY, ModelMetadata

if os.environ.get("SEM_SERVE_REQUIRED") == "1":
    import tritonclient.grpc.model_config_pb2 as mc
else:
    mc = pytest.importorskip("tritonclient.grpc.model_config_pb2",
                             reason="tritonclient is not installed here; runs in the serve venv (.ci/run)")
from google.protobuf import text_format  # noqa: E402
from test_deepstream import fake_engine, meta, tiny_onnx  # noqa: E402


def parse(folder: Path) -> mc.ModelConfig:
    return text_format.Parse((folder / "config.pbtxt").read_text(), mc.ModelConfig())


def test_onnx_repository(tmp_path: Path) -> None:
    m = meta()
    src = tiny_onnx(tmp_path / "m.onnx", m)
    folder = write_repository(src, tmp_path / "repo", "line3", max_batch=12, queue_delay_us=500, instances=2,
                              kind="KIND_CPU")
    cfg = parse(folder)
    assert folder == tmp_path / "repo" / "line3" and cfg.name == "line3"
    assert cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 12
    (inp,) = cfg.input
    assert inp.name == "images" and inp.data_type == mc.TYPE_FP32 and list(inp.dims) == [3, *m.input_size]
    assert inp.format == mc.ModelInput.FORMAT_NCHW
    (out,) = cfg.output
    assert out.name == m.output_name and list(out.dims) == [8] and out.label_filename == "labels.txt"
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 500
    assert list(cfg.dynamic_batching.preferred_batch_size) == [6, 12]
    assert [(g.count, g.kind) for g in cfg.instance_group] == [(2, mc.ModelInstanceGroup.KIND_CPU)]
    assert ModelMetadata.from_json(cfg.parameters[METADATA_KEY].string_value) == m
    assert (folder / "labels.txt").read_text().splitlines() == list(m.labels)
    assert (folder / "1" / "model.onnx").read_bytes() == src.read_bytes()
    assert ModelMetadata.from_dict(json.loads((folder / "line3.json").read_text())) == m


def test_score_output_and_fixed_batch(tmp_path: Path) -> None:
    m = meta(score="mahalanobis", score_output="feature_score")
    cfg = parse(write_repository(tiny_onnx(tmp_path / "s.onnx", m, score_output="feature_score"), tmp_path / "r1"))
    assert [(o.name, list(o.dims)) for o in cfg.output] == [("logits", [8]), ("feature_score", [1])]
    assert cfg.output[1].HasField("reshape") and list(cfg.output[1].reshape.shape) == []
    cfg = parse(write_repository(tiny_onnx(tmp_path / "f.onnx", batch=1), tmp_path / "r2"))
    assert cfg.max_batch_size == 0 and not cfg.HasField("dynamic_batching")
    assert list(cfg.input[0].dims) == [1, 3, 32, 48] and list(cfg.output[0].dims) == [1, 8]


def test_engine_repository_uses_the_profile(tmp_path: Path) -> None:
    m = meta(precision="fp16")
    folder = write_repository(fake_engine(tmp_path / "m.engine", m, 1, 32), tmp_path / "repo", max_batch=4)
    cfg = parse(folder)
    assert cfg.platform == "tensorrt_plan" and cfg.max_batch_size == 32  # the engine's profile, not --max-batch
    assert [(g.count, g.kind) for g in cfg.instance_group] == [(1, mc.ModelInstanceGroup.KIND_GPU)]
    assert (folder / "1" / "model.plan").read_bytes() == b"not a real plan"
    with pytest.raises(ValueError, match="profile starting at 1"):
        write_repository(fake_engine(tmp_path / "b.engine", m, 8, 32), tmp_path / "repo2")


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--model", str(tiny_onnx(tmp_path / "m.onnx")), "--out", str(tmp_path / "repo")]) == 0
    assert "tritonserver --model-repository" in capsys.readouterr().out
    assert parse(tmp_path / "repo" / "sem_classifier").max_batch_size == 16
    assert main(["--model", str(tmp_path / "nope.onnx"), "--out", str(tmp_path / "repo")]) == 2
