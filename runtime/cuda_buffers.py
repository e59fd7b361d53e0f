"""CUDA memory and stream plumbing for the TensorRT backend, with no TensorRT in it (cuda-python, not pycuda).

Pinned (page-locked) host buffers viewed as numpy arrays, device buffers, one CUDA stream, async copies both ways,
events for timing and CUDA-graph capture/replay. Kept apart from ``trt_backend`` so it can be checked on a GPU on its
own::

    python -m runtime.cuda_buffers --selftest          # H2D/D2H round trip through pinned memory + bandwidth

cuda-python is imported lazily (first use), so importing this module never fails; without the package or a GPU
every entry point raises :class:`~runtime.errors.BackendUnavailable` with the reason.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from runtime.errors import BackendUnavailable

_cudart: Any = None


def cudart() -> Any:
    """The cuda-python runtime module (``cuda.bindings.runtime``; ``cuda.cudart`` on cuda-python < 12.6)."""
    global _cudart
    if _cudart is None:
        try:
            from cuda.bindings import runtime as rt  # cuda-python >= 12.6 (13.x has only this)
        except ImportError:
            try:
                from cuda import cudart as rt  # cuda-python < 12.6 (12.x keeps it as an alias)
            except ImportError:
                raise BackendUnavailable(
                    "cuda-python is not installed; the TensorRT backend needs it: "
                    "pip install 'sem-defect-classifier[tensorrt]' (CUDA 12 drivers and JetPack 6: cuda-python<13; "
                    "CUDA 13 drivers: the [tensorrt-cu13] extra)") from None
        _cudart = rt
    return _cudart


def cuda_python_version() -> str:
    """Version of the installed cuda-python bindings, or "" when absent."""
    from importlib import metadata

    for dist in ("cuda-bindings", "cuda-python"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return ""


def _cuda_version_text(v: int) -> str:
    return f"{v // 1000}.{(v % 1000) // 10}" if v else "none"


def driver_and_runtime_versions() -> tuple[str, str]:
    """(CUDA version the driver supports, CUDA runtime version cuda-python was built for), e.g. ("12.6", "13.0");
    the driver's is "none" when no NVIDIA driver is loaded."""
    rt = cudart()
    err, drv = rt.cudaDriverGetVersion()
    err2, run = rt.cudaRuntimeGetVersion()
    ok = rt.cudaError_t.cudaSuccess
    return (_cuda_version_text(int(drv or 0)) if err == ok else "unknown",
            _cuda_version_text(int(run or 0)) if err2 == ok else "unknown")


#: What to do about the CUDA errors a new station meets first.
ERROR_HINTS = {
    "cudaErrorInsufficientDriver": (
        "the NVIDIA driver is older than the CUDA runtime of this cuda-python ({runtime}; driver supports "
        "{driver}): cuda-python 13 needs driver >= 580. On CUDA 12 drivers and JetPack 6 install "
        "pip install 'sem-defect-classifier[tensorrt]' (tensorrt-cu12<11, cuda-python<13), or update the driver"),
    "cudaErrorNoDevice": ("no NVIDIA GPU is visible: check nvidia-smi, CUDA_VISIBLE_DEVICES, and that the container "
                          "was started with --gpus all (or --runtime nvidia on Jetson)"),
    "cudaErrorSystemDriverMismatch": "the driver's kernel module and user library differ: reboot, or reinstall the "
                                     "driver",
    "cudaErrorCompatNotSupportedOnDevice": "CUDA forward compatibility is not supported on this GPU: update the driver",
}


def error_hint(err: Any) -> str:
    """What to do about ``err`` (empty when there is nothing specific to say)."""
    name = getattr(err, "name", str(err))
    hint = ERROR_HINTS.get(name, "")
    if "{" in hint:
        try:
            driver, runtime = driver_and_runtime_versions()
        except Exception:  # noqa: BLE001 - a hint must never raise
            driver = runtime = "unknown"
        hint = hint.format(driver=driver, runtime=runtime)
    return hint


def error_text(err: Any) -> str:
    """``cudaErrorInsufficientDriver (CUDA driver version is insufficient ...)``."""
    rt = cudart()
    name = getattr(err, "name", str(err))
    try:
        code, text = rt.cudaGetErrorString(err)
        if code == rt.cudaError_t.cudaSuccess:
            desc = text.decode() if isinstance(text, bytes) else str(text)
            return f"{name} ({desc})"
    except Exception:  # noqa: BLE001 - describing an error must never raise another one
        pass
    return str(name)


def check(result: Any, what: str) -> Any:
    """Unpack a cuda-python call result ``(err, *values)``; raise on error, return the value(s)."""
    rt = cudart()
    if not isinstance(result, tuple):
        result = (result,)
    err, values = result[0], result[1:]
    if err != rt.cudaError_t.cudaSuccess:
        raise CudaError(f"{what} failed: {error_text(err)}", err)
    if not values:
        return None
    return values[0] if len(values) == 1 else values


class CudaError(RuntimeError):
    """A CUDA runtime call returned an error."""

    def __init__(self, message: str, code: Any = None) -> None:
        super().__init__(message)
        self.code = code


# ------------------------------------------------------------------------------------------------ device queries
def gpu_problem(device: int = 0) -> str:
    """Why CUDA device ``device`` cannot be used (the CUDA error by name and what to do), or "" when it can."""
    try:
        rt = cudart()
    except BackendUnavailable as e:
        return str(e)
    err, n = rt.cudaGetDeviceCount()
    if err != rt.cudaError_t.cudaSuccess:
        hint = error_hint(err)
        return f"no usable CUDA GPU: {error_text(err)}" + (f"; {hint}" if hint else "")
    if not 0 <= device < int(n):
        return f"CUDA device {device} does not exist ({n} device(s) present)"
    return ""


def device_count() -> int:
    """Number of usable CUDA devices; 0 when there is no driver, no GPU or no cuda-python."""
    try:
        rt = cudart()
        err, n = rt.cudaGetDeviceCount()
    except Exception:  # noqa: BLE001 - "is there a GPU" must answer, not raise
        return 0
    return int(n) if err == rt.cudaError_t.cudaSuccess else 0


def cuda_available() -> bool:
    return device_count() > 0


def require_device(device: int = 0) -> None:
    """Select ``device`` or raise :class:`BackendUnavailable` saying why there is no usable GPU."""
    problem = gpu_problem(device)
    if problem:
        raise BackendUnavailable(f"{problem}; or use the ONNX Runtime backend (backend='ort')")
    check(cudart().cudaSetDevice(device), f"cudaSetDevice({device})")


def set_device(device: int) -> None:
    """Make ``device`` current for the calling thread (the CUDA runtime keeps the current device per thread)."""
    check(cudart().cudaSetDevice(device), f"cudaSetDevice({device})")


@dataclass(frozen=True)
class GpuProperties:
    name: str
    compute_capability: tuple[int, int]
    multiprocessors: int
    memory_bytes: int


def gpu_properties(device: int = 0) -> GpuProperties:
    """Name, compute capability, SM count and memory of ``device`` (SM count and memory tell Orin modules apart)."""
    props = check(cudart().cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    name = props.name
    if isinstance(name, bytes):
        name = name.split(b"\0", 1)[0].decode(errors="replace")
    return GpuProperties(str(name).strip(), (int(props.major), int(props.minor)),
                         int(getattr(props, "multiProcessorCount", 0)), int(getattr(props, "totalGlobalMem", 0)))


def device_properties(device: int = 0) -> tuple[str, tuple[int, int]]:
    """(GPU name, (compute capability major, minor)), as recorded in engine sidecars."""
    p = gpu_properties(device)
    return p.name, p.compute_capability


# ------------------------------------------------------------------------------------------------ memory
class _PinnedAllocation:
    """Owns one ``cudaMallocHost`` block; freed when the last numpy view of it is gone (NVIDIA's ``ArrayWithOwner``).

    Arrays made from it (``np.asarray(alloc)``) keep it alive through their ``base`` chain, so a view handed out by
    ``input_buffer()`` and held after ``close()`` still points at memory we own instead of freed memory.
    """

    def __init__(self, nbytes: int) -> None:
        self.nbytes = int(nbytes)
        self.ptr = 0
        # cudaMallocHost(0) is legal but gives a null pointer; keep one byte so the view has an address.
        self.ptr = int(check(cudart().cudaMallocHost(max(self.nbytes, 1)), f"cudaMallocHost({self.nbytes})"))
        self.__array_interface__ = {"shape": (self.nbytes,), "typestr": "|u1", "data": (self.ptr, False),
                                    "version": 3}

    def release(self) -> None:
        if self.ptr:
            ptr, self.ptr = self.ptr, 0
            check(cudart().cudaFreeHost(ptr), "cudaFreeHost")

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:  # noqa: BLE001 - garbage collection: nothing useful to report
            pass


class PinnedBuffer:
    """Page-locked host memory with a numpy view (``.array``); async copies from/to it overlap with compute.

    ``free()`` drops this object's hold on the memory; the block itself is returned to CUDA when no view of it is
    left (so a view someone kept never points at freed memory).
    """

    def __init__(self, shape: tuple[int, ...], dtype: Any = np.float32) -> None:
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.nbytes = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize
        self.ptr = 0
        alloc = _PinnedAllocation(self.nbytes)
        self.ptr = alloc.ptr
        raw = np.asarray(alloc)  # base chain: view -> raw -> alloc
        self.array: np.ndarray = raw[:self.nbytes].view(self.dtype).reshape(self.shape)

    def free(self) -> None:
        if self.ptr:
            self.ptr = 0
            self.array = np.empty(0, self.dtype)  # the allocation goes when the last view of it does

    def __del__(self) -> None:
        try:
            self.free()
        except Exception:  # noqa: BLE001 - interpreter teardown: nothing useful to report
            pass


class DeviceBuffer:
    """``nbytes`` of GPU memory; ``.ptr`` is the device address TensorRT binds to."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = int(nbytes)
        self.ptr = 0
        self.ptr = int(check(cudart().cudaMalloc(max(self.nbytes, 1)), f"cudaMalloc({self.nbytes})"))

    def free(self) -> None:
        if self.ptr:
            ptr, self.ptr = self.ptr, 0
            check(cudart().cudaFree(ptr), "cudaFree")

    def __del__(self) -> None:
        try:
            self.free()
        except Exception:  # noqa: BLE001
            pass


class CudaStream:
    """One CUDA stream: all copies and the engine run on it, in order, and one synchronize waits for all."""

    def __init__(self) -> None:
        self.handle: Any = None
        self.handle = check(cudart().cudaStreamCreate(), "cudaStreamCreate")

    def __int__(self) -> int:
        return int(self.handle)

    def synchronize(self) -> None:
        check(cudart().cudaStreamSynchronize(self.handle), "cudaStreamSynchronize")

    def destroy(self) -> None:
        if self.handle is not None:
            handle, self.handle = self.handle, None
            check(cudart().cudaStreamDestroy(handle), "cudaStreamDestroy")

    def __del__(self) -> None:
        try:
            self.destroy()
        except Exception:  # noqa: BLE001
            pass


def copy_htod_async(dst: DeviceBuffer, src: PinnedBuffer, nbytes: int, stream: CudaStream) -> None:
    """Queue host → device copy of the first ``nbytes``."""
    rt = cudart()
    check(rt.cudaMemcpyAsync(dst.ptr, src.ptr, nbytes, rt.cudaMemcpyKind.cudaMemcpyHostToDevice, stream.handle),
          "cudaMemcpyAsync(host to device)")


def copy_dtoh_async(dst: PinnedBuffer, src: DeviceBuffer, nbytes: int, stream: CudaStream) -> None:
    """Queue device → host copy of the first ``nbytes``."""
    rt = cudart()
    check(rt.cudaMemcpyAsync(dst.ptr, src.ptr, nbytes, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream.handle),
          "cudaMemcpyAsync(device to host)")


class CudaEvent:
    """A stream event, for GPU-side timing of what was queued between two records."""

    def __init__(self) -> None:
        self.handle: Any = None
        self.handle = check(cudart().cudaEventCreate(), "cudaEventCreate")

    def record(self, stream: CudaStream) -> None:
        check(cudart().cudaEventRecord(self.handle, stream.handle), "cudaEventRecord")

    def synchronize(self) -> None:
        check(cudart().cudaEventSynchronize(self.handle), "cudaEventSynchronize")

    def elapsed_ms_since(self, start: CudaEvent) -> float:
        return float(check(cudart().cudaEventElapsedTime(start.handle, self.handle), "cudaEventElapsedTime"))

    def destroy(self) -> None:
        if self.handle is not None:
            handle, self.handle = self.handle, None
            check(cudart().cudaEventDestroy(handle), "cudaEventDestroy")

    def __del__(self) -> None:
        try:
            self.destroy()
        except Exception:  # noqa: BLE001
            pass


class CudaGraph:
    """Work captured once from a stream and replayed with one launch (saves per-kernel launch overhead).

    Usage: ``g = CudaGraph.capture(stream, fn)`` where ``fn()`` queues the work on ``stream``; then
    ``g.launch(stream)``. Buffer addresses are baked in, so the buffers must stay allocated.
    """

    def __init__(self, graph: Any, exec_handle: Any) -> None:
        self.graph = graph
        self.exec_handle = exec_handle

    @classmethod
    def capture(cls, stream: CudaStream, enqueue: Any) -> CudaGraph:
        rt = cudart()
        # Thread-local mode: other threads' unrelated CUDA calls (a decode thread, say) do not break the capture.
        check(rt.cudaStreamBeginCapture(stream.handle, rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal),
              "cudaStreamBeginCapture")
        try:
            enqueue()
        except BaseException:
            cls._abandon_capture(stream)
            raise
        err, graph = rt.cudaStreamEndCapture(stream.handle)
        if err != rt.cudaError_t.cudaSuccess:  # invalidated inside the capture (e.g. a synchronize)
            cls._abandon_capture(stream, (err, graph))
            raise CudaError(f"cudaStreamEndCapture failed: {error_text(err)}", err)
        try:
            exec_handle = check(rt.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
        except CudaError:
            rt.cudaGraphDestroy(graph)
            rt.cudaGetLastError()
            raise
        return cls(graph, exec_handle)

    @staticmethod
    def _abandon_capture(stream: CudaStream, ended: tuple[Any, Any] | None = None) -> None:
        """trtexec's ``endCaptureOnError``: end the capture so the stream is usable again, destroy the graph it
        returns (an invalidated capture returns none), and clear the pending CUDA error with ``cudaGetLastError``."""
        rt = cudart()
        err, graph = ended if ended is not None else rt.cudaStreamEndCapture(stream.handle)
        if err == rt.cudaError_t.cudaSuccess and graph is not None and int(graph):
            rt.cudaGraphDestroy(graph)
        rt.cudaGetLastError()

    def launch(self, stream: CudaStream) -> None:
        check(cudart().cudaGraphLaunch(self.exec_handle, stream.handle), "cudaGraphLaunch")

    def destroy(self) -> None:
        rt = cudart()
        if self.exec_handle is not None:
            handle, self.exec_handle = self.exec_handle, None
            check(rt.cudaGraphExecDestroy(handle), "cudaGraphExecDestroy")
        if self.graph is not None:
            graph, self.graph = self.graph, None
            check(rt.cudaGraphDestroy(graph), "cudaGraphDestroy")

    def __del__(self) -> None:
        try:
            self.destroy()
        except Exception:  # noqa: BLE001
            pass


def free_all(objects: Iterable[Any]) -> list[str]:
    """Free/destroy every object (buffers, events, graphs, streams) even when some fail; returns the errors."""
    errors = []
    for obj in objects:
        release = getattr(obj, "free", None) or obj.destroy
        try:
            release()
        except Exception as e:  # noqa: BLE001 - one failure must not leak everything after it
            errors.append(f"{type(obj).__name__}: {e}")
    return errors


# ------------------------------------------------------------------------------------------------ self-test
def round_trip(nbytes: int, iters: int = 10, device: int = 0) -> dict[str, float]:
    """Copy random bytes host → device → host through pinned memory, verify them, and time both directions.

    Returns ``{"bytes", "h2d_gbps", "d2h_gbps", "h2d_ms", "d2h_ms"}`` (best of ``iters``, GPU event timing).
    Raises :class:`BackendUnavailable` without a GPU and :class:`CudaError` on a failed call or corrupted data.
    """
    require_device(device)
    src = PinnedBuffer((nbytes,), np.uint8)
    dst = PinnedBuffer((nbytes,), np.uint8)
    dev = DeviceBuffer(nbytes)
    stream = CudaStream()
    start, mid, end = CudaEvent(), CudaEvent(), CudaEvent()
    try:
        src.array[:] = np.random.default_rng(0).integers(0, 256, nbytes, dtype=np.uint8)
        best_h2d = best_d2h = float("inf")
        for _ in range(max(1, iters)):
            dst.array[:] = 0
            start.record(stream)
            copy_htod_async(dev, src, nbytes, stream)
            mid.record(stream)
            copy_dtoh_async(dst, dev, nbytes, stream)
            end.record(stream)
            stream.synchronize()
            best_h2d = min(best_h2d, mid.elapsed_ms_since(start))
            best_d2h = min(best_d2h, end.elapsed_ms_since(mid))
            if not np.array_equal(src.array, dst.array):
                raise CudaError(f"round trip corrupted data: {int(np.count_nonzero(src.array != dst.array))} of "
                                f"{nbytes} bytes differ")
        gb = nbytes / 1e9
        return {"bytes": float(nbytes), "h2d_ms": best_h2d, "d2h_ms": best_d2h,
                "h2d_gbps": gb / (best_h2d / 1e3) if best_h2d > 0 else float("inf"),
                "d2h_gbps": gb / (best_d2h / 1e3) if best_d2h > 0 else float("inf")}
    finally:
        free_all((start, mid, end, stream, dev, src, dst))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m runtime.cuda_buffers",
        description="Check the pinned-memory CUDA plumbing the TensorRT backend uses (no TensorRT needed).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  python -m runtime.cuda_buffers --selftest\n"
               "  python -m runtime.cuda_buffers --selftest --mib 256 --iters 20 --device 1\n")
    parser.add_argument("--selftest", action="store_true", help="host-to-device-to-host round trip, verified and timed")
    parser.add_argument("--mib", type=float, default=64.0, help="bytes to copy, in MiB (default 64)")
    parser.add_argument("--iters", type=int, default=10, help="repetitions; the best is reported (default 10)")
    parser.add_argument("--device", type=int, default=0, help="CUDA device index (default 0)")
    args = parser.parse_args(argv)
    if not args.selftest:
        parser.print_help()
        return 0
    nbytes = max(1, int(args.mib * 2**20))
    t0 = time.perf_counter()
    try:
        name, cc = (require_device(args.device), device_properties(args.device))[1]
        r = round_trip(nbytes, args.iters, args.device)
    except (BackendUnavailable, CudaError) as e:
        print(f"cuda_buffers selftest: FAILED: {e}", file=sys.stderr)
        return 2
    print(f"cuda_buffers selftest: OK on {name} (compute capability {cc[0]}.{cc[1]}): "
          f"{nbytes / 2**20:.0f} MiB verified; pinned H2D {r['h2d_gbps']:.1f} GB/s ({r['h2d_ms']:.2f} ms), "
          f"D2H {r['d2h_gbps']:.1f} GB/s ({r['d2h_ms']:.2f} ms), best of {args.iters}; "
          f"{time.perf_counter() - t0:.1f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
