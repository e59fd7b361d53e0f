"""``python -m train.from_onnx``: rebuild a training checkpoint from an exported (BatchNorm-folded) ONNX model.

Export simplifies the graph, which folds every BatchNorm into the convolution before it. To fine-tune such a model
again (e.g. the bundled demo model, of which no torch checkpoint is kept), its convolution weights and biases are
copied in graph order into the ``train.models`` architecture, each BatchNorm is set to the identity (gamma 1,
beta = the folded bias, running mean 0, running variance 1 − eps) and the final Gemm becomes the classifier. With
``--data``, each BatchNorm is instead "unfolded" around the statistics its convolution's output has on those images
(running mean/variance = the measured ones, gamma = the standard deviation, beta = folded bias + mean): the same
function in eval mode, and one that training-mode batch statistics barely move, so fine-tuning starts where the
exported model is. The result is checked against ONNX Runtime on random inputs and written as a checkpoint
``python -m train --weights`` accepts, with the ONNX model's metadata.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from runtime.contract import ModelMetadata
from sem_extras import cli

if TYPE_CHECKING:  # torch comes with the train extra; imported where used so that --help works without it
    import torch
    from torch import nn

log = logging.getLogger(__name__)


class ConversionError(ValueError):
    """The ONNX graph does not line up with the architecture named in its metadata."""


def _onnx_meta_and_params(path: Path) -> tuple[ModelMetadata, list[tuple[np.ndarray, np.ndarray]],
                                                tuple[np.ndarray, np.ndarray]]:
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(path))
    meta = ModelMetadata.from_props({p.key: p.value for p in proto.metadata_props}, str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    for node in proto.graph.node:  # initializers stored as Constant nodes
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            inits.setdefault(node.output[0], numpy_helper.to_array(node.attribute[0].t))
    convs: list[tuple[np.ndarray, np.ndarray]] = []
    gemm = None
    for node in proto.graph.node:
        if node.op_type == "Conv":
            if len(node.input) < 3:
                raise ConversionError(f"{path}: Conv {node.name or node.output[0]} has no bias (BatchNorm not folded?)")
            convs.append((inits[node.input[1]], inits[node.input[2]]))
        elif node.op_type == "Gemm":
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            w = inits[node.input[1]]
            gemm = (w if trans_b else w.T, inits[node.input[2]])
        elif node.op_type == "BatchNormalization":
            raise ConversionError(f"{path}: graph still has BatchNormalization nodes; only folded graphs are handled")
    if gemm is None:
        raise ConversionError(f"{path}: no Gemm (classifier) node found")
    return meta, convs, gemm


def convert(onnx_path: str | Path) -> tuple[nn.Module, ModelMetadata]:
    """The torch model (``train.models`` layout) equivalent to the folded ONNX model, and its metadata."""
    import torch
    from torch import nn

    from train.models import build_model

    path = Path(onnx_path)
    meta, convs, (fc_w, fc_b) = _onnx_meta_and_params(path)
    model = build_model(meta.arch, meta.num_classes, "none")
    pairs: list[tuple[nn.Conv2d, nn.BatchNorm2d]] = []
    modules = list(model.features.modules())
    for i, m in enumerate(modules):
        if isinstance(m, nn.Conv2d):
            bn = modules[i + 1] if i + 1 < len(modules) else None
            if not isinstance(bn, nn.BatchNorm2d):
                raise ConversionError(f"{meta.arch}: conv {i} is not followed by a BatchNorm")
            pairs.append((m, bn))
    if len(pairs) != len(convs):
        raise ConversionError(f"{path}: {len(convs)} Conv nodes, but {meta.arch} has {len(pairs)} conv+BN pairs")
    with torch.no_grad():
        for k, ((conv, bn), (w, b)) in enumerate(zip(pairs, convs)):
            if tuple(conv.weight.shape) != w.shape:
                raise ConversionError(f"{path}: Conv #{k} weight {w.shape} != {tuple(conv.weight.shape)}")
            conv.weight.copy_(torch.from_numpy(np.array(w)))
            bn.weight.fill_(1.0)
            bn.bias.copy_(torch.from_numpy(np.array(b)))
            bn.running_mean.zero_()
            bn.running_var.fill_(1.0 - bn.eps)
        fc = model.classifier[-1]
        if tuple(fc.weight.shape) != fc_w.shape:
            raise ConversionError(f"{path}: Gemm weight {fc_w.shape} != classifier {tuple(fc.weight.shape)}")
        fc.weight.copy_(torch.from_numpy(np.array(fc_w)))
        fc.bias.copy_(torch.from_numpy(np.array(fc_b)))
    return model.eval(), meta


def unfold_batchnorm(model: nn.Module, batches: Sequence[torch.Tensor]) -> None:
    """Set every identity BatchNorm (from :func:`convert`) to the statistics of its conv's output on ``batches``,
    keeping the eval-mode function unchanged."""
    import torch
    from torch import nn

    modules = list(model.features.modules())
    pairs = [(m, modules[i + 1]) for i, m in enumerate(modules)
             if isinstance(m, nn.Conv2d) and isinstance(modules[i + 1], nn.BatchNorm2d)]
    sums: dict[int, list[torch.Tensor]] = {}

    def hook(k: int) -> Any:
        def f(_m: nn.Module, _inp: Any, out: torch.Tensor) -> None:
            x = out.detach().double()
            s = sums.setdefault(k, [torch.zeros(x.shape[1], dtype=torch.float64)] * 2 + [torch.zeros(())])
            s[0] = s[0] + x.sum((0, 2, 3))
            s[1] = s[1] + (x * x).sum((0, 2, 3))
            s[2] = s[2] + x.numel() / x.shape[1]
        return f

    handles = [conv.register_forward_hook(hook(k)) for k, (conv, _) in enumerate(pairs)]
    model.eval()
    with torch.no_grad():
        for b in batches:
            model(b)
    for h in handles:
        h.remove()
    with torch.no_grad():
        for k, (_, bn) in enumerate(pairs):
            s1, s2, n = sums[k]
            mu = s1 / n
            var = (s2 / n - mu * mu).clamp_min(1e-6)
            bias = bn.bias.double().clone()
            bn.running_mean.copy_(mu.float())
            bn.running_var.copy_(var.float())
            bn.weight.copy_(torch.sqrt(var + bn.eps).float())
            bn.bias.copy_((bias + mu).float())


def data_batches(folder: str | Path, meta: ModelMetadata, n: int = 256, batch: int = 32) -> list[torch.Tensor]:
    """Up to ``n`` images from ``folder`` (``<class>/`` subfolders or flat), preprocessed as ``meta`` says."""
    import torch

    from runtime.folders import list_images
    from runtime.preprocess import Preprocessor

    files = list_images(folder, recursive=True)
    if not files:
        raise ConversionError(f"{folder}: no images")
    files = files[::max(1, len(files) // n)][:n]
    pre = Preprocessor(meta)
    x = np.stack([pre(f) for f in files])
    return [torch.from_numpy(x[i:i + batch]) for i in range(0, len(x), batch)]


def max_logit_difference(model: nn.Module, onnx_path: str | Path, meta: ModelMetadata, n: int = 8,
                         seed: int = 0) -> float:
    """Max |Δlogit| between ``model`` and ONNX Runtime on ``n`` random normalised inputs."""
    import onnxruntime as ort
    import torch

    x = np.random.default_rng(seed).uniform(-1, 1, (n, meta.channels, *meta.input_size)).astype(np.float32)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    ref = sess.run([meta.output_name], {meta.input_name: x})[0]
    with torch.no_grad():
        got = model(torch.from_numpy(x)).numpy()
    return float(np.abs(ref - got).max())


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m train.from_onnx", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="example:\n  python -m train.from_onnx --onnx models/sem_classifier.onnx "
                                        "--out runs/bundled/from_onnx.pt\n  python -m train --data DIR --out runs/ft "
                                        "--weights runs/bundled/from_onnx.pt --img-size 128")
    ap.add_argument("--onnx", required=True, help="exported FP32 ONNX model with project metadata")
    ap.add_argument("--out", required=True, help="checkpoint to write (.pt)")
    ap.add_argument("--data", help="images (a folder, searched recursively) to unfold the BatchNorms around; "
                    "without it they are identities, which training-mode batch statistics then disturb")
    ap.add_argument("--tolerance", type=float, default=1e-3, help="max |Δlogit| against ONNX Runtime (default 1e-3)")
    return ap


@cli("python -m train.from_onnx")
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from train.checkpoint import save_checkpoint

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        model, meta = convert(args.onnx)
        if args.data:
            unfold_batchnorm(model, data_batches(args.data, meta))
    except (ConversionError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    diff = max_logit_difference(model, args.onnx, meta)
    print(f"max |Δlogit| torch vs ONNX Runtime: {diff:.2e}")
    if not diff <= args.tolerance:
        print(f"error: {args.onnx}: converted model differs by {diff:.3g} > {args.tolerance}", file=sys.stderr)
        return 1
    save_checkpoint(args.out, model, meta, epoch=0)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
