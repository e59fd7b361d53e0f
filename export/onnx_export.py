"""PyTorch → ONNX with the model metadata inside, simplified, checked, and compared against PyTorch.

:func:`export_onnx` takes any ``nn.Module`` whose outputs are named by ``output_names`` (the plain classifier gives
``logits``; a wrapper module can add outputs such as a feature-space rejection score), so the open-set exporter can
reuse it. :func:`parity_check` runs real images (preprocessed by :class:`runtime.preprocess.Preprocessor`) through
both PyTorch and ONNX Runtime and raises :class:`ParityError` past the tolerance.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from calibration.quantize import set_metadata_props
from runtime.contract import METADATA_KEY, ModelMetadata, project_version
from runtime.errors import InputError
from runtime.files import atomic_write_bytes
from runtime.preprocess import Preprocessor

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
#: Max |Δlogit| allowed between PyTorch and ONNX Runtime (FP32).
DEFAULT_PARITY_TOLERANCE = 1e-3
PRODUCER = "sem-defect-classifier export"


class ParityError(RuntimeError):
    """ONNX Runtime's outputs disagree with PyTorch's beyond the tolerance."""


@dataclass(frozen=True)
class ParityResult:
    num_images: int
    max_abs_diff: float
    top1_agreement: float
    source: str
    per_output: dict[str, float]

    def line(self) -> str:
        return (f"parity on {self.num_images} images ({self.source}): max |Δlogit| {self.max_abs_diff:.2e}, "
                f"top-1 agreement {self.top1_agreement:.1%}")


def embed_metadata(model: onnx.ModelProto, meta: ModelMetadata, extra_props: dict[str, str] | None = None) -> None:
    """Put ``meta`` (key :data:`METADATA_KEY`) and producer info into ``model``."""
    model.producer_name = PRODUCER
    model.producer_version = project_version()
    model.doc_string = f"SEM defect classifier ({meta.arch}, {meta.precision}); labels: {', '.join(meta.labels)}"
    set_metadata_props(model, {METADATA_KEY: meta.validate().to_json(), **(extra_props or {})})


def export_onnx(model: Any, meta: ModelMetadata, out: str | os.PathLike[str], *,
                output_names: Sequence[str] | None = None, opset: int = DEFAULT_OPSET, simplify: bool = True,
                extra_props: dict[str, str] | None = None) -> Path:
    """Export ``model`` (a classifier or a wrapper with extra outputs) to ``out``, atomically.

    The input is ``meta.input_name`` with a dynamic batch axis; outputs are ``output_names`` (default:
    ``[meta.output_name]``, plus ``meta.score_output`` when set), each with a dynamic batch axis.
    """
    import torch

    meta = meta.validate()
    if output_names is None:
        output_names = [meta.output_name] + ([meta.score_output] if meta.score_output else [])
    output_names = list(output_names)
    if meta.output_name not in output_names:
        raise ValueError(f"output_names {output_names} must include the metadata's output {meta.output_name!r}")
    h, w = meta.input_size
    dummy = torch.zeros(2, meta.channels, h, w)
    dynamic = {meta.input_name: {0: "batch"}, **{n: {0: "batch"} for n in output_names}}
    buf = io.BytesIO()
    model = model.eval()
    with torch.no_grad():
        torch.onnx.export(model, (dummy,), buf, dynamo=False, opset_version=opset, input_names=[meta.input_name],
                          output_names=output_names, dynamic_axes=dynamic, do_constant_folding=True)
    proto = onnx.load_from_string(buf.getvalue())
    if simplify:
        proto = simplify_onnx(proto)
    embed_metadata(proto, meta, extra_props)
    onnx.checker.check_model(proto, full_check=True)
    return atomic_write_bytes(out, proto.SerializeToString())


def simplify_onnx(proto: onnx.ModelProto) -> onnx.ModelProto:
    """onnxsim with its own numerical check; on failure keep the unsimplified graph (with a warning)."""
    try:
        import onnxsim
    except ImportError:
        log.warning("onnxsim is not installed; exporting the graph unsimplified (pip install onnxsim)")
        return proto
    try:
        simplified, ok = onnxsim.simplify(proto)
    except Exception as e:  # noqa: BLE001 - onnxsim failures are not fatal: the unsimplified graph is valid
        log.warning("onnxsim failed (%s: %s); exporting the graph unsimplified", type(e).__name__, e)
        return proto
    if not ok:
        log.warning("onnxsim could not validate the simplified graph; exporting the graph unsimplified")
        return proto
    return simplified


# ------------------------------------------------------------------ parity
def generated_images(n: int, size: tuple[int, int], seed: int = 0) -> list[np.ndarray]:
    """Smooth random 8-bit grey images (structure at several scales), for when no real images are at hand."""
    import cv2

    rng = np.random.default_rng(seed)
    h, w = size
    out = []
    for _ in range(n):
        coarse = rng.uniform(0, 255, (max(2, h // 8), max(2, w // 8))).astype(np.float32)
        img = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC) + rng.normal(0, 12, (h, w))
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return out


def parity_inputs(meta: ModelMetadata, data_dirs: Sequence[str | os.PathLike[str] | None] = (), n: int = 16,
                  seed: int = 0) -> tuple[np.ndarray, str]:
    """Preprocessed ``(N, C, H, W)`` parity images from the first usable folder, else generated ones."""
    from calibration.select import calibration_batches, select_calibration_set

    for d in data_dirs:
        if not d:
            continue
        p = Path(d)
        if not p.is_dir():
            log.warning("parity data %s does not exist; trying the next source", p)
            continue
        for sub in ("test", "val", "train", ""):
            folder = p / sub if sub else p
            if not folder.is_dir():
                continue
            try:
                cset = select_calibration_set(folder, size=n, seed=seed, warn=False)
            except (ValueError, FileNotFoundError):
                continue
            batches = list(calibration_batches(cset, meta, batch_size=n))
            if batches:
                return np.concatenate(batches), str(folder)
    pre = Preprocessor(meta)
    imgs = generated_images(n, meta.input_size, seed)
    try:
        return np.stack([pre(x) for x in imgs]), "generated images"
    except InputError as e:  # pragma: no cover - generated images are always valid
        raise RuntimeError(f"cannot preprocess generated parity images: {e}") from None


def parity_check(model: Any, onnx_path: str | os.PathLike[str], inputs: np.ndarray, source: str = "",
                 tolerance: float = DEFAULT_PARITY_TOLERANCE,
                 output_names: Sequence[str] | None = None) -> ParityResult:
    """Compare PyTorch and ONNX Runtime on ``inputs``; raise :class:`ParityError` when max |Δ| > ``tolerance``.

    ``output_names`` name the model's outputs in order (a module returning a tuple); the first is the logits.
    """
    import onnxruntime as ort
    import torch

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = list(output_names) if output_names else [o.name for o in sess.get_outputs()]
    with torch.no_grad():
        ref = model.eval()(torch.from_numpy(inputs))
    refs = [r.numpy() for r in (ref if isinstance(ref, (tuple, list)) else (ref,))]
    got = sess.run(names[:len(refs)], {sess.get_inputs()[0].name: inputs})
    per_output = {n: float(np.abs(a.astype(np.float64) - b).max()) for n, a, b in zip(names, refs, got)}
    worst = max(per_output.values())
    agree = float((refs[0].argmax(1) == got[0].argmax(1)).mean())
    result = ParityResult(len(inputs), worst, agree, source, per_output)
    if not np.isfinite(worst) or worst > tolerance:
        raise ParityError(f"{onnx_path}: ONNX Runtime disagrees with PyTorch: {result.line()} exceeds the "
                          f"tolerance {tolerance:g} (per output: {per_output}); the export is broken — do not ship it")
    return result


# ------------------------------------------------------------------ FP16
FP16_MAX = 65504.0


#: FP16 Q/DQ scales need DequantizeLinear/QuantizeLinear-19 (before it, the scale and so the output is float32).
QDQ_FP16_OPSET = 19
FP16_TINY = float(np.finfo(np.float16).smallest_subnormal)


def _cone(g: onnx.GraphProto, outputs: Sequence[str]) -> set[int]:
    """Indices of the nodes that ``outputs`` depend on."""
    producer = {o: i for i, n in enumerate(g.node) for o in n.output}
    seen: set[int] = set()
    todo = [producer[o] for o in outputs if o in producer]
    while todo:
        i = todo.pop()
        if i not in seen:
            seen.add(i)
            todo += [producer[x] for x in g.node[i].input if x in producer]
    return seen


def _float_tensors(model: onnx.ModelProto) -> set[str]:
    """Names of the float32 tensors of ``model`` (inferred types, graph inputs/outputs and initialisers)."""
    from onnx import TensorProto

    g = onnx.shape_inference.infer_shapes(model).graph
    vis = [*g.value_info, *g.input, *g.output]
    names = {vi.name for vi in vis if vi.type.tensor_type.elem_type == TensorProto.FLOAT}
    return names | {t.name for t in g.initializer if t.data_type == TensorProto.FLOAT}


def _fp32_head(g: onnx.GraphProto, keep_fp32_outputs: Sequence[str]) -> tuple[set[int], set[str]]:
    """The nodes (and their output tensors) that only the ``keep_fp32_outputs`` depend on: they stay float32."""
    out_names = [o.name for o in g.output]
    keep = set(keep_fp32_outputs)
    unknown = keep - set(out_names)
    if unknown:
        raise ValueError(f"convert_to_fp16: keep_fp32_outputs {sorted(unknown)} are not graph outputs {out_names}")
    fp32_nodes = _cone(g, sorted(keep)) - _cone(g, [o for o in out_names if o not in keep]) if keep else set()
    return fp32_nodes, {o for i in fp32_nodes for o in g.node[i].output}


def _prepare_qdq_for_fp16(m: onnx.ModelProto) -> None:
    """Raise the opset of a Q/DQ graph to :data:`QDQ_FP16_OPSET`; refuse a scale FP16 cannot represent."""
    from onnx import TensorProto, numpy_helper

    qdq = [n for n in m.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    if not qdq:
        return
    for op in m.opset_import:
        if op.domain in ("", "ai.onnx") and op.version < QDQ_FP16_OPSET:
            op.version = QDQ_FP16_OPSET
    scales = {n.input[1] for n in qdq}
    for t in m.graph.initializer:
        if t.name in scales and t.data_type == TensorProto.FLOAT:
            a = np.abs(numpy_helper.to_array(t))
            if (a[a > 0] < FP16_TINY).any():
                raise ValueError(f"convert_to_fp16: Q/DQ scale {t.name!r} has values down to {a[a > 0].min():.3g}, "
                                 f"below what FP16 can hold ({FP16_TINY:.3g}); recalibrate, or keep that layer "
                                 "float (--cpu-keep-float / nodes_to_exclude)")


def _to16(t: onnx.TensorProto) -> onnx.TensorProto:
    """A float32 tensor as float16, clamped to FP16's range; any other tensor unchanged."""
    from onnx import TensorProto, numpy_helper

    if t.data_type != TensorProto.FLOAT:
        return t
    a = numpy_helper.to_array(t)
    return numpy_helper.from_array(np.clip(a, -FP16_MAX, FP16_MAX).astype(np.float16), t.name)


def _retype_to_fp16(g: onnx.GraphProto, fp16_nodes: Sequence[int], fp32_tensors: set[str]) -> None:
    """Initialisers read by any FP16 node, the FP16 nodes' tensor attributes and ``Cast(to=FLOAT)`` targets, and
    every float value type outside the FP32 head become float16 (an FP32 node reading one gets a cast later)."""
    from onnx import TensorProto

    fp16_inits = {x for i in fp16_nodes for x in g.node[i].input}
    new_inits = [_to16(t) if t.name in fp16_inits else t for t in g.initializer]
    del g.initializer[:]
    g.initializer.extend(new_inits)
    for i in fp16_nodes:
        n = g.node[i]
        for a in n.attribute:
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == TensorProto.FLOAT:
                a.t.CopyFrom(_to16(a.t))
            if n.op_type == "Cast" and a.name == "to" and a.i == TensorProto.FLOAT:
                a.i = TensorProto.FLOAT16
    for vi in g.value_info:
        if vi.type.tensor_type.elem_type == TensorProto.FLOAT and vi.name not in fp32_tensors:
            vi.type.tensor_type.elem_type = TensorProto.FLOAT16


def _cast(x: str, y: str, name: str, to: int) -> onnx.NodeProto:
    from onnx import helper

    return helper.make_node("Cast", [x], [y], name=name, to=to)


def _insert_casts(g: onnx.GraphProto, fp32_nodes: set[int], floats: set[str], fp32_tensors: set[str]) -> None:
    """Cast the float32 graph inputs down, each float32 output back up right after its producer (so nodes reading
    an output see a valid float32 tensor), and each FP16 tensor the FP32 head reads up, once."""
    from onnx import TensorProto

    F32, F16 = TensorProto.FLOAT, TensorProto.FLOAT16
    init_names = {t.name for t in g.initializer}
    fp16_init_names = {t.name for t in g.initializer if t.data_type == F16}
    inputs16 = {inp.name: inp.name + "_fp16" for inp in g.input
                if inp.type.tensor_type.elem_type == F32 and inp.name not in init_names}
    outputs16 = {o.name: o.name + "_fp16" for o in g.output
                 if o.type.tensor_type.elem_type == F32 and o.name not in fp32_tensors}
    fp16_elsewhere = floats - fp32_tensors - init_names - inputs16.keys() - outputs16.keys()
    nodes = [_cast(x, x16, x + "_to_fp16", F16) for x, x16 in inputs16.items()]
    up_casts: dict[str, str] = {}
    for i, n in enumerate(g.node):
        if i in fp32_nodes:
            for j, x in enumerate(n.input):
                if x in fp16_init_names or x in fp16_elsewhere:  # an FP16 tensor read by the FP32 head
                    if x not in up_casts:
                        up_casts[x] = x + "_fp32"
                        nodes.append(_cast(x, up_casts[x], x + "_to_fp32", F32))
                    n.input[j] = up_casts[x]
            nodes.append(n)
            continue
        n.input[:] = [inputs16.get(x, outputs16.get(x, x)) for x in n.input]
        n.output[:] = [outputs16.get(x, x) for x in n.output]
        nodes.append(n)
        nodes += [_cast(x16, x, x + "_to_fp32", F32) for x, x16 in outputs16.items() if x16 in n.output]
    del g.node[:]
    g.node.extend(nodes)
    outputs = {o.name for o in g.output}
    kept = [vi for vi in g.value_info if vi.name not in outputs]  # an output's name now means its float32 cast
    del g.value_info[:]
    g.value_info.extend(kept)


def convert_to_fp16(model: onnx.ModelProto, keep_fp32_outputs: Sequence[str] = ()) -> onnx.ModelProto:
    """Float32 graph → float16 inside, float32 at the inputs and outputs (like ``keep_io_types=True``).

    Converts float initialisers (clamped to the FP16 range), Constant values, ``Cast(to=FLOAT)`` targets and every
    float value type, then casts the graph inputs in and the outputs back out (right after the node producing each,
    so nodes that read an output, such as a score head reading ``logits``, read a valid float32 tensor).

    ``keep_fp32_outputs``: outputs computed in float32 from the float16 backbone — the nodes only they depend on
    stay float32 (inputs cast up), e.g. a feature-distance score head whose sums exceed FP16's range.

    A Q/DQ INT8 graph is converted too: its scales become float16 and the opset is raised to 19, so every
    DequantizeLinear outputs float16 and the layers between Q/DQ pairs run in FP16 in a strongly typed TensorRT
    build (with float32 scales they would all run in FP32). A scale that FP16 cannot represent is refused.
    """
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    floats = _float_tensors(m)
    fp32_nodes, fp32_tensors = _fp32_head(g, keep_fp32_outputs)
    _prepare_qdq_for_fp16(m)
    _retype_to_fp16(g, [i for i in range(len(g.node)) if i not in fp32_nodes], fp32_tensors)
    _insert_casts(g, fp32_nodes, floats, fp32_tensors)
    onnx.checker.check_model(m)
    return m


def write_fp16_onnx(fp32_path: str | os.PathLike[str], out: str | os.PathLike[str],
                    meta: ModelMetadata | None = None) -> Path:
    """Convert the ONNX file at ``fp32_path`` (FP32, or Q/DQ INT8 with FP32 scales) to FP16 (IO stays float32) and
    write it atomically; ``out`` may be ``fp32_path``. The metadata's ``score_output`` (a feature-space score head)
    stays float32."""
    model = onnx.load(str(fp32_path))
    own = meta
    if own is None:
        try:
            own = ModelMetadata.from_props({p.key: p.value for p in model.metadata_props}, str(fp32_path))
        except Exception:  # noqa: BLE001 - a file without our metadata converts as a plain graph
            own = None
    outputs = {o.name for o in model.graph.output}
    keep = [own.score_output] if own is not None and own.score_output in outputs else []
    fp16 = convert_to_fp16(model, keep_fp32_outputs=keep)
    if meta is not None:
        embed_metadata(fp16, meta)
    return atomic_write_bytes(out, fp16.SerializeToString())
