"""TrtBackend end to end without TensorRT or a GPU: fake ``tensorrt`` and ``runtime.cuda_buffers`` modules.

Fake device memory is numpy arrays keyed by pointer; copies, engine runs and event records queue on the stream and run
only on synchronize, as on a GPU. The fake engine computes ``x.reshape(N, -1) @ WEIGHTS`` from the bytes copied to its
bound input address, for the shape the context had when ``execute_async_v3`` was last called — so a CUDA graph replayed
after ``set_input_shape`` moved the context to another size computes with the stale size, as on a GPU
(NVIDIA/TensorRT#3798). User-managed contexts need their device memory set; a release can be made to fail. This checks
TrtBackend's own logic (tensor discovery, profile batch range, binding, chunking, padding, fp16 staging, output
copies, timing, CUDA graphs, freeing), not TensorRT or CUDA: that is the ``gpu`` test in test_trt_backend.py.
"""

from __future__ import annotations

import enum
import hashlib
import json
import sys
import types
from collections import Counter
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

import runtime
from runtime.contract import write_sidecar
from runtime.errors import InputError, MetadataError
from runtime.trt_backend import TrtBackend

H = W = 8
WEIGHTS = np.random.default_rng(0).standard_normal((3 * H * W, 8)).astype(np.float32)
NUMPY = {"FLOAT": np.dtype(np.float32), "HALF": np.dtype(np.float16)}
SIDECAR = {"tensorrt_version": "10.3.0.30", "gpu_name": "Orin", "compute_capability": "8.7", "precision": "fp16"}


def reference(x: np.ndarray) -> np.ndarray:
    return x.reshape(len(x), -1).astype(np.float64) @ WEIGHTS


def images(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 3, H, W), dtype=np.float32)


# ------------------------------------------------------------------------------------------------ fake CUDA
class Gpu:
    """State shared by the fakes: memory by pointer, streams by handle, release calls, engine runs, a clock."""

    def __init__(self) -> None:
        self.mem: dict[int, np.ndarray] = {}
        self.streams: dict[int, Stream] = {}
        self.objects: list[Tracked] = []
        self.released: Counter[int] = Counter()
        self.runs: list[int] = []
        self.clock = 0.0
        self.fail_free: set[int] = set()

    def released_once(self, kind: type) -> int:
        """How many objects of ``kind`` exist; fails unless each was freed/destroyed exactly once."""
        objs = [o for o in self.objects if isinstance(o, kind)]
        assert [self.released[id(o)] for o in objs] == [1] * len(objs)
        return len(objs)


class Tracked:
    gpu: Gpu  # set per test by the ``gpu`` fixture

    def __init__(self) -> None:
        self.gpu.objects.append(self)

    def free(self) -> None:
        self.gpu.released[id(self)] += 1
        if id(self) in self.gpu.fail_free:
            raise RuntimeError("cudaErrorIllegalAddress: an illegal memory access was encountered")

    destroy = free


class DeviceBuffer(Tracked):
    def __init__(self, nbytes: int) -> None:
        super().__init__()
        self.nbytes = int(nbytes)
        raw = np.zeros(max(self.nbytes, 1), np.uint8)
        self.ptr = raw.ctypes.data
        self.gpu.mem[self.ptr] = raw


class PinnedBuffer(DeviceBuffer):
    def __init__(self, shape: tuple[int, ...], dtype: Any = np.float32) -> None:
        super().__init__(int(np.prod(shape)) * np.dtype(dtype).itemsize)
        self.array = self.gpu.mem[self.ptr][:self.nbytes].view(dtype).reshape(shape)


class Stream(Tracked):
    def __init__(self) -> None:
        super().__init__()
        self.queue: list[Any] = []
        self.capture: list[Any] | None = None
        self.gpu.streams[id(self)] = self

    def __int__(self) -> int:
        return id(self)

    def put(self, op: Any) -> None:
        (self.capture if self.capture is not None else self.queue).append(op)

    def synchronize(self) -> None:
        while self.queue:
            self.queue.pop(0)()


def copy_async(dst: DeviceBuffer, src: DeviceBuffer, nbytes: int, stream: Stream) -> None:
    gpu, d, s = Tracked.gpu, Tracked.gpu.mem[dst.ptr], Tracked.gpu.mem[src.ptr]
    assert 0 < nbytes <= min(dst.nbytes, src.nbytes), f"copy of {nbytes} bytes overflows a buffer"

    def op() -> None:
        d[:nbytes] = s[:nbytes]
        gpu.clock += nbytes * 1e-6

    stream.put(op)


class Event(Tracked):
    t: float | None = None

    def record(self, stream: Stream) -> None:
        self.t, self.stream = None, stream
        stream.put(lambda: setattr(self, "t", self.gpu.clock))

    def synchronize(self) -> None:
        self.stream.synchronize()

    def elapsed_ms_since(self, start: Event) -> float:
        if self.t is None or start.t is None:
            raise RuntimeError("cudaErrorNotReady: event not completed")
        return self.t - start.t


class Graph(Tracked):
    fail = False  # set by a test: the engine cannot be captured

    @classmethod
    def capture(cls, stream: Stream, enqueue: Any) -> Graph:
        if cls.fail:
            raise RuntimeError("cudaErrorStreamCaptureUnsupported: operation not permitted when stream is capturing")
        graph, stream.capture = cls(), []
        try:
            enqueue()
        finally:
            graph.ops, stream.capture = stream.capture, None
        return graph

    def launch(self, stream: Stream) -> None:
        for op in self.ops:
            stream.put(op)


def free_all(objects: Any) -> list[str]:  # as runtime.cuda_buffers.free_all
    errors = []
    for obj in objects:
        try:
            (getattr(obj, "free", None) or obj.destroy)()
        except RuntimeError as e:
            errors.append(str(e))
    return errors


# ------------------------------------------------------------------------------------------------ fake TensorRT
DataType = enum.Enum("DataType", "FLOAT HALF")
TensorIOMode = enum.Enum("TensorIOMode", "INPUT OUTPUT")
ExecutionContextAllocationStrategy = enum.Enum("ExecutionContextAllocationStrategy",
                                               "STATIC ON_PROFILE_CHANGE USER_MANAGED")


def fake_engine(spec: dict[str, Any]) -> SimpleNamespace:
    """The engine the JSON ``spec`` describes: input (-1, 3, H, W), outputs (-1, 8), one optimization profile."""
    names = ["images", *spec["outputs"]]
    engine = SimpleNamespace(
        spec=spec, names=names, num_io_tensors=len(names), get_tensor_name=names.__getitem__,
        get_tensor_mode=lambda n: TensorIOMode.INPUT if n == "images" else TensorIOMode.OUTPUT,
        get_tensor_shape=lambda n: (-1, 3, H, W) if n == "images" else (-1, 8),
        get_tensor_dtype=lambda n: DataType[spec["dtype"] if n == "images" else spec["out_dtype"]],
        get_tensor_profile_shape=lambda n, p: [(b, 3, H, W) for b in (spec["min"], 3, spec["max"])]
        if (n, p) == ("images", 0) else None, device_memory_size_v2=4096, contexts=[])

    def create_execution_context(strategy: Any = ExecutionContextAllocationStrategy.STATIC) -> Context:
        engine.contexts.append(Context(engine, strategy))
        return engine.contexts[-1]

    engine.create_execution_context = create_execution_context
    return engine


class Context:
    def __init__(self, engine: SimpleNamespace, strategy: Any) -> None:
        self.engine, self.addr, self.shape, self.strategy, self.memory = engine, {}, None, strategy, None

    def set_device_memory(self, ptr: int, size: int) -> None:
        assert self.strategy == ExecutionContextAllocationStrategy.USER_MANAGED and size >= 4096
        self.memory = ptr

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        spec = self.engine.spec
        ok = name == "images" and spec["min"] <= shape[0] <= spec["max"] and tuple(shape[1:]) == (3, H, W)
        self.shape = tuple(shape) if ok else self.shape
        return ok

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        self.addr[name] = ptr
        return name in self.engine.names

    def execute_async_v3(self, stream: int) -> bool:
        gpu, spec = Tracked.gpu, self.engine.spec
        if self.strategy == ExecutionContextAllocationStrategy.USER_MANAGED and self.memory not in gpu.mem:
            return False  # a user-managed context needs its device memory set (and still allocated)
        src, din, dout = gpu.mem[self.addr["images"]], NUMPY[spec["dtype"]], NUMPY[spec["out_dtype"]]
        outs = [gpu.mem[self.addr[name]] for name in spec["outputs"]]
        # TensorRT does its shape-dependent setup here, on the host, into the context's own (device) state; the
        # queued kernels read that state when they run. A CUDA graph replay skips this call, so it runs with whatever
        # shape the context was last *enqueued* with (NVIDIA/TensorRT#3798).
        self.prepared = self.shape

        def op() -> None:  # runs on synchronize, or on each replay of a captured graph
            shape = self.prepared
            x = src[:int(np.prod(shape)) * din.itemsize].view(din).reshape(shape)
            y = reference(x).astype(dout).view(np.uint8).ravel()
            for out in outs:
                out[:y.size] = y
            gpu.runs.append(shape[0])
            gpu.clock += 0.5

        gpu.streams[stream].put(op)
        return True


class Runtime:
    def __init__(self, logger: Any) -> None:
        pass

    def deserialize_cuda_engine(self, blob: bytes) -> SimpleNamespace | None:
        if blob == b"corrupt":
            return None
        return fake_engine(json.loads(blob))


FAKE_TRT = types.ModuleType("tensorrt")
FAKE_TRT.__dict__.update(
    __version__="10.3.0.30", DataType=DataType, TensorIOMode=TensorIOMode,
    ExecutionContextAllocationStrategy=ExecutionContextAllocationStrategy,
    Logger=type("Logger", (), {"WARNING": 2, "__init__": lambda self, severity: None}), Runtime=Runtime)


@pytest.fixture
def gpu(monkeypatch: pytest.MonkeyPatch) -> Gpu:
    Tracked.gpu = g = Gpu()
    monkeypatch.setattr(Graph, "fail", False)
    cb = types.ModuleType("runtime.cuda_buffers")
    cb.__dict__.update(
        free_all=free_all, PinnedBuffer=PinnedBuffer, DeviceBuffer=DeviceBuffer, CudaStream=Stream, CudaEvent=Event,
        CudaGraph=Graph, gpu_problem=lambda device=0: "",
        CudaError=RuntimeError, copy_htod_async=copy_async, copy_dtoh_async=copy_async, cuda_available=lambda: True,
        require_device=lambda device=0: None, set_device=lambda device: None,
        device_properties=lambda device=0: ("Orin", (8, 7)))
    monkeypatch.setitem(sys.modules, "tensorrt", FAKE_TRT)
    monkeypatch.setitem(sys.modules, "runtime.cuda_buffers", cb)
    monkeypatch.setattr(runtime, "cuda_buffers", cb, raising=False)
    return g


@pytest.fixture
def make_engine(tmp_path, meta_factory):
    """``make_engine(dtype=, out_dtype=, min=, max=, outputs=, blob=, sha=)`` → engine file + sidecar."""
    def make(dtype: str = "FLOAT", out_dtype: str = "FLOAT", min: int = 2, max: int = 4,  # noqa: A002
             outputs: tuple[str, ...] = ("logits",), blob: bytes | None = None, sha: str | None = None):
        path = tmp_path / f"m{len(list(tmp_path.glob('*.engine')))}.engine"
        blob = blob or json.dumps(dict(dtype=dtype, out_dtype=out_dtype, min=min, max=max, outputs=outputs)).encode()
        path.write_bytes(blob)
        write_sidecar(path, meta_factory(input_size=(H, W)),
                      {**SIDECAR, "engine_sha256": sha or hashlib.sha256(blob).hexdigest()})
        return path

    return make


# ------------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("n, limit, runs", [(11, None, [4, 4, 3]), (1, None, [2]), (7, 3, [3, 3, 2])])
def test_batches_run_in_profile_sized_chunks_and_padding_is_dropped(gpu, make_engine, n, limit, runs):
    be = TrtBackend(make_engine(), max_batch=limit)
    assert (be.min_batch, be.max_batch, be.input_name, be.output_names) == (2, limit or 4, "images", ("logits",))
    assert "TensorRT 10.3.0.30 on Orin (sm 87), batch 2.." in be.describe()
    x = images(n)
    out = be.infer(x)["logits"]
    assert out.shape == (n, 8) and out.dtype == np.float32
    np.testing.assert_allclose(out, reference(x), rtol=1e-5, atol=1e-5)
    assert gpu.runs == runs


@pytest.mark.parametrize("dtype", ["FLOAT", "HALF"])
def test_infer_in_place_on_the_input_buffer_matches_a_copy(gpu, make_engine, dtype):
    be = TrtBackend(make_engine(dtype=dtype, out_dtype=dtype))
    tol = 1e-5 if dtype == "FLOAT" else 0.05  # fp16 input and output rounding
    buf = be.input_buffer(3)
    assert buf.dtype == np.float32 and buf.shape == (3, 3, H, W)
    assert np.shares_memory(buf, be._host["images"].array) == (dtype == "FLOAT")  # zero-copy only for float32
    x, y, z = images(3, seed=2), images(3, seed=3), images(9, seed=4)
    buf[:] = x
    in_place = be.infer(buf)["logits"]
    np.testing.assert_allclose(in_place, reference(x), atol=tol)
    np.testing.assert_allclose(be.infer(y.copy())["logits"], reference(y), atol=tol)  # a copy is not taken in place
    be.input_buffer(1)[:] = x[:1]
    np.testing.assert_allclose(be.infer(be.input_buffer(1))["logits"], in_place[:1], atol=1e-6)  # padded 1 → 2
    out = be.infer(z)["logits"]
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, reference(z), atol=tol)


@pytest.mark.parametrize("dtype", ["FLOAT", "HALF"])
def test_timed_run_times_each_stage_and_leaves_outputs_in_host_buffers(gpu, make_engine, dtype):
    be = TrtBackend(make_engine(dtype=dtype))
    x = images(3, seed=4)
    be.input_buffer(3)[:] = x
    for _ in range(2):
        t = be.timed_run(3)
        assert set(t) == {"h2d", "inference", "d2h"} and all(isinstance(v, float) and v >= 0 for v in t.values())
        assert t["inference"] > 0 and t["h2d"] > 0
        np.testing.assert_allclose(be._host["logits"].array[:3], reference(x), atol=1e-5 if dtype == "FLOAT" else 0.05)
    assert gpu.runs == [3, 3] and sum(isinstance(o, Event) for o in gpu.objects) == 4  # events made once
    for bad in (1, 5):
        with pytest.raises(ValueError, match=rf"batch {bad} is outside the engine profile 2\.\.4"):
            be.timed_run(bad)


def test_cuda_graphs_replay_per_batch_size(gpu, make_engine):
    """A replayed graph uses its context's state at replay time (NVIDIA/TensorRT#3798): each captured batch size
    needs a context of its own whose shape never changes; the contexts share one user-managed memory block."""
    be = TrtBackend(make_engine(), cuda_graphs=True)
    for n, seed in ((11, 5), (6, 6), (3, 7), (4, 8)):  # sizes 4, 4, 3, then 4 and 2, then 3, then 4 again
        x = images(n, seed)
        np.testing.assert_allclose(be.infer(x)["logits"], reference(x), rtol=1e-5, atol=1e-5)
    assert be.cuda_graphs and sorted(be._graphs) == [2, 3, 4] and gpu.runs[-1] == 4  # last: graph 4 replayed
    engine = be._engine
    graph_contexts = [c for c in engine.contexts if c.shape is not None and c is not be._context]
    assert sorted(c.shape[0] for c in graph_contexts) == [2, 3, 4]
    assert {c.strategy for c in engine.contexts} == {ExecutionContextAllocationStrategy.USER_MANAGED}
    assert len({c.memory for c in engine.contexts}) == 1  # one shared block, not one per context
    be.close()
    assert gpu.released_once(Graph) == 3


def test_a_failed_capture_runs_that_batch_without_graphs(gpu, make_engine, monkeypatch):
    be = TrtBackend(make_engine(), cuda_graphs=True)
    monkeypatch.setattr(Graph, "fail", True)
    x = images(3, seed=9)
    with pytest.warns(RuntimeWarning, match="CUDA graph capture failed"):
        out = be.infer(x)["logits"]
    np.testing.assert_allclose(out, reference(x), rtol=1e-5, atol=1e-5)
    assert not be.cuda_graphs and not be._graphs
    np.testing.assert_allclose(be.infer(images(4))["logits"], reference(images(4)), rtol=1e-5, atol=1e-5)


def test_close_frees_the_rest_when_one_free_fails(gpu, make_engine):
    be = TrtBackend(make_engine())
    be.infer(images(3))
    gpu.fail_free.add(id(be._host["images"]))
    with pytest.warns(RuntimeWarning, match="illegal memory access"):
        be.close()
    assert gpu.released_once(PinnedBuffer) == 2 and gpu.released_once(Stream) == 1


def test_close_frees_everything_once_and_a_closed_backend_refuses_work(gpu, make_engine):
    be = TrtBackend(make_engine())
    be.infer(images(5))
    be.input_buffer(2)[:] = images(2)
    be.timed_run(2)
    be.close()
    be.close()
    assert gpu.released_once(PinnedBuffer) == 2 and gpu.released_once(Stream) == 1
    # 5 = 2 pinned + 2 device + the contexts' shared device memory
    assert gpu.released_once(DeviceBuffer) == 5 and gpu.released_once(Event) == 4
    for call in (lambda: be.infer(images(1)), lambda: be.input_buffer(1), lambda: be.timed_run(2)):
        with pytest.raises(RuntimeError, match="closed"):
            call()


def test_bad_engines_are_refused_with_what_to_do(gpu, make_engine):
    with pytest.raises(MetadataError, match=r"metadata names output 'logits' but the engine's outputs are \['probs'\]"):
        TrtBackend(make_engine(outputs=("probs",)))
    with pytest.raises(MetadataError, match="could not deserialize.*Rebuild it: python -m export.build_engine"):
        TrtBackend(make_engine(blob=b"corrupt"))
    with pytest.raises(MetadataError, match="sha256 does not match"):
        TrtBackend(make_engine(sha="0" * 64))
    assert gpu.released_once(DeviceBuffer) == 1  # only the first engine's context memory, and it was freed


def test_wrong_shaped_or_empty_batches_get_a_clear_error(gpu, make_engine):
    be = TrtBackend(make_engine())
    for bad in (np.zeros((0, 3, H, W), np.float32), np.zeros((2, 3, H + 1, W), np.float32),
                np.zeros((3, H, W), np.float32)):
        with pytest.raises(InputError, match=r"expected a \(N, 3, 8, 8\) batch"):
            be.infer(bad)
    np.testing.assert_allclose(be.infer(images(2))["logits"], reference(images(2)), rtol=1e-4, atol=1e-4)
    be.close()
