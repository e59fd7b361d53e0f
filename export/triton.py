"""``python -m export.triton --model model.onnx|model.engine --out repo/``: a model repository for stock Triton.

Writes the standard layout NVIDIA's Triton Inference Server loads (``tritonserver --model-repository repo/``)::

    repo/<name>/config.pbtxt         platform, max_batch_size, dims, dynamic batching, instance groups
    repo/<name>/labels.txt           class names in output order (Triton's classification extension)
    repo/<name>/1/model.onnx|.plan   the artifact, unchanged
    repo/<name>/<name>.json          the model metadata (also in config.pbtxt ``parameters``, with its fingerprint)

Stock Triton serves the bare network (float input in, logits out): preprocessing and the rejection rule travel in
the metadata, and a client applies them (``runtime.remote.RemoteClassifier`` does, from the config's parameters;
``runtime.serve`` is the alternative that runs them on the server).
A TensorRT engine serves batched only when its optimisation profile starts at batch 1; ``max_batch_size`` is the
profile's maximum, and the engine runs only on the GPU model and TensorRT version it was built with.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from runtime.contract import METADATA_KEY, ModelMetadata, read_sidecar
from runtime.files import atomic_copy, atomic_write_text
from runtime.remote import FINGERPRINT_PARAMETER, model_fingerprint

DEFAULT_MAX_BATCH = 16
DEFAULT_QUEUE_DELAY_US = 2000
LABELS_FILE = "labels.txt"
PLATFORMS = {"onnx": ("onnxruntime_onnx", "model.onnx"), "engine": ("tensorrt_plan", "model.plan")}


@dataclass(frozen=True)
class ModelInfo:
    """What the repository needs to know about an artifact."""

    path: Path
    kind: str  # "onnx" | "engine"
    meta: ModelMetadata
    input_name: str
    outputs: tuple[str, ...]
    #: Largest batch the artifact takes (None: unbounded dynamic batch); 0 when the batch dimension is fixed at 1.
    max_batch: int | None
    min_batch: int


def inspect(path: str | Path) -> ModelInfo:
    """Read the metadata, input name, outputs and batch range of an ONNX model or a TensorRT engine (sidecar)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(2, "model file not found", str(path))
    if path.suffix in (".engine", ".plan"):
        meta, extra = read_sidecar(path)
        profile = extra.get("profile") or {}
        if not profile.get("min") or not profile.get("max"):
            raise ValueError(f"{path}: its sidecar has no optimisation profile; rebuild it with "
                             "`python -m export.build_engine`")
        outputs = [meta.output_name] + ([meta.score_output] if meta.score_output else [])
        return ModelInfo(path, "engine", meta, profile.get("input", meta.input_name), tuple(outputs),
                         int(profile["max"][0]), int(profile["min"][0]))
    from runtime.ort_backend import OrtBackend

    backend = OrtBackend(path, providers="cpu", threads=1)
    try:
        return ModelInfo(path, "onnx", backend.meta, backend.input_name, tuple(backend.output_names),
                         backend.max_batch, backend.min_batch)
    finally:
        backend.close()


def _pbtxt_string(text: str) -> str:
    """A protobuf text-format string literal."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def render_config(info: ModelInfo, name: str, *, max_batch: int = DEFAULT_MAX_BATCH,
                  queue_delay_us: int = DEFAULT_QUEUE_DELAY_US, instances: int = 1, kind: str = "KIND_GPU") -> str:
    """``config.pbtxt`` text for ``info`` (Triton's ``model_config.proto`` in text format)."""
    meta = info.meta
    platform = PLATFORMS[info.kind][0]
    if info.max_batch is None:  # dynamic batch dimension: the server's limit is ours to choose
        mbs = max_batch
    elif info.min_batch == 1 and info.max_batch > 1:
        mbs = min(max_batch, info.max_batch) if info.kind == "onnx" else info.max_batch
    elif info.max_batch == 1:
        mbs = 0  # fixed batch 1: no batching, dims carry the batch dimension
    else:
        raise ValueError(f"{info.path}: batch range {info.min_batch}..{info.max_batch} cannot be served batched "
                         "(Triton sends any batch from 1 up); rebuild with a profile starting at 1, e.g. "
                         "`python -m export.build_engine --batch 1,8,32`")
    lead = [] if mbs else [1]
    c, (h, w) = meta.channels, meta.input_size
    dims = lambda *d: "[ " + ", ".join(str(v) for v in (*lead, *d)) + " ]"  # noqa: E731
    lines = [f"name: {_pbtxt_string(name)}", f"platform: {_pbtxt_string(platform)}", f"max_batch_size: {mbs}",
             "input [", "  {", f"    name: {_pbtxt_string(info.input_name)}", "    data_type: TYPE_FP32",
             "    format: FORMAT_NCHW", f"    dims: {dims(c, h, w)}", "  }", "]", "output ["]
    outs = []
    for out in info.outputs:
        if out == meta.output_name:
            outs.append(["  {", f"    name: {_pbtxt_string(out)}", "    data_type: TYPE_FP32",
                         f"    dims: {dims(meta.num_classes)}", f"    label_filename: {_pbtxt_string(LABELS_FILE)}",
                         "  }"])
        elif out == meta.score_output:
            # The graph gives (N,): one value per image, which Triton describes as dims [1] reshaped to [].
            reshape = ["    reshape: { shape: [ ] }"] if mbs else []
            outs.append(["  {", f"    name: {_pbtxt_string(out)}", "    data_type: TYPE_FP32",
                         f"    dims: {dims(1)}", *reshape, "  }"])
    lines += [",\n".join("\n".join(o) for o in outs), "]"]
    if mbs:
        preferred = sorted({b for b in (mbs // 2, mbs) if b >= 1})
        lines += ["dynamic_batching {", f"  preferred_batch_size: [ {', '.join(map(str, preferred))} ]",
                  f"  max_queue_delay_microseconds: {queue_delay_us}", "}"]
    lines += ["instance_group [", "  {", f"    count: {instances}", f"    kind: {kind}", "  }", "]",
              "parameters {", f"  key: {_pbtxt_string(METADATA_KEY)}",
              f"  value {{ string_value: {_pbtxt_string(meta.to_json())} }}", "}",
              # The artifact's identity (as `runtime.serve` reports it), which a remote client can be pinned to.
              "parameters {", f"  key: {_pbtxt_string(FINGERPRINT_PARAMETER)}",
              f"  value {{ string_value: {_pbtxt_string(model_fingerprint(info.path))} }}", "}"]
    return "\n".join(lines) + "\n"


def write_repository(model: str | Path, out: str | Path, name: str = "sem_classifier", *,
                     max_batch: int = DEFAULT_MAX_BATCH, queue_delay_us: int = DEFAULT_QUEUE_DELAY_US,
                     instances: int = 1, kind: str = "KIND_GPU", version: int = 1) -> Path:
    """Write ``out/<name>/`` (see module docstring); returns that folder. Each file is written atomically."""
    info = inspect(model)
    config = render_config(info, name, max_batch=max_batch, queue_delay_us=queue_delay_us, instances=instances,
                           kind=kind)
    folder = Path(out) / name
    (folder / str(version)).mkdir(parents=True, exist_ok=True)
    target = folder / str(version) / PLATFORMS[info.kind][1]
    atomic_copy(info.path, target)
    atomic_write_text(folder / LABELS_FILE, "\n".join(info.meta.labels) + "\n")
    atomic_write_text(folder / f"{name}.json", json.dumps(info.meta.to_dict(), indent=2, sort_keys=True) + "\n")
    atomic_write_text(folder / "config.pbtxt", config)
    return folder


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m export.triton", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="ONNX model or TensorRT engine (with its .json sidecar)")
    p.add_argument("--out", required=True, help="model repository folder (created)")
    p.add_argument("--name", default="sem_classifier", help="model name in the repository")
    p.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH,
                   help="max_batch_size for a dynamic-batch ONNX model (engines: their profile's maximum)")
    p.add_argument("--max-queue-delay-us", type=int, default=DEFAULT_QUEUE_DELAY_US)
    p.add_argument("--instances", type=int, default=1, help="instance_group count")
    p.add_argument("--kind", choices=("gpu", "cpu"), default="gpu", help="instance_group kind")
    args = p.parse_args(argv)
    try:
        folder = write_repository(args.model, args.out, args.name, max_batch=args.max_batch,
                                  queue_delay_us=args.max_queue_delay_us, instances=args.instances,
                                  kind=f"KIND_{args.kind.upper()}")
    except (OSError, ValueError) as e:
        print(f"export.triton: {e}", file=sys.stderr)
        return 2
    print(f"wrote {folder} (serve with: tritonserver --model-repository {folder.parent})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
