"""The artifact table: every model file the pipeline writes, its name, what opens it and where it is meant to run.

One row per format (:data:`FORMATS`), read by the exporter (``export.build_engine.artifact_paths``), the loaders
(``runtime.trt_backend.fallback_onnx``, ``runtime.classifier`` for the bundled names) and the benchmarks
(``benchmarks.latency.artifact_candidates``), so a name changes in one place. A file's name is the model's stem
plus the row's suffix: ``models/sem.onnx`` → ``models/sem.int8.cpu.onnx``. ONNX files hold the model contract
(:class:`runtime.contract.ModelMetadata`) and their golden references inside (``metadata_props``); engines cannot,
so each has two files beside it: ``<engine>.json`` (the metadata plus the :data:`SIDECAR_KEYS` below) and
``<engine>.golden.json`` (:data:`GOLDEN_SUFFIX`).

Also here, because every package needs them and ``runtime`` is the ground floor: :func:`read_onnx_metadata` (the
contract inside an ONNX file, read without the ``onnx`` package or an inference session) and
:func:`import_tensorrt`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.contract import ModelMetadata
from runtime.errors import BackendUnavailable, MetadataError

ONNXRUNTIME = "onnxruntime"
TENSORRT = "tensorrt"
#: File suffixes the TensorRT backend opens (``.plan`` is Triton's name, ``.trt`` a common one).
ENGINE_SUFFIXES = (".engine", ".plan", ".trt")
#: Golden references beside an artifact that cannot hold metadata: ``x.int8.engine`` → ``x.int8.engine.golden.json``.
GOLDEN_SUFFIX = ".golden.json"
#: Stem of the models bundled with the runtime (repository ``models/``, installed as package ``runtime.models``).
BUNDLED_STEM = "sem_classifier"


@dataclass(frozen=True)
class ArtifactFormat:
    """One row of the table. ``suffix`` follows the model's stem; ``built_from`` names the row an engine is built
    from; ``written_by`` is the command that writes the file (empty: no command writes that name)."""

    key: str
    suffix: str
    precision: str
    opened_by: str  # the runtime backend that runs it
    device: str  # where it is meant to run: "cpu" or "gpu"
    written_by: str
    sidecars: tuple[str, ...] = ()  # files beside it: the artifact's name + each suffix
    built_from: str = ""
    description: str = ""

    def file(self, folder: str | os.PathLike[str], stem: str) -> Path:
        """This format's file for the model ``stem`` in ``folder``."""
        return Path(folder) / (stem + self.suffix)


_ENGINE_SIDECARS = (".json", GOLDEN_SUFFIX)
#: The table. Order matters: for one precision and backend, earlier rows are preferred (see :func:`candidates`).
FORMATS: tuple[ArtifactFormat, ...] = (
    ArtifactFormat("fp32_onnx", ".onnx", "fp32", ONNXRUNTIME, "cpu", "python -m export",
                   description="the exported model; source of every other artifact"),
    ArtifactFormat("fp16_onnx", ".fp16.onnx", "fp16", ONNXRUNTIME, "gpu", "python -m export.build_engine --fp16",
                   description="float16 inside, float32 input/output; source of the FP16 engine"),
    ArtifactFormat("int8_onnx", ".int8.onnx", "int8", ONNXRUNTIME, "cpu", "",
                   description="the bundled CPU INT8 model's name (a renamed .int8.cpu.onnx)"),
    ArtifactFormat("int8_cpu_onnx", ".int8.cpu.onnx", "int8", ONNXRUNTIME, "cpu",
                   "python -m export.build_engine --int8 (or python -m calibration)",
                   description="ONNX Runtime U8S8 INT8 for x86 CPUs"),
    ArtifactFormat("int8_qdq_onnx", ".int8.qdq.onnx", "int8", ONNXRUNTIME, "gpu",
                   "python -m export.build_engine --int8 (or python -m calibration)",
                   description="symmetric Q/DQ INT8 for TensorRT; source of the INT8 engine"),
    ArtifactFormat("fp32_engine", ".engine", "fp32", TENSORRT, "gpu", "", _ENGINE_SIDECARS, "fp32_onnx",
                   description="an FP32 engine built by other means (export builds FP16 and INT8 engines)"),
    ArtifactFormat("fp16_engine", ".fp16.engine", "fp16", TENSORRT, "gpu", "python -m export.build_engine --fp16",
                   _ENGINE_SIDECARS, "fp16_onnx", "strongly typed TensorRT engine"),
    ArtifactFormat("int8_engine", ".int8.engine", "int8", TENSORRT, "gpu", "python -m export.build_engine --int8",
                   _ENGINE_SIDECARS, "int8_qdq_onnx", "strongly typed TensorRT engine from the Q/DQ file"),
)
BY_KEY: dict[str, ArtifactFormat] = {f.key: f for f in FORMATS}
#: Precisions export builds engines and reduced-precision files for.
BUILD_PRECISIONS = ("fp16", "int8")

DEFAULT_MODEL = BUNDLED_STEM + BY_KEY["fp32_onnx"].suffix
DEFAULT_INT8_MODEL = BUNDLED_STEM + BY_KEY["int8_onnx"].suffix

# ------------------------------------------------------------------ engine sidecar (<engine>.json) besides "metadata"
# Written by engine_sidecar (export.build_engine), read by runtime.trt_backend (check_engine_compat, fallback_onnx).
SIDECAR_MODEL_SHA256 = "model_sha256"  # sha256 of the ONNX file the engine was built from (stale check)
SIDECAR_TENSORRT_VERSION = "tensorrt_version"  # trt.__version__ at build time; must match where it runs
SIDECAR_GPU_NAME = "gpu_name"  # the GPU's name; another name with the same compute capability only warns
SIDECAR_COMPUTE_CAPABILITY = "compute_capability"  # "major.minor"; must match where it runs
SIDECAR_PRECISION = "precision"  # "fp16" | "int8"
SIDECAR_PROFILE = "profile"  # {"input": name, "min": [N,C,H,W], "opt": [...], "max": [...]}; informational
SIDECAR_BUILD_COMMAND = "build_command"  # the command that rebuilds this engine, printed on a mismatch
SIDECAR_ONNX = "onnx"  # the source ONNX, relative to the engine's folder (stale check, CPU fallback)
SIDECAR_ENGINE_SHA256 = "engine_sha256"  # sha256 of the engine file itself (a corrupt or swapped copy is refused)
SIDECAR_KEYS = (SIDECAR_MODEL_SHA256, SIDECAR_TENSORRT_VERSION, SIDECAR_GPU_NAME, SIDECAR_COMPUTE_CAPABILITY,
                SIDECAR_PRECISION, SIDECAR_PROFILE, SIDECAR_BUILD_COMMAND, SIDECAR_ONNX, SIDECAR_ENGINE_SHA256)


def engine_sidecar(model_sha256: str, tensorrt_version: str, gpu_name: str, compute_capability: str,
                   precision: str, profile: dict[str, Any], command: str, onnx: str = "",
                   engine_sha256: str = "") -> dict[str, Any]:
    """The engine sidecar's fields next to ``metadata`` (:data:`SIDECAR_KEYS`)."""
    if precision not in BUILD_PRECISIONS:
        raise ValueError(f"precision must be one of {BUILD_PRECISIONS}, got {precision!r}")
    return {SIDECAR_MODEL_SHA256: model_sha256, SIDECAR_TENSORRT_VERSION: tensorrt_version,
            SIDECAR_GPU_NAME: gpu_name, SIDECAR_COMPUTE_CAPABILITY: compute_capability,
            SIDECAR_PRECISION: precision, SIDECAR_PROFILE: profile, SIDECAR_BUILD_COMMAND: command,
            SIDECAR_ONNX: onnx, SIDECAR_ENGINE_SHA256: engine_sha256}


# ------------------------------------------------------------------ names
def is_engine(path: str | os.PathLike[str]) -> bool:
    """A file the TensorRT backend opens (by its suffix, :data:`ENGINE_SUFFIXES`)."""
    return Path(path).suffix.lower() in ENGINE_SUFFIXES


def format_of(path: str | os.PathLike[str]) -> ArtifactFormat | None:
    """The row whose suffix ends ``path``'s name (the longest such suffix), or None."""
    name = Path(path).name
    matches = [f for f in FORMATS if name.endswith(f.suffix) and len(name) > len(f.suffix)]
    return max(matches, key=lambda f: len(f.suffix), default=None)


def stem_of(path: str | os.PathLike[str]) -> str:
    """The model's stem: ``sem.int8.cpu.onnx`` → ``sem``; a name outside the table loses only its last suffix."""
    name = Path(path).name
    fmt = format_of(name)
    if fmt is not None:
        return name[: -len(fmt.suffix)]
    return Path(name).stem or name


def candidates(model: str | os.PathLike[str], precision: str, backend: str = ONNXRUNTIME) -> list[Path]:
    """Files beside ``model`` (any artifact of it) that hold ``precision`` for ``backend``, preferred first."""
    src = Path(model)
    return [f.file(src.parent, stem_of(src)) for f in FORMATS if f.precision == precision and f.opened_by == backend]


def artifact_paths(fp32_model: str | os.PathLike[str], out_dir: str | os.PathLike[str] | None = None
                   ) -> dict[str, Path]:
    """Every row's file, by key, for the FP32 model ``fp32_model`` (its name less ``.onnx`` is the stem, whatever
    else it holds, so a variant passed by mistake is never overwritten), in ``out_dir`` or beside it."""
    src = Path(fp32_model)
    stem = src.name.removesuffix(BY_KEY["fp32_onnx"].suffix)
    return {f.key: f.file(out_dir or src.parent, stem) for f in FORMATS}


def sidecar_files(artifact: str | os.PathLike[str]) -> list[Path]:
    """The files the table puts beside ``artifact`` (engines: metadata sidecar and golden references)."""
    p = Path(artifact)
    fmt = format_of(p)
    return [p.with_name(p.name + s) for s in (fmt.sidecars if fmt else ())]


def source_onnx(engine: str | os.PathLike[str]) -> Path | None:
    """The ONNX file the table says ``engine`` is built from (beside it), or None for a name outside the table."""
    fmt = format_of(engine)
    if fmt is None or not fmt.built_from:
        return None
    return BY_KEY[fmt.built_from].file(Path(engine).parent, stem_of(engine))


def build_report_path(fp32_model: str | os.PathLike[str], precision: str,
                      out_dir: str | os.PathLike[str] | None = None) -> Path:
    """``export.build_engine``'s JSON report: ``<out>/<stem>.<precision>.build-report.json``."""
    src = Path(fp32_model)
    stem = src.name.removesuffix(BY_KEY["fp32_onnx"].suffix)
    return Path(out_dir or src.parent) / f"{stem}.{precision}.build-report.json"


def rejected_path(path: str | os.PathLike[str]) -> Path:
    """``x.int8.cpu.onnx`` → ``x.int8.cpu.rejected.onnx``: where a file that failed its gate is kept, a name nobody
    ships by mistake."""
    p = Path(path)
    if p.name.endswith(".onnx"):
        return p.with_name(p.name.removesuffix(".onnx") + ".rejected.onnx")
    return p.with_name(p.name + ".rejected")


# ------------------------------------------------------------------ ONNX metadata without the onnx package
def _varint(buf: memoryview, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(buf) or shift > 63:
            raise ValueError("truncated varint")
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i
        shift += 7


def _fields(buf: memoryview) -> Iterator[tuple[int, Any]]:
    """(field number, value) of one protobuf message: ints for varints, memoryviews for length-delimited fields."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 2:
            size, i = _varint(buf, i)
            value, i = buf[i:i + size], i + size
        elif wire in (1, 5):
            value, i = None, i + (8 if wire == 1 else 4)
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if i > len(buf) or number == 0:
            raise ValueError("truncated or malformed message")
        yield number, value


#: ``onnx.ModelProto.metadata_props`` and ``StringStringEntryProto.key/value`` field numbers (onnx.proto).
_MODEL_METADATA_PROPS, _ENTRY_KEY, _ENTRY_VALUE = 14, 1, 2


def read_onnx_props(path: str | os.PathLike[str]) -> dict[str, str]:
    """An ONNX file's ``metadata_props`` as a dict, parsed from the protobuf directly (the graph is skipped)."""
    data = memoryview(Path(path).read_bytes())
    props: dict[str, str] = {}
    try:
        for number, value in _fields(data):
            if number == _MODEL_METADATA_PROPS and isinstance(value, memoryview):
                entry = dict(_fields(value))
                props[bytes(entry.get(_ENTRY_KEY, b"")).decode()] = bytes(entry.get(_ENTRY_VALUE, b"")).decode()
    except (ValueError, TypeError, UnicodeDecodeError) as e:
        raise MetadataError(f"{path}: not a readable ONNX model ({e})") from None
    return props


def read_onnx_metadata(path: str | os.PathLike[str]) -> ModelMetadata:
    """The model contract stored in an ONNX file; :class:`MetadataError` naming the file when it has none."""
    return ModelMetadata.from_props(read_onnx_props(path), str(path))


# ------------------------------------------------------------------ TensorRT
def import_tensorrt(required: bool = True) -> Any:
    """``import tensorrt``. When it cannot be loaded: a :class:`BackendUnavailable` that says what to do instead, or
    None with ``required=False`` (export and the doctor then build or check the rest without it)."""
    try:
        import tensorrt as trt
    except (ImportError, OSError) as e:
        if not required:
            return None
        state = "is not installed here" if isinstance(e, ImportError) else "cannot load its libraries here"
        raise BackendUnavailable(
            f"TensorRT {state} ({e}). Install it on a machine with an NVIDIA GPU "
            "(pip install 'sem-defect-classifier[tensorrt]', or JetPack on Jetson), or run the ONNX model with "
            "ONNX Runtime instead (backend='ort', model=...onnx)") from None
    return trt
