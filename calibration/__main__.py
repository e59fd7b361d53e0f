"""``python -m calibration``: choose calibration images, compute INT8 ranges on the CPU, write the Q/DQ ONNX files."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from calibration.run import run_calibration
from calibration.select import DEFAULT_SIZE
from runtime.artifacts import BY_KEY, artifact_paths
from sem_extras import cli, help_note, import_for_help

__all__ = ["build_parser", "main", "run_calibration"]  # run_calibration lives in calibration.run

EPILOG = """examples:
  python -m calibration --onnx models/sem.onnx --data data/ --out models/
  python -m calibration --onnx models/sem.onnx --data data/ --size 256 --method minmax
writes <out>/<stem>{qdq} (TensorRT) and <out>/<stem>{cpu} (ONNX Runtime on the CPU).
""".format(qdq=BY_KEY["int8_qdq_onnx"].suffix, cpu=BY_KEY["int8_cpu_onnx"].suffix)


def build_parser() -> argparse.ArgumentParser:
    q = import_for_help("calibration.quantize")  # a stand-in without the train extra, so --help still works
    p = argparse.ArgumentParser(prog="python -m calibration", description=__doc__, epilog=EPILOG + help_note(q),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--onnx", required=True, help="FP32 ONNX exported by `python -m export` (metadata inside)")
    p.add_argument("--data", required=True, help="dataset root (uses train/), class folders, or a flat image folder")
    p.add_argument("--out", help="output folder (default: beside the ONNX file)")
    p.add_argument("--size", type=int, default=DEFAULT_SIZE, help="calibration images (default %(default)s)")
    p.add_argument("--method", default="percentile", choices=q.CALIBRATION_METHODS, help="range method")
    p.add_argument("--seed", type=int, default=0, help="selection seed (default %(default)s)")
    p.add_argument("--cpu-keep-float", default="", help="comma-separated node names the CPU model keeps float")
    p.add_argument("--cpu-target", default="portable", choices=("portable", "vnni"),
                   help="CPU INT8 weights: portable (exact on every x86 CPU) or vnni (8-bit, VNNI/AMX CPUs only)")
    p.add_argument("-v", "--verbose", action="store_true", help="show onnxruntime's INFO logs")
    return p


@cli("python -m calibration")
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    logging.getLogger("calibration").setLevel(logging.INFO)
    src = Path(args.onnx)
    paths = artifact_paths(src, args.out)
    try:
        summary = run_calibration(src, Path(args.data), paths["int8_qdq_onnx"], paths["int8_cpu_onnx"],
                                  args.size, args.method, args.seed,
                                  [s for s in args.cpu_keep_float.split(",") if s], cpu_target=args.cpu_target,
                                  verbose=args.verbose)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"TensorRT Q/DQ placement: {summary['tensorrt_placement']}")
    print(f"wrote {summary['tensorrt_onnx']}\nwrote {summary['cpu_onnx']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
