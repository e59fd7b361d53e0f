"""Write the tiny models ``python -m runtime.doctor`` builds TensorRT engines from (runtime/data/doctor_*.onnx).

A conv → ReLU → conv → ReLU → residual add → global pool → linear network, 16×16 input, 8 outputs, with fixed random
weights: FP32 (the ONNX Runtime reference), FP16, and Q/DQ INT8 with FP16 scales (the production path:
``calibration.quantize`` places Q/DQ and ``export.onnx_export.convert_to_fp16`` makes it FP16 at opset 19). A few KB
each; the doctor needs neither onnx nor torch to use them. Regenerate (deterministic)::

    python tools/make_doctor_models.py            # writes runtime/data/
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "runtime" / "data"
SIZE, WIDTH, CLASSES = 16, 8, 8
NAMES = {"fp32": "doctor_fp32.onnx", "fp16": "doctor_fp16.onnx", "int8": "doctor_int8_qdq.onnx"}


def fp32_model() -> onnx.ModelProto:
    rng = np.random.default_rng(20261207)

    def init(name: str, *shape: int, scale: float) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["images", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["a1"], name="relu1"),
        helper.make_node("Conv", ["a1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["a2"], name="relu2"),
        helper.make_node("Add", ["a1", "a2"], ["res"], name="residual"),
        helper.make_node("GlobalAveragePool", ["res"], ["pooled"], name="pool"),
        helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flat", "w3", "b3"], ["logits"], name="head", transB=1),
    ]
    inits = [init("w1", WIDTH, 3, 3, 3, scale=0.4), init("b1", WIDTH, scale=0.1),
             init("w2", WIDTH, WIDTH, 3, 3, scale=0.15), init("b2", WIDTH, scale=0.1),
             init("w3", CLASSES, WIDTH, scale=1.0), init("b3", CLASSES, scale=0.1)]
    graph = helper.make_graph(nodes, "doctor_tiny",
                              [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, SIZE, SIZE])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="runtime.doctor")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def build(out: Path = OUT) -> dict[str, Path]:
    sys.path.insert(0, str(REPO))
    from calibration.quantize import compute_ranges, ranges_as_dict, write_tensorrt_qdq
    from export.onnx_export import convert_to_fp16

    out.mkdir(parents=True, exist_ok=True)
    paths = {k: out / v for k, v in NAMES.items()}
    model = fp32_model()
    onnx.save(model, str(paths["fp32"]))
    onnx.save(convert_to_fp16(model), str(paths["fp16"]))
    data = np.random.default_rng(1).random((32, 3, SIZE, SIZE), dtype=np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        ranges = ranges_as_dict(compute_ranges(paths["fp32"], data, method="minmax"))
        qdq = Path(tmp) / "qdq.onnx"
        write_tensorrt_qdq(paths["fp32"], ranges, qdq)
        onnx.save(convert_to_fp16(onnx.load(str(qdq))), str(paths["int8"]))
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    for k, path in build(args.out).items():
        print(f"{k}: {path} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
