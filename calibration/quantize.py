"""INT8 range computation on the CPU (ONNX Runtime calibrators) and the two Q/DQ writers.

Ranges: :func:`compute_ranges` runs ONNX Runtime's MinMax / Entropy / Percentile calibrators over the calibration
array in chunks (histograms accumulate across chunks, so 512 images at 224 px never sit in memory as activations).

TensorRT file (:func:`write_tensorrt_qdq`, our own writer, because the placement matters more than anything else
for EfficientNet under TensorRT and onnxruntime's quantiser cannot express it): symmetric signed INT8
(zero point 0) everywhere; Q/DQ on

* every Conv's data input and its weight (weights stored as INT8 initialisers + per-output-channel DequantizeLinear),
* the input of GlobalAveragePool,
* both inputs of the squeeze-excitation multiply (``x * sigmoid(conv(...))``, told apart from SiLU's
  ``x * sigmoid(x)`` by the sigmoid's input not being the other operand),
* the skip input of each residual Add (the operand produced earlier; TensorRT fuses the Add into the conv that
  produces the other operand).

SiLU (Sigmoid + Mul) stays in the conv's output precision (TensorRT fuses it as a pointwise epilogue), and the
final classifier (Gemm/MatMul) stays in float by default (``keep_head_float``). This is the placement NVIDIA gives
for EfficientNet and the one NVIDIA ModelOpt (``modelopt.onnx.quantization``) writes: its B0 output has Q/DQ on
81 Conv (input + weight), 17 GlobalAveragePool, 16 SE Mul (both inputs) and 9 Add (one input).

CPU file (:func:`write_cpu_int8`): ``onnxruntime.quantization.quantize_static`` in QDQ format with unsigned
activations (asymmetric) and signed per-channel weights, all supported ops quantised so activations stay INT8
between QLinearConvs; nodes named in ``nodes_to_exclude`` stay float. Which weights get 7 bits is the CPU target
(:data:`CPU_TARGETS`): ONNX Runtime fuses the Q/DQ pairs into integer kernels, and on x86 without VNNI (AVX2,
AVX-512BW) its U8S8 GEMM multiplies adjacent u8·s8 pairs with ``vpmaddubsw``, whose int16 sum saturates once
``a1·w1 + a2·w2`` exceeds 32767 (two activations near 255 with weights near ±127): the fused model then differs from
the Q/DQ graph it was built from by whole logits. ``portable`` (the default) quantises each output channel's weights
so that no two adjacent weights along K sum to more than 128 in magnitude (``255·128 = 32640`` cannot saturate,
whatever the activations; :func:`limit_pair_sums`): per channel the scale with the smallest weight error between the
full 8-bit scale (offending pairs moved toward zero) and the scale at which no pair exceeds the limit
(:func:`pair_limited_int8`). That is exact on every x86 kernel and keeps nearly all of the 8 bits (plain 7-bit
weights, ``reduce_range``, are safe too but cost a point of agreement). Depthwise convs keep plain 8-bit weights:
ONNX Runtime's depthwise kernels (SSE2/AVX2 and the symmetric AVX2/AVX-512/VNNI ones) never add two products in
int16 (:func:`is_depthwise`). ``vnni``
keeps onnxruntime's plain 8-bit weights, for CPUs whose dot-product instructions accumulate in int32 (AVX-512 VNNI,
AVX-VNNI, AMX). The target and the build machine's instruction set are recorded in the artifact, and the
on-target self-check (:mod:`runtime.check`) catches a kernel that still disagrees. See ``docs/int8.md``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from runtime.files import atomic_write_bytes

log = logging.getLogger(__name__)


def set_metadata_props(model: onnx.ModelProto, props: dict[str, str]) -> None:
    """Set ONNX ``metadata_props`` entries, replacing existing keys (here because export builds on calibration)."""
    existing = {p.key: p for p in model.metadata_props}
    for k, v in props.items():
        if k in existing:
            existing[k].value = v
        else:
            model.metadata_props.append(onnx.StringStringEntryProto(key=k, value=v))

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
DEFAULT_PERCENTILE = 99.999
INT8_MAX = 127.0
#: Guards scales against all-zero tensors (TensorRT rejects a zero scale).
MIN_AMAX = 1e-8
#: Smallest Q/DQ scale in the TensorRT file: the smallest normal FP16 value, because the file's scales are converted
#: to FP16 for a strongly typed engine (a dead channel's 1e-10 scale would underflow). Values below half of it
#: quantise to zero, which for weights and activations of a trained network is no loss.
MIN_TRT_SCALE = 2.0 ** -14


# ------------------------------------------------------------------ model preparation
def prepare_for_quantization(model_path: str | Path, out_path: str | Path) -> Path:
    """Shape inference + basic graph optimisation (onnxruntime's ``quant_pre_process``); falls back to a copy."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out_path = Path(out_path)
    try:
        quant_pre_process(str(model_path), str(out_path), skip_symbolic_shape=False)
    except Exception as e:  # noqa: BLE001 - preprocessing is an optimisation; quantisation works without it
        log.warning("%s: quant_pre_process failed (%s: %s); quantising the model as it is", model_path,
                    type(e).__name__, e)
        model = onnx.shape_inference.infer_shapes(onnx.load(str(model_path)))
        onnx.save(model, str(out_path))
    return out_path


class _ArrayReader:
    """A CalibrationDataReader over ``(N, C, H, W)`` float32, ``batch`` images per call."""

    def __init__(self, input_name: str, data: np.ndarray, batch: int) -> None:
        self.input_name = input_name
        self.batches = [data[i:i + batch] for i in range(0, len(data), batch)]
        self.i = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.i >= len(self.batches):
            return None
        self.i += 1
        return {self.input_name: self.batches[self.i - 1]}

    def rewind(self) -> None:
        self.i = 0


def _graph_input_name(model_path: str | Path) -> str:
    model = onnx.load(str(model_path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in inits]
    if len(names) != 1:
        raise ValueError(f"{model_path}: expected one graph input to calibrate, found {names}")
    return names[0]


def compute_ranges(model_path: str | Path, data: np.ndarray, method: str = "percentile",
                   percentile: float = DEFAULT_PERCENTILE, chunk: int = 8, progress: bool = False,
                   quiet: bool = True) -> Any:
    """Activation ranges of every float tensor in ``model_path`` over ``data`` → onnxruntime ``TensorsData``.

    ``quiet`` hides what onnxruntime's calibrators print for every chunk. Chunks of ``chunk`` images go through the
    calibrator one after another, each as one batch (onnxruntime's
    histogram collector stacks a call's outputs, so a call must not mix batch sizes); MinMax merges the ranges and
    the histogram methods merge their histograms across calls.
    """
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    if method not in CALIBRATION_METHODS:
        raise ValueError(f"unknown calibration method {method!r}; choose one of {', '.join(CALIBRATION_METHODS)}")
    if data.ndim != 4 or len(data) == 0:
        raise ValueError(f"calibration data must be a non-empty (N, C, H, W) array, got shape {data.shape}")
    cm = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
          "percentile": CalibrationMethod.Percentile}[method]
    extra: dict[str, Any] = {}
    if method == "percentile":
        extra = {"percentile": percentile, "num_bins": 2048}
    elif method == "entropy":
        extra = {"num_bins": 2048, "num_quantized_bins": 128}
    input_name = _graph_input_name(model_path)
    with tempfile.TemporaryDirectory(prefix="calib.") as tmp:
        cal = create_calibrator(Path(model_path), [], augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                calibrate_method=cm, providers=["CPUExecutionProvider"], extra_options=extra)
        chunks = range(0, len(data), chunk)
        if progress:
            from tqdm import tqdm
            chunks = tqdm(chunks, desc=f"calibrating ({method})", unit="chunk")
        with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
            for start in chunks:
                cal.collect_data(_ArrayReader(input_name, data[start:start + chunk], chunk))
            return cal.compute_data()


def ranges_as_dict(tensors_data: Any) -> dict[str, tuple[float, float]]:
    """``TensorsData`` → {tensor name: (low, high)} as plain floats."""
    out: dict[str, tuple[float, float]] = {}
    for name, td in tensors_data.data.items():
        lo, hi = td.range_value
        out[name] = (float(np.asarray(lo).min()), float(np.asarray(hi).max()))
    return out


# ------------------------------------------------------------------ TensorRT Q/DQ placement
def _is_initializer_or_constant(name: str, inits: set[str]) -> bool:
    return name in inits or name == ""


def tensorrt_qdq_placement(model: onnx.ModelProto, keep_head_float: bool = True,
                           nodes_to_exclude: Iterable[str] = ()) -> tuple[dict[str, list[tuple[int, int]]],
                                                                          list[tuple[int, int]]]:
    """Where TensorRT wants Q/DQ: returns (activation tensor → [(node index, input index)], [(conv index, 1)]).

    See the module docstring for the rules.
    """
    g = model.graph
    inits = {i.name for i in g.initializer}
    producer: dict[str, int] = {o: i for i, n in enumerate(g.node) for o in n.output}
    excluded = set(nodes_to_exclude)
    acts: dict[str, list[tuple[int, int]]] = {}
    weights: list[tuple[int, int]] = []

    def add(tensor: str, node_i: int, input_i: int) -> None:
        if not _is_initializer_or_constant(tensor, inits):
            acts.setdefault(tensor, []).append((node_i, input_i))

    for i, n in enumerate(g.node):
        if n.name in excluded:
            continue
        if n.op_type == "Conv":
            add(n.input[0], i, 0)
            if n.input[1] in inits:
                weights.append((i, 1))
        elif n.op_type in ("Gemm", "MatMul") and not keep_head_float:
            add(n.input[0], i, 0)
            if n.input[1] in inits and n.op_type == "Gemm":
                weights.append((i, 1))
        elif n.op_type in ("GlobalAveragePool", "AveragePool"):
            add(n.input[0], i, 0)
        elif n.op_type == "Mul" and len(n.input) == 2:
            a, b = n.input
            for gate, other in ((a, b), (b, a)):
                p = producer.get(gate)
                if p is not None and g.node[p].op_type == "Sigmoid" and g.node[p].input[0] != other:
                    add(a, i, 0)
                    add(b, i, 1)
                    break
        elif n.op_type == "Add" and len(n.input) == 2:
            if any(x in inits for x in n.input):
                continue  # a bias add, not a residual
            # The skip is the operand computed earlier; TensorRT fuses the Add into the other operand's conv.
            order = [producer.get(x, -1) for x in n.input]
            skip = 0 if order[0] < order[1] else 1
            add(n.input[skip], i, skip)
    return acts, weights


def _per_channel_int8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-output-channel INT8: (int8 weights, float32 scales)."""
    flat = np.abs(w.reshape(w.shape[0], -1)).max(axis=1)
    scale = np.maximum(flat / INT8_MAX, MIN_TRT_SCALE).astype(np.float32)
    shape = (-1,) + (1,) * (w.ndim - 1)
    q = np.clip(np.round(w / scale.reshape(shape)), -INT8_MAX, INT8_MAX).astype(np.int8)
    return q, scale


def write_tensorrt_qdq(model_path: str | Path, ranges: dict[str, tuple[float, float]], out_path: str | Path,
                       keep_head_float: bool = True, nodes_to_exclude: Iterable[str] = (),
                       metadata_props: dict[str, str] | None = None) -> dict[str, int]:
    """Write the TensorRT Q/DQ model; returns counts of what was quantised (for the report and tests)."""
    model = onnx.load(str(model_path))
    g = model.graph
    acts, weights = tensorrt_qdq_placement(model, keep_head_float, nodes_to_exclude)
    missing = sorted(t for t in acts if t not in ranges)
    if missing:
        raise ValueError(f"{model_path}: no calibration range for tensor(s) {missing[:5]}; were the ranges computed "
                         "on this model?")
    inits = {i.name: i for i in g.initializer}
    new_inits: list[TensorProto] = []
    head_nodes: list[onnx.NodeProto] = []
    after: dict[int, list[onnx.NodeProto]] = {}
    producer = {o: i for i, n in enumerate(g.node) for o in n.output}
    zero8 = "qdq_zero_point_int8"
    new_inits.append(numpy_helper.from_array(np.array(0, np.int8), zero8))

    for tensor, uses in acts.items():
        lo, hi = ranges[tensor]
        amax = max(abs(lo), abs(hi), MIN_AMAX)
        scale_name = f"{tensor}_qdq_scale"
        new_inits.append(numpy_helper.from_array(np.array(max(amax / INT8_MAX, MIN_TRT_SCALE), np.float32),
                                                 scale_name))
        q_out, dq_out = f"{tensor}_quantized", f"{tensor}_dequantized"
        nodes = [helper.make_node("QuantizeLinear", [tensor, scale_name, zero8], [q_out], name=f"{tensor}_Q"),
                 helper.make_node("DequantizeLinear", [q_out, scale_name, zero8], [dq_out], name=f"{tensor}_DQ")]
        if tensor in producer:
            after.setdefault(producer[tensor], []).extend(nodes)
        else:
            head_nodes.extend(nodes)  # a graph input
        for node_i, input_i in uses:
            g.node[node_i].input[input_i] = dq_out

    for node_i, input_i in weights:
        node = g.node[node_i]
        wname = node.input[input_i]
        w = numpy_helper.to_array(inits[wname]).astype(np.float32)
        q, scale = _per_channel_int8(w)
        qn, sn, zn, dqn = f"{wname}_int8", f"{wname}_qdq_scale", f"{wname}_qdq_zero_point", f"{wname}_dequantized"
        new_inits += [numpy_helper.from_array(q, qn), numpy_helper.from_array(scale, sn),
                      numpy_helper.from_array(np.zeros(len(scale), np.int8), zn)]
        head_nodes.append(helper.make_node("DequantizeLinear", [qn, sn, zn], [dqn], name=f"{wname}_DQ", axis=0))
        node.input[input_i] = dqn

    ordered: list[onnx.NodeProto] = list(head_nodes)
    for i, n in enumerate(g.node):
        ordered.append(n)
        ordered.extend(after.get(i, []))
    # Float weights that were replaced by INT8 copies are no longer referenced.
    used = {x for n in ordered for x in n.input}
    keep = [i for i in g.initializer if i.name in used]
    del g.node[:]
    g.node.extend(ordered)
    del g.initializer[:]
    g.initializer.extend(keep + new_inits)
    _set_props(model, metadata_props)
    onnx.checker.check_model(model)
    atomic_write_bytes(out_path, model.SerializeToString())
    counts: dict[str, int] = {"activation_qdq": len(acts), "weight_dq": len(weights)}
    counts.update(count_qdq_consumers(model))
    return counts


def _set_props(model: onnx.ModelProto, props: dict[str, str] | None) -> None:
    if props:
        set_metadata_props(model, props)


# ------------------------------------------------------------------ CPU (ONNX Runtime) INT8
#: CPU targets for :func:`write_cpu_int8` (see the module docstring).
CPU_TARGETS = ("portable", "vnni")
#: What each CPU target does to the weights, recorded in the artifact's metadata (``extra.calibration.weights``).
CPU_TARGET_WEIGHTS = {
    "portable": "dense Conv/Gemm: adjacent weight pairs <= 128 in magnitude, least-error per-channel scale; "
                "depthwise Conv: plain 8-bit per-channel",
    "vnni": "plain 8-bit per-channel (onnxruntime quantize_static)",
}
#: Instruction-set flags (``/proc/cpuinfo``) whose integer dot products accumulate in int32 without saturation.
NON_SATURATING_ISA = ("avx512_vnni", "avx_vnni", "amx_int8")
#: Op types whose weights ONNX Runtime's integer GEMM/conv kernels multiply with u8 activations.
GEMM_OPS = ("Conv", "Gemm", "MatMul")
#: ``vpmaddubsw`` adds two u8·s8 products in int16: |q_k + q_(k+1)| · 255 must stay ≤ 32767.
PAIR_LIMIT = 128


def cpu_target_ok(target: str, isa: Sequence[str]) -> bool:
    """Whether a CPU with instruction-set flags ``isa`` runs ``target``'s integer kernels without saturation."""
    return target == "portable" or any(f in isa for f in NON_SATURATING_ISA)


def _k_orders(w: np.ndarray, op: str) -> list[np.ndarray]:
    """``w`` as (channels, K) in every order a kernel may walk K: for a conv (C_in, kh, kw) and (kh, kw, C_in)."""
    if op == "Conv" and w.ndim == 4:
        return [w.reshape(w.shape[0], -1), w.transpose(0, 2, 3, 1).reshape(w.shape[0], -1)]
    return [w.reshape(w.shape[0], -1)]


def max_pair_sum(q: np.ndarray, op: str) -> np.ndarray:
    """Per output channel: the largest |q_k + q_(k+1)| over adjacent K positions (any walking order), or |q_k|."""
    out = np.abs(q.reshape(q.shape[0], -1)).max(axis=1).astype(np.int64)
    for m in _k_orders(q.astype(np.int64), op):
        if m.shape[1] > 1:
            out = np.maximum(out, np.abs(m[:, :-1] + m[:, 1:]).max(axis=1))
    return out


#: Candidate scales per channel between full 8 bits (pairs fixed by shrinking) and a scale at which no pair needs it.
SCALE_CANDIDATES = 12


def _fit_pairs(q: np.ndarray, op: str) -> np.ndarray:
    """``q`` (channels first, int) with every adjacent pair sum brought within :data:`PAIR_LIMIT` in every order a
    kernel may walk K, by moving both weights of an offending pair toward zero. Only same-sign pairs can exceed the
    limit, and shrinking a weight never lifts another pair above it (an opposite-sign pair sums to at most 127), so
    one pass per order suffices."""
    q = q.astype(np.int32, copy=True)
    c = q.shape[0]
    two_orders = q.ndim == 4 and op == "Conv" and q.shape[1] > 1 and q.shape[2] * q.shape[3] > 1
    for hwc in (False, True) if two_orders else (False,):
        m = (q.transpose(0, 2, 3, 1) if hwc else q).reshape(c, -1).copy()
        for k in range(m.shape[1] - 1):
            total = m[:, k] + m[:, k + 1]
            excess = np.maximum(np.abs(total) - PAIR_LIMIT, 0)
            if not excess.any():
                continue
            sign = np.sign(total)
            later = np.minimum((excess + 1) // 2, np.abs(m[:, k + 1]))
            m[:, k + 1] -= sign * later
            m[:, k] -= sign * (excess - later)
        q = m.reshape(c, q.shape[2], q.shape[3], q.shape[1]).transpose(0, 3, 1, 2) if hwc else m.reshape(q.shape)
    return q


def pair_limited_int8(w: np.ndarray, op: str) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-channel INT8 (channels on axis 0) with every adjacent pair sum within :data:`PAIR_LIMIT`.

    Per channel, the scale with the smallest squared weight error among :data:`SCALE_CANDIDATES` between the full
    8-bit scale (``amax / 127``, offending pairs shrunk by :func:`_fit_pairs`) and the scale at which no pair
    exceeds the limit (``max pair / 128``): most channels keep nearly all of their 8 bits, and a few large
    neighbours cost a little of their own value instead of the whole channel's resolution."""
    wc = w.astype(np.float64).reshape(w.shape[0], -1)
    amax = np.abs(wc).max(axis=1)
    pair = amax.copy()
    for m in _k_orders(w.astype(np.float64), op):
        if m.shape[1] > 1:
            pair = np.maximum(pair, np.abs(m[:, :-1] + m[:, 1:]).max(axis=1))
    lo = np.maximum(amax / INT8_MAX, MIN_AMAX / INT8_MAX)
    hi = np.maximum(np.maximum(pair / PAIR_LIMIT, lo), MIN_AMAX / INT8_MAX) * 1.0001  # safe without shrinking
    shape = (-1,) + (1,) * (w.ndim - 1)
    best_q = np.zeros(w.shape, np.int8)
    best_s = hi.astype(np.float32)
    best_err = np.full(w.shape[0], np.inf)
    for t in np.linspace(0.0, 1.0, SCALE_CANDIDATES):
        scale = (lo * (hi / lo) ** t).astype(np.float32)
        q = np.clip(np.round(w / scale.reshape(shape)), -INT8_MAX, INT8_MAX)
        q = _fit_pairs(q, op)
        err = ((wc - q.reshape(w.shape[0], -1) * scale.astype(np.float64)[:, None]) ** 2).sum(axis=1)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_s = np.where(better, scale, best_s).astype(np.float32)
        best_q[better] = q[better].astype(np.int8)
    if (max_pair_sum(best_q, op) > PAIR_LIMIT).any():  # pragma: no cover - _fit_pairs guarantees it
        raise RuntimeError("could not fit INT8 weights under the pair-sum limit")
    return best_q, best_s


def is_depthwise(node: onnx.NodeProto, weight_shape: Sequence[int]) -> bool:
    """A Conv with one input and one output channel per group: ONNX Runtime's depthwise kernels, which never add two
    products in 16 bits (each int16 pair holds one product and a zero, or the sum is in int32)."""
    group = next((a.i for a in node.attribute if a.name == "group"), 1)
    return node.op_type == "Conv" and len(weight_shape) == 4 and group > 1 and weight_shape[0] == group \
        and weight_shape[1] == 1


def limit_pair_sums(model: onnx.ModelProto, float_weights: dict[str, np.ndarray] | None = None,
                    depthwise: bool = False) -> dict[str, int]:
    """Requantise, in place, every INT8 weight an integer GEMM/conv kernel reads so that no two adjacent products
    can saturate int16 (see the module docstring); conv/Gemm biases follow their new scales. Depthwise convs keep their
    weights (their kernels cannot saturate) unless ``depthwise``. ``float_weights`` (name → array of the float model)
    avoids rounding twice. Returns counts for the report."""
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    float_weights = float_weights or {}
    done: set[str] = set()
    stats = {"weights": 0, "channels": 0, "channels_rescaled": 0}
    for node in g.node:
        if node.op_type not in GEMM_OPS or len(node.input) < 2:
            continue
        dq = producer.get(node.input[1])
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits or dq.input[0] in done:
            continue
        qname, sname = dq.input[0], dq.input[1]
        q = numpy_helper.to_array(inits[qname])
        s = numpy_helper.to_array(inits[sname]).astype(np.float32)
        if q.dtype != np.int8 or sname not in inits or (not depthwise and is_depthwise(node, q.shape)):
            continue
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1) % q.ndim if s.ndim else 0
        base = qname[: -len("_quantized")] if qname.endswith("_quantized") else ""
        w = float_weights.get(base)
        if w is None or w.shape != q.shape:
            w = q.astype(np.float32) * (s.reshape([-1 if i == axis else 1 for i in range(q.ndim)]) if s.ndim else s)
        wc = np.moveaxis(w, axis, 0)
        if s.ndim == 0:  # per-tensor: one channel over everything
            wc = wc.reshape(1, -1)
        new_q, new_s = pair_limited_int8(wc, node.op_type if q.ndim == 4 else "Gemm")
        old_s = np.broadcast_to(s, new_s.shape) if s.ndim == 0 else s
        stats["weights"] += 1
        stats["channels"] += len(new_s)
        stats["channels_rescaled"] += int((np.abs(new_s - old_s) > 1e-6 * np.abs(old_s)).sum())
        if s.ndim == 0:
            new_s = new_s.reshape(())
            new_q = new_q.reshape(np.moveaxis(w, axis, 0).shape)
        inits[qname].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(np.moveaxis(new_q, 0, axis)), qname))
        inits[sname].CopyFrom(numpy_helper.from_array(new_s.astype(np.float32), sname))
        done.add(qname)
        if len(node.input) > 2 and node.input[2] and (bdq := producer.get(node.input[2])) is not None \
                and bdq.op_type == "DequantizeLinear" and bdq.input[0] in inits and bdq.input[1] in inits:
            bq = numpy_helper.to_array(inits[bdq.input[0]])
            bs = numpy_helper.to_array(inits[bdq.input[1]]).astype(np.float64)
            if bq.dtype == np.int32:
                b = bq.astype(np.float64) * bs
                new_bs = (bs * (new_s.astype(np.float64) / old_s.astype(np.float64).reshape(bs.shape)
                                if bs.ndim else bs * float(new_s) / float(old_s))).astype(np.float32)
                new_bq = np.clip(np.round(b / new_bs), -(2 ** 31), 2 ** 31 - 1).astype(np.int32)
                inits[bdq.input[0]].CopyFrom(numpy_helper.from_array(new_bq, bdq.input[0]))
                inits[bdq.input[1]].CopyFrom(numpy_helper.from_array(new_bs, bdq.input[1]))
    return stats


def write_cpu_int8(model_path: str | Path, tensors_data: Any, out_path: str | Path,
                   nodes_to_exclude: Sequence[str] = (), per_channel: bool = True,
                   quant_format: str = "qdq", metadata_props: dict[str, str] | None = None,
                   target: str = "portable") -> Path:
    """U8 activations / S8 per-channel weights with onnxruntime's quantiser, reusing precomputed ranges.

    ``target`` (:data:`CPU_TARGETS`): ``portable`` limits adjacent weight pairs so no x86 kernel saturates
    (:func:`limit_pair_sums`); ``vnni`` keeps onnxruntime's plain 8-bit weights for CPUs with int32-accumulating
    dot products.
    """
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import save_tensors_data

    if target not in CPU_TARGETS:
        raise ValueError(f"unknown CPU target {target!r}; choose one of {', '.join(CPU_TARGETS)}")
    fmt = {"qdq": QuantFormat.QDQ, "qoperator": QuantFormat.QOperator}[quant_format]
    with tempfile.TemporaryDirectory(prefix="quant.") as tmp:
        cache = Path(tmp) / "ranges.json"
        save_tensors_data(tensors_data, cache)
        raw = Path(tmp) / "int8.onnx"
        quantize_static(str(model_path), str(raw), None, quant_format=fmt, per_channel=per_channel,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        nodes_to_exclude=list(nodes_to_exclude), calibrate_method=tensors_data.calibration_method,
                        calibration_cache_path=cache)
        model = onnx.load(str(raw))
    if target == "portable":
        floats = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(model_path)).graph.initializer
                  if i.data_type == TensorProto.FLOAT}
        st = limit_pair_sums(model, floats)
        log.info("CPU INT8 (portable): %d of %d GEMM-type weight channels rescaled or fitted so no int16 pair sum "
                 "can saturate", st["channels_rescaled"], st["channels"])
    _set_props(model, metadata_props)
    atomic_write_bytes(out_path, model.SerializeToString())
    return Path(out_path)


def count_qdq_consumers(model: onnx.ModelProto) -> dict[str, int]:
    """How many nodes of each op type read a DequantizeLinear output (placement summary)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    counts: dict[str, int] = {}
    for n in model.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        if any(x in producer and producer[x].op_type == "DequantizeLinear" for x in n.input):
            counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts
