"""FP16 graphs for strongly typed TensorRT: the FP16 conversion keeps the graph valid when outputs feed other nodes
(a score head reading ``logits``), keeps the score head in FP32 (distances overflow FP16), and turns a Q/DQ INT8
graph into one whose non-quantised layers are FP16 (opset 19, FP16 scales) — TensorRT takes each tensor's type
from the file, so FP32 scales would make every layer outside the Q/DQ pairs run in FP32.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from export.onnx_export import convert_to_fp16

F32, F16 = TensorProto.FLOAT, TensorProto.FLOAT16
QDQ = ("QuantizeLinear", "DequantizeLinear")


def run(model: onnx.ModelProto, x: np.ndarray) -> dict[str, np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"images": x})))


def scored_model(scale: float = 1.0) -> onnx.ModelProto:
    """images → GAP → feats (N, 3); logits = Gemm(feats); score = logsumexp(logits) - sum((feats·W - m)²).

    The score head reads the graph output ``logits`` (as ViM does) and, with ``scale`` large, its squared distances
    exceed FP16's 65504 (as unscaled Mahalanobis distances can)."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 3)).astype(np.float32)
    whiten = (rng.standard_normal((3, 3)) * scale).astype(np.float32)
    nodes = [
        helper.make_node("GlobalAveragePool", ["images"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["feats"], axis=1),
        helper.make_node("Gemm", ["feats", "W", "B"], ["logits"], transB=1),
        helper.make_node("ReduceLogSumExp", ["logits"], ["energy"], keepdims=0, axes=[1]),
        helper.make_node("MatMul", ["feats", "whiten"], ["z"]),
        helper.make_node("Sub", ["z", "mean"], ["d"]),
        helper.make_node("Mul", ["d", "d"], ["d2"]),
        helper.make_node("ReduceSum", ["d2", "axes"], ["dist"], keepdims=0),
        helper.make_node("Sub", ["energy", "dist"], ["score"]),
    ]
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.zeros(8, np.float32), "B"),
             numpy_helper.from_array(whiten, "whiten"), numpy_helper.from_array(np.full(3, -2, np.float32), "mean"),
             numpy_helper.from_array(np.array([1], np.int64), "axes")]
    graph = helper.make_graph(nodes, "scored", [helper.make_tensor_value_info("images", F32, ["N", 3, 4, 4])],
                              [helper.make_tensor_value_info("logits", F32, ["N", 8]),
                               helper.make_tensor_value_info("score", F32, ["N"])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def test_an_output_read_inside_the_graph_stays_valid_after_fp16_conversion() -> None:
    model = scored_model()
    fp16 = convert_to_fp16(model)  # today: the score head read the FP32 cast appended after it (checker error)
    onnx.checker.check_model(fp16, full_check=True)
    x = np.random.default_rng(1).random((2, 3, 4, 4), dtype=np.float32)
    ref, got = run(model, x), run(fp16, x)
    np.testing.assert_allclose(got["logits"], ref["logits"], atol=2e-2)
    np.testing.assert_allclose(got["score"], ref["score"], rtol=1e-2, atol=2e-2)


def test_the_score_head_stays_fp32_so_large_distances_do_not_overflow() -> None:
    model = scored_model(scale=300.0)
    x = np.random.default_rng(2).random((3, 3, 4, 4), dtype=np.float32) * 4
    ref = run(model, x)
    assert np.abs(ref["score"]).max() > 65504  # beyond FP16
    fp16 = convert_to_fp16(model, keep_fp32_outputs=("score",))
    got = run(fp16, x)
    assert np.isfinite(got["score"]).all()
    np.testing.assert_allclose(got["score"], ref["score"], rtol=1e-2)
    types = tensor_types(fp16)
    assert types["dist"] == F32 and types["feats"] == F16  # the backbone is FP16, the head FP32


def tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    g = inferred.graph
    types = {vi.name: vi.type.tensor_type.elem_type for vi in [*g.value_info, *g.input, *g.output]}
    types.update({t.name: t.data_type for t in g.initializer})
    return types


def qdq_model() -> onnx.ModelProto:
    """A Q/DQ INT8 graph as calibration.quantize writes it (opset 17, FP32 scales): conv + residual + head."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((3, 3, 3, 3)).astype(np.float32) * 0.3
    ws = (np.abs(w).reshape(3, -1).max(1) / 127).astype(np.float32)
    wq = np.clip(np.round(w / ws[:, None, None, None]), -127, 127).astype(np.int8)
    nodes = [
        helper.make_node("QuantizeLinear", ["images", "s_in", "zp"], ["q_in"]),
        helper.make_node("DequantizeLinear", ["q_in", "s_in", "zp"], ["dq_in"]),
        helper.make_node("DequantizeLinear", ["wq", "ws", "wzp"], ["w_dq"], axis=0),
        helper.make_node("Conv", ["dq_in", "w_dq", "cb"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["act"]),
        helper.make_node("QuantizeLinear", ["images", "s_in", "zp"], ["q_skip"], name="skip_Q"),
        helper.make_node("DequantizeLinear", ["q_skip", "s_in", "zp"], ["dq_skip"], name="skip_DQ"),
        helper.make_node("Add", ["act", "dq_skip"], ["res"]),
        helper.make_node("GlobalAveragePool", ["res"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "W", "B"], ["logits"], transB=1),
    ]
    inits = [numpy_helper.from_array(np.array(1 / 127, np.float32), "s_in"),
             numpy_helper.from_array(np.array(0, np.int8), "zp"), numpy_helper.from_array(wq, "wq"),
             numpy_helper.from_array(ws, "ws"), numpy_helper.from_array(np.zeros(3, np.int8), "wzp"),
             numpy_helper.from_array(np.zeros(3, np.float32), "cb"),
             numpy_helper.from_array(rng.standard_normal((8, 3)).astype(np.float32), "W"),
             numpy_helper.from_array(np.zeros(8, np.float32), "B")]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("images", F32, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", F32, ["N", 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def assert_fp16_outside_qdq(model: onnx.ModelProto) -> None:
    """Strongly typed INT8: every float tensor a compute layer touches is FP16; only the input/output casts see
    FP32 (what TensorRT would run each layer in, read statically from the file)."""
    types = tensor_types(model)
    io = {i.name for i in model.graph.input} | {o.name for o in model.graph.output}
    for node in model.graph.node:
        if node.op_type == "Cast" and (set(node.input) & io or set(node.output) & io):
            continue
        for name in [*node.input, *node.output]:
            if name and types.get(name) in (F32, F16):
                assert types[name] == F16, f"{node.op_type} {node.name or node.output[0]}: {name} is FP32"


def test_a_qdq_graph_becomes_fp16_outside_the_qdq_pairs() -> None:
    model = qdq_model()
    fp16 = convert_to_fp16(model)  # today: refused ("the graph has Q/DQ nodes")
    onnx.checker.check_model(fp16, full_check=True)
    opset = {o.domain: o.version for o in fp16.opset_import}
    assert opset.get("", opset.get("ai.onnx")) >= 19  # FP16 scales need DequantizeLinear-19
    assert_fp16_outside_qdq(fp16)
    scales = {n.input[1] for n in fp16.graph.node if n.op_type in QDQ}
    assert {t.data_type for t in fp16.graph.initializer if t.name in scales} == {F16}
    x = np.random.default_rng(4).random((2, 3, 8, 8), dtype=np.float32)  # ONNX Runtime still runs it on a CPU
    np.testing.assert_allclose(run(fp16, x)["logits"], run(model, x)["logits"], atol=0.05)


def test_a_scale_that_flushes_to_zero_in_fp16_is_refused() -> None:
    model = qdq_model()
    for t in model.graph.initializer:
        if t.name == "ws":
            t.CopyFrom(numpy_helper.from_array(np.full(3, 1e-9, np.float32), "ws"))
    with pytest.raises(ValueError, match="ws.*FP16"):
        convert_to_fp16(model)
