"""``python -m train.refit_quality``: give an exported ONNX model an intensity mode and a frame-quality gate fitted
on its training images, without retraining.

For models made before the gate (their metadata has no ``quality``: the runtime uses default limits and warns), and
to switch a model that divides by the dtype maximum to ``bit_depth`` (the same numbers for 8-bit and full 16-bit
frames, the right ones for 10- to 14-bit data in uint16). Switching to or from ``percentile`` changes what the
network sees and needs a fine-tune, so it is refused. The model is rewritten atomically, weights untouched.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from runtime.contract import METADATA_KEY, ModelMetadata
from runtime.files import atomic_write_bytes
from sem_extras import cli

log = logging.getLogger(__name__)
_COMPATIBLE = {"full_scale", "bit_depth"}


def refit(model_path: str | Path, data: str | Path, out: str | Path, intensity: str | None = None) -> ModelMetadata:
    import onnx

    proto = onnx.load(str(model_path))
    props = {p.key: p.value for p in proto.metadata_props}
    meta = ModelMetadata.from_props(props, str(model_path))
    mode = intensity or meta.intensity
    if mode != meta.intensity and not {mode, meta.intensity} <= _COMPATIBLE:
        raise ValueError(f"{model_path}: intensity {meta.intensity!r} -> {mode!r} changes what the network sees; "
                         "fine-tune with `python -m train --intensity ...` instead")
    meta = meta.with_updates(intensity=mode)
    from train.data import fit_quality  # torch comes with the train extra; imported here so --help works without it

    q = fit_quality(data, meta)
    if q is None:
        raise ValueError(f"{data}: too few usable images to fit the frame-quality gate")
    meta = meta.with_updates(quality=q).validate(str(out))
    for p in proto.metadata_props:
        if p.key == METADATA_KEY:
            p.value = meta.to_json()
    atomic_write_bytes(out, proto.SerializeToString())
    return meta


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m train.refit_quality", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="example:\n  python -m train.refit_quality --model models/sem_classifier.onnx "
                                        "--data data/q_ft/train --intensity bit_depth --out runs/x/model.onnx")
    ap.add_argument("--model", required=True, help="exported ONNX model with project metadata")
    ap.add_argument("--data", required=True, help="its training images, DIR/<class>/")
    ap.add_argument("--out", required=True, help="where to write the model (may be --model itself)")
    ap.add_argument("--intensity", choices=sorted(_COMPATIBLE), help="new intensity mode (default: keep)")
    return ap


@cli("python -m train.refit_quality")
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        meta = refit(args.model, args.data, args.out, args.intensity)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    lim = meta.quality["limits"] if meta.quality else {}
    print(f"wrote {args.out}: intensity {meta.intensity}, gate limits {lim}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
