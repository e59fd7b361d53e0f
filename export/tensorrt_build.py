"""The TensorRT builder calls: ONNX (FP16 tensors or Q/DQ INT8) → serialized strongly typed engine.

Written for TensorRT 10.x (JetPack 6 ships 10.3) and 11.x: the network is created with
``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` (precision comes from the ONNX file; the flag is a no-op in 11.x),
and no ``BuilderFlag.FP16/INT8`` or implicit calibrators are used (removed in 11.0). ``trt`` is passed in as a
module object so the call sequence can be tested with a fake module on machines without TensorRT; every TensorRT
name appears as ``trt.<Name>`` / ``builder.<method>`` so the API check (tests/trt_api_check.py) can verify it
against the real bindings. Never run on this project's CPU-only build machines.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from runtime._atomic import atomic_write_bytes


class EngineBuildError(RuntimeError):
    """TensorRT could not parse the ONNX file or build an engine from it."""


@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: str  # "8.7"


def import_tensorrt() -> ModuleType | None:
    """The ``tensorrt`` module, or None when it is not installed (or fails to load its libraries)."""
    try:
        import tensorrt as trt
    except (ImportError, OSError):
        return None
    return trt


def query_gpu(device: int = 0) -> GpuInfo | None:
    """Name and compute capability of CUDA device ``device`` via cuda-python, or None without a usable GPU."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        return None
    err, props = cudart.cudaGetDeviceProperties(device)
    if err != cudart.cudaError_t.cudaSuccess:
        return None
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    return GpuInfo(name.strip("\x00 "), f"{props.major}.{props.minor}")


def parser_errors(parser: Any) -> list[str]:
    return [str(parser.get_error(i)) for i in range(parser.num_errors)]


def build_serialized_engine(trt: Any, onnx_path: str | os.PathLike[str], profile: dict[str, Any],
                            workspace_bytes: int, timing_cache_path: str | os.PathLike[str] | None = None,
                            log_level: str = "WARNING") -> bytes:
    """Parse ``onnx_path`` into a strongly typed network and build it with one optimisation profile.

    ``profile`` is ``{"input": name, "min": [...], "opt": [...], "max": [...]}``. A timing cache at
    ``timing_cache_path`` is loaded when present and written back (atomically) after the build. Returns the
    serialized engine; raises :class:`EngineBuildError` with the parser's errors on failure.
    """
    onnx_path = Path(onnx_path)
    logger = trt.Logger(getattr(trt.Logger, log_level))
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    # parse_from_file resolves external weight files relative to the model's folder.
    if not parser.parse_from_file(str(onnx_path)):
        errors = parser_errors(parser)
        raise EngineBuildError(f"{onnx_path}: TensorRT's ONNX parser failed with {len(errors)} error(s):\n  "
                               + "\n  ".join(errors or ["(no error detail reported)"]))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    opt_profile = builder.create_optimization_profile()
    opt_profile.set_shape(profile["input"], tuple(profile["min"]), tuple(profile["opt"]), tuple(profile["max"]))
    config.add_optimization_profile(opt_profile)
    cache_bytes = b""
    if timing_cache_path is not None and Path(timing_cache_path).is_file():
        cache_bytes = Path(timing_cache_path).read_bytes()
    timing_cache = config.create_timing_cache(cache_bytes)
    # ignore_mismatch=False: a cache from another device/version is refused rather than silently misused.
    config.set_timing_cache(timing_cache, False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(f"{onnx_path}: TensorRT failed to build an engine (see the TensorRT log above)")
    if timing_cache_path is not None:
        atomic_write_bytes(timing_cache_path, bytes(config.get_timing_cache().serialize()))
    return bytes(serialized)
