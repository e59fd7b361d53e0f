"""train.refit_quality: an exported model gets a fitted gate and a compatible intensity mode, weights untouched."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from runtime.contract import METADATA_KEY, ModelMetadata
from train.refit_quality import main, refit


def _model(path: Path, meta: ModelMetadata) -> Path:
    w = numpy_helper.from_array(np.ones((8, 3), np.float32), "W")
    b = numpy_helper.from_array(np.zeros(8, np.float32), "B")
    nodes = [helper.make_node("GlobalAveragePool", ["images"], ["p"]), helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "W", "B"], ["logits"], transB=1)]
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, 32, 32])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 8])], [w, b])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    helper.set_model_props(m, {METADATA_KEY: meta.to_json()})
    onnx.save(m, str(path))
    return path


def test_refit_writes_limits_and_keeps_the_weights(tmp_path: Path, make_class_dataset: Callable[..., Path]):
    data = make_class_dataset(tmp_path / "d", per_class=3, size=40, splits=())
    src = _model(tmp_path / "m.onnx", ModelMetadata(input_size=(32, 32)))
    out = tmp_path / "m2.onnx"
    meta = refit(src, data, out, "bit_depth")
    assert meta.intensity == "bit_depth" and meta.quality["n_images"] == 24
    back = onnx.load(str(out))
    got = ModelMetadata.from_props({p.key: p.value for p in back.metadata_props})
    assert got == meta
    assert back.graph.initializer[0].raw_data == onnx.load(str(src)).graph.initializer[0].raw_data
    lo = got.quality["limits"]["range"]["spread"][0]
    assert lo > 0  # dim frames are out of range for a model that sees absolute intensities


def test_refit_refuses_a_change_the_network_would_see(tmp_path: Path, make_class_dataset: Callable[..., Path]):
    data = make_class_dataset(tmp_path / "d", per_class=3, size=40, splits=())
    src = _model(tmp_path / "m.onnx", ModelMetadata(input_size=(32, 32), intensity="percentile"))
    with pytest.raises(ValueError, match="fine-tune"):
        refit(src, data, tmp_path / "x.onnx", "bit_depth")
    assert main(["--model", str(src), "--data", str(data), "--out", str(tmp_path / "y.onnx"),
                 "--intensity", "full_scale"]) == 2
    assert main(["--model", str(src), "--data", str(data), "--out", str(tmp_path / "z.onnx")]) == 0
