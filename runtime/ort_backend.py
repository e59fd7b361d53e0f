"""ONNX Runtime backend: runs an ONNX (FP32 or Q/DQ INT8) model on the CPU, or on ONNX Runtime's CUDA provider.

Session options are set for a single-stream, latency-bound station: intra-op threads = physical cores (hyper-threads
share the FP units and only add contention), sequential execution, all graph optimisations. The metadata is read from
the model's ``metadata_props`` through ONNX Runtime itself, so the runtime never needs the ``onnx`` package.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from runtime.backend import ClosingContext
from runtime.contract import ModelMetadata
from runtime.errors import BackendUnavailable, MetadataError

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"

_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


def physical_cores(cpuinfo: str | None = None, allowed_cpus: int | None = None) -> int:
    """Physical cores this process may use: distinct (package, core) pairs in /proc/cpuinfo, capped by affinity.

    Falls back to the logical CPU count where /proc/cpuinfo says nothing (other OSes, some VMs).
    """
    if allowed_cpus is None:
        try:
            allowed_cpus = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            allowed_cpus = os.cpu_count() or 1
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            cpuinfo = ""
    cores: set[tuple[str, str]] = set()
    package = core = None
    for line in cpuinfo.splitlines() + [""]:
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "physical id":
            package = value.strip()
        elif key == "core id":
            core = value.strip()
        elif not key:  # blank line ends one processor block
            if core is not None:
                cores.add((package or "0", core))
            package = core = None
    physical = len(cores) or allowed_cpus
    return max(1, min(physical, allowed_cpus))


def session_options(threads: int | None = None, spin: bool = True) -> ort.SessionOptions:
    """Options for one latency-bound inference stream (see module docstring)."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads) if threads else physical_cores()
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3  # errors only: warnings about unused initialisers are noise on a station
    if not spin:
        # Idle intra-op threads normally spin for a while; in a pipeline they would steal the decode thread's core.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


def choose_providers(requested: str | Sequence[str] | None, available: Sequence[str]) -> list[str]:
    """Provider list for ``requested``: ``None``/"auto" (CUDA if present, else CPU), "cpu", "cuda", or a list."""
    if requested is None or requested == "auto":
        return [CUDA, CPU] if CUDA in available else [CPU]
    if isinstance(requested, str):
        key = requested.lower()
        if key == "cpu":
            return [CPU]
        if key in ("cuda", "gpu"):
            if CUDA not in available:
                raise BackendUnavailable(
                    "ONNX Runtime's CUDA provider is not available here (installed providers: "
                    f"{', '.join(available)}); install onnxruntime-gpu on a machine with an NVIDIA GPU, or use 'cpu'")
            return [CUDA, CPU]
        requested = [requested]
    missing = [p for p in requested if p not in available]
    if missing:
        raise BackendUnavailable(f"ONNX Runtime provider(s) {missing} not available "
                                 f"(installed: {', '.join(available)})")
    return list(requested)


def _dim(d: Any) -> int | None:
    return d if isinstance(d, int) and d > 0 else None


class OrtBackend(ClosingContext):
    """An ONNX model in an ONNX Runtime session, with its metadata checked against the graph: a
    :class:`~runtime.backend.Backend`.

    ``infer(batch)`` takes ``(N, C, H, W)`` float32 and returns ``{output name: array}``. Models with a fixed batch
    dimension are run in chunks of that size (the last chunk zero-padded), so any N works.
    """

    def __init__(self, model: str | os.PathLike[str], providers: str | Sequence[str] | None = None,
                 threads: int | None = None, spin: bool = True, io_binding: bool = False,
                 metadata: ModelMetadata | None = None) -> None:
        self.path = Path(model)
        if not self.path.is_file():
            raise FileNotFoundError(2, "model file not found", str(self.path))
        self.providers = choose_providers(providers, ort.get_available_providers())
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=session_options(threads, spin),
                                                providers=self.providers)
        except Exception as e:  # noqa: BLE001 - ORT raises its own pybind types for corrupt/unsupported graphs
            raise MetadataError(f"{self.path}: ONNX Runtime cannot load this model: {e}") from None
        self.providers = self.session.get_providers()
        self.meta = metadata or ModelMetadata.from_props(self.session.get_modelmeta().custom_metadata_map,
                                                         str(self.path))
        inputs = self.session.get_inputs()
        outputs = {o.name: o for o in self.session.get_outputs()}
        src = str(self.path)
        if len(inputs) != 1:
            raise MetadataError(f"{src}: the model has {len(inputs)} inputs; one image input is expected")
        inp = inputs[0]
        if inp.name != self.meta.input_name:
            raise MetadataError(f"{src}: metadata names input {self.meta.input_name!r} but the model's input is "
                                f"{inp.name!r}")
        if len(inp.shape) != 4:
            raise MetadataError(f"{src}: the model input {inp.name!r} has shape {inp.shape}; (N, C, H, W) expected")
        if inp.type not in _ORT_TYPES:
            raise MetadataError(f"{src}: the model input is {inp.type}; a float tensor is expected")
        for name in (self.meta.output_name, self.meta.score_output):
            if name and name not in outputs:
                raise MetadataError(f"{src}: metadata names output {name!r} but the model's outputs are "
                                    f"{sorted(outputs)}")
        out_shape = outputs[self.meta.output_name].shape
        classes = _dim(out_shape[-1]) if out_shape else None
        self.meta.validate_against_model(src, inp.shape, classes)
        self.input_name = inp.name
        self.input_dtype = np.dtype(_ORT_TYPES[inp.type])
        self.input_shape = (self.meta.channels, *self.meta.input_size)  # (C, H, W)
        self.output_names = tuple(outputs)
        self._output_shapes = {name: o.shape for name, o in outputs.items()}
        fixed = _dim(inp.shape[0])
        self.min_batch = fixed or 1
        self.max_batch: int | None = fixed
        self.io_binding = io_binding and self._outputs_resolvable()
        self._buffer = np.empty((0, *self.input_shape), np.float32)
        self._bound: dict[int, tuple[Any, dict[str, np.ndarray]]] = {}
        self.name = "onnxruntime-" + ("cuda" if self.providers and self.providers[0] == CUDA else "cpu")

    # ---------------------------------------------------------------------------------------------------- buffers
    def input_buffer(self, n: int) -> np.ndarray:
        """A writable float32 ``(n, C, H, W)`` array reused across calls; ``infer`` recognises it (no copy)."""
        if n > len(self._buffer):
            cap = max(n, self.min_batch)
            self._buffer = np.empty((cap, *self.input_shape), np.float32)
        return self._buffer[:n]

    def _outputs_resolvable(self) -> bool:
        return all(all(isinstance(d, int) for d in s[1:]) for s in
                   (o.shape for o in self.session.get_outputs()))

    # ---------------------------------------------------------------------------------------------------- running
    def _run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        if batch.dtype != self.input_dtype:
            batch = batch.astype(self.input_dtype)
        if self.io_binding:
            return self._run_bound(batch)
        values = self.session.run(None, {self.input_name: batch})
        return dict(zip(self.output_names, values))

    def _run_bound(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        n = len(batch)
        entry = self._bound.get(n)
        if entry is None:
            binding = self.session.io_binding()
            outs = {name: np.empty((n, *shape[1:]), np.float32) for name, shape in self._output_shapes.items()}
            for name, arr in outs.items():
                binding.bind_output(name, "cpu", 0, np.float32, list(arr.shape), arr.ctypes.data)
            entry = self._bound[n] = (binding, outs)
        binding, outs = entry
        binding.bind_cpu_input(self.input_name, batch)
        self.session.run_with_iobinding(binding)
        return {k: v.copy() for k, v in outs.items()}

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Raw outputs for a ``(N, C, H, W)`` batch (chunked/padded for fixed-batch models)."""
        n = len(batch)
        if self.max_batch is None:
            return self._run(np.ascontiguousarray(batch))
        size = self.max_batch
        parts: list[dict[str, np.ndarray]] = []
        for start in range(0, n, size):
            chunk = batch[start:start + size]
            count = len(chunk)
            if count < size:
                padded = np.zeros((size, *chunk.shape[1:]), chunk.dtype)
                padded[:count] = chunk
                chunk = padded
            parts.append({k: v[:count] for k, v in self._run(np.ascontiguousarray(chunk)).items()})
        if len(parts) == 1:
            return parts[0]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def describe(self) -> str:
        so = self.session.get_session_options()
        return (f"onnxruntime {ort.__version__} {self.providers[0]}, {so.intra_op_num_threads} intra-op thread(s)"
                + (", IO binding" if self.io_binding else ""))

    def close(self) -> None:
        self._bound.clear()
        self.session = None  # type: ignore[assignment]
