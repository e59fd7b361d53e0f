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

from runtime._atomic import atomic_write_bytes
from runtime.contract import METADATA_KEY, ModelMetadata, project_version
from runtime.errors import InputError
from runtime.preprocess import Preprocessor

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
#: Max |Δlogit| allowed between PyTorch and ONNX Runtime (FP32; typical is ~1e-5).
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


def set_metadata_props(model: onnx.ModelProto, props: dict[str, str]) -> None:
    existing = {p.key: p for p in model.metadata_props}
    for k, v in props.items():
        if k in existing:
            existing[k].value = v
        else:
            model.metadata_props.append(onnx.StringStringEntryProto(key=k, value=v))


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


def convert_to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """Float32 graph → float16 inside, float32 at the inputs and outputs (like ``keep_io_types=True``).

    Converts float initialisers (clamped to the FP16 range), Constant values, ``Cast(to=FLOAT)`` targets and every
    float value type, then casts the graph inputs in and the outputs back out. Graphs with Q/DQ nodes are refused:
    their scales must stay float32 before opset 19.
    """
    from onnx import TensorProto, helper, numpy_helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in g.node):
        raise ValueError("convert_to_fp16: the graph has Q/DQ nodes; convert the FP32 graph instead")
    F32, F16 = TensorProto.FLOAT, TensorProto.FLOAT16

    def to16(t: TensorProto) -> TensorProto:
        if t.data_type != F32:
            return t
        a = numpy_helper.to_array(t)
        return numpy_helper.from_array(np.clip(a, -FP16_MAX, FP16_MAX).astype(np.float16), t.name)

    new_inits = [to16(t) for t in g.initializer]
    del g.initializer[:]
    g.initializer.extend(new_inits)
    for n in g.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == F32:
                a.t.CopyFrom(to16(a.t))
            if n.op_type == "Cast" and a.name == "to" and a.i == F32:
                a.i = F16
    for vi in g.value_info:
        if vi.type.tensor_type.elem_type == F32:
            vi.type.tensor_type.elem_type = F16
    def rename(old_name: str, new_name: str, field: str) -> None:
        for n in g.node:
            names = getattr(n, field)
            for i, x in enumerate(names):
                if x == old_name:
                    names[i] = new_name

    cast_in, cast_out = [], []
    for inp in g.input:
        if inp.type.tensor_type.elem_type == F32:
            rename(inp.name, inp.name + "_fp16", "input")
            cast_in.append(helper.make_node("Cast", [inp.name], [inp.name + "_fp16"], name=inp.name + "_to_fp16",
                                            to=F16))
    for out in g.output:
        if out.type.tensor_type.elem_type == F32:
            rename(out.name, out.name + "_fp16", "output")
            cast_out.append(helper.make_node("Cast", [out.name + "_fp16"], [out.name], name=out.name + "_to_fp32",
                                             to=F32))
    nodes = cast_in + list(g.node) + cast_out
    del g.node[:]
    g.node.extend(nodes)
    onnx.checker.check_model(m)
    return m


def write_fp16_onnx(fp32_path: str | os.PathLike[str], out: str | os.PathLike[str],
                    meta: ModelMetadata | None = None) -> Path:
    """Convert the FP32 ONNX file at ``fp32_path`` to FP16 (IO stays float32) and write it atomically."""
    model = onnx.load(str(fp32_path))
    fp16 = convert_to_fp16(model)
    if meta is not None:
        embed_metadata(fp16, meta)
    return atomic_write_bytes(out, fp16.SerializeToString())
