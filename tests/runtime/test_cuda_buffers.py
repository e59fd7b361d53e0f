"""CUDA buffers: the real wrapper against a fake ``cudart`` with cuda-python's ``(err, value)`` return shapes, the real
cuda-python without a GPU (arguments accepted, the driver error named), and a pinned round trip on a GPU.

cuda-python (``cuda-bindings``) is a declared test dependency (the ``dev`` extra): the real-binding tests fail, not
skip, without it. Tests that need a GPU are marked ``gpu``.
"""

from __future__ import annotations

import gc
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from runtime import cuda_buffers as cb
from runtime.errors import BackendUnavailable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fake_gpu import FakeCudart, cudaError_t, install_cudart  # noqa: E402


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeCudart:
    return install_cudart(monkeypatch, FakeCudart())


# ------------------------------------------------------------------------------------------------ fake cudart
def test_wrappers_unpack_values_from_the_result_tuples(fake):
    host, dev, stream, event = cb.PinnedBuffer((2, 3), np.float32), cb.DeviceBuffer(24), cb.CudaStream(), cb.CudaEvent()
    assert isinstance(host.ptr, int) and host.ptr in fake.host
    assert isinstance(dev.ptr, int) and dev.ptr in fake.device
    assert isinstance(stream.handle, fake.cudaStream_t) and isinstance(event.handle, fake.cudaEvent_t)
    assert cb.device_properties(0) == ("Orin", (8, 7))
    assert cb.gpu_properties(0).multiprocessors == 8


def test_round_trip_copies_the_right_way_and_times_forward(fake):
    r = cb.round_trip(1 << 12, iters=2)
    assert r["h2d_ms"] > 0 and r["d2h_ms"] > 0 and r["h2d_gbps"] > 0  # cudaEventElapsedTime(start, end)


def test_host_to_device_copy_moves_host_bytes_to_the_device(fake):
    host, dev, back, stream = cb.PinnedBuffer((4,), np.float32), cb.DeviceBuffer(16), cb.PinnedBuffer((4,)), \
        cb.CudaStream()
    host.array[:] = [1, 2, 3, 4]
    cb.copy_htod_async(dev, host, 16, stream)
    cb.copy_dtoh_async(back, dev, 16, stream)
    stream.synchronize()
    assert fake.device_view(dev.ptr, 16).view(np.float32).tolist() == [1, 2, 3, 4]
    assert back.array.tolist() == [1, 2, 3, 4]


def test_elapsed_time_is_measured_from_start_to_end(fake):
    stream, a, b = cb.CudaStream(), cb.CudaEvent(), cb.CudaEvent()
    host, dev = cb.PinnedBuffer((1024,), np.uint8), cb.DeviceBuffer(1024)
    a.record(stream)
    cb.copy_htod_async(dev, host, 1024, stream)
    b.record(stream)
    b.synchronize()
    assert b.elapsed_ms_since(a) > 0


def test_graph_capture_replays_and_is_destroyed(fake):
    stream, host, dev = cb.CudaStream(), cb.PinnedBuffer((4,), np.float32), cb.DeviceBuffer(16)
    graph = cb.CudaGraph.capture(stream, lambda: cb.copy_htod_async(dev, host, 16, stream))
    host.array[:] = 5
    graph.launch(stream)
    stream.synchronize()
    assert fake.device_view(dev.ptr, 16).view(np.float32).tolist() == [5] * 4
    graph.destroy()
    assert fake.live_graphs == 0 and not fake.execs


def test_failed_capture_destroys_the_graph_and_clears_the_cuda_error(fake):
    """trtexec's endCaptureOnError: the graph EndCapture returns is destroyed and cudaGetLastError clears the error."""
    stream = cb.CudaStream()

    def failing_enqueue() -> None:  # what TensorRT does when its kernels cannot be captured
        fake.last_error = cudaError_t.cudaErrorStreamCaptureUnsupported
        raise RuntimeError("execute_async_v3 failed")

    with pytest.raises(RuntimeError, match="execute_async_v3 failed"):
        cb.CudaGraph.capture(stream, failing_enqueue)
    assert fake.live_graphs == 0, "the graph from cudaStreamEndCapture leaked"
    assert fake.last_error == cudaError_t.cudaSuccess, "the capture's CUDA error is still pending"
    assert fake.stream(stream.handle).capture is None  # the stream is usable again

    # an invalidated capture (a synchronize inside it) fails with a CudaError and leaves nothing behind either
    with pytest.raises(cb.CudaError, match="cudaErrorStreamCapture"):
        cb.CudaGraph.capture(stream, stream.synchronize)
    assert fake.live_graphs == 0 and fake.last_error == cudaError_t.cudaSuccess


def test_views_keep_pinned_memory_alive_after_free(fake):
    buf = cb.PinnedBuffer((4,), np.float32)
    ptr, view = buf.ptr, buf.array[1:3]
    buf.free()
    assert ptr not in fake.freed_host, "freed while a view of it is still held"
    view[:] = 7  # writes into memory that is still ours
    assert buf.ptr == 0
    del view
    gc.collect()
    assert fake.freed_host.count(ptr) == 1


def test_free_all_frees_the_rest_when_one_free_fails(fake):
    bufs = [cb.DeviceBuffer(8) for _ in range(3)]
    ptrs = [b.ptr for b in bufs]
    fake.fail_free.add(ptrs[0])
    errors = cb.free_all(bufs)
    assert len(errors) == 1 and "cudaFree" in errors[0]
    assert set(fake.freed_device) == set(ptrs[1:])


def test_no_gpu_names_the_driver_error_and_what_to_do(monkeypatch):
    install_cudart(monkeypatch, FakeCudart(error=cudaError_t.cudaErrorInsufficientDriver))
    assert cb.device_count() == 0 and not cb.cuda_available()
    with pytest.raises(BackendUnavailable, match="cudaErrorInsufficientDriver") as info:
        cb.require_device(0)
    assert "cuda-python<13" in str(info.value)  # the fix for a CUDA-12 driver
    assert "cudaErrorInsufficientDriver" in cb.gpu_problem()


def test_old_cuda_python_with_only_cuda_cudart_is_used(monkeypatch):
    """cuda-python < 12.6 has only ``cuda.cudart``; 13.x only ``cuda.bindings``: either is found."""
    fake = FakeCudart()
    monkeypatch.setitem(sys.modules, "cuda.bindings", None)
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", None)
    monkeypatch.setitem(sys.modules, "cuda", types.SimpleNamespace(cudart=fake, __path__=[]))
    monkeypatch.setitem(sys.modules, "cuda.cudart", fake)
    monkeypatch.setattr(cb, "_cudart", None)
    assert cb.cudart() is fake
    assert cb.device_properties(0) == ("Orin", (8, 7))


def test_selftest_cli_fails_cleanly_without_gpu(monkeypatch, capsys):
    install_cudart(monkeypatch, FakeCudart(error=cudaError_t.cudaErrorNoDevice))
    assert cb.main(["--selftest", "--mib", "1"]) == 2
    assert "cudaErrorNoDevice" in capsys.readouterr().err


def test_selftest_cli_on_the_fake_gpu(fake, capsys):
    assert cb.main(["--selftest", "--mib", "0.01", "--iters", "2"]) == 0
    assert "OK on Orin" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ real cuda-python
def _has_gpu() -> bool:
    try:
        from cuda.bindings import runtime as rt
    except ImportError:
        return False  # the tests below then fail in the `real` fixture: cuda-bindings is a declared dev dependency
    return rt.cudaGetDeviceCount()[0] == rt.cudaError_t.cudaSuccess


HAS_GPU = _has_gpu()
no_gpu = pytest.mark.skipif(HAS_GPU, reason="checks the no-GPU behaviour of the real cuda-python")


@pytest.fixture
def real(monkeypatch):
    """The real cuda-python; a missing one fails the test (the dev extra installs cuda-bindings), never skips."""
    from cuda.bindings import runtime  # noqa: F401 - ImportError here is a failure, on purpose

    monkeypatch.setattr(cb, "_cudart", None)
    rt = cb.cudart()
    assert rt.__name__.startswith("cuda")
    return rt


@no_gpu
def test_real_no_gpu_is_reported_not_crashed(real):
    assert cb.device_count() == 0 and not cb.cuda_available()
    with pytest.raises(BackendUnavailable, match="no usable CUDA GPU"):
        cb.require_device(0)


@no_gpu
def test_real_calls_reach_cuda_with_valid_arguments(real):
    """Each wrapper gets past cuda-python's argument checking and fails only for want of a driver (a CudaError,
    not a TypeError), so the call signatures match the real bindings."""
    stream = SimpleNamespace(handle=real.cudaStream_t(0))
    dev = SimpleNamespace(ptr=0)
    host = SimpleNamespace(ptr=0)
    calls = [
        lambda: cb.PinnedBuffer((4, 4), np.float32), lambda: cb.DeviceBuffer(64), cb.CudaStream, cb.CudaEvent,
        lambda: cb.copy_htod_async(dev, host, 16, stream), lambda: cb.copy_dtoh_async(host, dev, 16, stream),
        lambda: cb.CudaGraph.capture(stream, lambda: None), lambda: cb.device_properties(0),
        lambda: cb.CudaGraph(real.cudaGraph_t(0), real.cudaGraphExec_t(0)).launch(stream),
    ]
    for call in calls:
        with pytest.raises(cb.CudaError) as info:
            call()
        assert "cudaError" in str(info.value)


def test_real_error_text_names_the_error(real):
    assert "cudaErrorInsufficientDriver" in cb.error_text(real.cudaError_t.cudaErrorInsufficientDriver)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
def test_pinned_round_trip_on_gpu(real):
    r = cb.round_trip(8 << 20, iters=3)
    assert r["h2d_gbps"] > 0.5 and r["d2h_gbps"] > 0.5
    buf = cb.PinnedBuffer((2, 3), np.float32)
    buf.array[:] = 7
    assert buf.array.sum() == 42
    buf.free()
    assert cb.main(["--selftest", "--mib", "8", "--iters", "2"]) == 0
