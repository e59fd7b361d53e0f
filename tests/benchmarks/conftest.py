"""Fixtures for the benchmark tests: a tiny ONNX classifier built with onnx.helper (milliseconds to run)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from runtime.contract import METADATA_KEY, ModelMetadata

TINY_SIZE = 32
#: Conv 3→8, 3×3, stride 1, pad 1 on 32×32: 8·32·32 outputs × 27 MACs; Gemm 8→8: 64 MACs.
TINY_MACS = 8 * 32 * 32 * 27 + 8 * 8


def write_tiny_onnx(path: Path, precision: str = "fp32", seed: int = 0, threshold: float | None = 0.2) -> Path:
    """images (N,3,32,32) → Conv(3→8) → Relu → GlobalAveragePool → Flatten → Gemm(8→8) → logits, with metadata."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.5, (8, 3, 3, 3)).astype(np.float32), "w_conv"),
        numpy_helper.from_array(rng.normal(0, 0.1, (8,)).astype(np.float32), "b_conv"),
        numpy_helper.from_array(rng.normal(0, 1.0, (8, 8)).astype(np.float32), "w_fc"),
        numpy_helper.from_array(np.zeros(8, np.float32), "b_fc"),
    ]
    nodes = [
        helper.make_node("Conv", ["images", "w_conv", "b_conv"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "w_fc", "b_fc"], ["logits"], transB=1, name="fc"),
    ]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, TINY_SIZE, TINY_SIZE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    meta = ModelMetadata(input_size=(TINY_SIZE, TINY_SIZE), precision=precision, threshold=threshold)
    helper.set_model_props(model, {METADATA_KEY: meta.to_json()})
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tiny.onnx`` (fp32) and ``tiny.int8.onnx`` (the same graph, labelled int8) in one folder; returns the fp32.

    The "int8" file is not quantised: these tests check the benchmark machinery (artifact lookup, schema, ratios),
    not what quantisation does to speed.
    """
    d = tmp_path_factory.mktemp("models")
    fp32 = write_tiny_onnx(d / "tiny.onnx")
    write_tiny_onnx(d / "tiny.int8.onnx", precision="int8")
    return fp32
