"""``python -m export``: checkpoint → ONNX with metadata, simplified, checked, parity-tested against PyTorch."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

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
    from export.onnx_export import ParityError, export_onnx, parity_check, parity_inputs
    from train.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    ckpt_path = Path(args.checkpoint)
    try:
        model, meta = model_from_checkpoint(ckpt_path)
        ckpt = load_checkpoint(ckpt_path)
        ckpt_args = ckpt.get("args") or {}
        output_names = [meta.output_name]
        if meta.score_output:
            # A feature-space rejection score is computed inside the graph (extra output), from the statistics
            # fitted at the end of training, so every backend gets it without Python-side feature handling.
            from train.openset import scored_model, stats_from_checkpoint

            stats = stats_from_checkpoint(ckpt, meta.score, str(ckpt_path))
            model = scored_model(model, stats, meta.score, meta.temperature)
            output_names.append(meta.score_output)
    except (OSError, CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else ckpt_path.with_suffix(".onnx")
    path = export_onnx(model, meta, out, output_names=output_names, opset=args.opset, simplify=not args.no_simplify)
    inputs, source = parity_inputs(meta, [args.parity_data, ckpt_args.get("data") if isinstance(ckpt_args, dict)
                                          else None], n=args.parity_images)
    try:
        result = parity_check(model, path, inputs, source, args.tolerance, output_names=output_names)
    except ParityError as e:
        bad = path.with_name(path.name + ".failed-parity")
        path.replace(bad)
        print(f"error: {e}\n(the file was moved to {bad})", file=sys.stderr)
        return 1
    print(result.line())
    # Golden references for the on-target self-check (python -m runtime.check), from the parity data's folder.
    from export.golden import add_goldens, make_goldens

    data = args.parity_data or (ckpt_args.get("data") if isinstance(ckpt_args, dict) else None)
    goldens = make_goldens(path, data if source != "generated images" else None, meta,
                           build_command=f"python -m export --checkpoint {ckpt_path} --out {path}")
    add_goldens(path, goldens)
    print(f"golden references: {len(goldens)} images from {goldens.reference['data']}")
    print(f"wrote {path} ({meta.arch}, input {meta.input_name} {meta.channels}×{meta.input_size[0]}×"
          f"{meta.input_size[1]}, dynamic batch, opset {args.opset})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
