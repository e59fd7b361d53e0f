"""The compute floor: how much arithmetic a model needs and how fast this machine can do arithmetic at best.

``count_macs`` reads the ONNX graph (after ONNX shape inference with the batch fixed to 1) and counts the
multiply-accumulates of Conv, ConvTranspose, Gemm and MatMul nodes, the layers that carry almost all of a CNN's
arithmetic. ``measure_gemm_gflops`` times a large single-precision matrix product (numpy's BLAS, and torch's when
installed; the faster wins), which is about the best sustained FP32 rate a program gets on this machine. Dividing
one by the other gives a floor: a model cannot run faster than ``2 * MACs / GEMM rate`` in FP32, and the fraction of
that rate a backend achieves says how much room is left (depthwise convolutions are memory-bound, so EfficientNets
land well below 100%).
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

_MAC_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger")


def _static_batch_one(model: Any) -> None:
    """Fix every graph input's symbolic first dimension to 1 so shape inference yields concrete shapes."""
    for inp in model.graph.input:
        dims = inp.type.tensor_type.shape.dim
        if len(dims) and not dims[0].HasField("dim_value"):
            dims[0].dim_value = 1


def count_macs(onnx_path: str | os.PathLike[str]) -> dict[str, Any]:
    """Multiply-accumulates for one image: ``{"macs": int, "by_op": {op: macs}, "uncounted": [node names]}``.

    Q/DQ models count the same as their float original (the arithmetic is the same, only its type differs).
    Nodes whose shapes cannot be inferred are listed in ``uncounted`` rather than guessed.
    """
    import onnx
    from onnx import numpy_helper, shape_inference

    model = onnx.load(str(onnx_path))
    _static_batch_one(model)
    model = shape_inference.infer_shapes(model, data_prop=True)
    shapes: dict[str, list[int]] = {}

    def note(vi: Any) -> None:
        dims = vi.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            shapes[vi.name] = [d.dim_value for d in dims]

    for vi in (*model.graph.input, *model.graph.value_info, *model.graph.output):
        note(vi)
    for init in model.graph.initializer:
        shapes[init.name] = list(init.dims)
    # A weight that reaches its conv through DequantizeLinear (Q/DQ INT8) has the shape of the quantised tensor.
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in shapes:
            shapes.setdefault(node.output[0], shapes[node.input[0]])
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    shapes.setdefault(node.output[0], list(numpy_helper.to_array(attr.t).shape))

    by_op: dict[str, int] = {}
    uncounted: list[str] = []
    for node in model.graph.node:
        if node.op_type not in _MAC_OPS:
            continue
        out = shapes.get(node.output[0])
        if node.op_type in ("QLinearConv", "QLinearMatMul"):
            w = shapes.get(node.input[3])
        elif node.op_type in ("ConvInteger", "MatMulInteger"):
            w = shapes.get(node.input[1])
        else:
            w = shapes.get(node.input[1])
        if out is None or w is None:
            uncounted.append(node.name or node.op_type)
            continue
        if node.op_type in ("Conv", "QLinearConv", "ConvInteger"):
            # out (N, Cout, *spatial); w (Cout, Cin/group, *kernel): each output element needs Cin/group · k MACs.
            macs = int(np.prod(out)) * int(np.prod(w[1:]))
        elif node.op_type == "ConvTranspose":
            a = shapes.get(node.input[0])
            if a is None:
                uncounted.append(node.name or node.op_type)
                continue
            macs = int(np.prod(a)) * int(np.prod(w[1:]))  # w (Cin, Cout/group, *kernel)
        elif node.op_type == "Gemm":
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            k = w[1] if trans_b else w[0]
            macs = int(np.prod(out)) * int(k)
        else:  # MatMul: out (..., M, N), inner dimension K is the second-to-last of B (or B's only dim)
            k = w[-2] if len(w) >= 2 else w[0]
            macs = int(np.prod(out)) * int(k)
        by_op[node.op_type] = by_op.get(node.op_type, 0) + macs
    return {"macs": sum(by_op.values()), "by_op": by_op, "uncounted": uncounted}


def _best_seconds(fn: Any, repeats: int) -> float:
    fn()  # warm-up: BLAS thread pool start, page faults
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_gemm_gflops(n: int = 2048, repeats: int = 3, threads: int | None = None) -> dict[str, Any]:
    """Best-of-``repeats`` SGEMM rate (GFLOP/s) for ``n × n`` matrices with numpy and, if installed, torch.

    Best rather than median: the floor is about what the hardware can do, and noise from other processes only
    ever makes a run slower.
    """
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    flops = 2.0 * n**3
    rates: dict[str, float] = {"numpy": flops / _best_seconds(lambda: a @ b, repeats) / 1e9}
    try:
        import torch

        old = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        try:
            ta, tb = torch.from_numpy(a), torch.from_numpy(b)
            with torch.inference_mode():
                rates["torch"] = flops / _best_seconds(lambda: torch.mm(ta, tb), repeats) / 1e9
        finally:
            torch.set_num_threads(old)
    except ImportError:
        pass
    best = max(rates, key=rates.__getitem__)
    return {"gflops": rates[best], "by_library": rates, "best": best, "n": n}


def floor_ms(macs: int, gflops: float, batch: int = 1) -> float:
    """FP32 compute floor for ``batch`` images in milliseconds: 2 FLOPs per MAC at the measured GEMM rate."""
    return 2.0 * macs * batch / (gflops * 1e9) * 1e3
