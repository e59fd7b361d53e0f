"""Golden references for the on-target self-check (:mod:`runtime.check`): choose, compute, store.

:func:`make_goldens` picks images covering the model's classes (per class the ones the FP32 model separates most
clearly, so top-1 agreement is a fair requirement for every precision), turns each into the exact network input
the runtime would build, and records the FP32 model's logits and rejection score for them. :func:`embed_goldens`
puts them into an ONNX file's ``metadata_props`` (:data:`runtime.check.GOLDEN_KEY`); engines get
:func:`runtime.check.write_golden_sidecar`.

``python -m export.golden --model X.onnx --data DIR [--reference FP32.onnx]`` adds them to an existing file (e.g. a
bundled model written before goldens existed) and then runs the check on this machine.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from runtime.check import Goldens, cpu_info
from runtime.contract import ModelMetadata
from sem_extras import cli

log = logging.getLogger(__name__)

DEFAULT_IMAGES = 16
#: Raw bytes of grey images above which fewer images are stored (the document stays a few hundred KB).
MAX_GREY_BYTES = 300_000
#: Candidates looked at per class before choosing the clearest.
CANDIDATES_PER_CLASS = 6


def golden_count(meta: ModelMetadata, wanted: int = DEFAULT_IMAGES) -> int:
    """How many images to store: ``wanted``, fewer for large inputs, but at least one per class."""
    h, w = meta.input_size
    fit = max(1, MAX_GREY_BYTES // (h * w))
    return max(min(wanted, fit), meta.num_classes)


def _affine(meta: ModelMetadata) -> tuple[np.ndarray, np.ndarray]:
    """Per channel (scale, offset) with ``input = grey_u8 * scale + offset`` (the metadata's mean/std on 0-1)."""
    std = np.asarray(meta.std, np.float64)
    mean = np.asarray(meta.mean, np.float64)
    return (1.0 / (255.0 * std)).astype(np.float32), (-mean / std).astype(np.float32)


def to_grey_u8(x: np.ndarray, meta: ModelMetadata) -> np.ndarray:
    """A preprocessed ``(C, H, W)`` network input back to the 8-bit grey image it encodes (channel 0)."""
    v = x[0].astype(np.float64) * meta.std[0] + meta.mean[0]
    return np.clip(np.round(v * 255.0), 0, 255).astype(np.uint8)


def candidate_images(meta: ModelMetadata, data: str | os.PathLike[str] | None, per_class: int = CANDIDATES_PER_CLASS,
                     seed: int = 0) -> tuple[np.ndarray, list[str], list[str], str]:
    """(grey uint8 (N, H, W), class per image, file name per image, source description).

    ``data``: a dataset root (test/, val/ or train/ is used, in that order), a folder of class folders, or a flat
    folder; ``None`` or an unusable folder gives generated images (then the classes are not covered).
    """
    from calibration.select import select_calibration_set
    from export.onnx_export import generated_images
    from runtime.errors import InputError
    from runtime.preprocess import Preprocessor

    if data:
        root = Path(data)
        for sub in ("test", "val", "train", ""):
            folder = root / sub if sub else root
            if not folder.is_dir():
                continue
            try:
                cset = select_calibration_set(folder, size=per_class * meta.num_classes, seed=seed,
                                              classes=meta.labels, warn=False)
            except (ValueError, FileNotFoundError):
                continue
            pre = Preprocessor(meta)
            grey_list, keep = [], []
            for i, path in enumerate(cset.paths):
                try:
                    grey_list.append(to_grey_u8(pre(path), meta))
                    keep.append(i)
                except (InputError, OSError) as e:
                    log.warning("skipping golden candidate: %s", e)
            if not keep:
                continue
            grey = np.stack(grey_list)
            return grey, [cset.classes[i] for i in keep], [cset.paths[i].name for i in keep], str(folder)
        log.warning("no images usable for golden references in %s; using generated images", root)
    pre = Preprocessor(meta)
    imgs = generated_images(per_class * meta.num_classes, meta.input_size, seed)
    grey = np.stack([to_grey_u8(pre(im), meta) for im in imgs])
    return grey, ["generated"] * len(grey), [f"generated_{i}" for i in range(len(grey))], "generated images"


def reference_outputs(fp32_path: str | os.PathLike[str], x: np.ndarray, meta: ModelMetadata
                      ) -> tuple[np.ndarray, np.ndarray | None]:
    """FP32 logits (and the graph's score output, if the metadata names one) with ONNX Runtime on the CPU."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(fp32_path), so, providers=["CPUExecutionProvider"])
    names = [meta.output_name] + ([meta.score_output] if meta.score_output else [])
    outs = [sess.run(names, {meta.input_name: x[i:i + 16]}) for i in range(0, len(x), 16)]
    logits = np.concatenate([o[0] for o in outs]).astype(np.float32)
    score = np.concatenate([np.asarray(o[1]).reshape(len(o[0]), -1)[:, 0] for o in outs]).astype(np.float32) \
        if meta.score_output else None
    return logits, score


def make_goldens(fp32_path: str | os.PathLike[str], data: str | os.PathLike[str] | None,
                 meta: ModelMetadata | None = None, n: int = DEFAULT_IMAGES, build_command: str = "",
                 seed: int = 0) -> Goldens:
    """Golden references from the FP32 model at ``fp32_path`` on images from ``data`` (see :func:`candidate_images`).

    ``meta`` (default: the FP32 model's own) gives preprocessing and the rejection score; its temperature is the one
    the reference score uses.
    """
    from runtime.artifacts import read_onnx_metadata
    from runtime.files import sha256_file
    from runtime.scores import logit_score

    meta = meta or read_onnx_metadata(fp32_path)
    n = golden_count(meta, n)
    per_class = max(CANDIDATES_PER_CLASS, -(-n // meta.num_classes))
    grey, classes, names, source = candidate_images(meta, data, per_class, seed)
    scale, offset = _affine(meta)
    x = (grey.astype(np.float32)[:, None] * scale[None, :, None, None] + offset[None, :, None, None]).astype(np.float32)
    logits, gscore = reference_outputs(fp32_path, x, meta)
    top2 = np.sort(logits, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    # Per class (round robin) the candidates with the clearest FP32 decision, so agreement can be required.
    by_class: dict[str, list[int]] = {}
    for i in np.argsort(-margin, kind="stable"):
        by_class.setdefault(classes[i], []).append(int(i))
    chosen: list[int] = []
    while len(chosen) < min(n, len(grey)):
        for c in sorted(by_class, key=lambda c: meta.labels.index(c) if c in meta.labels else len(meta.labels)):
            if by_class[c] and len(chosen) < n:
                chosen.append(by_class[c].pop(0))
    idx = np.asarray(chosen)
    score = gscore[idx] if gscore is not None else logit_score(meta.score, logits[idx], meta.temperature)
    return Goldens(grey=grey[idx], scale=scale, offset=offset, logits=logits[idx], score=score,
                   score_name=meta.score, temperature=meta.temperature, score_output=meta.score_output,
                   labels=meta.labels, classes=tuple(classes[i] for i in idx), sources=tuple(names[i] for i in idx),
                   reference={"name": Path(fp32_path).name, "sha256": sha256_file(fp32_path), "precision": "fp32",
                              "data": source},
                   built=cpu_info(), build_command=build_command)


def embed_goldens(model: Any, goldens: Goldens) -> None:
    """Put ``goldens`` into an ``onnx.ModelProto``'s ``metadata_props``."""
    from calibration.quantize import set_metadata_props
    from runtime.check import GOLDEN_KEY

    set_metadata_props(model, {GOLDEN_KEY: goldens.to_json()})


def add_goldens(onnx_path: str | os.PathLike[str], goldens: Goldens) -> Path:
    """Rewrite ``onnx_path`` with ``goldens`` inside (atomically)."""
    import onnx

    from runtime.files import atomic_write_bytes

    model = onnx.load(str(onnx_path))
    embed_goldens(model, goldens)
    return atomic_write_bytes(onnx_path, model.SerializeToString())


def default_reference(model_path: Path) -> Path:
    """The FP32 ONNX a reduced-precision file came from (the artifact table's FP32 name for its stem):
    ``x.int8.cpu.onnx``, ``x.int8.onnx``, ``x.fp16.onnx`` → ``x.onnx``."""
    from runtime.artifacts import BY_KEY, ONNXRUNTIME, format_of, stem_of

    fmt = format_of(model_path)
    if fmt is None or fmt.opened_by != ONNXRUNTIME:
        return model_path
    return BY_KEY["fp32_onnx"].file(model_path.parent, stem_of(model_path))


# ------------------------------------------------------------------------------------------------ CLI
EPILOG = """examples:
  python -m export.golden --model models/sem_classifier.onnx --data data/synth/
  python -m export.golden --model models/sem_classifier.int8.onnx --reference models/sem_classifier.onnx \\
      --data data/synth/ --build-command "python -m export.build_engine --onnx ... --int8 ..."
then: python -m runtime.check --model models/sem_classifier.int8.onnx
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m export.golden", description=__doc__.split("\n\n")[0], epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="ONNX file to add golden references to (rewritten in place)")
    p.add_argument("--reference", help="the FP32 ONNX whose outputs are the references (default: the model itself "
                   "when it is FP32, else the FP32 file beside it, x.int8.onnx → x.onnx)")
    p.add_argument("--data", help="images: dataset root, class folders or a flat folder (default: generated images)")
    p.add_argument("--images", type=int, default=DEFAULT_IMAGES, help="how many (default %(default)s, at least one per "
                   "class, fewer for large inputs)")
    p.add_argument("--build-command", default="", help="the command that rebuilds this artifact (shown on FAIL)")
    p.add_argument("--no-check", action="store_true", help="do not run the self-check afterwards")
    return p


@cli("python -m export.golden")
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    import onnx  # noqa: F401 - adding goldens needs the train extra: say so before reading anything

    from runtime.artifacts import read_onnx_metadata
    from runtime.errors import MetadataError

    model = Path(args.model)
    try:
        meta = read_onnx_metadata(model)
        ref = Path(args.reference) if args.reference else \
            (model if meta.precision == "fp32" else default_reference(model))
        if not ref.is_file():
            print(f"error: {ref}: FP32 reference model not found (pass --reference FP32.onnx)", file=sys.stderr)
            return 2
        ref_meta = read_onnx_metadata(ref)
        if ref_meta.precision != "fp32":
            print(f"error: {ref}: the reference must be an FP32 model, it is {ref_meta.precision}", file=sys.stderr)
            return 2
        command = args.build_command
        if not command and meta.precision.startswith(("int8", "fp16")):
            command = f"python -m export.build_engine --onnx {ref} --{meta.precision[:4]}" + \
                (f" --calib-data {args.data or '<training data>'}" if meta.precision.startswith("int8") else "")
        goldens = make_goldens(ref, args.data, ref_meta, args.images, command)
        add_goldens(model, goldens)
    except (OSError, ValueError, MetadataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"added {len(goldens)} golden references ({', '.join(sorted(set(goldens.classes)))}) from "
          f"{goldens.reference['data']} to {model}; reference {ref.name}")
    if args.no_check:
        return 0
    from runtime.check import self_check

    report = self_check(model, "cpu")
    print(report.render())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
