"""Calibration as a library call: choose the images, compute INT8 ranges once, write the TensorRT Q/DQ and the CPU
INT8 ONNX files. ``python -m calibration`` and ``python -m export.build_engine --int8`` both call
:func:`run_calibration`."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from calibration.select import DEFAULT_SIZE, load_calibration_array, select_calibration_set
from runtime.artifacts import read_onnx_metadata
from runtime.contract import METADATA_KEY

log = logging.getLogger("calibration")


def _machine(cpu_target: str) -> dict[str, Any]:
    """This machine's CPU (recorded in the metadata); warns when ``cpu_target`` needs instructions it lacks."""
    from calibration.quantize import CPU_TARGETS, cpu_target_ok
    from runtime.check import cpu_info

    if cpu_target not in CPU_TARGETS:
        raise ValueError(f"unknown CPU target {cpu_target!r}; choose one of {', '.join(CPU_TARGETS)}")
    machine = cpu_info()
    if not cpu_target_ok(cpu_target, machine["isa"]):
        log.warning("CPU target %r: this machine (%s) lacks VNNI/AMX, so its integer kernels saturate on that file "
                    "and the self-check here fails; use that file only on VNNI/AMX CPUs", cpu_target, machine["cpu"])
    return machine


def run_calibration(onnx_path: Path, data: Path, trt_out: Path, cpu_out: Path, size: int = DEFAULT_SIZE,
                    method: str = "percentile", seed: int = 0, cpu_keep_float: Sequence[str] = (),
                    progress: bool = True, cpu_target: str = "portable", verbose: bool = False) -> dict[str, Any]:
    """Select, preprocess, compute ranges once, write both files; returns a summary for reports.

    ``cpu_target`` picks the CPU file's weights (:data:`calibration.quantize.CPU_TARGETS`); it and the building
    machine's instruction set are recorded in the metadata (``extra.calibration``)."""
    from calibration.quantize import (
        CPU_TARGET_WEIGHTS,
        compute_ranges,
        prepare_for_quantization,
        ranges_as_dict,
        write_cpu_int8,
        write_tensorrt_qdq,
    )

    machine = _machine(cpu_target)
    meta = read_onnx_metadata(onnx_path)
    cset = select_calibration_set(data, size=size, seed=seed, classes=meta.labels)
    print(cset.summary())
    skipped: list[str] = []
    x = load_calibration_array(cset, meta, skipped)
    int8_meta = meta.with_updates(precision="int8", extra={**meta.extra, "calibration": {
        "images": int(len(x)), "per_class": cset.per_class, "method": method, "seed": seed,
        "source": str(cset.source), "cpu_target": cpu_target,
        "weights": CPU_TARGET_WEIGHTS[cpu_target], "built_on": machine}})
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
