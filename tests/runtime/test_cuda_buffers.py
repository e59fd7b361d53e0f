"""CUDA buffers: without a GPU every entry point fails with a clear error (and the real cuda-python accepts the
argument forms we pass); with a GPU, a pinned-memory round trip returns the bytes it sent."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from runtime import cuda_buffers as cb
from runtime.errors import BackendUnavailable

pytest.importorskip("cuda.bindings.runtime", reason="cuda-python not installed")
HAS_GPU = cb.cuda_available()
no_gpu = pytest.mark.skipif(HAS_GPU, reason="checks the no-GPU behaviour")


@no_gpu
def test_no_gpu_is_reported_not_crashed():
    assert cb.device_count() == 0 and not cb.cuda_available()
    with pytest.raises(BackendUnavailable, match="no usable CUDA GPU"):
        cb.require_device(0)


@no_gpu
def test_calls_reach_cuda_with_valid_arguments():
    """Each wrapper gets past cuda-python's argument checking and fails only for want of a driver (a CudaError,
    not a TypeError), so the call signatures match the real bindings."""
    rt = cb.cudart()
    stream = SimpleNamespace(handle=rt.cudaStream_t(0))
    dev = SimpleNamespace(ptr=0)
    host = SimpleNamespace(ptr=0)
    calls = [
        lambda: cb.PinnedBuffer((4, 4), np.float32), lambda: cb.DeviceBuffer(64), cb.CudaStream, cb.CudaEvent,
        lambda: cb.copy_htod_async(dev, host, 16, stream), lambda: cb.copy_dtoh_async(host, dev, 16, stream),
        lambda: cb.CudaGraph.capture(stream, lambda: None), lambda: cb.device_properties(0),
        lambda: cb.CudaGraph(rt.cudaGraph_t(0), rt.cudaGraphExec_t(0)).launch(stream),
    ]
    for call in calls:
        with pytest.raises(cb.CudaError) as info:
            call()
        assert "cudaError" in str(info.value)


@no_gpu
def test_selftest_cli_fails_cleanly_without_gpu(capsys):
    assert cb.main(["--selftest", "--mib", "1"]) == 2
    assert "FAILED" in capsys.readouterr().err


def test_error_text_names_the_error():
    rt = cb.cudart()
    assert "cudaErrorInsufficientDriver" in cb.error_text(rt.cudaError_t.cudaErrorInsufficientDriver)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
def test_pinned_round_trip_on_gpu():
    r = cb.round_trip(8 << 20, iters=3)
    assert r["h2d_gbps"] > 0.5 and r["d2h_gbps"] > 0.5
    buf = cb.PinnedBuffer((2, 3), np.float32)
    buf.array[:] = 7
    assert buf.array.sum() == 42
    buf.free()
    assert cb.main(["--selftest", "--mib", "8", "--iters", "2"]) == 0
