"""``python -m export.deepstream --model model.onnx|model.engine --out dir/``: an nvinfer config for DeepStream.

Writes ``dir/config_infer_<name>.txt`` (the ``[property]`` group of Gst-nvinfer, as a classifier:
``network-type=1``) and ``dir/labels.txt`` (nvinfer's classifier format: one line, labels separated by ``;``).

What carries over from the model's metadata, and what cannot:

* Normalisation. nvinfer computes ``y = net-scale-factor * (x - offsets)`` on 0–255 pixels; ours is
  ``(x / 255 - mean[c]) / std[c]``. ``offsets`` = ``255 * mean`` is exact. ``net-scale-factor`` is one number
  while ``std`` is per channel: we write ``2 / (255 * (min(std) + max(std)))``, which makes the largest relative
  error over the channels as small as it can be (0 when all channels share one std; about ±1 % for ImageNet's
  std), and print that error.
* Colour. Our models take grey replicated into three channels. From a grey camera (R = G = B after
  nvvideoconvert) ``model-color-format=0`` gives exactly that; a colour source would be fed as colour, not as
  our BT.601 grey: convert to grey upstream. One-channel models get ``model-color-format=2`` (GRAY).
* Rejection. nvinfer's built-in classifier keeps a label when the largest output exceeds
  ``classifier-threshold``; our network outputs logits, so that is our rule only for ``score="max_logit"`` with
  temperature 1. For every other score we write a threshold that keeps all labels and set ``output-tensor-meta=1``
  so a probe can apply the model's rule (the metadata JSON is written beside the config).
* Intensity. nvinfer scales every frame by the same numbers, so a model trained with the per-frame percentile
  stretch (``intensity="percentile"``) would see other inputs than it was trained on: such models are refused
  (train or refit one with ``--intensity full_scale``/``bit_depth`` for DeepStream). The frame-quality gate does
  not run inside nvinfer either; a probe has to apply it.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from export.triton import ModelInfo, inspect
from runtime.files import atomic_copy, atomic_write_text

LABELS_FILE = "labels.txt"
NETWORK_MODE = {"fp32": 0, "int8": 1, "fp16": 2}  # nvinfer network-mode
KEEP_ALL_THRESHOLD = -1e30


@dataclass(frozen=True)
class Normalisation:
    net_scale_factor: float
    offsets: tuple[float, ...]
    #: Largest relative error of the single scale against the per-channel 1 / (255 * std).
    max_relative_error: float


def normalisation(mean: Sequence[float], std: Sequence[float]) -> Normalisation:
    """nvinfer's ``net-scale-factor``/``offsets`` for our ``(x / 255 - mean) / std`` (see module docstring)."""
    scale = 2.0 / (255.0 * (min(std) + max(std)))
    err = max(abs(scale * 255.0 * s - 1.0) for s in std)
    return Normalisation(scale, tuple(255.0 * m for m in mean), err)


def render_config(info: ModelInfo, name: str, *, batch_size: int, model_file: str,
                  labels_file: str = LABELS_FILE, gie_id: int = 1, process_mode: int = 1) -> str:
    meta = info.meta
    norm = normalisation(meta.mean, meta.std)
    exact_rule = meta.score == "max_logit" and meta.temperature == 1.0 and not meta.score_output
    threshold = meta.threshold if (exact_rule and meta.threshold is not None) else KEEP_ALL_THRESHOLD
    h, w = meta.input_size
    key = "model-engine-file" if info.kind == "engine" else "onnx-file"
    rule = "off" if meta.threshold is None else f"{meta.score} < {meta.threshold:.6g}"
    lines = [
        f"# nvinfer config for {info.path.name} ({meta.arch}, {meta.precision}) written by export.deepstream.",
        f"# net-scale-factor is one number for per-channel std {list(meta.std)}: largest relative error "
        f"{norm.max_relative_error:.3%}.",
        f"# The model's rejection rule ({rule}, temperature {meta.temperature:g}) is "
        + ("classifier-threshold below." if exact_rule else
           "NOT applied by nvinfer: read the output tensor (output-tensor-meta=1) and apply it in a probe; the "
           f"metadata is in {name}.json."),
        "[property]",
        "gpu-id=0",
        f"{key}={model_file}",
        f"labelfile-path={labels_file}",
        f"batch-size={batch_size}",
        f"network-mode={NETWORK_MODE.get(meta.precision, 0)}",
        "network-type=1",
        f"process-mode={process_mode}",
        f"gie-unique-id={gie_id}",
        f"net-scale-factor={norm.net_scale_factor:.10g}",
        "offsets=" + ";".join(f"{o:.6g}" for o in norm.offsets),
        f"model-color-format={2 if meta.channels == 1 else 0}",
        f"infer-dims={meta.channels};{h};{w}",
        "maintain-aspect-ratio=0",
        f"output-blob-names={meta.output_name}",
        f"classifier-threshold={threshold:.10g}",
        "output-tensor-meta=1",
    ]
    return "\n".join(lines) + "\n"


def write_config(model: str | Path, out: str | Path, name: str = "sem_classifier", *,
                 batch_size: int | None = None) -> Path:
    """Copy the model into ``out`` and write its nvinfer config, labels and metadata; returns the config path."""
    info = inspect(model)
    if info.meta.intensity == "percentile":
        raise ValueError(f"{info.path}: the model stretches each frame to its own percentiles (intensity "
                         "'percentile'), which nvinfer's fixed net-scale-factor/offsets cannot do; use a model "
                         "trained with --intensity full_scale or bit_depth for DeepStream")
    if batch_size is None:
        batch_size = info.max_batch or 1
    if info.max_batch is not None and not info.min_batch <= batch_size <= info.max_batch:
        raise ValueError(f"{info.path}: batch-size {batch_size} is outside the model's {info.min_batch}.."
                         f"{info.max_batch}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    target = out / info.path.name
    if target.resolve() != info.path.resolve():
        atomic_copy(info.path, target)
    atomic_write_text(out / LABELS_FILE, ";".join(info.meta.labels) + "\n")
    atomic_write_text(out / f"{name}.json", json.dumps(info.meta.to_dict(), indent=2, sort_keys=True) + "\n")
    config = out / f"config_infer_{name}.txt"
    atomic_write_text(config, render_config(info, name, batch_size=batch_size, model_file=target.name))
    return config


def parse_config(text: str) -> dict[str, str]:
    """``key=value`` lines of an nvinfer config (comments and group headers skipped)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "[")) and "=" in line:
            k, v = line.split("=", 1)
            out[k.strip()] = v.strip()
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m export.deepstream", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="ONNX model or TensorRT engine (with its .json sidecar)")
    p.add_argument("--out", required=True, help="folder for the config, labels, metadata and model copy")
    p.add_argument("--name", default="sem_classifier")
    p.add_argument("--batch-size", type=int, default=None,
                   help="nvinfer batch-size (default: the engine profile's maximum, 1 for dynamic ONNX)")
    args = p.parse_args(argv)
    try:
        config = write_config(args.model, args.out, args.name, batch_size=args.batch_size)
    except (OSError, ValueError) as e:
        print(f"export.deepstream: {e}", file=sys.stderr)
        return 2
    print(f"wrote {config}")
    print(config.read_text().split("[property]")[0].rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
