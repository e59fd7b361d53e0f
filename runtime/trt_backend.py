"""TensorRT backend: a serialized engine + its JSON sidecar, run with pinned host buffers on one CUDA stream.

Written against the TensorRT 10.x/11.x tensor-name API (``num_io_tensors``, ``get_tensor_name``,
``set_input_shape``, ``set_tensor_address``, ``execute_async_v3``; the binding-index API was removed in 10.0).
Per call: copy the batch into pinned memory → async H2D → ``execute_async_v3`` (or a CUDA-graph replay captured for
that batch size) → async D2H → one stream synchronize. Buffers are allocated once for the profile's largest batch.

An engine only runs on the TensorRT version and GPU it was built for, so its sidecar (``model.engine.json``,
written by ``python -m export.build_engine``; keys in :mod:`runtime.artifacts`) is checked before deserializing:
the TensorRT version (major.minor.patch) and the compute capability must match; another GPU name with the same
compute capability only warns; ``engine_sha256`` must match the engine file; if the source ONNX (``onnx``,
relative to the engine's folder) is still there, its hash must equal ``model_sha256`` or the engine is stale. A
mismatch prints ``build_command``. Everything that touches TensorRT is inside :class:`TrtBackend`; the checks and
shape logic are plain functions so they are tested without a GPU.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from runtime import artifacts as art
from runtime.artifacts import ENGINE_SUFFIXES, import_tensorrt, is_engine  # noqa: F401 - importable from here too
from runtime.backend import ClosingContext
from runtime.contract import read_sidecar
from runtime.errors import BackendUnavailable, InputError, MetadataError
from runtime.files import sha256_bytes, sha256_file

#: TensorRT ``DataType`` member name → numpy dtype. BF16/FP8/INT4/FP4 have no numpy type: I/O must not use them.
TRT_TO_NUMPY: dict[str, Any] = {
    "FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "INT32": np.int32, "INT64": np.int64,
    "BOOL": np.bool_, "UINT8": np.uint8,
}


def tensorrt_available() -> bool:
    """TensorRT importable and a CUDA GPU usable (what backend='auto' needs to pick TensorRT).

    TensorRT installed but no usable GPU (a driver older than the installed cuda-python needs, say) is a setup
    problem, not a CPU-only machine: it is warned about, with the CUDA error and its fix, before falling back."""
    try:
        import_tensorrt()
    except BackendUnavailable:
        return False
    from runtime import cuda_buffers

    problem = cuda_buffers.gpu_problem()
    if problem:
        warnings.warn(f"TensorRT is installed but cannot run here: {problem}. Falling back to ONNX Runtime; "
                      "python -m runtime.doctor checks the whole stack", RuntimeWarning, stacklevel=2)
        return False
    return True


# ------------------------------------------------------------------------------------------------ plain logic
def numpy_dtype(trt_dtype: Any, tensor: str = "?") -> np.dtype:
    """numpy dtype for a TensorRT ``DataType`` (matched by member name, so it is testable without TensorRT)."""
    name = getattr(trt_dtype, "name", str(trt_dtype)).rsplit(".", 1)[-1].upper()
    if name not in TRT_TO_NUMPY:
        raise BackendUnavailable(f"engine I/O tensor {tensor!r} has TensorRT type {name}, which numpy cannot hold; "
                                 "rebuild the engine with float32 or float16 inputs and outputs")
    return np.dtype(TRT_TO_NUMPY[name])


def resolve_shape(shape: Sequence[int], batch: int, tensor: str = "?") -> tuple[int, ...]:
    """Engine shape with a dynamic (-1) batch dimension → concrete shape for ``batch``."""
    dims = [int(d) for d in shape]
    if dims and dims[0] < 0:
        dims[0] = batch
    if any(d < 0 for d in dims):
        raise BackendUnavailable(f"engine tensor {tensor!r} has shape {list(shape)}: only the batch dimension "
                                 "may be dynamic")
    return tuple(dims)


def plan_batches(n: int, min_batch: int, max_batch: int) -> list[tuple[int, int, int]]:
    """Split ``n`` images into engine runs ``(start, count, run_size)`` inside the profile's [min, max] batch.

    Runs are ``max_batch`` long; a short last run is padded up to ``min_batch`` (``run_size >= count``).
    """
    if n <= 0:
        return []
    if not 1 <= min_batch <= max_batch:
        raise ValueError(f"bad batch range [{min_batch}, {max_batch}]")
    plans = []
    for start in range(0, n, max_batch):
        count = min(max_batch, n - start)
        plans.append((start, count, max(count, min_batch)))
    return plans


def _version_tuple(v: Any) -> tuple[int, ...]:
    parts = []
    for p in str(v).split("."):
        digits = "".join(ch for ch in p if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def _cc_tuple(v: Any) -> tuple[int, int] | None:
    if v is None:
        return None
    if isinstance(v, (list, tuple)) and len(v) == 2:
        return int(v[0]), int(v[1])
    s = str(v).lower().removeprefix("sm_").removeprefix("sm")
    if "." in s:
        a, b = s.split(".", 1)
        return int(a), int(b)
    if s.isdigit() and len(s) >= 2:  # "87" → (8, 7)
        return int(s[:-1]), int(s[-1])
    return None


def _field(sidecar: Mapping[str, Any], key: str) -> Any:
    """A sidecar field, None when absent or empty."""
    value = sidecar.get(key)
    return None if value in (None, "") else value


def rebuild_command(engine: str | os.PathLike[str], sidecar: Mapping[str, Any]) -> str:
    """The command the sidecar records, else one rebuilt from its source ONNX and precision."""
    if _field(sidecar, art.SIDECAR_BUILD_COMMAND):
        return str(sidecar[art.SIDECAR_BUILD_COMMAND])
    onnx = _field(sidecar, art.SIDECAR_ONNX) or "<model.onnx>"
    precision = str(_field(sidecar, art.SIDECAR_PRECISION) or "fp16").lower()
    flag = f" --{precision}" if precision in art.BUILD_PRECISIONS else ""
    return f"python -m export.build_engine --onnx {onnx}{flag} --out {Path(engine).parent}"


def _version_problem(sidecar: Mapping[str, Any], trt_version: str) -> str | None:
    built = _field(sidecar, art.SIDECAR_TENSORRT_VERSION)
    if built is None:
        return "the sidecar does not record the TensorRT version it was built with"
    if _version_tuple(built)[:3] != _version_tuple(trt_version)[:3]:
        return f"built with TensorRT {built}, running TensorRT {trt_version}"
    return None


def _gpu_check(engine: Path, sidecar: Mapping[str, Any], gpu_name: str, compute_capability: tuple[int, int],
               ) -> tuple[str | None, str | None]:
    """(problem, note): another compute capability is refused; another GPU name with the same one only warns."""
    built_cc = _cc_tuple(_field(sidecar, art.SIDECAR_COMPUTE_CAPABILITY))
    built_gpu = _field(sidecar, art.SIDECAR_GPU_NAME)
    running = f"{compute_capability[0]}.{compute_capability[1]}"
    if built_cc is None:
        return "the sidecar does not record the GPU compute capability it was built for", None
    if built_cc != tuple(compute_capability):
        return (f"built for compute capability {built_cc[0]}.{built_cc[1]} ({built_gpu or 'unknown GPU'}), this GPU "
                f"{gpu_name!r} is {running}"), None
    if built_gpu and str(built_gpu).strip() != gpu_name.strip():
        return None, (f"{engine}: built on {built_gpu!r}, running on {gpu_name!r} (same compute capability): it runs, "
                      "but its kernels were tuned for the other GPU; rebuild for best speed")
    return None, None


def _source_onnx_candidates(engine: Path, onnx: str) -> list[Path]:
    """Where the sidecar's ``onnx`` may be: relative to the engine's folder, then to the working directory."""
    return [Path(onnx)] if Path(onnx).is_absolute() else [engine.parent / onnx, Path(onnx)]


def _stale_problem(engine: Path, sidecar: Mapping[str, Any]) -> str | None:
    onnx, want = _field(sidecar, art.SIDECAR_ONNX), _field(sidecar, art.SIDECAR_MODEL_SHA256)
    if not onnx or not want:
        return None
    src = next((c for c in _source_onnx_candidates(engine, str(onnx)) if c.is_file()), None)
    if src is not None and sha256_file(src) != want:
        return f"the ONNX model it was built from ({src}) has changed since (sha256 differs): the engine is stale"
    return None


def check_engine_compat(engine: str | os.PathLike[str], sidecar: Mapping[str, Any], *, trt_version: str,
                        gpu_name: str, compute_capability: tuple[int, int], engine_bytes: bytes | None = None,
                        ) -> list[str]:
    """Refuse an engine built for another TensorRT or GPU, or from an ONNX file that has changed since.

    Raises :class:`MetadataError` listing every mismatch plus the rebuild command; returns warnings (e.g. same
    compute capability but a different GPU model, where the engine runs but its tactics were tuned elsewhere).
    """
    engine = Path(engine)
    gpu_problem, note = _gpu_check(engine, sidecar, gpu_name, compute_capability)
    want_engine = _field(sidecar, art.SIDECAR_ENGINE_SHA256)
    corrupt = None
    if want_engine and engine_bytes is not None and sha256_bytes(engine_bytes) != want_engine:
        corrupt = "the engine file's sha256 does not match the sidecar (corrupt or replaced file)"
    problems = [p for p in (_version_problem(sidecar, trt_version), gpu_problem, corrupt,
                            _stale_problem(engine, sidecar)) if p]
    if problems:
        raise MetadataError(f"{engine}: this TensorRT engine cannot be used here: " + "; ".join(problems)
                            + f". Rebuild it on this machine: {rebuild_command(engine, sidecar)}")
    return [note] if note else []


def fallback_onnx(engine: str | os.PathLike[str]) -> Path | None:
    """The ONNX model an engine was built from, if it is still around (for backend='auto' without TensorRT): the
    sidecar's ``onnx``, else the table's source file beside the engine, else the engine's name with ``.onnx``."""
    engine = Path(engine)
    cands: list[Path] = []
    try:
        _, side = read_sidecar(engine)
        onnx = _field(side, art.SIDECAR_ONNX)
        if onnx:
            cands += _source_onnx_candidates(engine, str(onnx))
    except (MetadataError, OSError):
        pass
    cands += [p for p in (art.source_onnx(engine), engine.with_suffix(".onnx")) if p is not None]
    return next((c for c in cands if c.is_file()), None)


# ------------------------------------------------------------------------------------------------ the backend
class TrtBackend(ClosingContext):
    """A TensorRT engine with its sidecar metadata, pinned I/O buffers and one CUDA stream: a
    :class:`~runtime.backend.Backend`.

    ``infer(batch)`` takes ``(N, C, H, W)`` float32 and returns ``{output name: array}``. ``cuda_graphs=True``
    captures ``execute_async_v3`` once per batch size and replays it (lower launch overhead at batch 1).

    A replayed graph runs with the execution context's state as it was when last enqueued, not as
    ``set_input_shape`` left it since (NVIDIA/TensorRT#3798; trtexec captures one graph per context). So each
    captured batch size gets an execution context of its own whose shape never changes; all contexts are created
    ``USER_MANAGED`` and share one device-memory block (they run one at a time on one stream).
    """

    name = "tensorrt"

    def __init__(self, engine: str | os.PathLike[str], *, device: int = 0, max_batch: int | None = None,
                 cuda_graphs: bool = False, check_compat: bool = True) -> None:
        self.path = Path(engine)
        self._closed = True
        self._graphs: dict[int, Any] = {}
        self._graph_contexts: dict[int, Any] = {}
        self._context_memory: Any = None
        self._host: dict[str, Any] = {}
        self._device: dict[str, Any] = {}
        self._stream: Any = None
        self._events: list[Any] | None = None
        self.cuda_graphs = cuda_graphs
        self.device = device
        self._owner_thread = threading.get_ident()
        try:
            self._open(device, max_batch, check_compat)
        except BaseException:
            self.close()
            raise

    def _open(self, device: int, max_batch: int | None, check_compat: bool) -> None:
        trt = import_tensorrt()
        from runtime import cuda_buffers as cb

        self._cb = cb
        if not self.path.is_file():
            raise FileNotFoundError(2, "engine file not found", str(self.path))
        cb.require_device(device)
        self.meta, sidecar = read_sidecar(self.path)
        blob = self.path.read_bytes()
        self.gpu_name, self.compute_capability = cb.device_properties(device)
        if check_compat:
            for note in check_engine_compat(self.path, sidecar, trt_version=trt.__version__, gpu_name=self.gpu_name,
                                            compute_capability=self.compute_capability, engine_bytes=blob):
                warnings.warn(note, RuntimeWarning, stacklevel=2)
        self._rebuild = rebuild_command(self.path, sidecar)
        self._deserialize(trt, blob)
        del blob
        shapes, dtypes = self._io_tensors(trt)
        self._set_batch_range(shapes[self.input_name], max_batch)
        self.input_shape = (self.meta.channels, *self.meta.input_size)
        self.input_dtype = dtypes[self.input_name]
        self._dtypes = dtypes
        self._allocate(shapes, dtypes)

    def _deserialize(self, trt: Any, blob: bytes) -> None:
        """The engine from ``blob`` and its first execution context, on one user-managed device-memory block."""
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(blob)
        if self._engine is None:
            raise MetadataError(f"{self.path}: TensorRT {trt.__version__} could not deserialize this engine (built "
                                f"for another TensorRT version or GPU, or corrupt). Rebuild it: {self._rebuild}")
        self._trt = trt
        # One device-memory block for every context of this engine (the graph contexts too): user-managed.
        self._memory_size = max(int(self._engine.device_memory_size_v2), 1)
        self._context_memory = self._cb.DeviceBuffer(self._memory_size)
        self._context = self._new_context()
        self._closed = False

    def _io_tensors(self, trt: Any) -> tuple[dict[str, tuple[int, ...]], dict[str, np.dtype]]:
        """The engine's input and output names, shapes and dtypes, checked against the metadata."""
        inputs: list[str] = []
        outputs: list[str] = []
        shapes: dict[str, tuple[int, ...]] = {}
        dtypes: dict[str, np.dtype] = {}
        for i in range(self._engine.num_io_tensors):
            tname = self._engine.get_tensor_name(i)
            (inputs if self._engine.get_tensor_mode(tname) == trt.TensorIOMode.INPUT else outputs).append(tname)
            shapes[tname] = tuple(self._engine.get_tensor_shape(tname))
            dtypes[tname] = numpy_dtype(self._engine.get_tensor_dtype(tname), tname)
        src = str(self.path)
        if inputs != [self.meta.input_name]:
            raise MetadataError(f"{src}: metadata names input {self.meta.input_name!r} but the engine's inputs are "
                                f"{inputs}")
        for wanted in (self.meta.output_name, self.meta.score_output):
            if wanted and wanted not in outputs:
                raise MetadataError(f"{src}: metadata names output {wanted!r} but the engine's outputs are {outputs}")
        self.input_name = inputs[0]
        self.output_names = tuple(outputs)
        out_classes = shapes[self.meta.output_name][-1]
        self.meta.validate_against_model(src, [d if d >= 0 else "N" for d in shapes[self.input_name]],
                                         out_classes if out_classes > 0 else None)
        return shapes, dtypes

    def _set_batch_range(self, in_shape: tuple[int, ...], max_batch: int | None) -> None:
        """``min_batch``/``max_batch`` from the optimisation profile (dynamic batch) or the fixed batch."""
        if in_shape[0] < 0:
            pmin, _popt, pmax = self._engine.get_tensor_profile_shape(self.input_name, 0)
            self.min_batch, profile_max = int(pmin[0]), int(pmax[0])
        else:
            self.min_batch = profile_max = int(in_shape[0])
        self.max_batch = min(max_batch, profile_max) if max_batch else profile_max
        self.max_batch = max(self.max_batch, self.min_batch)

    def _allocate(self, shapes: dict[str, tuple[int, ...]], dtypes: dict[str, np.dtype]) -> None:
        """Buffers sized for the largest batch, bound once: addresses never change, which CUDA graphs rely on."""
        self._stream = self._cb.CudaStream()
        for tname in (self.input_name, *self.output_names):
            shape = resolve_shape(shapes[tname], self.max_batch, tname)
            self._host[tname] = self._cb.PinnedBuffer(shape, dtypes[tname])
            self._device[tname] = self._cb.DeviceBuffer(self._host[tname].nbytes)
        self._bind(self._context)
        self._staging = (np.empty((self.max_batch, *self.input_shape), np.float32)
                         if self.input_dtype != np.float32 else None)
        self._shapes = shapes
        self._current_batch = -1

    def _new_context(self) -> Any:
        strategy = self._trt.ExecutionContextAllocationStrategy.USER_MANAGED
        context = self._engine.create_execution_context(strategy)
        if context is None:
            raise BackendUnavailable(f"{self.path}: could not create a TensorRT execution context (out of GPU "
                                     "memory?)")
        context.set_device_memory(self._context_memory.ptr, self._memory_size)
        return context

    def _bind(self, context: Any) -> None:
        for tname in (self.input_name, *self.output_names):
            if not context.set_tensor_address(tname, self._device[tname].ptr):
                raise BackendUnavailable(f"{self.path}: TensorRT refused the buffer address for tensor {tname!r}")

    # ---------------------------------------------------------------------------------------------------- buffers
    def input_buffer(self, n: int) -> np.ndarray:
        """Where the caller should write a float32 ``(n, C, H, W)`` batch: the pinned input itself when it is
        float32 (no copy at all), else a staging array converted on ``infer``. ``n`` ≤ ``max_batch``."""
        if self._closed:
            raise RuntimeError(f"{self.path}: backend is closed")
        n = min(n, self.max_batch)
        if self._staging is not None:
            return self._staging[:n]
        return self._host[self.input_name].array[:n]

    # ---------------------------------------------------------------------------------------------------- running
    def _set_shape(self, context: Any, run_size: int) -> None:
        shape = (run_size, *self.input_shape)
        if not context.set_input_shape(self.input_name, shape):
            raise BackendUnavailable(f"{self.path}: TensorRT rejected input shape {shape} (profile batch range "
                                     f"{self.min_batch}..{self.max_batch})")

    def _set_batch(self, run_size: int) -> None:
        if run_size != self._current_batch:
            self._set_shape(self._context, run_size)
            self._current_batch = run_size

    def _enqueue(self, context: Any = None) -> None:
        if not (context or self._context).execute_async_v3(int(self._stream)):
            raise RuntimeError(f"{self.path}: TensorRT execute_async_v3 failed (see the TensorRT log above)")

    def _capture(self, run_size: int) -> Any:
        """A graph for ``run_size`` on a context of its own (its shape is set once, never changed)."""
        context = self._new_context()
        self._bind(context)
        self._set_shape(context, run_size)
        # TensorRT does its shape-dependent setup on the first enqueue after set_input_shape; run it once outside
        # the capture so the graph only records the kernels (the results are recomputed by the replay).
        self._enqueue(context)
        self._stream.synchronize()
        graph = self._cb.CudaGraph.capture(self._stream, lambda: self._enqueue(context))
        self._graph_contexts[run_size] = context
        return graph

    def _execute(self, run_size: int) -> None:
        graph = self._graphs.get(run_size) if self.cuda_graphs else None
        if graph is None and self.cuda_graphs:
            try:
                graph = self._graphs[run_size] = self._capture(run_size)
            except (self._cb.CudaError, RuntimeError) as e:
                # Some engines cannot be captured (e.g. data-dependent shapes); cuda_buffers has ended the capture
                # and cleared the CUDA error, so the stream runs them the ordinary way from here on.
                warnings.warn(f"{self.path}: CUDA graph capture failed ({e}); running without CUDA graphs",
                              RuntimeWarning, stacklevel=3)
                self.cuda_graphs = False
                graph = None
        if graph is not None:
            graph.launch(self._stream)
            return
        self._set_batch(run_size)
        self._enqueue()

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Raw outputs for a ``(N, C, H, W)`` batch; runs in profile-sized chunks when N exceeds the profile."""
        if self._closed:
            raise RuntimeError(f"{self.path}: backend is closed")
        if batch.ndim != 4 or tuple(batch.shape[1:]) != self.input_shape or len(batch) == 0:
            raise InputError(f"{self.path}: expected a (N, {', '.join(map(str, self.input_shape))}) batch with N ≥ 1, "
                             f"got {tuple(batch.shape)}")
        cb = self._cb
        if threading.get_ident() != self._owner_thread and self.device != 0:
            cb.set_device(self.device)  # the current device is per thread; device 0 is every thread's default
        host_in = self._host[self.input_name]
        in_place = (self._staging is None and batch.ndim == 4 and len(batch) <= self.max_batch
                    and batch.ctypes.data == host_in.ptr)
        results: dict[str, list[np.ndarray]] = {k: [] for k in self.output_names}
        for start, count, run_size in plan_batches(len(batch), self.min_batch, self.max_batch):
            if not in_place:
                np.copyto(host_in.array[:count], batch[start:start + count], casting="same_kind")
            if run_size > count:
                host_in.array[count:run_size] = 0
            in_bytes = host_in.array[:run_size].nbytes
            cb.copy_htod_async(self._device[self.input_name], host_in, in_bytes, self._stream)
            self._execute(run_size)
            for tname in self.output_names:
                host = self._host[tname]
                cb.copy_dtoh_async(host, self._device[tname], host.array[:run_size].nbytes, self._stream)
            self._stream.synchronize()
            for tname in self.output_names:
                results[tname].append(self._host[tname].array[:count].astype(np.float32, copy=True))
        return {k: v[0] if len(v) == 1 else np.concatenate(v) for k, v in results.items()}

    def timed_run(self, n: int) -> dict[str, float]:
        """Run the ``n`` rows already written to :meth:`input_buffer` once, timing each stage with CUDA events on
        this backend's stream: ``{"h2d", "inference", "d2h"}`` in ms (GPU time; the benchmark's floor). Outputs
        stay in the pinned host buffers; use :meth:`infer` for results."""
        if self._closed:
            raise RuntimeError(f"{self.path}: backend is closed")
        if not self.min_batch <= n <= self.max_batch:
            raise ValueError(f"{self.path}: batch {n} is outside the engine profile "
                             f"{self.min_batch}..{self.max_batch}")
        cb = self._cb
        if self._events is None:
            self._events = [cb.CudaEvent() for _ in range(4)]
        e0, e1, e2, e3 = self._events
        host_in = self._host[self.input_name]
        if self._staging is not None:  # engine input is not float32: convert on the host, as infer() does
            np.copyto(host_in.array[:n], self._staging[:n], casting="same_kind")
        e0.record(self._stream)
        cb.copy_htod_async(self._device[self.input_name], host_in, host_in.array[:n].nbytes, self._stream)
        e1.record(self._stream)
        self._execute(n)
        e2.record(self._stream)
        for tname in self.output_names:
            host = self._host[tname]
            cb.copy_dtoh_async(host, self._device[tname], host.array[:n].nbytes, self._stream)
        e3.record(self._stream)
        e3.synchronize()
        return {"h2d": e1.elapsed_ms_since(e0), "inference": e2.elapsed_ms_since(e1), "d2h": e3.elapsed_ms_since(e2)}

    def describe(self) -> str:
        trt = import_tensorrt()
        return (f"TensorRT {trt.__version__} on {self.gpu_name} (sm {self.compute_capability[0]}"
                f"{self.compute_capability[1]}), batch {self.min_batch}..{self.max_batch}"
                + (", CUDA graphs" if self.cuda_graphs else ""))

    def close(self) -> None:
        """Free graphs, buffers and the stream, then the context, engine and runtime (in that order)."""
        if self._closed:
            return
        self._closed = True
        if self._stream is not None:
            try:
                self._stream.synchronize()
            except Exception:  # noqa: BLE001 - tearing down after a CUDA error must still free what it can
                pass
        cb = getattr(self, "_cb", None)
        # Graphs first (they reference the buffers), then the contexts, then the memory they used; one failure must
        # not leak the rest, so every release is attempted and the failures are reported together.
        errors = cb.free_all(list(self._graphs.values()) + list(self._events or ())) if cb else []
        self._graphs.clear()
        self._events = None
        self._graph_contexts.clear()
        self._context = None
        memory = [self._context_memory] if self._context_memory is not None else []
        if cb:
            errors += cb.free_all([*self._host.values(), *self._device.values(), *memory]
                                  + ([self._stream] if self._stream is not None else []))
        self._context_memory = None
        self._host.clear()
        self._device.clear()
        self._stream = None
        self._engine = None
        self._runtime = None
        if errors:
            warnings.warn(f"{self.path}: freeing CUDA resources failed: " + "; ".join(errors), RuntimeWarning,
                          stacklevel=2)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass
