"""INT8 ranges and the two Q/DQ writers on a tiny EfficientNet-shaped network.

The numeric tests use a network trained on class patterns (``learned_tiny``): its logits span about ±12 and move with
the input, so a bound of a few times the measured INT8 error is far below what a model that ignores its input, a
broken weight scale, or a saturating integer kernel gives (``test_the_int8_bounds_catch_broken_models``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from tiny_models import learned_tiny, pattern_batch, tiny_meta, trained_tiny

from calibration.quantize import (
    CPU_TARGETS,
    PAIR_LIMIT,
    compute_ranges,
    count_qdq_consumers,
    cpu_target_ok,
    is_depthwise,
    max_pair_sum,
    pair_limited_int8,
    prepare_for_quantization,
    ranges_as_dict,
    tensorrt_qdq_placement,
    write_cpu_int8,
    write_tensorrt_qdq,
)
from export.onnx_export import export_onnx
from runtime.check import cpu_info

#: Measured on the learned tiny network (48 pattern images, ranges from 64 others): CPU INT8 (portable) max
#: |Δlogit| vs FP32 0.51, the TensorRT Q/DQ file run as Q/DQ 0.3; a model ignoring its input 14, halved conv weight
#: scales 18, the saturating AVX2 kernels (8-bit weights, fused) 3.6. Bounds: about 5x the correct error.
INT8_CPU_BOUND = 2.5
INT8_QDQ_BOUND = 1.5
MIN_AGREEMENT = 47 / 48


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    d = tmp_path_factory.mktemp("q")
    src = export_onnx(trained_tiny(), tiny_meta(), d / "tiny.onnx", simplify=False)
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (24, 3, 32, 32)).astype(np.float32)
    return prepare_for_quantization(src, d / "prep.onnx"), x


@pytest.fixture(scope="module")
def learned(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, np.ndarray, np.ndarray]:
    """(prepared learned model, calibration images, test images, FP32 logits on the test images)."""
    d = tmp_path_factory.mktemp("ql")
    src = export_onnx(learned_tiny(), tiny_meta(), d / "tiny.onnx", simplify=False)
    path = prepare_for_quantization(src, d / "prep.onnx")
    calib, _ = pattern_batch(64, seed=1)
    x, y = pattern_batch(48, seed=2)
    ref = _run(path, x)
    assert (ref.argmax(1) == y).mean() > 0.9 and np.abs(ref - ref.mean(0)).max() > 5 * INT8_CPU_BOUND
    return path, calib, x, ref


def _run(path: Path, x: np.ndarray, optimize: bool = True) -> np.ndarray:
    so = ort.SessionOptions()
    if not optimize:  # the Q/DQ graph as written: float ops between exact quantise/dequantise steps
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]


def _gemm_weights(model: onnx.ModelProto, depthwise: bool = False) -> list[tuple[np.ndarray, str]]:
    """(INT8 weight, op type) for every Conv/Gemm/MatMul whose weight comes from a DequantizeLinear; depthwise convs
    only with ``depthwise``."""
    inits = {i.name: i for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    out = []
    for n in model.graph.node:
        dq = producer.get(n.input[1]) if n.op_type in ("Conv", "Gemm", "MatMul") else None
        if dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] in inits:
            q = onnx.numpy_helper.to_array(inits[dq.input[0]])
            if depthwise or not _depthwise(n, q.shape):
                out.append((q, n.op_type))
    return out


def _depthwise(node: onnx.NodeProto, shape: tuple[int, ...]) -> bool:
    """One input and one output channel per group (written out here, independent of the code under test)."""
    group = next((a.i for a in node.attribute if a.name == "group"), 1)
    return node.op_type == "Conv" and len(shape) == 4 and group > 1 and shape[0] == group and shape[1] == 1


def _check(ref: np.ndarray, got: np.ndarray, bound: float) -> None:
    err = float(np.abs(ref - got).max())
    agree = float((ref.argmax(1) == got.argmax(1)).mean())
    assert err < bound and agree >= MIN_AGREEMENT, (f"max |Δlogit| {err:.3f} (bound {bound}), top-1 agreement "
                                                    f"{agree:.3f} on {cpu_info()}")


def test_minmax_ranges_do_not_depend_on_chunking(prepared: tuple[Path, np.ndarray]) -> None:
    path, x = prepared
    a = ranges_as_dict(compute_ranges(path, x, "minmax", chunk=5))
    b = ranges_as_dict(compute_ranges(path, x, "minmax", chunk=24))
    assert a.keys() == b.keys() and a["images"] == pytest.approx((float(x.min()), float(x.max())), rel=1e-6)
    for k in a:
        assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6)


def test_percentile_clips_inside_minmax(prepared: tuple[Path, np.ndarray]) -> None:
    path, x = prepared
    mm = ranges_as_dict(compute_ranges(path, x, "minmax"))
    pc = ranges_as_dict(compute_ranges(path, x, "percentile", percentile=99.0))
    assert pc["images"][1] < mm["images"][1] and pc["images"][0] > mm["images"][0]
    with pytest.raises(ValueError, match="unknown calibration method"):
        compute_ranges(path, x, "kl")


def test_tensorrt_placement_follows_efficientnet_rules(prepared: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    path, x = prepared
    model = onnx.load(str(path))
    acts, weights = tensorrt_qdq_placement(model)
    ops = {model.graph.node[i].op_type for uses in acts.values() for i, _ in uses}
    assert ops == {"Conv", "Mul", "Add", "GlobalAveragePool"}
    # Only the SE multiply is quantised, never SiLU's x * sigmoid(x).
    se_muls = {i for uses in acts.values() for i, _ in uses if model.graph.node[i].op_type == "Mul"}
    assert len(se_muls) == 1
    n_conv = sum(n.op_type == "Conv" for n in model.graph.node)
    assert len(weights) == n_conv
    counts = write_tensorrt_qdq(path, ranges_as_dict(compute_ranges(path, x, "minmax")), tmp_path / "trt.onnx")
    q = onnx.load(str(tmp_path / "trt.onnx"))
    assert counts["Conv"] == n_conv and counts["Add"] == 1 and counts["GlobalAveragePool"] >= 1
    assert "Gemm" not in count_qdq_consumers(q)  # head stays float
    for n in q.graph.node:
        if n.op_type == "QuantizeLinear":  # symmetric signed INT8 activations
            zp = next(i for i in q.graph.initializer if i.name == n.input[2])
            assert zp.data_type == onnx.TensorProto.INT8 and onnx.numpy_helper.to_array(zp).item() == 0
    weights_int8 = [i for i in q.graph.initializer if i.name.endswith("_int8") and len(i.dims) == 4]
    assert len(weights_int8) == n_conv and all(i.data_type == onnx.TensorProto.INT8 for i in weights_int8)


def test_tensorrt_qdq_is_close_to_fp32(learned: tuple[Path, np.ndarray, np.ndarray, np.ndarray],
                                       tmp_path: Path) -> None:
    path, calib, x, ref = learned
    write_tensorrt_qdq(path, ranges_as_dict(compute_ranges(path, calib, "minmax")), tmp_path / "trt.onnx")
    # TensorRT runs Q/DQ with int32 accumulation: the unfused graph is its arithmetic, independent of this CPU.
    _check(ref, _run(tmp_path / "trt.onnx", x, optimize=False), INT8_QDQ_BOUND)


def test_tensorrt_scales_stay_representable_in_fp16(prepared: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    """A dead (all-zero) conv channel must not get a scale that underflows when the file goes to FP16 scales."""
    path, x = prepared
    model = onnx.load(str(path))
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    w = next(i for i in model.graph.initializer if i.name == conv.input[1])
    arr = onnx.numpy_helper.to_array(w).copy()
    arr[0] = 0
    w.CopyFrom(onnx.numpy_helper.from_array(arr, w.name))
    onnx.save(model, str(tmp_path / "dead.onnx"))
    write_tensorrt_qdq(tmp_path / "dead.onnx", ranges_as_dict(compute_ranges(tmp_path / "dead.onnx", x, "minmax")),
                       tmp_path / "trt.onnx")
    scales = [onnx.numpy_helper.to_array(i) for i in onnx.load(str(tmp_path / "trt.onnx")).graph.initializer
              if i.name.endswith("_qdq_scale")]
    assert min(float(s.min()) for s in scales) >= 2.0 ** -14


def test_cpu_int8_is_u8s8_and_close_to_fp32(learned: tuple[Path, np.ndarray, np.ndarray, np.ndarray],
                                            tmp_path: Path) -> None:
    path, calib, x, ref = learned
    td = compute_ranges(path, calib, "minmax")
    out = write_cpu_int8(path, td, tmp_path / "cpu.onnx", metadata_props={"k": "v"})
    q = onnx.load(str(out))
    inits = {i.name: i for i in q.graph.initializer}
    act_q = [n for n in q.graph.node if n.op_type == "QuantizeLinear"]
    assert act_q and all(inits[n.input[2]].data_type == onnx.TensorProto.UINT8 for n in act_q)
    assert {p.key: p.value for p in q.metadata_props}["k"] == "v"
    # Portable target: no two adjacent INT8 weights of a GEMM-type kernel can overflow vpmaddubsw's int16 pair sum
    # (255 · 128 < 32768), in either order a conv kernel may walk K; the largest weight of a channel still uses the
    # full 8 bits. Depthwise convs keep plain 8-bit weights (their kernels never add two products in int16:
    # test_depthwise_kernels_never_saturate).
    weights = _gemm_weights(q)
    src = onnx.load(str(path))
    dense = [n for n in src.graph.node if n.op_type in ("Conv", "Gemm")
             and not _depthwise(n, tuple(next(i.dims for i in src.graph.initializer if i.name == n.input[1])))]
    assert len(weights) == len(dense) and len(_gemm_weights(q, depthwise=True)) > len(dense)
    assert all(qw.dtype == np.int8 and max_pair_sum(qw, op).max() <= PAIR_LIMIT for qw, op in weights)
    assert max(np.abs(qw.astype(int)).max() for qw, _ in weights) == 127
    # ONNX Runtime with its fused integer kernels on this CPU, as the runtime runs it.
    _check(ref, _run(out, x), INT8_CPU_BOUND)


def test_the_int8_bounds_catch_broken_models(learned: tuple[Path, np.ndarray, np.ndarray, np.ndarray],
                                             tmp_path: Path) -> None:
    """The bounds above are tight enough to fail on what they guard against."""
    path, calib, x, ref = learned
    with pytest.raises(AssertionError):  # a model that ignores its input
        _check(ref, np.broadcast_to(ref.mean(0), ref.shape), INT8_CPU_BOUND)
    out = write_cpu_int8(path, compute_ranges(path, calib, "minmax"), tmp_path / "cpu.onnx")
    q = onnx.load(str(out))
    for i in q.graph.initializer:  # every conv weight scale halved
        if i.name.endswith("weight_scale") and "head" not in i.name:
            i.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(i) * 0.5, i.name))
    onnx.save(q, str(tmp_path / "half.onnx"))
    with pytest.raises(AssertionError):
        _check(ref, _run(tmp_path / "half.onnx", x), INT8_CPU_BOUND)


def test_cpu_targets(learned: tuple[Path, np.ndarray, np.ndarray, np.ndarray], tmp_path: Path) -> None:
    path, calib, x, ref = learned
    assert CPU_TARGETS == ("portable", "vnni")
    assert cpu_target_ok("portable", []) and not cpu_target_ok("vnni", ["avx2", "avx512bw"])
    assert cpu_target_ok("vnni", ["avx2", "avx512_vnni"]) and cpu_target_ok("vnni", ["amx_int8"])
    out = write_cpu_int8(path, compute_ranges(path, calib, "minmax"), tmp_path / "v.onnx", target="vnni")
    # Plain 8-bit weights: adjacent pairs above the limit exist (they saturate where vpmaddubsw is used).
    assert max(max_pair_sum(qw, op).max() for qw, op in _gemm_weights(onnx.load(str(out)))) > PAIR_LIMIT
    # As Q/DQ (no fused kernels) the 8-bit file is at least as close to FP32 as the portable one is bound to be.
    _check(ref, _run(out, x, optimize=False), INT8_CPU_BOUND)
    if cpu_target_ok("vnni", cpu_info()["isa"]):
        _check(ref, _run(out, x), INT8_CPU_BOUND)
    with pytest.raises(ValueError, match="unknown CPU target"):
        write_cpu_int8(path, compute_ranges(path, calib, "minmax"), tmp_path / "w.onnx", target="avx2")


@pytest.mark.parametrize(("shape", "op"), [((16, 3, 3, 3), "Conv"), ((16, 1152, 1, 1), "Conv"), ((8, 320), "Gemm")])
def test_pair_limited_weights(shape: tuple[int, ...], op: str) -> None:
    """Every adjacent pair within the limit in both K orders; per channel never a larger weight error than the scale
    at which nothing has to be shrunk (the previous recipe), and a smaller one over the whole layer."""
    rng = np.random.default_rng(3)
    w = rng.laplace(0, 1, shape).astype(np.float32)  # trained conv weights are heavy-tailed
    q, scale = pair_limited_int8(w, op)
    assert q.dtype == np.int8 and scale.shape == (shape[0],) and max_pair_sum(q, op).max() <= PAIR_LIMIT
    if op == "Conv" and shape[2] > 1:  # the (kh, kw, C_in) walk as well as (C_in, kh, kw)
        hwc = q.transpose(0, 2, 3, 1).reshape(shape[0], -1).astype(int)
        assert np.abs(hwc[:, 1:] + hwc[:, :-1]).max() <= PAIR_LIMIT
    flat = w.reshape(shape[0], -1).astype(np.float64)
    err = ((flat - q.reshape(shape[0], -1) * scale[:, None].astype(np.float64)) ** 2).sum(1)
    pair = np.maximum(np.abs(flat).max(1), np.abs(flat[:, 1:] + flat[:, :-1]).max(1))
    if op == "Conv" and shape[2] > 1:
        t = w.transpose(0, 2, 3, 1).reshape(shape[0], -1)
        pair = np.maximum(pair, np.abs(t[:, 1:] + t[:, :-1]).max(1))
    old_s = np.maximum(np.abs(flat).max(1) / 127, pair / PAIR_LIMIT) * 1.0001
    old = ((flat - np.clip(np.round(flat / old_s[:, None]), -127, 127) * old_s[:, None]) ** 2).sum(1)
    wide = not (op == "Conv" and shape[2] > 1)  # 27 weights per channel leave little to gain
    assert (err <= old * (1 + 1e-4)).all() and (not wide or err.sum() < old.sum())


def _adversarial_conv(depthwise: bool, channels: int = 32) -> bytes:
    """Q/DQ conv whose INT8 weights are all +127 (one -127 per kernel) and whose inputs quantise to 255: every adjacent
    pair of products is 2 · 255 · 127, twice what an int16 holds."""
    from onnx import TensorProto, helper
    from onnx.numpy_helper import from_array

    w = np.full((channels, 1 if depthwise else channels, 3, 3), 127, np.int8)
    w[:, :, 0, 0] = -127
    inits = [from_array(np.float32(1 / 255), "xs"), from_array(np.uint8(0), "xz"), from_array(w, "wq"),
             from_array(np.full(channels, 0.01, np.float32), "ws"), from_array(np.zeros(channels, np.int8), "wz"),
             from_array(np.float32(0.05 if depthwise else 2.0), "ys"), from_array(np.uint8(0), "yz")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=0),
             helper.make_node("Conv", ["xd", "wd"], ["y"], group=channels if depthwise else 1, pads=[1, 1, 1, 1]),
             helper.make_node("QuantizeLinear", ["y", "ys", "yz"], ["yq"]),
             helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["out"])]
    shape = [1, channels, 8, 8]
    graph = helper.make_graph(nodes, "adversarial", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, shape)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]).SerializeToString()


def test_depthwise_kernels_never_saturate() -> None:
    """Why the portable target leaves depthwise weights at 8 bits: ONNX Runtime's fused depthwise kernels compute each
    product exactly, even where the dense kernel with the same weights and inputs saturates."""
    x = np.ones((1, 32, 8, 8), np.float32)
    for dw in (True, False):  # the portable recipe's classification matches the kernels ONNX Runtime picks
        conv = next(n for n in onnx.load_from_string(_adversarial_conv(dw)).graph.node if n.op_type == "Conv")
        assert is_depthwise(conv, (32, 1 if dw else 32, 3, 3)) is dw

    def fused_vs_qdq(model: bytes) -> float:
        fused = ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        qdq = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        return float(np.abs(fused - qdq).max())

    # At most one output step (0.05, float rounding at a .5 boundary); a saturating pair would be off by dozens.
    assert fused_vs_qdq(_adversarial_conv(depthwise=True)) <= 0.05 + 1e-6, cpu_info()
    if not cpu_target_ok("vnni", cpu_info()["isa"]):  # the probe can see saturation where vpmaddubsw is used
        assert fused_vs_qdq(_adversarial_conv(depthwise=False)) > 10.0, cpu_info()


def test_missing_ranges_are_an_error(prepared: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    path, _ = prepared
    with pytest.raises(ValueError, match="no calibration range"):
        write_tensorrt_qdq(path, {}, tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()
