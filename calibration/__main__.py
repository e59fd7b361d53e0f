"""``python -m calibration``: choose calibration images, compute INT8 ranges on the CPU, write the Q/DQ ONNX files."""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from calibration.select import DEFAULT_SIZE, load_calibration_array, select_calibration_set
from runtime.contract import METADATA_KEY, ModelMetadata
from sem_extras import cli, help_note, import_for_help

log = logging.getLogger("calibration")

EPILOG = """examples:
  python -m calibration --onnx models/sem.onnx --data data/ --out models/
  python -m calibration --onnx models/sem.onnx --data data/ --size 256 --method minmax
writes <out>/<stem>.int8.qdq.onnx (TensorRT) and <out>/<stem>.int8.cpu.onnx (ONNX Runtime on the CPU).
"""


def run_calibration(onnx_path: Path, data: Path, trt_out: Path, cpu_out: Path, size: int = DEFAULT_SIZE,
                    method: str = "percentile", seed: int = 0, cpu_keep_float: Sequence[str] = (),
                    progress: bool = True, cpu_target: str = "portable", verbose: bool = False) -> dict[str, Any]:
    """Select, preprocess, compute ranges once, write both files; returns a summary for reports.

    ``cpu_target`` picks the CPU file's weights (:data:`calibration.quantize.CPU_TARGETS`); it and the building
    machine's instruction set are recorded in the metadata (``extra.calibration``)."""
    import onnx

    from calibration.quantize import (
        CPU_TARGETS,
        compute_ranges,
        cpu_target_ok,
        prepare_for_quantization,
        ranges_as_dict,
        write_cpu_int8,
        write_tensorrt_qdq,
    )
    from runtime.check import cpu_info

    if cpu_target not in CPU_TARGETS:
        raise ValueError(f"unknown CPU target {cpu_target!r}; choose one of {', '.join(CPU_TARGETS)}")
    machine = cpu_info()
    if not cpu_target_ok(cpu_target, machine["isa"]):
        log.warning("CPU target %r: this machine (%s) lacks VNNI/AMX, so its integer kernels saturate on that file "
                    "and the self-check here fails; use that file only on VNNI/AMX CPUs", cpu_target, machine["cpu"])
    model = onnx.load(str(onnx_path), load_external_data=False)
    props = {p.key: p.value for p in model.metadata_props}
    meta = ModelMetadata.from_props(props, str(onnx_path))
    cset = select_calibration_set(data, size=size, seed=seed, classes=meta.labels)
    print(cset.summary())
    skipped: list[str] = []
    x = load_calibration_array(cset, meta, skipped)
    int8_meta = meta.with_updates(precision="int8", extra={**meta.extra, "calibration": {
        "images": int(len(x)), "per_class": cset.per_class, "method": method, "seed": seed,
        "source": str(cset.source), "cpu_target": cpu_target, "built_on": machine}})
    out_props = {METADATA_KEY: int8_meta.to_json()}
    with tempfile.TemporaryDirectory(prefix="calibration.") as tmp:
        prepared = prepare_for_quantization(onnx_path, Path(tmp) / "prepared.onnx")
        ranges = compute_ranges(prepared, x, method, progress=progress, quiet=not verbose)
        placement = write_tensorrt_qdq(prepared, ranges_as_dict(ranges), trt_out, metadata_props=out_props)
        write_cpu_int8(prepared, ranges, cpu_out, nodes_to_exclude=cpu_keep_float, metadata_props=out_props,
                       target=cpu_target)
    return {"images": int(len(x)), "per_class": cset.per_class, "available": cset.available, "method": method,
            "warnings": list(cset.warnings), "skipped": skipped, "tensorrt_placement": placement,
            "tensorrt_onnx": str(trt_out), "cpu_onnx": str(cpu_out), "cpu_target": cpu_target, "built_on": machine}


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
    out = Path(args.out) if args.out else src.parent
    stem = src.name[:-5] if src.name.endswith(".onnx") else src.name
    try:
        summary = run_calibration(src, Path(args.data), out / f"{stem}.int8.qdq.onnx", out / f"{stem}.int8.cpu.onnx",
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
