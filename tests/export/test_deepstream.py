"""``export.deepstream``: every nvinfer value checked against the model's metadata (DeepStream itself cannot run
here). Also home of the small ONNX/engine builders the Triton repository tests share."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from export.deepstream import KEEP_ALL_THRESHOLD, main, normalisation, parse_config, write_config
from runtime.contract import METADATA_KEY, ModelMetadata, write_sidecar

SIZE = 32


def meta(**changes: Any) -> ModelMetadata:
    base: dict[str, Any] = dict(input_size=(SIZE, 48), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                                threshold=1.5, score="energy", temperature=1.3, arch="tiny")
    base.update(changes)
    return ModelMetadata(**base)


def tiny_onnx(path: Path, m: ModelMetadata | None = None, *, batch: Any = "N", score_output: str | None = None) -> Path:
    """GlobalAveragePool → Gemm: (N, C, H, W) → (N, 8) logits, optionally a second (N,) score output."""
    m = m or meta()
    h, w = m.input_size
    nodes = [helper.make_node("GlobalAveragePool", ["images"], ["p"]), helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "W", "B"], ["logits"], transB=1)]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 8])]
    if score_output:
        nodes.append(helper.make_node("ReduceMax", ["logits"], [score_output], keepdims=0, axes=[1]))
        outputs.append(helper.make_tensor_value_info(score_output, TensorProto.FLOAT, [batch]))
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("images", TensorProto.FLOAT,
                                                                            [batch, m.channels, h, w])], outputs,
                              initializer=[numpy_helper.from_array(np.ones((8, m.channels), np.float32), "W"),
                                           numpy_helper.from_array(np.zeros(8, np.float32), "B")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    helper.set_model_props(model, {METADATA_KEY: m.to_json()})
    onnx.save(model, str(path))
    return path


def fake_engine(path: Path, m: ModelMetadata, lo: int = 1, hi: int = 32) -> Path:
    """Engine bytes are opaque to the exporters: a file plus the sidecar build_engine writes."""
    path.write_bytes(b"not a real plan")
    h, w = m.input_size
    write_sidecar(path, m, {"profile": {"input": "images", "min": [lo, 3, h, w], "opt": [hi, 3, h, w],
                                        "max": [hi, 3, h, w]}, "precision": m.precision})
    return path


def test_normalisation_reproduces_the_runtime_preprocessing() -> None:
    m = meta()
    n = normalisation(m.mean, m.std)
    x = np.arange(256, dtype=np.float64)
    for c in range(3):
        ours = (x / 255 - m.mean[c]) / m.std[c]
        theirs = n.net_scale_factor * (x - n.offsets[c])
        rel = np.abs(theirs - ours) / np.maximum(np.abs(ours), 1e-9)
        assert rel.max() <= n.max_relative_error + 1e-9  # the stated error bounds the real one...
    assert 0.01 < n.max_relative_error < 0.012  # ...about ±1 % for ImageNet's std, equal-ripple choice
    exact = normalisation((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert exact.max_relative_error == 0 and exact.net_scale_factor == pytest.approx(1 / (255 * 0.25))
    assert exact.offsets == (127.5, 127.5, 127.5)


def test_onnx_config_values_come_from_the_metadata(tmp_path: Path) -> None:
    m = meta()
    cfg_path = write_config(tiny_onnx(tmp_path / "m.onnx", m), tmp_path / "ds")
    cfg = parse_config(cfg_path.read_text())
    n = normalisation(m.mean, m.std)
    assert cfg["network-type"] == "1" and cfg["process-mode"] == "1" and cfg["gie-unique-id"] == "1"
    assert cfg["onnx-file"] == "m.onnx"
    assert (tmp_path / "ds" / "m.onnx").read_bytes() == (tmp_path / "m.onnx").read_bytes()
    assert "model-engine-file" not in cfg
    assert cfg["network-mode"] == "0"  # fp32
    assert float(cfg["net-scale-factor"]) == pytest.approx(n.net_scale_factor, rel=1e-9)
    assert [float(v) for v in cfg["offsets"].split(";")] == pytest.approx([255 * v for v in m.mean], rel=1e-6)
    assert cfg["model-color-format"] == "0"  # grey replicated into RGB
    assert cfg["infer-dims"] == f"3;{SIZE};48"
    assert cfg["batch-size"] == "1"
    assert cfg["output-blob-names"] == m.output_name
    assert float(cfg["classifier-threshold"]) == KEEP_ALL_THRESHOLD  # energy: not expressible in nvinfer
    assert cfg["output-tensor-meta"] == "1"
    text = cfg_path.read_text()
    assert "NOT applied by nvinfer" in text and "largest relative error 1.104%" in text
    labels = (tmp_path / "ds" / cfg["labelfile-path"]).read_text().strip()
    assert labels.split(";") == list(m.labels)
    assert ModelMetadata.from_dict(json.loads((tmp_path / "ds" / "sem_classifier.json").read_text())) == m


def test_max_logit_threshold_is_nvinfers_own_rule(tmp_path: Path) -> None:
    m = meta(score="max_logit", temperature=1.0, threshold=4.25)
    cfg = parse_config(write_config(tiny_onnx(tmp_path / "m.onnx", m), tmp_path / "ds").read_text())
    assert float(cfg["classifier-threshold"]) == 4.25


@pytest.mark.parametrize(("precision", "mode"), [("fp16", "2"), ("int8", "1"), ("fp32", "0")])
def test_engine_config(tmp_path: Path, precision: str, mode: str) -> None:
    m = meta(precision=precision, channels=1, mean=(0.5,), std=(0.2,))
    cfg = parse_config(write_config(fake_engine(tmp_path / "m.engine", m, 1, 8), tmp_path / "ds").read_text())
    assert cfg["model-engine-file"] == "m.engine" and "onnx-file" not in cfg
    assert cfg["network-mode"] == mode and cfg["batch-size"] == "8"  # the profile's maximum
    assert cfg["model-color-format"] == "2" and cfg["infer-dims"] == f"1;{SIZE};48"
    assert float(cfg["net-scale-factor"]) == pytest.approx(1 / (255 * 0.2)) and cfg["offsets"] == "127.5"
    with pytest.raises(ValueError, match="outside the model's 1..8"):
        write_config(tmp_path / "m.engine", tmp_path / "ds2", batch_size=16)


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--model", str(tiny_onnx(tmp_path / "m.onnx")), "--out", str(tmp_path / "o"), "--batch-size",
                 "4"]) == 0
    assert parse_config((tmp_path / "o" / "config_infer_sem_classifier.txt").read_text())["batch-size"] == "4"
    assert "relative error" in capsys.readouterr().out
    assert main(["--model", str(tmp_path / "missing.onnx"), "--out", str(tmp_path / "o")]) == 2
    assert "model file not found" in capsys.readouterr().err


def test_a_per_frame_percentile_model_is_refused(tmp_path: Path) -> None:
    """nvinfer scales every frame alike, so a model that stretches each frame itself cannot be expressed."""
    model = tiny_onnx(tmp_path / "p.onnx", meta(intensity="percentile"))
    with pytest.raises(ValueError, match="percentile"):
        write_config(model, tmp_path / "ds")
    assert not (tmp_path / "ds" / "config_infer_sem_classifier.txt").exists()
    assert write_config(tiny_onnx(tmp_path / "b.onnx", meta(intensity="bit_depth")), tmp_path / "ds2").is_file()
