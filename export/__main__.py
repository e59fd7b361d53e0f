"""``python -m export``: checkpoint → ONNX with metadata, simplified, checked, parity-tested against PyTorch.

The work is :func:`export.checkpoint.export_checkpoint`; this module parses the flags and prints the outcome."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from sem_extras import cli, help_note, import_for_help

log = logging.getLogger("export")

EPILOG = """examples:
  python -m export --checkpoint runs/x/best.pt                      # → runs/x/best.onnx
  python -m export --checkpoint runs/x/best.pt --out models/sem.onnx --parity-data data/
  then: python -m export.build_engine --onnx models/sem.onnx --int8 --calib-data data/
"""


def build_parser() -> argparse.ArgumentParser:
    ox = import_for_help("export.onnx_export")  # a stand-in without the train extra, so --help still works
    p = argparse.ArgumentParser(prog="python -m export", description=__doc__, epilog=EPILOG + help_note(ox),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="training checkpoint (.pt) written by `python -m train`")
    p.add_argument("--out", help="output .onnx path (default: the checkpoint path with .onnx)")
    p.add_argument("--opset", type=int, default=ox.DEFAULT_OPSET, help="ONNX opset (default %(default)s)")
    p.add_argument("--parity-data", help="folder of images (class folders or a dataset root) for the parity check; "
                   "default: the data folder recorded in the checkpoint, else generated images")
    p.add_argument("--parity-images", type=int, default=16, help="images for the parity check (default %(default)s)")
    p.add_argument("--tolerance", type=float, default=ox.DEFAULT_PARITY_TOLERANCE,
                   help="max |Δlogit| PyTorch vs ONNX Runtime (default %(default)s)")
    p.add_argument("--no-simplify", action="store_true", help="skip onnxsim")
    return p


@cli("python -m export")
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from export.checkpoint import ExportFailed, export_checkpoint

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        res = export_checkpoint(args.checkpoint, args.out, opset=args.opset, parity_data=args.parity_data,
                                parity_images=args.parity_images, tolerance=args.tolerance,
                                simplify=not args.no_simplify)
    except ExportFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    meta = res.meta
    print(f"golden references: {len(res.goldens)} images from {res.goldens.reference['data']}")
    print(f"wrote {res.path} ({meta.arch}, input {meta.input_name} {meta.channels}×{meta.input_size[0]}×"
          f"{meta.input_size[1]}, dynamic batch, opset {args.opset})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
