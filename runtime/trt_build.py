"""The TensorRT builder calls: ONNX (FP16 tensors or Q/DQ INT8) → serialized strongly typed engine.

Lives in ``runtime`` because an engine is built on the machine that runs it: ``python -m export.build_engine``
(through ``export.tensorrt_build``) and ``python -m runtime.doctor`` both build with it.

Written for TensorRT 10.x (JetPack 6 ships 10.3) and 11.x: the network is created with
``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` (precision comes from the ONNX file; the flag is a no-op in 11.x),
and no ``BuilderFlag.FP16/INT8`` or implicit calibrators are used (removed in 11.0). ``trt`` is passed in as a
module object so the call sequence can be tested with a fake module on machines without TensorRT; every TensorRT
name appears as ``trt.<Name>`` / ``builder.<method>`` so the API check (tests/trt_api_check.py) can verify it
against the real bindings.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime import artifacts
from runtime.files import atomic_write_bytes

log = logging.getLogger(__name__)


#: ``tensorrt`` or None where it cannot be loaded (:func:`runtime.artifacts.import_tensorrt`, not required): builders
#: check the rest of the stack without it.
import_tensorrt = functools.partial(artifacts.import_tensorrt, required=False)


class EngineBuildError(RuntimeError):
    """TensorRT could not parse the ONNX file or build an engine from it."""


@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: str  # "8.7"
    multiprocessors: int = 0  # SM count and memory tell modules with one name apart (Orin AGX / NX / Nano)
    memory_bytes: int = 0


def gpu_problem(device: int = 0) -> str:
    """Why no engine can be built on CUDA device ``device`` (the CUDA error by name and the fix), or ""."""
    from runtime import cuda_buffers

    return cuda_buffers.gpu_problem(device)


def query_gpu(device: int = 0) -> GpuInfo | None:
    """Name, compute capability, SM count and memory of CUDA device ``device`` via cuda-python (either module
    layout: ``cuda.bindings`` or the older ``cuda.cudart``), or None without a usable GPU (:func:`gpu_problem`
    says why)."""
    from runtime import cuda_buffers
    from runtime.errors import BackendUnavailable

    if gpu_problem(device):
        return None
    try:
        p = cuda_buffers.gpu_properties(device)
    except (BackendUnavailable, cuda_buffers.CudaError):
        return None
    return GpuInfo(p.name, f"{p.compute_capability[0]}.{p.compute_capability[1]}", p.multiprocessors,
                   p.memory_bytes)


def parser_errors(parser: Any) -> list[str]:
    return [str(parser.get_error(i)) for i in range(parser.num_errors)]


def _network_inputs(network: Any) -> dict[str, tuple[int, ...]]:
    return {network.get_input(i).name: tuple(network.get_input(i).shape) for i in range(network.num_inputs)}


def _add_profile(trt: Any, builder: Any, config: Any, network: Any, profile: dict[str, Any], src: Path) -> None:
    """Set the profile's shapes, then add it: TensorRT validates and copies a profile when it is added."""
    inputs = _network_inputs(network)
    name = profile["input"]
    if name not in inputs:
        raise EngineBuildError(f"{src}: the optimisation profile names input {name!r}, but the network's inputs are "
                               f"{sorted(inputs)}")
    shapes = [tuple(int(d) for d in profile[k]) for k in ("min", "opt", "max")]
    opt_profile = builder.create_optimization_profile()
    try:
        opt_profile.set_shape(name, *shapes)
    except (RuntimeError, TypeError, ValueError) as e:  # pybind raises when setDimensions returns false
        raise EngineBuildError(f"{src}: invalid optimisation profile for input {name!r} "
                               f"(min {list(shapes[0])}, opt {list(shapes[1])}, max {list(shapes[2])}; each must be "
                               f"<= the next, with the network's fixed dimensions {list(inputs[name])}): {e}") from None
    index = config.add_optimization_profile(opt_profile)
    if index is None or int(index) < 0:
        raise EngineBuildError(f"{src}: TensorRT refused the optimisation profile for input {name!r} (min "
                               f"{list(shapes[0])}, max {list(shapes[2])}) against the network's input shape "
                               f"{list(inputs[name])}; check --batch and the model's input size")


def _attach_timing_cache(config: Any, path: Path | None) -> None:
    """Attach the cache at ``path`` (or a fresh one) before the build; a corrupt file or one from another GPU or
    TensorRT is refused (``ignore_mismatch=False``) and replaced by a fresh cache, never silently misused."""
    data = b""
    if path is not None and path.is_file():
        data = path.read_bytes()
    try:  # createTimingCache returns null (None) for a blob it cannot read
        cache = config.create_timing_cache(data) if data else None
    except (RuntimeError, TypeError, ValueError):
        cache = None
    if data and cache is None:
        log.warning("%s: timing cache could not be read (corrupt?); starting a fresh one", path)
    if cache is not None and not config.set_timing_cache(cache, False):
        log.warning("%s: timing cache refused by TensorRT (made on another GPU or TensorRT version); starting a "
                    "fresh one", path)
        cache = None
    if cache is None:
        fresh = config.create_timing_cache(b"")
        if fresh is None or not config.set_timing_cache(fresh, False):
            log.warning("TensorRT gave no timing cache; building without one")


def _save_timing_cache(config: Any, path: Path) -> None:
    """Write the (updated) cache back; a missing cache is a warning, never a lost engine."""
    try:
        cache = config.get_timing_cache()
        if cache is None:
            log.warning("%s: TensorRT returned no timing cache after the build; not saved", path)
            return
        atomic_write_bytes(path, bytes(cache.serialize()))
    except (OSError, RuntimeError, AttributeError, TypeError) as e:
        log.warning("%s: timing cache not saved (%s)", path, e)


def build_serialized_engine(trt: Any, onnx_path: str | os.PathLike[str], profile: dict[str, Any],
                            workspace_bytes: int, timing_cache_path: str | os.PathLike[str] | None = None,
                            log_level: str = "WARNING") -> bytes:
    """Parse ``onnx_path`` into a strongly typed network and build it with one optimisation profile.

    ``profile`` is ``{"input": name, "min": [...], "opt": [...], "max": [...]}``. A timing cache at
    ``timing_cache_path`` is attached before the build when TensorRT accepts it (else a fresh one) and written back
    (atomically) after it. Returns the serialized engine; raises :class:`EngineBuildError` with the parser's errors,
    an invalid profile or a failed build.
    """
    onnx_path = Path(onnx_path)
    logger = trt.Logger(getattr(trt.Logger, log_level))
    builder = trt.Builder(logger)
    # The flag's value differs between versions (10.x: 1, 11.x: 0, where it is a no-op): always go by the name.
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
    _add_profile(trt, builder, config, network, profile, onnx_path)
    cache_path = Path(timing_cache_path) if timing_cache_path is not None else None
    _attach_timing_cache(config, cache_path)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(f"{onnx_path}: TensorRT failed to build an engine (see the TensorRT log above)")
    blob = bytes(serialized)
    if cache_path is not None:
        _save_timing_cache(config, cache_path)
    return blob
