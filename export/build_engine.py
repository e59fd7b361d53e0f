"""``python -m export.build_engine``: FP16 / INT8 artifacts from an exported ONNX file, TensorRT engines where possible.

Every run writes into ``--out`` (default: beside the ONNX file):

* ``--fp16``: ``<stem>.fp16.onnx`` (float16 inside, float32 IO) and, with TensorRT + GPU, ``<stem>.fp16.engine``.
* ``--int8``: ``<stem>.int8.qdq.onnx`` (TensorRT Q/DQ placement, symmetric INT8), ``<stem>.int8.cpu.onnx``
  (ONNX Runtime U8S8), and with TensorRT + GPU ``<stem>.int8.engine`` built from the Q/DQ file.

Engines are strongly typed (TensorRT 10.x and 11.x) with one optimisation profile over ``--batch`` and a timing
cache keyed by TensorRT version and GPU. Each engine gets a JSON sidecar (``<engine>.json``, written with
:func:`runtime.contract.write_sidecar`) whose fields besides ``metadata`` are the ``SIDECAR_*`` constants below;
the runtime's TensorRT loader reads the same keys and refuses an engine whose TensorRT version, GPU or model hash
does not match, printing ``build_command``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from runtime.contract import ModelMetadata, write_sidecar
from sem_extras import cli

log = logging.getLogger("export.build_engine")

# ------------------------------------------------------------------ sidecar contract (read by runtime.trt_backend)
SIDECAR_MODEL_SHA256 = "model_sha256"  # sha256 of the ONNX file the engine was built from
SIDECAR_TENSORRT_VERSION = "tensorrt_version"  # trt.__version__ at build time, e.g. "10.3.0"
SIDECAR_GPU_NAME = "gpu_name"  # cudaDeviceProp.name, e.g. "Orin"
SIDECAR_COMPUTE_CAPABILITY = "compute_capability"  # "major.minor", e.g. "8.7"
SIDECAR_PRECISION = "precision"  # "fp16" | "int8"
SIDECAR_PROFILE = "profile"  # {"input": name, "min": [N,C,H,W], "opt": [...], "max": [...]}
SIDECAR_BUILD_COMMAND = "build_command"  # the command that rebuilds this engine
SIDECAR_ONNX = "onnx"  # the source ONNX, relative to the engine's folder (stale check, CPU fallback)
SIDECAR_ENGINE_SHA256 = "engine_sha256"  # sha256 of the engine file itself (a corrupt or swapped copy is refused)
SIDECAR_KEYS = (SIDECAR_MODEL_SHA256, SIDECAR_TENSORRT_VERSION, SIDECAR_GPU_NAME, SIDECAR_COMPUTE_CAPABILITY,
                SIDECAR_PRECISION, SIDECAR_PROFILE, SIDECAR_BUILD_COMMAND, SIDECAR_ONNX, SIDECAR_ENGINE_SHA256)
PRECISIONS = ("fp16", "int8")
DEFAULT_BATCHES = (1, 8, 32)
DEFAULT_WORKSPACE_GIB = 2.0
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


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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
    """Where each artifact goes: ``<out>/<stem>.{fp16.onnx,int8.qdq.onnx,int8.cpu.onnx,fp16.engine,int8.engine}``."""
    src = Path(onnx_path)
    out = Path(out_dir) if out_dir else src.parent
    stem = src.name[:-5] if src.name.endswith(".onnx") else src.name
    return {"fp16_onnx": out / f"{stem}.fp16.onnx", "int8_qdq_onnx": out / f"{stem}.int8.qdq.onnx",
            "int8_cpu_onnx": out / f"{stem}.int8.cpu.onnx", "fp16_engine": out / f"{stem}.fp16.engine",
            "int8_engine": out / f"{stem}.int8.engine", "fp16_report": out / f"{stem}.fp16.build-report.json",
            "int8_report": out / f"{stem}.int8.build-report.json"}


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


def sidecar_extra(model_sha256: str, tensorrt_version: str, gpu_name: str, compute_capability: str,
                  precision: str, profile: dict[str, Any], command: str, onnx: str = "",
                  engine_sha256: str = "") -> dict[str, Any]:
    """The sidecar fields next to ``metadata``; keys are the ``SIDECAR_*`` constants."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return {SIDECAR_MODEL_SHA256: model_sha256, SIDECAR_TENSORRT_VERSION: tensorrt_version,
            SIDECAR_GPU_NAME: gpu_name, SIDECAR_COMPUTE_CAPABILITY: compute_capability,
            SIDECAR_PRECISION: precision, SIDECAR_PROFILE: profile, SIDECAR_BUILD_COMMAND: command,
            SIDECAR_ONNX: onnx, SIDECAR_ENGINE_SHA256: engine_sha256}


def read_onnx_metadata(path: str | os.PathLike[str]) -> ModelMetadata:
    import onnx  # the train extra; imported here so that --help works without it

    model = onnx.load(str(path), load_external_data=False)
    return ModelMetadata.from_props({p.key: p.value for p in model.metadata_props}, str(path))


def update_onnx_metadata(path: str | os.PathLike[str], meta: ModelMetadata) -> None:
    """Rewrite ``path`` with ``meta`` embedded (atomically)."""
    import onnx

    from export.onnx_export import embed_metadata
    from runtime.files import atomic_write_bytes

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
    from runtime.files import atomic_write_bytes

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
                                engine_sha256=hashlib.sha256(blob).hexdigest()))
    return engine_path


# ------------------------------------------------------------------ CLI
EPILOG = """examples:
  python -m export.build_engine --onnx models/sem.onnx --fp16
  python -m export.build_engine --onnx models/sem.onnx --int8 --calib-data data/ --batch 1,8,32
  python -m export.build_engine --onnx models/sem.onnx --int8 --require-tensorrt   # fail without TensorRT/GPU

Without TensorRT the CPU artifacts are built and the command exits 0; --require-tensorrt makes that an error
(exit 3). With TensorRT installed but no usable GPU (e.g. a driver too old for the installed cuda-python) it fails
(exit 3) naming the CUDA error, unless --no-engine asks for the CPU artifacts only.
The accuracy gate (exit 4) compares each variant with FP32 on --val-data (default: val/ of the training data
recorded in the model).
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m export.build_engine", description=__doc__.split("\n\n")[0],
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--onnx", required=True, help="FP32 ONNX exported by `python -m export`")
    prec = p.add_mutually_exclusive_group(required=True)
    prec.add_argument("--fp16", action="store_true", help="FP16 ONNX (+ engine)")
    prec.add_argument("--int8", action="store_true",
                      help="INT8 Q/DQ ONNX for TensorRT, INT8 ONNX for the CPU (+ engine)")
    p.add_argument("--calib-data", help="calibration images (dataset root, class folders or a flat folder); "
                   "default: the training data recorded in the model")
    p.add_argument("--calib-size", type=int, default=512, help="calibration images (default %(default)s)")
    p.add_argument("--calib-method", default="percentile", choices=("minmax", "percentile", "entropy"),
                   help="range method (default %(default)s; entropy is slow)")
    p.add_argument("--cpu-keep-float", default="", help="comma-separated node names the CPU INT8 model keeps float")
    p.add_argument("--cpu-target", default="portable", choices=("portable", "vnni"),
                   help="CPU INT8 weights: portable (exact on every x86 CPU, default) or vnni (plain 8-bit, only for "
                   "CPUs with AVX-512 VNNI/AVX-VNNI/AMX; saturates elsewhere)")
    p.add_argument("--batch", default=",".join(map(str, DEFAULT_BATCHES)),
                   help="batch sizes for the engine profile: min,opt,max (default %(default)s)")
    p.add_argument("--workspace", type=float, default=DEFAULT_WORKSPACE_GIB, help="TensorRT workspace GiB")
    p.add_argument("--out", help="output folder (default: beside the ONNX file)")
    p.add_argument("--require-tensorrt", action="store_true", help="fail (exit 3) when TensorRT or a GPU is missing")
    p.add_argument("--no-engine", action="store_true",
                   help="build only the CPU/ONNX artifacts even where TensorRT is installed")
    p.add_argument("--val-data", help="labelled validation folder (class folders) for the accuracy gate")
    p.add_argument("--max-drop", type=float, default=1.0, help="max accuracy/macro-F1 drop in points (default 1)")
    p.add_argument("--allow-drop", action="store_true", help="keep artifacts that fail the accuracy gate under their "
                   "normal names")
    p.add_argument("--keep-rejected", action="store_true", help="keep an artifact that fails the gate as "
                   "<name>.rejected.onnx for inspection (default: delete it)")
    p.add_argument("--golden-data", help="images for the golden references stored with each artifact (default: "
                   "--val-data, else the calibration data)")
    p.add_argument("-v", "--verbose", action="store_true", help="show third-party (onnxruntime, TensorRT) INFO logs")
    return p


def rejected_path(path: Path) -> Path:
    """``x.int8.cpu.onnx`` → ``x.int8.cpu.rejected.onnx``: a name nobody ships by mistake."""
    return path.with_name(path.name[:-5] + ".rejected.onnx") if path.name.endswith(".onnx") else \
        path.with_name(path.name + ".rejected")


def configure_logging(verbose: bool) -> None:
    """Our own progress at INFO; third-party loggers (onnxruntime's quantiser, ...) only from WARNING unless -v."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(message)s",
                        force=True)
    for name in ("export", "calibration"):
        logging.getLogger(name).setLevel(logging.INFO)


def _val_folder(args: argparse.Namespace, meta: ModelMetadata) -> Path | None:
    if args.val_data:
        return Path(args.val_data)
    d = default_data_dir(meta)
    return d / "val" if d is not None and (d / "val").is_dir() else None


def _write_goldens(args: argparse.Namespace, onnx_path: Path, meta: ModelMetadata, precision: str,
                   batches: tuple[int, int, int], variants: dict[str, Path], rejected: set[Path],
                   report: dict[str, Any], default_data: Any) -> Any:
    """Golden references (runtime.check) from the FP32 model into every kept variant; returns them (or None)."""
    from export.golden import add_goldens, make_goldens

    command = build_command(args.onnx, precision, batches, args.out, args.calib_data)
    if precision == "int8" and args.val_data:
        command += f" --val-data {shlex.quote(str(args.val_data))}"
    if precision == "int8" and args.cpu_target != "portable":
        command += f" --cpu-target {args.cpu_target}"
    data = args.golden_data or (str(default_data) if default_data else None)
    try:
        goldens = make_goldens(onnx_path, data, meta, build_command=command)
        for path in variants.values():
            if path not in rejected:
                add_goldens(path, goldens)
    except (OSError, ValueError) as e:
        print(f"warning: golden references not written ({e}); these artifacts cannot self-check", file=sys.stderr)
        return None
    report["goldens"] = {"images": len(goldens), "source": goldens.reference.get("data"), "sha256": goldens.sha256}
    return goldens


def _self_check_variants(args: argparse.Namespace, variants: dict[str, Path], rejected: set[Path],
                         report: dict[str, Any], goldens: Any) -> bool:
    """Run each kept CPU variant's goldens here; a FAIL rejects it (unless --allow-drop). True when one failed."""
    from runtime.check import self_check

    failed = False
    report["self_check"] = {}
    for name, path in variants.items():
        if goldens is None or path in rejected or name == "int8-trt":
            continue  # the TensorRT Q/DQ file is checked by its engine, where that runs
        rep = self_check(path, "cpu")
        print(f"\n{rep.render()}")
        report["self_check"][name] = rep.to_dict()
        if not rep.ok:
            failed = True
            if not args.allow_drop:
                rejected.add(path)
    return failed


@cli("python -m export.build_engine")
def main(argv: Sequence[str] | None = None) -> int:  # noqa: C901 - a linear script of steps
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    from export.tensorrt_build import EngineBuildError, gpu_problem, import_tensorrt, query_gpu

    onnx_path = Path(args.onnx)
    if not onnx_path.is_file():
        print(f"error: {onnx_path}: no such ONNX file (export one with `python -m export --checkpoint ...`)",
              file=sys.stderr)
        return 2
    try:
        batches = parse_batches(args.batch)
        meta = read_onnx_metadata(onnx_path)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    precision = "fp16" if args.fp16 else "int8"
    paths = artifact_paths(onnx_path, args.out)
    paths[f"{precision}_report"].parent.mkdir(parents=True, exist_ok=True)

    trt = None if args.no_engine else import_tensorrt()
    gpu = query_gpu() if trt is not None else None
    if trt is not None and gpu is None:
        # TensorRT is installed, so an engine is wanted: a driver/cuda-python mismatch must not pass as success.
        print(f"error: TensorRT {trt.__version__} is installed but no engine can be built here: {gpu_problem()}. "
              "Fix that and rerun (python -m runtime.doctor checks the whole stack), or pass --no-engine to build "
              "only the CPU/ONNX artifacts", file=sys.stderr)
        return EXIT_NO_TENSORRT
    if trt is None:
        why = "--no-engine was given" if args.no_engine else "TensorRT is not installed"
        if args.require_tensorrt:
            print(f"error: {why}; --require-tensorrt was given, so no engine can be built here "
                  "(install the [tensorrt] extra on the GPU machine, see docs/tensorrt.md, and rerun)",
                  file=sys.stderr)
            return EXIT_NO_TENSORRT
        print(f"{why}: building the CPU/ONNX artifacts only (no engine)")

    written: list[Path] = []
    report: dict[str, Any] = {"precision": precision, "source": str(onnx_path)}
    variants: dict[str, Path] = {}  # variant name → ONNX file to gate
    if precision == "fp16":
        from export.onnx_export import write_fp16_onnx

        written.append(write_fp16_onnx(onnx_path, paths["fp16_onnx"], meta.with_updates(precision="fp16")))
        variants["fp16"] = paths["fp16_onnx"]
    else:
        from calibration.__main__ import run_calibration

        calib_dir = args.calib_data or default_data_dir(meta)
        if calib_dir is None:
            print("error: no calibration data: pass --calib-data DIR (the model records no training data folder)",
                  file=sys.stderr)
            return 2
        try:
            cal = run_calibration(onnx_path, Path(calib_dir), paths["int8_qdq_onnx"], paths["int8_cpu_onnx"],
                                  size=args.calib_size, method=args.calib_method,
                                  cpu_keep_float=[s for s in args.cpu_keep_float.split(",") if s],
                                  cpu_target=args.cpu_target, verbose=args.verbose)
        except (ValueError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        report["calibration"] = cal
        # TensorRT Q/DQ file with FP16 scales (opset 19): a strongly typed engine runs the layers between the Q/DQ
        # pairs in FP16 instead of FP32. Converted before the gate, so the gate checks what the engine is built from.
        from export.onnx_export import write_fp16_onnx

        try:
            write_fp16_onnx(paths["int8_qdq_onnx"], paths["int8_qdq_onnx"])
        except ValueError as e:
            print(f"error: {paths['int8_qdq_onnx']}: {e}", file=sys.stderr)
            return 2
        written += [paths["int8_qdq_onnx"], paths["int8_cpu_onnx"]]
        variants["int8-cpu"] = paths["int8_cpu_onnx"]
        variants["int8-trt"] = paths["int8_qdq_onnx"]

    gate_failed = False
    rejected: set[Path] = set()
    calib_dir = None if precision == "fp16" else (args.calib_data or default_data_dir(meta))
    val = _val_folder(args, meta)
    if val is None:
        print("accuracy gate skipped: no validation data (pass --val-data DIR)")
        report["gate"] = "skipped: no validation data"
    else:
        from export.accuracy_gate import accuracy_gate, labelled_images, load_inputs, onnx_logits

        try:
            x, y = load_inputs(*labelled_images(val, meta.labels), meta)
        except (ValueError, FileNotFoundError) as e:
            print(f"error: accuracy gate: {e}", file=sys.stderr)
            return 2
        ref = onnx_logits(onnx_path, x, meta.output_name)
        report["gate"] = {}
        for name, path in variants.items():
            # TensorRT's Q/DQ file is judged by its Q/DQ arithmetic (TensorRT accumulates in int32); onnxruntime's
            # fused CPU kernels for it would measure this CPU, not the engine.
            got = onnx_logits(path, x, meta.output_name, optimize=name != "int8-trt")
            res = accuracy_gate(ref, got, y, meta, name, args.max_drop)
            print(f"\naccuracy gate on {len(y)} images of {val} ({name}: {path.name})\n{res.table()}")
            report["gate"][name] = res.to_dict()
            own = read_onnx_metadata(path)  # keeps what calibration recorded
            vmeta = own.with_updates(precision=precision, temperature=res.temperature, threshold=res.threshold,
                                     extra={**own.extra, "accuracy_gate": res.to_dict()})
            update_onnx_metadata(path, vmeta)
            gate_failed |= not res.passed
            if not res.passed and not args.allow_drop:
                rejected.add(path)

    goldens = _write_goldens(args, onnx_path, meta, precision, batches, variants, rejected, report,
                             val if val is not None else calib_dir)
    gate_failed |= _self_check_variants(args, variants, rejected, report, goldens)
    for path in sorted(rejected):
        written.remove(path)
        if args.keep_rejected:
            written.append(path.replace(rejected_path(path)))
            print(f"rejected: {path.name} failed the accuracy gate or the self-check; kept as "
                  f"{rejected_path(path).name}", file=sys.stderr)
        else:
            path.unlink(missing_ok=True)
            print(f"rejected: {path.name} failed the accuracy gate or the self-check and was deleted "
                  f"(--keep-rejected keeps it as {rejected_path(path).name}, --allow-drop under its name)",
                  file=sys.stderr)
    report["rejected"] = [str(p) for p in sorted(rejected)]
    engine_src = paths["fp16_onnx"] if precision == "fp16" else paths["int8_qdq_onnx"]
    if trt is not None and gpu is not None and engine_src in rejected:
        print(f"no engine built: its source {engine_src.name} was rejected", file=sys.stderr)

    if trt is not None and gpu is not None and engine_src not in rejected:
        src = paths["fp16_onnx"] if precision == "fp16" else paths["int8_qdq_onnx"]
        engine = paths[f"{precision}_engine"]
        try:
            build_tensorrt_engine(trt, gpu, src, engine, read_onnx_metadata(src), precision, batches, args.workspace,
                                  build_command(onnx_path, precision, batches, args.out, args.calib_data))
        except EngineBuildError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        written += [engine, Path(str(engine) + ".json")]
        if goldens is not None:  # the engine checks itself against the same references where it runs
            from runtime.check import write_golden_sidecar

            written.append(write_golden_sidecar(engine, goldens))

    from runtime.files import atomic_write_text

    report["artifacts"] = [str(p) for p in written]
    written.append(atomic_write_text(paths[f"{precision}_report"], json.dumps(report, indent=2, default=str) + "\n"))
    print("\nwrote:\n  " + "\n  ".join(str(p) for p in written))
    if gate_failed and not args.allow_drop:
        print(f"error: accuracy gate failed (drop above {args.max_drop:g} pt) or the self-check failed on this "
              "machine; rerun with --allow-drop to accept such artifacts under their normal names", file=sys.stderr)
        return EXIT_GATE_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
