"""INT8 ranges and the two Q/DQ writers on a tiny EfficientNet-shaped network."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from tiny_models import tiny_meta, trained_tiny

from calibration.quantize import (
    compute_ranges,
    count_qdq_consumers,
    prepare_for_quantization,
    ranges_as_dict,
    tensorrt_qdq_placement,
    write_cpu_int8,
    write_tensorrt_qdq,
)
from export.onnx_export import export_onnx


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    d = tmp_path_factory.mktemp("q")
    src = export_onnx(trained_tiny(), tiny_meta(), d / "tiny.onnx", simplify=False)
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (24, 3, 32, 32)).astype(np.float32)
    return prepare_for_quantization(src, d / "prep.onnx"), x


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]


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
    ref, got = _run(path, x), _run(tmp_path / "trt.onnx", x)
    assert np.abs(ref - got).max() < 0.1 * np.abs(ref).max() + 0.05


def test_cpu_int8_is_u8s8_and_close_to_fp32(prepared: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    path, x = prepared
    td = compute_ranges(path, x, "minmax")
    out = write_cpu_int8(path, td, tmp_path / "cpu.onnx", metadata_props={"k": "v"})
    q = onnx.load(str(out))
    zps = {i.name: i for i in q.graph.initializer}
    act_q = [n for n in q.graph.node if n.op_type == "QuantizeLinear"]
    assert act_q and all(zps[n.input[2]].data_type == onnx.TensorProto.UINT8 for n in act_q)
    assert {p.key: p.value for p in q.metadata_props}["k"] == "v"
    ref, got = _run(path, x), _run(out, x)
    assert np.abs(ref - got).max() < 0.1 * np.abs(ref).max() + 0.05


def test_missing_ranges_are_an_error(prepared: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    path, _ = prepared
    with pytest.raises(ValueError, match="no calibration range"):
        write_tensorrt_qdq(path, {}, tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()
