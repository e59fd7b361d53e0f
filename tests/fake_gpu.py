"""Fakes of cuda-python's runtime module and of TensorRT that behave like the real ones where our code can go wrong.

No GPU and no TensorRT reach this project's machines, so the real ``runtime.cuda_buffers``, ``export.tensorrt_build``
and ``runtime.trt_backend`` are run against these. What they model, each because a review found our code wrong there:

:class:`FakeCudart` (``cuda.bindings.runtime``)
  * every call returns a tuple ``(cudaError_t, *values)``; a handle argument that is not a handle or an int (e.g. the
    whole tuple) raises ``TypeError`` as the real bindings do;
  * device memory is its own address space: ``cudaMemcpyAsync`` checks the pointers against ``cudaMemcpyKind`` and
    fails ``cudaErrorInvalidValue`` on a reversed copy; freed or unknown device pointers fail;
  * work queues on streams and runs at ``cudaStreamSynchronize``/``cudaEventSynchronize``; events read a clock, so
    ``cudaEventElapsedTime(start, end)`` is negative when the arguments are swapped;
  * stream capture: work goes into a graph; ``cudaStreamEndCapture`` hands back a graph that the caller must destroy
    (``live_graphs`` counts them); an error raised inside a capture stays pending until ``cudaGetLastError``;
  * without a driver (``FakeCudart(error=...)``) every call returns that error, as cuda-python does.

:func:`fake_tensorrt` (``tensorrt`` 10.3 or 11.x)
  * ``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` has each version's value (1 in 10.3, 0 in 11.x) and the network
    records whether it is strongly typed; 11.x has no ``BuilderFlag.FP16/INT8``;
  * the builder is stateful: an optimisation profile is validated (and copied) when it is added, ``set_shape`` raises
    ``RuntimeError`` on an invalid range, ``add_optimization_profile`` returns -1 for an incomplete profile, a timing
    cache helps only if it is attached before the build, a cache from another device is refused
    (``set_timing_cache`` returns False) and ``get_timing_cache`` returns None when none is attached;
  * the serialized engine embeds the parsed ONNX file; the runtime refuses engines of another version and
    version-compatible engines unless ``engine_host_code_allowed``; contexts run the ONNX with ONNX Runtime on the
    fake GPU's memory and read their shape **when the work runs**, so a CUDA graph replayed after the context's
    shape changed computes with the new shape (NVIDIA/TensorRT#3798).
"""

from __future__ import annotations

import ctypes
import enum
import hashlib
import json
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


# ------------------------------------------------------------------------------------------------ cuda-python
class cudaError_t(enum.IntEnum):  # noqa: N801 - the real name
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorMemoryAllocation = 2
    cudaErrorInsufficientDriver = 35
    cudaErrorNoDevice = 100
    cudaErrorInvalidResourceHandle = 400
    cudaErrorNotReady = 600
    cudaErrorIllegalAddress = 700
    cudaErrorStreamCaptureUnsupported = 900
    cudaErrorStreamCaptureInvalidated = 901


MESSAGES = {
    cudaError_t.cudaErrorInsufficientDriver: b"CUDA driver version is insufficient for CUDA runtime version",
    cudaError_t.cudaErrorNoDevice: b"no CUDA-capable device is detected",
    cudaError_t.cudaErrorInvalidValue: b"invalid argument",
}


class cudaMemcpyKind(enum.IntEnum):  # noqa: N801
    cudaMemcpyHostToHost = 0
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2
    cudaMemcpyDeviceToDevice = 3
    cudaMemcpyDefault = 4


class cudaStreamCaptureMode(enum.IntEnum):  # noqa: N801
    cudaStreamCaptureModeGlobal = 0
    cudaStreamCaptureModeThreadLocal = 1
    cudaStreamCaptureModeRelaxed = 2


class _Handle:
    def __init__(self, value: int = 0) -> None:
        self.value = int(value)

    def __int__(self) -> int:
        return self.value

    def getPtr(self) -> int:  # noqa: N802 - cuda-python's name
        return self.value

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.value == self.value  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.value))

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.value:#x}>"


class cudaStream_t(_Handle):  # noqa: N801
    pass


class cudaEvent_t(_Handle):  # noqa: N801
    pass


class cudaGraph_t(_Handle):  # noqa: N801
    pass


class cudaGraphExec_t(_Handle):  # noqa: N801
    pass


def _value(x: Any, kind: type, what: str) -> int:
    """What the real bindings accept for a handle/pointer argument: the handle type or an int."""
    if isinstance(x, (kind, int, np.integer)) and not isinstance(x, bool):
        return int(x)
    raise TypeError(f"Argument '{what}' is not instance of type (expected <class 'int'>, or {kind.__name__}, "
                    f"found {type(x).__name__})")


@dataclass
class DeviceProp:
    name: bytes
    major: int
    minor: int
    multiProcessorCount: int  # noqa: N815
    totalGlobalMem: int  # noqa: N815


@dataclass
class _Stream:
    queue: list[Any] = field(default_factory=list)
    capture: list[Any] | None = None
    capture_invalid: bool = False


class FakeCudart:
    """``cuda.bindings.runtime`` on a pretend GPU (``error`` set: no usable GPU, every call fails with it)."""

    cudaError_t = cudaError_t
    cudaMemcpyKind = cudaMemcpyKind
    cudaStreamCaptureMode = cudaStreamCaptureMode
    cudaStream_t = cudaStream_t
    cudaEvent_t = cudaEvent_t
    cudaGraph_t = cudaGraph_t
    cudaGraphExec_t = cudaGraphExec_t

    __name__ = "cuda.bindings.runtime (fake)"
    DEVICE_BASE = 0x2000_0000_0000  # below where Linux maps host memory (PIE binaries at 0x55.., mmap at 0x7f..)
    DEVICE_SPAN = 1 << 40

    def __init__(self, error: cudaError_t | None = None, name: str = "Orin", cc: tuple[int, int] = (8, 7),
                 sms: int = 8, memory: int = 16 << 30, driver: int = 12060, runtime: int = 12060) -> None:
        self.error = error
        self.props = DeviceProp((name.encode() + b"\0" * 256)[:256], cc[0], cc[1], sms, memory)
        self.driver, self.runtime = driver, runtime
        self.host: dict[int, np.ndarray] = {}  # pinned allocations by address (real host memory)
        self.device: dict[int, np.ndarray] = {}  # fake device memory
        self.freed_host: list[int] = []
        self.freed_device: list[int] = []
        self.fail_free: set[int] = set()
        self.streams: dict[int, _Stream] = {0: _Stream()}
        self.events: dict[int, float | None] = {}
        self.graphs: dict[int, list[Any]] = {}
        self.execs: dict[int, list[Any]] = {}
        self.last_error = cudaError_t.cudaSuccess
        self.clock = 0.0
        self.calls: list[str] = []
        self._next = self.DEVICE_BASE

    # -- helpers for the fakes and tests
    def _new(self) -> int:
        self._next += 0x1000
        return self._next

    def _fail(self) -> tuple[cudaError_t] | None:
        return (self.error,) if self.error is not None else None

    @property
    def live_graphs(self) -> int:
        return len(self.graphs)

    def stream(self, handle: Any) -> _Stream:
        return self.streams[_value(handle, cudaStream_t, "stream")]

    def put(self, handle: Any, op: Any) -> None:
        """Queue ``op`` on a stream (into its capture while capturing)."""
        s = self.stream(handle)
        (s.capture if s.capture is not None else s.queue).append(op)

    def device_view(self, ptr: int, nbytes: int) -> np.ndarray:
        """The fake device bytes at ``ptr`` (inside an allocation); raises on unknown or freed memory."""
        for base, arr in self.device.items():
            if base <= ptr and ptr + nbytes <= base + arr.size:
                return arr[ptr - base:ptr - base + nbytes]
        raise RuntimeError(f"illegal device address {ptr:#x} (+{nbytes})")

    def _is_device(self, ptr: int) -> bool:
        return self.DEVICE_BASE <= ptr < self.DEVICE_BASE + self.DEVICE_SPAN

    # -- the cuda-python API (every call returns a tuple)
    def cudaGetErrorString(self, err: cudaError_t) -> tuple[cudaError_t, bytes]:  # noqa: N802
        return cudaError_t.cudaSuccess, MESSAGES.get(err, b"unknown error")

    def cudaGetErrorName(self, err: cudaError_t) -> tuple[cudaError_t, bytes]:  # noqa: N802
        return cudaError_t.cudaSuccess, err.name.encode()

    def cudaGetLastError(self) -> tuple[cudaError_t]:  # noqa: N802
        err, self.last_error = self.last_error, cudaError_t.cudaSuccess
        return (err,)

    def cudaDriverGetVersion(self) -> tuple[cudaError_t, int]:  # noqa: N802
        return cudaError_t.cudaSuccess, self.driver  # 0 without a driver, as in CUDA

    def cudaRuntimeGetVersion(self) -> tuple[cudaError_t, int]:  # noqa: N802
        return cudaError_t.cudaSuccess, self.runtime

    def cudaGetDeviceCount(self) -> tuple[cudaError_t, int]:  # noqa: N802
        return (self.error, None) if self.error is not None else (cudaError_t.cudaSuccess, 1)

    def cudaSetDevice(self, device: int) -> tuple[cudaError_t]:  # noqa: N802
        if self._fail():
            return self._fail()  # type: ignore[return-value]
        return (cudaError_t.cudaSuccess if device == 0 else cudaError_t.cudaErrorInvalidValue,)

    def cudaGetDeviceProperties(self, device: int) -> tuple[cudaError_t, DeviceProp | None]:  # noqa: N802
        if self.error is not None:
            return self.error, None
        if device != 0:
            return cudaError_t.cudaErrorInvalidValue, None
        return cudaError_t.cudaSuccess, self.props

    def cudaMallocHost(self, nbytes: int) -> tuple[cudaError_t, int | None]:  # noqa: N802
        if self.error is not None:
            return self.error, None
        arr = np.zeros(int(nbytes), np.uint8)
        self.host[arr.ctypes.data] = arr
        return cudaError_t.cudaSuccess, arr.ctypes.data

    def cudaFreeHost(self, ptr: int) -> tuple[cudaError_t]:  # noqa: N802
        ptr = _value(ptr, int, "ptr")
        if ptr in self.fail_free or ptr not in self.host:
            return (cudaError_t.cudaErrorInvalidValue,)
        self.freed_host.append(ptr)
        self.host[ptr][:] = 0xEE  # what a later read through a dangling view would see
        del self.host[ptr]
        return (cudaError_t.cudaSuccess,)

    def cudaMalloc(self, nbytes: int) -> tuple[cudaError_t, int | None]:  # noqa: N802
        if self.error is not None:
            return self.error, None
        ptr = self._new()
        self._next += int(nbytes)
        self.device[ptr] = np.zeros(int(nbytes), np.uint8)
        return cudaError_t.cudaSuccess, ptr

    def cudaFree(self, ptr: int) -> tuple[cudaError_t]:  # noqa: N802
        ptr = _value(ptr, int, "devPtr")
        if ptr in self.fail_free or ptr not in self.device:
            return (cudaError_t.cudaErrorInvalidValue,)
        self.freed_device.append(ptr)
        del self.device[ptr]
        return (cudaError_t.cudaSuccess,)

    def cudaStreamCreate(self) -> tuple[cudaError_t, cudaStream_t | None]:  # noqa: N802
        if self.error is not None:
            return self.error, None
        h = self._new()
        self.streams[h] = _Stream()
        return cudaError_t.cudaSuccess, cudaStream_t(h)

    def cudaStreamDestroy(self, stream: Any) -> tuple[cudaError_t]:  # noqa: N802
        h = _value(stream, cudaStream_t, "stream")
        ok = self.streams.pop(h, None) is not None
        return (cudaError_t.cudaSuccess if ok else cudaError_t.cudaErrorInvalidResourceHandle,)

    def _run(self, s: _Stream) -> cudaError_t:
        while s.queue:
            op = s.queue.pop(0)
            try:
                op()
            except RuntimeError:
                self.last_error = cudaError_t.cudaErrorIllegalAddress
                return cudaError_t.cudaErrorIllegalAddress
        return cudaError_t.cudaSuccess

    def cudaStreamSynchronize(self, stream: Any) -> tuple[cudaError_t]:  # noqa: N802
        if self._fail():
            return self._fail()  # type: ignore[return-value]
        s = self.stream(stream)
        if s.capture is not None:  # illegal while capturing: invalidates the capture
            s.capture_invalid = True
            self.last_error = cudaError_t.cudaErrorStreamCaptureUnsupported
            return (cudaError_t.cudaErrorStreamCaptureUnsupported,)
        return (self._run(s),)

    def cudaMemcpyAsync(self, dst: Any, src: Any, count: int, kind: cudaMemcpyKind,  # noqa: N802
                        stream: Any) -> tuple[cudaError_t]:
        if self._fail():
            return self._fail()  # type: ignore[return-value]
        dst, src, count = _value(dst, int, "dst"), _value(src, int, "src"), int(count)
        want = {cudaMemcpyKind.cudaMemcpyHostToDevice: (True, False),
                cudaMemcpyKind.cudaMemcpyDeviceToHost: (False, True)}.get(cudaMemcpyKind(kind))
        if want is None or (self._is_device(dst), self._is_device(src)) != want:
            return (cudaError_t.cudaErrorInvalidValue,)
        try:
            if want[0]:
                self.device_view(dst, count)
            else:
                self.device_view(src, count)
        except RuntimeError:
            return (cudaError_t.cudaErrorInvalidValue,)

        def op() -> None:
            if want[0]:
                self.device_view(dst, count)[:] = np.frombuffer((ctypes.c_ubyte * count).from_address(src), np.uint8)
            else:
                ctypes.memmove(dst, self.device_view(src, count).ctypes.data, count)
            self.clock += 0.001 + count * 1e-7

        self.put(stream, op)
        return (cudaError_t.cudaSuccess,)

    def cudaEventCreate(self) -> tuple[cudaError_t, cudaEvent_t | None]:  # noqa: N802
        if self.error is not None:
            return self.error, None
        h = self._new()
        self.events[h] = None
        return cudaError_t.cudaSuccess, cudaEvent_t(h)

    def cudaEventDestroy(self, event: Any) -> tuple[cudaError_t]:  # noqa: N802
        h = _value(event, cudaEvent_t, "event")
        ok = self.events.pop(h, 0) != 0
        return (cudaError_t.cudaSuccess if ok else cudaError_t.cudaErrorInvalidResourceHandle,)

    def cudaEventRecord(self, event: Any, stream: Any) -> tuple[cudaError_t]:  # noqa: N802
        h = _value(event, cudaEvent_t, "event")
        self.events[h] = None
        self.put(stream, lambda: self.events.__setitem__(h, self.clock))
        self._event_stream = getattr(self, "_event_stream", {})
        self._event_stream[h] = _value(stream, cudaStream_t, "stream")
        return (cudaError_t.cudaSuccess,)

    def cudaEventSynchronize(self, event: Any) -> tuple[cudaError_t]:  # noqa: N802
        h = _value(event, cudaEvent_t, "event")
        return (self._run(self.streams[self._event_stream[h]]),)

    def cudaEventElapsedTime(self, start: Any, end: Any) -> tuple[cudaError_t, float]:  # noqa: N802
        t0, t1 = self.events.get(_value(start, cudaEvent_t, "start")), self.events.get(_value(end, cudaEvent_t, "end"))
        if t0 is None or t1 is None:
            return cudaError_t.cudaErrorNotReady, 0.0
        return cudaError_t.cudaSuccess, float(t1 - t0)

    def cudaStreamBeginCapture(self, stream: Any, mode: cudaStreamCaptureMode) -> tuple[cudaError_t]:  # noqa: N802
        s = self.stream(stream)
        cudaStreamCaptureMode(mode)
        s.capture, s.capture_invalid = [], False
        return (cudaError_t.cudaSuccess,)

    def cudaStreamEndCapture(self, stream: Any) -> tuple[cudaError_t, cudaGraph_t]:  # noqa: N802
        s = self.stream(stream)
        ops, invalid, s.capture, s.capture_invalid = s.capture, s.capture_invalid, None, False
        if ops is None:
            return cudaError_t.cudaErrorInvalidValue, cudaGraph_t(0)
        if invalid:
            self.last_error = cudaError_t.cudaErrorStreamCaptureInvalidated
            return cudaError_t.cudaErrorStreamCaptureInvalidated, cudaGraph_t(0)
        h = self._new()
        self.graphs[h] = ops
        return cudaError_t.cudaSuccess, cudaGraph_t(h)

    def cudaGraphInstantiate(self, graph: Any, flags: int = 0) -> tuple[cudaError_t, cudaGraphExec_t | None]:  # noqa: N802
        g = _value(graph, cudaGraph_t, "graph")
        if g not in self.graphs:
            return cudaError_t.cudaErrorInvalidValue, None
        h = self._new()
        self.execs[h] = list(self.graphs[g])
        return cudaError_t.cudaSuccess, cudaGraphExec_t(h)

    def cudaGraphLaunch(self, exec_handle: Any, stream: Any) -> tuple[cudaError_t]:  # noqa: N802
        if self._fail():
            return self._fail()  # type: ignore[return-value]
        ops = self.execs.get(_value(exec_handle, cudaGraphExec_t, "graphExec"))
        if ops is None:
            return (cudaError_t.cudaErrorInvalidResourceHandle,)
        for op in ops:
            self.put(stream, op)
        return (cudaError_t.cudaSuccess,)

    def cudaGraphExecDestroy(self, exec_handle: Any) -> tuple[cudaError_t]:  # noqa: N802
        ok = self.execs.pop(_value(exec_handle, cudaGraphExec_t, "graphExec"), None) is not None
        return (cudaError_t.cudaSuccess if ok else cudaError_t.cudaErrorInvalidResourceHandle,)

    def cudaGraphDestroy(self, graph: Any) -> tuple[cudaError_t]:  # noqa: N802
        ok = self.graphs.pop(_value(graph, cudaGraph_t, "graph"), None) is not None
        return (cudaError_t.cudaSuccess if ok else cudaError_t.cudaErrorInvalidResourceHandle,)


def install_cudart(monkeypatch: Any, fake: FakeCudart) -> FakeCudart:
    """Make ``runtime.cuda_buffers`` use ``fake`` (it caches the module it imported)."""
    from runtime import cuda_buffers

    monkeypatch.setattr(cuda_buffers, "_cudart", fake)
    return fake


# ------------------------------------------------------------------------------------------------ TensorRT
MAGIC = b"FAKETRT1"


class _HostMemory:
    """IHostMemory: supports ``bytes()`` / the buffer protocol."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.nbytes = len(data)

    def __bytes__(self) -> bytes:
        return self._data

    def __buffer__(self, flags: int) -> memoryview:
        return memoryview(self._data)


class _TimingCache:
    def __init__(self, device: str, entries: set[str]) -> None:
        self.device, self.entries = device, set(entries)

    def serialize(self) -> _HostMemory:
        return _HostMemory(b"TC1" + json.dumps({"device": self.device, "entries": sorted(self.entries)}).encode())

    def combine(self, other: _TimingCache, ignore_mismatch: bool) -> bool:
        self.entries |= other.entries
        return True


class _Input:
    def __init__(self, name: str, shape: tuple[int, ...], dtype: Any) -> None:
        self.name, self.shape, self.dtype = name, shape, dtype


class _Network:
    def __init__(self, flags: int, strongly_typed: bool) -> None:
        self.flags, self.strongly_typed = flags, strongly_typed
        self.inputs: list[_Input] = []
        self.onnx_path: str | None = None
        self.onnx_bytes = b""
        self.layers: list[str] = []

    @property
    def num_inputs(self) -> int:
        return len(self.inputs)

    def get_input(self, i: int) -> _Input:
        return self.inputs[i]


class _Profile:
    def __init__(self) -> None:
        self.shapes: dict[str, tuple[tuple[int, ...], ...]] = {}

    def set_shape(self, name: str, min: Any, opt: Any, max: Any) -> None:  # noqa: A002 - the real keyword names
        lo, mid, hi = (tuple(int(d) for d in s) for s in (min, opt, max))
        if not (len(lo) == len(mid) == len(hi)) or any(a > b or b > c or a < 0 for a, b, c in zip(lo, mid, hi)):
            # pybind's opt_profile_set_shape throws when IOptimizationProfile::setDimensions returns false
            raise RuntimeError(f"Shape provided for {name} is invalid: min {lo}, opt {mid}, max {hi}")
        self.shapes[name] = (lo, mid, hi)


class _Config:
    def __init__(self, builder: _Builder) -> None:
        self.builder = builder
        self.pool: dict[Any, int] = {}
        self.profiles: list[dict[str, tuple[tuple[int, ...], ...]]] = []
        self.cache: _TimingCache | None = None
        self.flags: set[Any] = set()
        self.hardware_compatibility_level = None

    def set_memory_pool_limit(self, pool: Any, size: int) -> None:
        self.pool[pool] = int(size)

    def set_flag(self, flag: Any) -> None:
        self.flags.add(flag)

    def get_flag(self, flag: Any) -> bool:
        return flag in self.flags

    def add_optimization_profile(self, profile: _Profile) -> int:
        net = self.builder.last_network
        for inp in net.inputs if net is not None else []:
            got = profile.shapes.get(inp.name)
            if got is None or len(got[0]) != len(inp.shape) or any(
                    d >= 0 and (lo != d or hi != d) for d, lo, hi in zip(inp.shape, got[0], got[2])):
                return -1
        self.profiles.append(dict(profile.shapes))  # copied: later set_shape calls do not reach the config
        return len(self.profiles) - 1

    def create_timing_cache(self, serialized: Any) -> _TimingCache | None:
        data = bytes(serialized)
        if not data:
            return _TimingCache(self.builder.module.FAKE_DEVICE, set())
        if not data.startswith(b"TC1"):
            return None  # corrupt cache file
        d = json.loads(data[3:])
        return _TimingCache(d["device"], set(d["entries"]))

    def set_timing_cache(self, cache: _TimingCache, ignore_mismatch: bool) -> bool:
        if not isinstance(cache, _TimingCache):
            raise TypeError("set_timing_cache(): incompatible function arguments")
        if cache.device != self.builder.module.FAKE_DEVICE and not ignore_mismatch:
            return False  # refused: nothing is attached
        self.cache = cache
        return True

    def get_timing_cache(self) -> _TimingCache | None:
        return self.cache


class _Builder:
    def __init__(self, module: Any, logger: Any) -> None:
        self.module = module
        self.last_network: _Network | None = None
        self.timed_layers: list[int] = []  # per build: layers that had to be timed (not in the cache)

    def create_network(self, flags: int = 0) -> _Network:
        bit = 1 << int(self.module.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        strongly = bool(flags & bit) or self.module.MAJOR >= 11  # 11.x: always strongly typed
        self.last_network = _Network(int(flags), strongly)
        return self.last_network

    def create_builder_config(self) -> _Config:
        return _Config(self)

    def create_optimization_profile(self) -> _Profile:
        return _Profile()

    def build_serialized_network(self, network: _Network, config: _Config) -> _HostMemory | None:
        m = self.module
        m.build_log.append("build")
        if network.onnx_path is None:
            return None
        dynamic = any(d < 0 for inp in network.inputs for d in inp.shape)
        if dynamic and not config.profiles:
            return None  # "Network has dynamic or shape inputs, but no optimization profile has been defined."
        timed = [layer for layer in network.layers if config.cache is None or layer not in config.cache.entries]
        if config.cache is not None:
            config.cache.entries |= set(network.layers)
        self.timed_layers.append(len(timed))
        header = {"version": m.__version__, "device": m.FAKE_DEVICE, "strongly_typed": network.strongly_typed,
                  "onnx_path": network.onnx_path, "onnx_sha256": hashlib.sha256(network.onnx_bytes).hexdigest(),
                  "profile": {k: [list(s) for s in v] for k, v in config.profiles[0].items()} if config.profiles
                  else {}, "version_compatible": m.BuilderFlag.VERSION_COMPATIBLE in config.flags}
        head = json.dumps(header).encode()
        return _HostMemory(MAGIC + len(head).to_bytes(4, "little") + head + network.onnx_bytes)


class _Parser:
    def __init__(self, network: _Network, logger: Any) -> None:
        self.network = network
        self.errors: list[str] = []

    @property
    def num_errors(self) -> int:
        return len(self.errors)

    def get_error(self, i: int) -> str:
        return self.errors[i]

    def parse_from_file(self, path: str) -> bool:
        import onnx

        try:
            model = onnx.load(path)
        except Exception as e:  # noqa: BLE001 - the real parser reports, not raises
            self.errors.append(f"cannot read {path}: {e}")
            return False
        self.network.onnx_path = str(path)
        self.network.onnx_bytes = Path(path).read_bytes()
        inits = {i.name for i in model.graph.initializer}
        for vi in model.graph.input:
            if vi.name in inits:
                continue
            dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in vi.type.tensor_type.shape.dim)
            self.network.inputs.append(_Input(vi.name, dims, vi.type.tensor_type.elem_type))
        self.network.layers = [f"{n.op_type}:{n.name or i}" for i, n in enumerate(model.graph.node)]
        return True


def unpack_engine(blob: bytes) -> tuple[dict[str, Any], bytes] | None:
    blob = bytes(blob)
    if not blob.startswith(MAGIC):
        return None
    n = int.from_bytes(blob[8:12], "little")
    return json.loads(blob[12:12 + n]), blob[12 + n:]


class _Engine:
    def __init__(self, module: Any, header: dict[str, Any], onnx_bytes: bytes) -> None:
        import onnx
        import onnxruntime as ort

        self.module, self.header = module, header
        self.session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
        model = onnx.load_from_string(onnx_bytes)
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.shapes = {}
        for vi in list(model.graph.input) + list(model.graph.output):
            self.shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else -1
                                         for d in vi.type.tensor_type.shape.dim)
        self.contexts: list[_Context] = []
        self.device_memory_size_v2 = 1 << 16

    @property
    def num_io_tensors(self) -> int:
        return len(self.inputs) + len(self.outputs)

    def get_tensor_name(self, i: int) -> str:
        return (self.inputs + self.outputs)[i]

    def get_tensor_mode(self, name: str) -> Any:
        return self.module.TensorIOMode.INPUT if name in self.inputs else self.module.TensorIOMode.OUTPUT

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return self.shapes[name]

    def get_tensor_dtype(self, name: str) -> Any:
        return self.module.DataType.FLOAT

    def get_tensor_profile_shape(self, name: str, profile: int) -> list[tuple[int, ...]]:
        return [tuple(s) for s in self.header["profile"][name]]

    def create_execution_context(self, strategy: Any = None) -> _Context:
        static = self.module.ExecutionContextAllocationStrategy.STATIC
        ctx = _Context(self, strategy if strategy is not None else static)
        self.contexts.append(ctx)
        return ctx


class _Context:
    def __init__(self, engine: _Engine, strategy: Any) -> None:
        self.engine, self.strategy = engine, strategy
        self.addr: dict[str, int] = {}
        self.shape: tuple[int, ...] | None = None
        self.device_memory: tuple[int, int] | None = None
        self.runs: list[int] = engine.module.runs

    def set_input_shape(self, name: str, shape: Any) -> bool:
        shape = tuple(int(d) for d in shape)
        lo, _, hi = self.engine.header["profile"].get(name, [None, None, None])
        if lo is None or len(shape) != len(lo) or any(not a <= d <= b for a, d, b in zip(lo, shape, hi)):
            return False
        self.shape = shape
        return True

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        if name not in self.engine.inputs + self.engine.outputs:
            return False
        self.addr[name] = int(ptr)
        return True

    def set_device_memory(self, memory: int, size: int) -> None:
        if int(size) < self.engine.device_memory_size_v2:
            raise RuntimeError("device memory too small")
        self.device_memory = (int(memory), int(size))

    def execute_async_v3(self, stream_handle: int) -> bool:
        m = self.engine.module
        cu: FakeCudart = m.cudart
        if not isinstance(stream_handle, int):
            raise TypeError("execute_async_v3(): incompatible function arguments (stream_handle: int)")
        if cu.last_error != cudaError_t.cudaSuccess:
            return False  # TensorRT checks for a pending CUDA error after launching its kernels
        if self.strategy == m.ExecutionContextAllocationStrategy.USER_MANAGED and self.device_memory is None:
            return False  # "no device memory set for a user-managed context"
        if self.shape is None or any(n not in self.addr for n in self.engine.inputs + self.engine.outputs):
            return False
        s = cu.stream(stream_handle)
        if s.capture is not None and m.fail_capture:
            cu.last_error = cudaError_t.cudaErrorStreamCaptureUnsupported
            return False

        # The shape-dependent setup happens here, on the host, into the context's state; the kernels read that
        # state when they run. A graph replay skips this call and runs with the last *enqueued* shape (#3798).
        self.prepared = self.shape

        def op() -> None:  # runs on synchronize, or on each replay of a captured graph
            if self.device_memory is not None:
                cu.device_view(*self.device_memory)
            shape = self.prepared
            n = int(np.prod(shape))
            x = cu.device_view(self.addr[self.engine.inputs[0]], n * 4).view(np.float32).reshape(shape)
            outs = self.engine.session.run(None, {self.engine.inputs[0]: x.copy()})
            for name, y in zip(self.engine.outputs, outs):
                y = np.ascontiguousarray(y, np.float32)
                cu.device_view(self.addr[name], y.nbytes)[:] = y.view(np.uint8).ravel()
            self.runs.append(shape[0])
            cu.clock += 0.5

        cu.put(stream_handle, op)
        return True


class _Runtime:
    def __init__(self, module: Any, logger: Any) -> None:
        self.module = module
        self.engine_host_code_allowed = False

    def deserialize_cuda_engine(self, blob: Any) -> _Engine | None:
        got = unpack_engine(bytes(blob))
        if got is None:
            return None
        header, onnx_bytes = got
        built, running = header["version"].split("."), self.module.__version__.split(".")
        if header["version_compatible"]:
            if built[0] != running[0] or not self.engine_host_code_allowed:
                return None
        elif built[:3] != running[:3] or header["device"] != self.module.FAKE_DEVICE:
            return None
        return _Engine(self.module, header, onnx_bytes)


def fake_tensorrt(version: str = "10.3.0.30", cudart: FakeCudart | None = None,
                  device: str = "Orin-8sm") -> types.ModuleType:
    """A ``tensorrt`` module of ``version`` (10.x or 11.x) whose engines run on ``cudart``'s pretend GPU."""
    major = int(version.split(".")[0])
    m = types.ModuleType("tensorrt")
    m.__version__, m.MAJOR, m.FAKE_DEVICE, m.cudart = version, major, device, cudart
    m.build_log, m.runs, m.fail_capture = [], [], False
    if major == 10:
        ncf = enum.IntEnum("NetworkDefinitionCreationFlag", {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1})
        bf = enum.Enum("BuilderFlag", "FP16 BF16 INT8 REFIT VERSION_COMPATIBLE EXCLUDE_LEAN_RUNTIME")
    else:
        ncf = enum.IntEnum("NetworkDefinitionCreationFlag", {"STRONGLY_TYPED": 0, "PREFER_JIT_PYTHON_PLUGINS": 1})
        bf = enum.Enum("BuilderFlag", "REFIT VERSION_COMPATIBLE EXCLUDE_LEAN_RUNTIME")
    m.NetworkDefinitionCreationFlag = ncf
    m.BuilderFlag = bf
    m.MemoryPoolType = enum.Enum("MemoryPoolType", "WORKSPACE DLA_MANAGED_SRAM")
    m.TensorIOMode = enum.Enum("TensorIOMode", "NONE INPUT OUTPUT")
    m.DataType = enum.Enum("DataType", "FLOAT HALF INT8 INT32 BOOL UINT8 BF16 INT64")
    m.ExecutionContextAllocationStrategy = enum.Enum("ExecutionContextAllocationStrategy",
                                                     "STATIC ON_PROFILE_CHANGE USER_MANAGED")

    class Logger:
        VERBOSE, INFO, WARNING, ERROR, INTERNAL_ERROR = 4, 3, 2, 1, 0

        def __init__(self, min_severity: int = 2) -> None:
            self.min_severity = min_severity

    m.Logger = Logger
    m.Builder = lambda logger: _Builder(m, logger)
    m.OnnxParser = _Parser
    m.Runtime = lambda logger: _Runtime(m, logger)
    return m


def tiny_onnx(path: Path, size: int = 32, classes: int = 8, opset: int = 17) -> Path:
    """A GAP → Gemm model ``images (N, 3, size, size) → logits (N, classes)`` with metadata, without torch."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from runtime.contract import METADATA_KEY, ModelMetadata

    rng = np.random.default_rng(0)
    w = rng.standard_normal((classes, 3)).astype(np.float32)
    nodes = [helper.make_node("GlobalAveragePool", ["images"], ["pooled"]),
             helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
             helper.make_node("Gemm", ["flat", "W", "B"], ["logits"], transB=1)]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
        initializer=[numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.zeros(classes, np.float32), "B")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    helper.set_model_props(model, {METADATA_KEY: ModelMetadata(input_size=(size, size), arch="tiny").to_json()})
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return Path(path)
