"""``python -m export.build_engine``: FP16 / INT8 artifacts from an exported ONNX file, TensorRT engines where possible.

Every run writes into ``--out`` (default: beside the ONNX file), under the names of :mod:`runtime.artifacts`:

* ``--fp16``: ``<stem>.fp16.onnx`` (float16 inside, float32 IO) and, with TensorRT + GPU, ``<stem>.fp16.engine``.
* ``--int8``: ``<stem>.int8.qdq.onnx`` (TensorRT Q/DQ placement, symmetric INT8), ``<stem>.int8.cpu.onnx``
  (ONNX Runtime U8S8), and with TensorRT + GPU ``<stem>.int8.engine`` built from the Q/DQ file.

Each variant is compared with FP32 by the accuracy gate and checks itself against golden references on this
machine; a variant that fails either is rejected. Engines are strongly typed (TensorRT 10.x and 11.x) with one
optimisation profile over ``--batch`` and a timing cache keyed by TensorRT version and GPU. Each engine gets a JSON
sidecar (``<engine>.json``, written with :func:`runtime.contract.write_sidecar`) whose fields besides ``metadata``
are :data:`runtime.artifacts.SIDECAR_KEYS`; the runtime's TensorRT loader refuses an engine whose TensorRT
version, GPU or model hash does not match, printing ``build_command``.

:func:`build_artifacts` is the library call (a :class:`BuildOptions` in, a :class:`BuildReport` out); ``main``
parses the command line and maps the outcome to the exit code.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime import artifacts
from runtime.artifacts import (  # noqa: F401 - the sidecar contract, importable from here as before
    SIDECAR_BUILD_COMMAND,
    SIDECAR_COMPUTE_CAPABILITY,
    SIDECAR_ENGINE_SHA256,
    SIDECAR_GPU_NAME,
    SIDECAR_KEYS,
    SIDECAR_MODEL_SHA256,
    SIDECAR_ONNX,
    SIDECAR_PRECISION,
    SIDECAR_PROFILE,
    SIDECAR_TENSORRT_VERSION,
    read_onnx_metadata,
    rejected_path,
)
from runtime.artifacts import engine_sidecar as sidecar_extra
from runtime.contract import ModelMetadata, write_sidecar
from runtime.errors import BackendUnavailable
from runtime.files import atomic_write_bytes, atomic_write_text, sha256_bytes, sha256_file
from sem_extras import cli

log = logging.getLogger("export.build_engine")

PRECISIONS = artifacts.BUILD_PRECISIONS
DEFAULT_BATCHES = (1, 8, 32)
DEFAULT_WORKSPACE_GIB = 2.0
EXIT_OK = 0
EXIT_ENGINE_BUILD = 1
EXIT_BAD_INPUT = 2
EXIT_NO_TENSORRT = 3
EXIT_GATE_FAILED = 4


# ------------------------------------------------------------------ plain, TensorRT-free helpers
def parse_batches(text: str | Sequence[int]) -> tuple[int, int, int]:
    """``"1,8,32"`` → (min, opt, max) = (1, 8, 32); one value → all equal; opt is the middle value."""
    if isinstance(text, str):
        try:
            values = [int(v) for v in text.replace(" ", "").split(",") if v]
        except ValueError:
            raise ValueError(f"--batch must be comma-separated integers like 1,8,32, got {text!r}") from None
    else:
        values = [int(v) for v in text]
    if not values or any(v < 1 for v in values):
        raise ValueError(f"--batch needs positive batch sizes, got {text!r}")
    values = sorted(set(values))
    return values[0], values[len(values) // 2], values[-1]


def profile_shapes(meta: ModelMetadata, batches: tuple[int, int, int]) -> dict[str, Any]:
    """The optimisation profile for the model's input: ``{"input", "min", "opt", "max"}`` as NCHW lists."""
    c, (h, w) = meta.channels, meta.input_size
    lo, opt, hi = batches
    return {"input": meta.input_name, "min": [lo, c, h, w], "opt": [opt, c, h, w], "max": [hi, c, h, w]}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower() or "unknown"


def timing_cache_key(tensorrt_version: str, gpu_name: str, compute_capability: str, *, multiprocessors: int = 0,
                     memory_bytes: int = 0) -> str:
    """A file-name-safe key: a cache is only reused by the same TensorRT version on the same GPU model. Every Jetson
    Orin module reports the name "Orin" and compute capability 8.7, so the SM count and memory (GiB) are part of
    the key when known."""
    key = f"trt{_slug(tensorrt_version)}-{_slug(gpu_name)}-sm{compute_capability.replace('.', '')}"
    if multiprocessors:
        key += f"-{int(multiprocessors)}sms"
    if memory_bytes:
        key += f"-{round(memory_bytes / 2**30)}gib"
    return key


def timing_cache_path(out_dir: str | os.PathLike[str], key: str) -> Path:
    return Path(out_dir) / f"timing-cache-{key}.bin"


def artifact_paths(onnx_path: str | os.PathLike[str], out_dir: str | os.PathLike[str] | None) -> dict[str, Path]:
    """Where each artifact goes (:func:`runtime.artifacts.artifact_paths`) plus each precision's build report
    (``<precision>_report``)."""
    paths = artifacts.artifact_paths(onnx_path, out_dir)
    paths.update({f"{p}_report": artifacts.build_report_path(onnx_path, p, out_dir) for p in PRECISIONS})
    return paths


def build_command(onnx_path: str | os.PathLike[str], precision: str, batches: tuple[int, int, int],
                  out_dir: str | os.PathLike[str] | None = None, calib_data: str | None = None) -> str:
    """The command line that rebuilds an engine (stored in the sidecar, printed by the runtime on mismatch)."""
    parts = ["python", "-m", "export.build_engine", "--onnx", str(onnx_path), f"--{precision}",
             "--batch", ",".join(str(b) for b in sorted(set(batches)))]
    if out_dir:
        parts += ["--out", str(out_dir)]
    if calib_data and precision == "int8":
        parts += ["--calib-data", str(calib_data)]
    return " ".join(shlex.quote(p) for p in parts)


def update_onnx_metadata(path: str | os.PathLike[str], meta: ModelMetadata) -> None:
    """Rewrite ``path`` with ``meta`` embedded (atomically)."""
    import onnx

    from export.onnx_export import embed_metadata

    model = onnx.load(str(path))
    embed_metadata(model, meta)
    atomic_write_bytes(path, model.SerializeToString())


def default_data_dir(meta: ModelMetadata) -> Path | None:
    """The training data folder recorded in the metadata (``extra.train_args.data``), if it still exists."""
    args = meta.extra.get("train_args") if isinstance(meta.extra, dict) else None
    d = args.get("data") if isinstance(args, dict) else None
    return Path(d) if d and Path(d).is_dir() else None


# ------------------------------------------------------------------ TensorRT engine
def build_tensorrt_engine(trt: Any, gpu: Any, onnx_path: Path, engine_path: Path, meta: ModelMetadata,
                          precision: str, batches: tuple[int, int, int], workspace_gib: float,
                          command: str) -> Path:
    """Build, write the engine and its sidecar; the timing cache lives beside the engine."""
    from export.tensorrt_build import build_serialized_engine

    profile = profile_shapes(meta, batches)
    key = timing_cache_key(trt.__version__, gpu.name, gpu.compute_capability,
                           multiprocessors=getattr(gpu, "multiprocessors", 0),
                           memory_bytes=getattr(gpu, "memory_bytes", 0))
    blob = build_serialized_engine(trt, onnx_path, profile, int(workspace_gib * (1 << 30)),
                                   timing_cache_path(engine_path.parent, key))
    atomic_write_bytes(engine_path, blob)
    write_sidecar(engine_path, meta.with_updates(precision=precision),
                  sidecar_extra(sha256_file(onnx_path), trt.__version__, gpu.name, gpu.compute_capability,
                                precision, profile, command, os.path.relpath(onnx_path, engine_path.parent),
                                engine_sha256=sha256_bytes(blob)))
    return engine_path


# ------------------------------------------------------------------ the build as a library call
class BuildFailed(Exception):
    """The build stopped before it finished; ``exit_code`` is what ``main`` returns for it."""

    def __init__(self, message: str, exit_code: int = EXIT_BAD_INPUT) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class BuildOptions:
    """What to build; the fields are the command-line flags (``cpu_keep_float`` as a list)."""

    onnx: str | os.PathLike[str]
    precision: str = "fp16"
    calib_data: str | None = None
    calib_size: int = 512
    calib_method: str = "percentile"
    cpu_keep_float: Sequence[str] = ()
    cpu_target: str = "portable"
    batch: str | Sequence[int] = DEFAULT_BATCHES
    workspace: float = DEFAULT_WORKSPACE_GIB
    out: str | None = None
    require_tensorrt: bool = False
    no_engine: bool = False
    val_data: str | None = None
    max_drop: float = 1.0
    allow_drop: bool = False
    keep_rejected: bool = False
    golden_data: str | None = None
    verbose: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> BuildOptions:
        names = {f for f in cls.__dataclass_fields__ if f not in ("precision", "cpu_keep_float")}
        return cls(precision="fp16" if args.fp16 else "int8",
                   cpu_keep_float=[s for s in args.cpu_keep_float.split(",") if s],
                   **{name: getattr(args, name) for name in names})


@dataclass
class BuildReport:
    """What a build wrote and how its checks went. ``document`` is the JSON report written beside the artifacts
    (precision, source, calibration, gate, goldens, self_check, rejected, artifacts)."""

    precision: str
    paths: dict[str, Path]
    written: list[Path] = field(default_factory=list)
    variants: dict[str, Path] = field(default_factory=dict)  # variant name → ONNX file the gate judged
    rejected: set[Path] = field(default_factory=set)
    gate_failed: bool = False  # the accuracy gate or the self-check failed for some variant
    allow_drop: bool = False
    engine: Path | None = None
    document: dict[str, Any] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        return EXIT_GATE_FAILED if self.gate_failed and not self.allow_drop else EXIT_OK


def _open_source(opts: BuildOptions) -> tuple[Path, tuple[int, int, int], ModelMetadata]:
    onnx_path = Path(opts.onnx)
    if not onnx_path.is_file():
        raise BuildFailed(f"{onnx_path}: no such ONNX file (export one with `python -m export --checkpoint ...`)")
    try:
        return onnx_path, parse_batches(opts.batch), read_onnx_metadata(onnx_path)
    except ValueError as e:
        raise BuildFailed(str(e)) from None


def _tensorrt_and_gpu(opts: BuildOptions) -> tuple[Any, Any]:
    """(TensorRT module, GPU) when an engine can be built here, (None, None) when only the CPU artifacts are wanted
    or possible; raises when an engine is required or TensorRT is installed with an unusable GPU."""
    from export.tensorrt_build import gpu_problem, import_tensorrt, query_gpu

    trt = None
    if not opts.no_engine:
        try:
            trt = import_tensorrt()
        except BackendUnavailable:
            pass
    gpu = query_gpu() if trt is not None else None
    if trt is not None and gpu is None:
        # TensorRT is installed, so an engine is wanted: a driver/cuda-python mismatch must not pass as success.
        raise BuildFailed(f"TensorRT {trt.__version__} is installed but no engine can be built here: "
                          f"{gpu_problem()}. Fix that and rerun (python -m runtime.doctor checks the whole stack), "
                          "or pass --no-engine to build only the CPU/ONNX artifacts", EXIT_NO_TENSORRT)
    if trt is None:
        why = "--no-engine was given" if opts.no_engine else "TensorRT is not installed"
        if opts.require_tensorrt:
            raise BuildFailed(f"{why}; --require-tensorrt was given, so no engine can be built here (install the "
                              "[tensorrt] extra on the GPU machine, see docs/tensorrt.md, and rerun)",
                              EXIT_NO_TENSORRT)
        print(f"{why}: building the CPU/ONNX artifacts only (no engine)")
    return trt, gpu


def _calib_dir(opts: BuildOptions, meta: ModelMetadata) -> Path | str | None:
    return None if opts.precision == "fp16" else (opts.calib_data or default_data_dir(meta))


def _write_fp16(onnx_path: Path, meta: ModelMetadata, rep: BuildReport) -> None:
    from export.onnx_export import write_fp16_onnx

    rep.written.append(write_fp16_onnx(onnx_path, rep.paths["fp16_onnx"], meta.with_updates(precision="fp16")))
    rep.variants["fp16"] = rep.paths["fp16_onnx"]


def _write_int8(opts: BuildOptions, onnx_path: Path, meta: ModelMetadata, rep: BuildReport) -> None:
    """Calibrate, write the CPU INT8 file and the TensorRT Q/DQ file (with FP16 scales)."""
    from calibration.run import run_calibration
    from export.onnx_export import write_fp16_onnx

    calib_dir = _calib_dir(opts, meta)
    if calib_dir is None:
        raise BuildFailed("no calibration data: pass --calib-data DIR (the model records no training data folder)")
    qdq, cpu = rep.paths["int8_qdq_onnx"], rep.paths["int8_cpu_onnx"]
    try:
        rep.document["calibration"] = run_calibration(
            onnx_path, Path(calib_dir), qdq, cpu, size=opts.calib_size, method=opts.calib_method,
            cpu_keep_float=list(opts.cpu_keep_float), cpu_target=opts.cpu_target, verbose=opts.verbose)
    except (ValueError, FileNotFoundError) as e:
        raise BuildFailed(str(e)) from None
    # TensorRT Q/DQ file with FP16 scales (opset 19): a strongly typed engine runs the layers between the Q/DQ
    # pairs in FP16 instead of FP32. Converted before the gate, so the gate checks what the engine is built from.
    try:
        write_fp16_onnx(qdq, qdq)
    except ValueError as e:
        raise BuildFailed(f"{qdq}: {e}") from None
    rep.written += [qdq, cpu]
    rep.variants["int8-cpu"] = cpu
    rep.variants["int8-trt"] = qdq


def _val_folder(opts: BuildOptions, meta: ModelMetadata) -> Path | None:
    if opts.val_data:
        return Path(opts.val_data)
    d = default_data_dir(meta)
    return d / "val" if d is not None and (d / "val").is_dir() else None


def _gate(opts: BuildOptions, onnx_path: Path, meta: ModelMetadata, val: Path, rep: BuildReport) -> None:
    """Each variant against FP32 on ``val``; its refitted temperature/threshold and the result go into its
    metadata; a failing variant is rejected unless ``allow_drop``."""
    from export.accuracy_gate import accuracy_gate, labelled_images, load_inputs, onnx_logits

    try:
        x, y = load_inputs(*labelled_images(val, meta.labels), meta)
    except (ValueError, FileNotFoundError) as e:
        raise BuildFailed(f"accuracy gate: {e}") from None
    ref = onnx_logits(onnx_path, x, meta.output_name)
    rep.document["gate"] = {}
    for name, path in rep.variants.items():
        # TensorRT's Q/DQ file is judged by its Q/DQ arithmetic (TensorRT accumulates in int32); onnxruntime's
        # fused CPU kernels for it would measure this CPU, not the engine.
        got = onnx_logits(path, x, meta.output_name, optimize=name != "int8-trt")
        res = accuracy_gate(ref, got, y, meta, name, opts.max_drop)
        print(f"\naccuracy gate on {len(y)} images of {val} ({name}: {path.name})\n{res.table()}")
        rep.document["gate"][name] = res.to_dict()
        own = read_onnx_metadata(path)  # keeps what calibration recorded
        update_onnx_metadata(path, own.with_updates(precision=rep.precision, temperature=res.temperature,
                                                    threshold=res.threshold,
                                                    extra={**own.extra, "accuracy_gate": res.to_dict()}))
        rep.gate_failed |= not res.passed
        if not res.passed and not opts.allow_drop:
            rep.rejected.add(path)


def _golden_command(opts: BuildOptions, batches: tuple[int, int, int]) -> str:
    command = build_command(opts.onnx, opts.precision, batches, opts.out, opts.calib_data)
    if opts.precision == "int8" and opts.val_data:
        command += f" --val-data {shlex.quote(str(opts.val_data))}"
    if opts.precision == "int8" and opts.cpu_target != "portable":
        command += f" --cpu-target {opts.cpu_target}"
    return command


def _write_goldens(opts: BuildOptions, onnx_path: Path, meta: ModelMetadata, batches: tuple[int, int, int],
                   rep: BuildReport, default_data: Any) -> Any:
    """Golden references (runtime.check) from the FP32 model into every kept variant; returns them (or None)."""
    from export.golden import add_goldens, make_goldens

    data = opts.golden_data or (str(default_data) if default_data else None)
    try:
        goldens = make_goldens(onnx_path, data, meta, build_command=_golden_command(opts, batches))
        for path in rep.variants.values():
            if path not in rep.rejected:
                add_goldens(path, goldens)
    except (OSError, ValueError) as e:
        print(f"warning: golden references not written ({e}); these artifacts cannot self-check", file=sys.stderr)
        return None
    rep.document["goldens"] = {"images": len(goldens), "source": goldens.reference.get("data"),
                               "sha256": goldens.sha256}
    return goldens


def _self_check_variants(opts: BuildOptions, rep: BuildReport, goldens: Any) -> None:
    """Run each kept CPU variant's goldens here; a FAIL rejects it (unless ``allow_drop``)."""
    from runtime.check import self_check

    rep.document["self_check"] = {}
    for name, path in rep.variants.items():
        if goldens is None or path in rep.rejected or name == "int8-trt":
            continue  # the TensorRT Q/DQ file is checked by its engine, where that runs
        check = self_check(path, "cpu")
        print(f"\n{check.render()}")
        rep.document["self_check"][name] = check.to_dict()
        if not check.ok:
            rep.gate_failed = True
            if not opts.allow_drop:
                rep.rejected.add(path)


def _drop_rejected(opts: BuildOptions, rep: BuildReport) -> None:
    """Delete each rejected file, or keep it under :func:`rejected_path` with ``keep_rejected``."""
    for path in sorted(rep.rejected):
        rep.written.remove(path)
        if opts.keep_rejected:
            rep.written.append(path.replace(rejected_path(path)))
            print(f"rejected: {path.name} failed the accuracy gate or the self-check; kept as "
                  f"{rejected_path(path).name}", file=sys.stderr)
        else:
            path.unlink(missing_ok=True)
            print(f"rejected: {path.name} failed the accuracy gate or the self-check and was deleted "
                  f"(--keep-rejected keeps it as {rejected_path(path).name}, --allow-drop under its name)",
                  file=sys.stderr)
    rep.document["rejected"] = [str(p) for p in sorted(rep.rejected)]


def _build_engine(opts: BuildOptions, onnx_path: Path, batches: tuple[int, int, int], trt: Any, gpu: Any,
                  goldens: Any, rep: BuildReport) -> None:
    """The engine from the table's source file (FP16 ONNX or Q/DQ INT8), with its sidecars; none when that
    source was rejected."""
    from export.tensorrt_build import EngineBuildError
    from runtime.check import write_golden_sidecar

    engine = rep.paths[f"{rep.precision}_engine"]
    src = rep.paths[artifacts.BY_KEY[f"{rep.precision}_engine"].built_from]
    if src in rep.rejected:
        print(f"no engine built: its source {src.name} was rejected", file=sys.stderr)
        return
    try:
        build_tensorrt_engine(trt, gpu, src, engine, read_onnx_metadata(src), rep.precision, batches,
                              opts.workspace, build_command(onnx_path, rep.precision, batches, opts.out,
                                                            opts.calib_data))
    except EngineBuildError as e:
        raise BuildFailed(str(e), EXIT_ENGINE_BUILD) from None
    rep.engine = engine
    rep.written += [engine, Path(str(engine) + ".json")]
    if goldens is not None:  # the engine checks itself against the same references where it runs
        rep.written.append(write_golden_sidecar(engine, goldens))


def _write_report(rep: BuildReport) -> None:
    rep.document["artifacts"] = [str(p) for p in rep.written]
    text = json.dumps(rep.document, indent=2, default=str) + "\n"
    rep.written.append(atomic_write_text(rep.paths[f"{rep.precision}_report"], text))
    print("\nwrote:\n  " + "\n  ".join(str(p) for p in rep.written))


def build_artifacts(opts: BuildOptions) -> BuildReport:
    """Write ``opts.precision``'s artifacts, gate and self-check them, build the engine where TensorRT and a GPU
    are here, and write the JSON report. Raises :class:`BuildFailed` when the build cannot go on."""
    if opts.precision not in PRECISIONS:
        raise BuildFailed(f"precision must be one of {PRECISIONS}, got {opts.precision!r}")
    import export.onnx_export  # noqa: F401 - every build needs the train extra (onnx): say so before any work
    onnx_path, batches, meta = _open_source(opts)
    rep = BuildReport(opts.precision, artifact_paths(onnx_path, opts.out), allow_drop=opts.allow_drop,
                      document={"precision": opts.precision, "source": str(onnx_path)})
    rep.paths[f"{opts.precision}_report"].parent.mkdir(parents=True, exist_ok=True)
    trt, gpu = _tensorrt_and_gpu(opts)
    _write_fp16(onnx_path, meta, rep) if opts.precision == "fp16" else _write_int8(opts, onnx_path, meta, rep)
    val = _val_folder(opts, meta)
    if val is None:
        print("accuracy gate skipped: no validation data (pass --val-data DIR)")
        rep.document["gate"] = "skipped: no validation data"
    else:
        _gate(opts, onnx_path, meta, val, rep)
    goldens = _write_goldens(opts, onnx_path, meta, batches, rep, val if val is not None else _calib_dir(opts, meta))
    _self_check_variants(opts, rep, goldens)
    _drop_rejected(opts, rep)
    if trt is not None and gpu is not None:
        _build_engine(opts, onnx_path, batches, trt, gpu, goldens, rep)
    _write_report(rep)
    return rep


# ------------------------------------------------------------------ CLI
EPILOG = """examples:
  python -m export.build_engine --onnx models/sem.onnx --fp16
  python -m export.build_engine --onnx models/sem.onnx --int8 --calib-data data/ --batch 1,8,32
  python -m export.build_engine --onnx models/sem.onnx --int8 --require-tensorrt   # fail without TensorRT/GPU

exit codes: 0 built; 1 TensorRT could not build the engine; 2 bad input (model, data, flags); 3 no engine possible
(TensorRT missing with --require-tensorrt, or installed without a usable GPU); 4 the accuracy gate or the
self-check failed (unless --allow-drop).
Without TensorRT the CPU artifacts are built and the command exits 0; --require-tensorrt makes that an error
(exit 3). With TensorRT installed but no usable GPU (e.g. a driver too old for the installed cuda-python) it fails
(exit 3) naming the CUDA error, unless --no-engine asks for the CPU artifacts only.
The accuracy gate (exit 4) compares each variant with FP32 on --val-data (default: val/ of the training data
recorded in the model).
"""


def _input_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and precision")
    g.add_argument("--onnx", required=True, help="FP32 ONNX exported by `python -m export`")
    prec = g.add_mutually_exclusive_group(required=True)
    prec.add_argument("--fp16", action="store_true", help="FP16 ONNX (+ engine)")
    prec.add_argument("--int8", action="store_true",
                      help="INT8 Q/DQ ONNX for TensorRT, INT8 ONNX for the CPU (+ engine)")
    g.add_argument("--out", help="output folder (default: beside the ONNX file)")
    g.add_argument("-v", "--verbose", action="store_true", help="show third-party (onnxruntime, TensorRT) INFO logs")


def _calibration_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("INT8 calibration")
    g.add_argument("--calib-data", help="calibration images (dataset root, class folders or a flat folder); "
                   "default: the training data recorded in the model")
    g.add_argument("--calib-size", type=int, default=512, help="calibration images (default %(default)s)")
    g.add_argument("--calib-method", default="percentile", choices=("minmax", "percentile", "entropy"),
                   help="range method (default %(default)s; entropy is slow)")
    g.add_argument("--cpu-keep-float", default="", help="comma-separated node names the CPU INT8 model keeps float")
    g.add_argument("--cpu-target", default="portable", choices=("portable", "vnni"),
                   help="CPU INT8 weights: portable (exact on every x86 CPU, default) or vnni (plain 8-bit, only for "
                   "CPUs with AVX-512 VNNI/AVX-VNNI/AMX; saturates elsewhere)")


def _engine_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("TensorRT engine")
    g.add_argument("--batch", default=",".join(map(str, DEFAULT_BATCHES)),
                   help="batch sizes for the engine profile: min,opt,max (default %(default)s)")
    g.add_argument("--workspace", type=float, default=DEFAULT_WORKSPACE_GIB, help="TensorRT workspace GiB")
    g.add_argument("--require-tensorrt", action="store_true", help="fail (exit 3) when TensorRT or a GPU is missing")
    g.add_argument("--no-engine", action="store_true",
                   help="build only the CPU/ONNX artifacts even where TensorRT is installed")


def _gate_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("accuracy gate and golden references")
    g.add_argument("--val-data", help="labelled validation folder (class folders) for the accuracy gate")
    g.add_argument("--max-drop", type=float, default=1.0, help="max accuracy/macro-F1 drop in points (default 1)")
    g.add_argument("--allow-drop", action="store_true", help="keep artifacts that fail the accuracy gate under their "
                   "normal names")
    g.add_argument("--keep-rejected", action="store_true", help="keep an artifact that fails the gate as "
                   "<name>.rejected.onnx for inspection (default: delete it)")
    g.add_argument("--golden-data", help="images for the golden references stored with each artifact (default: "
                   "--val-data, else the calibration data)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m export.build_engine", description=__doc__.split("\n\n")[0],
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    for add in (_input_flags, _calibration_flags, _engine_flags, _gate_flags):
        add(p)
    return p


def configure_logging(verbose: bool) -> None:
    """Our own progress at INFO; third-party loggers (onnxruntime's quantiser, ...) only from WARNING unless -v."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(message)s",
                        force=True)
    for name in ("export", "calibration"):
        logging.getLogger(name).setLevel(logging.INFO)


@cli("python -m export.build_engine")
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    opts = BuildOptions.from_args(args)
    try:
        report = build_artifacts(opts)
    except BuildFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    if report.exit_code == EXIT_GATE_FAILED:
        print(f"error: accuracy gate failed (drop above {opts.max_drop:g} pt) or the self-check failed on this "
              "machine; rerun with --allow-drop to accept such artifacts under their normal names", file=sys.stderr)
    return report.exit_code


if __name__ == "__main__":
    sys.exit(main())
