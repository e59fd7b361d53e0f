"""``python -m runtime.doctor``: does this machine's GPU stack work for the classifier? The first command on a station.

Checks, one line each, PASS / FAIL (with the fix) / SKIP (with why):

* versions: Python, ONNX Runtime (and its providers), cuda-python, the NVIDIA driver (and the CUDA version it
  supports), the CUDA runtime cuda-python was built for, TensorRT (and the CUDA it was built for), the GPU — and
  whether they fit each other (cuda-python 13 and TensorRT for CUDA 13 need a CUDA 13 driver, >= 580);
* the pinned-memory round trip the TensorRT backend depends on (``runtime.cuda_buffers``);
* a tiny engine built here, FP16 and INT8 (Q/DQ), from the models bundled in ``runtime/data/``, twice each with the
  timing cache (the second build must accept the first build's cache);
* each engine run against ONNX Runtime FP32 without and with CUDA graphs over batch sizes 1, 8, 3, 8, 1, 32, 5
  (sizes change back and forth; 32 is above the profile's maximum, so it runs in chunks);
* with ``--model PATH``: that artifact's own self-check (``runtime.check``) with the backend it would get.

Exit status: :data:`EXIT_OK` (0) every applicable check passed; :data:`EXIT_FAIL` (1) a check failed;
:data:`EXIT_NOT_APPLICABLE` (3) no NVIDIA driver and no TensorRT on this machine, so there is no GPU stack to check
(nothing else failed; such a machine runs the ONNX Runtime backend).
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

EXIT_OK, EXIT_FAIL, EXIT_NOT_APPLICABLE = 0, 1, 3
BATCHES = (1, 8, 3, 8, 1, 32, 5)
PROFILE = (1, 8, 16)  # min, opt, max batch of the tiny engines
DATA = Path(__file__).resolve().with_name("data")
MODELS = {"fp32": DATA / "doctor_fp32.onnx", "fp16": DATA / "doctor_fp16.onnx", "int8": DATA / "doctor_int8_qdq.onnx"}
#: max |Δlogit| against ONNX Runtime FP32, as a fraction of the reference logits' scale (as runtime.check does).
TOLERANCE = {"fp16": 0.03, "int8": 0.12}
JETSON = Path("/etc/nv_tegra_release").exists()
#: How to get a matching TensorRT + cuda-python (docs/tensorrt.md): JetPack's TensorRT on Jetson, pip's elsewhere.
INSTALL = ("pip install 'sem-defect-classifier[jetson]' in a venv made with --system-site-packages (JetPack's "
           "TensorRT)" if JETSON else "pip install 'sem-defect-classifier[tensorrt]'")
STATUS = ("PASS", "FAIL", "SKIP")


@dataclass
class Check:
    name: str
    status: str  # PASS | FAIL | SKIP
    detail: str
    fix: str = ""

    def lines(self) -> list[str]:
        out = [f"{self.status:<4}  {self.name:<16} {self.detail}"]
        if self.fix:
            out.append(f"{'':<4}  {'':<16} fix: {self.fix}")
        return out


def _dist_version(*names: str) -> str:
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return ""


def _major(version: str) -> int:
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        return 0


def _known(cuda_version: str) -> bool:
    """Whether a CUDA version read from the driver is a real one (not absent, "none" or "unknown")."""
    return cuda_version not in ("", "none", "unknown")


def _read(path: str) -> str:
    try:
        return Path(path).read_text(errors="replace").strip()
    except OSError:
        return ""


def nvidia_driver_text() -> str:
    """The kernel driver's version line (Linux) or the Jetson L4T release, "" when neither is present."""
    line = _read("/proc/driver/nvidia/version").splitlines()[:1]
    tegra = _read("/etc/nv_tegra_release").splitlines()[:1]
    parts = []
    if line:
        words = line[0].split()
        version = next((w for w in words if w[:1].isdigit() and "." in w), line[0])
        parts.append(f"NVIDIA driver {version}")
    if tegra:
        parts.append(f"Jetson {tegra[0].lstrip('# ').split(',')[0]}")
    return ", ".join(parts)


def tensorrt_cuda_major(trt: Any) -> tuple[int, str]:
    """(CUDA major TensorRT was built for, where TensorRT came from); 0 when unknown (JetPack's system package)."""
    for major in (13, 12, 11):
        v = _dist_version(f"tensorrt-cu{major}", f"tensorrt_cu{major}", f"tensorrt-cu{major}-libs",
                          f"tensorrt_cu{major}_libs", f"tensorrt-cu{major}-bindings")
        if v:
            return major, f"pip tensorrt-cu{major} {v}"
    return 0, "system package (JetPack or NVIDIA's repository)" if not _dist_version("tensorrt") else "pip tensorrt"


class Doctor:
    """Runs the checks in order; each later check skips (saying why) when what it needs failed or is absent."""

    def __init__(self, device: int = 0, model: str | None = None, echo: Callable[[str], None] | None = None) -> None:
        self.device, self.model = device, model
        self.checks: list[Check] = []
        self.echo = echo or (lambda line: print(line, flush=True))
        self.trt: Any = None
        self.cb: Any = None
        self.gpu_ok = False
        self.applicable = True

    # ------------------------------------------------------------------------------------------- bookkeeping
    def add(self, name: str, status: str, detail: str, fix: str = "") -> Check:
        assert status in STATUS
        check = Check(name, status, detail, fix)
        self.checks.append(check)
        for line in check.lines():
            self.echo(line)
        return check

    def guarded(self, name: str, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - a doctor reports what broke, it does not crash on it
            self.add(name, "FAIL", f"{type(e).__name__}: {e}", "see the error above; python -m runtime.doctor "
                     "again after fixing it")

    @property
    def failed(self) -> bool:
        return any(c.status == "FAIL" for c in self.checks)

    def exit_code(self) -> int:
        if self.failed:
            return EXIT_FAIL
        return EXIT_OK if self.applicable else EXIT_NOT_APPLICABLE

    # ------------------------------------------------------------------------------------------- the checks
    def run(self) -> int:
        from runtime.contract import __version__

        self.echo(f"sem-defect-classifier {__version__} doctor: is this machine ready for the TensorRT backend?")
        self.python()
        self.onnxruntime()
        self.stack()
        if self.applicable:
            self.guarded("pinned memory", self.pinned)
            self.guarded("engines", self.engines)
        if self.model:
            self.guarded("model", self.model_check)
        self.summary()
        return self.exit_code()

    def python(self) -> None:
        v = platform.python_version()
        ok = sys.version_info >= (3, 10)
        self.add("python", "PASS" if ok else "FAIL", f"{v} ({platform.system()} {platform.machine()})",
                 "" if ok else "use Python 3.10 or newer")

    def onnxruntime(self) -> None:
        try:
            import onnxruntime as ort
        except ImportError as e:
            self.add("onnxruntime", "FAIL", f"not importable ({e})", "pip install onnxruntime (or onnxruntime-gpu)")
            return
        self.add("onnxruntime", "PASS", f"{ort.__version__}, providers: {', '.join(ort.get_available_providers())}")

    def stack(self) -> None:
        """cuda-python, driver, CUDA runtime, GPU, TensorRT — and whether they fit each other."""
        from runtime import cuda_buffers as cb
        from runtime.artifacts import import_tensorrt
        from runtime.errors import BackendUnavailable

        self.trt = import_tensorrt(required=False)
        driver_text = nvidia_driver_text()
        try:
            cb.cudart()
            self.cb = cb
        except BackendUnavailable:
            self.cb = None
        driver_cuda = runtime_cuda = ""
        if self.cb is not None:
            try:
                driver_cuda, runtime_cuda = cb.driver_and_runtime_versions()
            except Exception:  # noqa: BLE001
                driver_cuda = runtime_cuda = "unknown"
        if self.trt is None and not (driver_text or _known(driver_cuda)):
            self.not_applicable()
            return
        cp_version = cb.cuda_python_version() if self.cb is not None else ""
        self.cuda_python(cp_version)
        self.driver(driver_text, driver_cuda)
        self.cuda_runtime(cp_version, driver_cuda, runtime_cuda)
        self.gpu()
        self.tensorrt(cp_version, driver_cuda)

    def not_applicable(self) -> None:
        self.applicable = False
        why = ("no NVIDIA GPU or driver and no TensorRT on this machine: the TensorRT backend does not apply "
               "(this machine runs models with ONNX Runtime)")
        self.add("gpu stack", "SKIP", why)
        for name in ("cuda-python", "driver", "cuda runtime", "gpu", "tensorrt", "pinned memory", "engines"):
            self.add(name, "SKIP", "no GPU stack here")

    def cuda_python(self, cp_version: str) -> None:
        if self.cb is None:
            self.add("cuda-python", "FAIL", "not installed (the TensorRT backend's CUDA buffers need it)",
                     f"{INSTALL} (CUDA 12 drivers, JetPack 6) or the [tensorrt-cu13] extra (driver >= 580)")
        else:
            module = getattr(self.cb.cudart(), "__name__", "cuda-python")
            self.add("cuda-python", "PASS", f"{cp_version or 'unknown version'} ({module})")

    def driver(self, driver_text: str, driver_cuda: str) -> None:
        if driver_cuda in ("none", "") and not driver_text:
            self.add("driver", "FAIL", "no NVIDIA driver is loaded", "install the NVIDIA driver (on Jetson: JetPack)")
        else:
            self.add("driver", "PASS", ", ".join(x for x in (driver_text, f"supports CUDA {driver_cuda}"
                                                              if driver_cuda else "") if x))

    def cuda_runtime(self, cp_version: str, driver_cuda: str, runtime_cuda: str) -> None:
        if self.cb is None or not _known(driver_cuda) or runtime_cuda in ("", "unknown"):
            self.add("cuda runtime", "SKIP", "needs cuda-python and a driver")
            return
        fits = _major(driver_cuda) >= _major(runtime_cuda)
        self.add("cuda runtime", "PASS" if fits else "FAIL",
                 f"cuda-python {cp_version} uses CUDA {runtime_cuda}; the driver supports CUDA {driver_cuda}"
                 + ("" if fits else ": the driver is too old for it"),
                 "" if fits else f"pip install 'cuda-python>=12.6,<13' ({INSTALL}), or update the driver "
                                 f"to one for CUDA {_major(runtime_cuda)} (>= 580 for CUDA 13)")

    def gpu(self) -> None:
        if self.cb is None:
            self.add("gpu", "SKIP", "needs cuda-python")
            return
        problem = self.cb.gpu_problem(self.device)
        if problem:
            self.add("gpu", "FAIL", problem.split("; ", 1)[0],
                     problem.split("; ", 1)[1] if "; " in problem else "check nvidia-smi")
            return
        p = self.cb.gpu_properties(self.device)
        self.gpu_ok = True
        self.add("gpu", "PASS", f"{p.name}, compute capability {p.compute_capability[0]}."
                 f"{p.compute_capability[1]}, {p.multiprocessors} SMs, {p.memory_bytes / 2**30:.1f} GiB")

    def tensorrt(self, cp_version: str, driver_cuda: str) -> None:
        if self.trt is None:
            self.add("tensorrt", "FAIL", "not installed, though this machine has an NVIDIA driver",
                     f"{INSTALL} (CUDA 12 drivers), the [tensorrt-cu13] extra (driver >= 580), or on Jetson the "
                     "JetPack TensorRT in a venv made with --system-site-packages plus the [jetson] extra")
            return
        version = str(self.trt.__version__)
        cuda_major, source = tensorrt_cuda_major(self.trt)
        problems, fixes = [], []
        if _major(version) < 10 or (_major(version) == 10 and tuple(map(int, version.split(".")[:2])) < (10, 3)):
            problems.append("TensorRT 10.3 or newer is needed")
            fixes.append(INSTALL)
        if cuda_major and _known(driver_cuda) and cuda_major > _major(driver_cuda):
            problems.append(f"built for CUDA {cuda_major}, the driver supports CUDA {driver_cuda}")
            fixes.append(f"{INSTALL} (tensorrt-cu12 < 11), or update the driver")
        if cuda_major and cp_version and _major(cp_version) != cuda_major:
            problems.append(f"TensorRT is built for CUDA {cuda_major} but cuda-python {cp_version} for CUDA "
                            f"{_major(cp_version)}")
            fixes.append(f"install the matching pair: {INSTALL} (CUDA 12) or the [tensorrt-cu13] extra (CUDA 13)")
        self.add("tensorrt", "FAIL" if problems else "PASS",
                 f"{version} ({source})" + (": " + "; ".join(problems) if problems else ""), "; ".join(fixes))

    def ready(self, name: str) -> bool:
        if self.trt is None or self.cb is None or not self.gpu_ok:
            self.add(name, "SKIP", "needs TensorRT, cuda-python and a usable GPU (see the FAIL above)")
            return False
        return True

    def pinned(self) -> None:
        if self.cb is None or not self.gpu_ok:
            self.add("pinned memory", "SKIP", "needs cuda-python and a usable GPU (see the FAIL above)")
            return
        r = self.cb.round_trip(16 << 20, iters=3, device=self.device)
        self.add("pinned memory", "PASS", f"16 MiB host→device→host verified; H2D {r['h2d_gbps']:.1f} GB/s, "
                 f"D2H {r['d2h_gbps']:.1f} GB/s")

    def engines(self) -> None:
        if not self.ready("engines"):
            return
        with tempfile.TemporaryDirectory(prefix="sem-doctor.") as tmp:
            built = {}
            for precision in ("fp16", "int8"):
                engine = self.build(precision, Path(tmp))
                if engine is not None:
                    built[precision] = engine
            reference = self.reference()
            for precision, engine in built.items():
                for graphs in (False, True):
                    self.guarded(f"run {precision}{' +graphs' if graphs else ''}",
                                 lambda e=engine, p=precision, g=graphs: self.compare(e, p, g, reference))

    def build(self, precision: str, tmp: Path) -> Path | None:
        from runtime.trt_build import EngineBuildError

        name = f"build {precision}"
        src = MODELS[precision]
        if not src.is_file():
            self.add(name, "FAIL", f"bundled model {src} is missing", "reinstall sem-defect-classifier")
            return None
        profile = {"input": "images", "min": [PROFILE[0], 3, 16, 16], "opt": [PROFILE[1], 3, 16, 16],
                   "max": [PROFILE[2], 3, 16, 16]}
        cache = tmp / f"timing-{precision}.cache"
        try:
            blob, times, warned = self._build_twice(src, profile, cache)
        except EngineBuildError as e:
            self.add(name, "FAIL", str(e), "the TensorRT log above says why; report it with this output")
            return None
        if not cache.is_file() or warned:
            self.add(name, "FAIL", "the engine builds, but the timing cache was not written or not accepted back: "
                     + ("; ".join(warned) or "no cache file"),
                     "delete stale timing-cache-*.bin files beside your engines; report the TensorRT log")
            return None
        engine = self._write_engine(tmp / f"doctor.{precision}.engine", blob, src, precision, profile)
        self.add(name, "PASS", f"built twice from {src.name}: {times[0]:.2f} s, then {times[1]:.2f} s with the "
                 f"timing cache ({cache.stat().st_size} bytes)")
        return engine

    def _build_twice(self, src: Path, profile: dict[str, Any], cache: Path) -> tuple[bytes, list[float], list[str]]:
        """Build from ``src`` with a timing cache, then again reading it back: (engine, build seconds, the
        builder's warnings about the cache)."""
        from runtime.trt_build import build_serialized_engine

        warned: list[str] = []
        handler = _Collect(warned)
        log = logging.getLogger("runtime.trt_build")
        log.addHandler(handler)
        times = []
        try:
            for _ in range(2):
                t0 = time.perf_counter()
                blob = build_serialized_engine(self.trt, src, profile, 256 << 20, cache)
                times.append(time.perf_counter() - t0)
                if not cache.is_file():
                    break
        finally:
            log.removeHandler(handler)
        return blob, times, warned

    def _write_engine(self, engine: Path, blob: bytes, src: Path, precision: str, profile: dict[str, Any]) -> Path:
        """Write the engine and its sidecar (source hash, TensorRT version, GPU, profile) for the run checks."""
        from runtime.artifacts import engine_sidecar
        from runtime.contract import ModelMetadata, write_sidecar
        from runtime.files import sha256_bytes, sha256_file

        engine.write_bytes(blob)
        gpu = self.cb.gpu_properties(self.device)
        write_sidecar(engine, ModelMetadata(input_size=(16, 16), arch="doctor_tiny", precision=precision),
                      engine_sidecar(sha256_file(src), self.trt.__version__, gpu.name,
                                     f"{gpu.compute_capability[0]}.{gpu.compute_capability[1]}", precision, profile,
                                     "python -m runtime.doctor", onnx=str(src), engine_sha256=sha256_bytes(blob)))
        return engine

    def reference(self) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        import onnxruntime as ort

        sess = ort.InferenceSession(str(MODELS["fp32"]), providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(0)
        out = {}
        for i, n in enumerate(BATCHES):
            x = rng.random((n, 3, 16, 16), dtype=np.float32)
            out[i] = (x, sess.run(None, {"images": x})[0])
        return out

    def compare(self, engine: Path, precision: str, graphs: bool,
                reference: dict[int, tuple[np.ndarray, np.ndarray]]) -> None:
        import warnings

        from runtime.trt_backend import TrtBackend

        name = f"run {precision}{' +graphs' if graphs else ''}"
        worst = 0.0
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            backend = TrtBackend(engine, device=self.device, cuda_graphs=graphs)
            try:
                for i, _n in enumerate(BATCHES):
                    x, ref = reference[i]
                    got = backend.infer(x)["logits"]
                    worst = max(worst, float(np.abs(got - ref).max()) / max(1.0, float(np.abs(ref).max())))
                still_graphs = backend.cuda_graphs
            finally:
                backend.close()
        limit = TOLERANCE[precision]
        if worst > limit:
            self.add(name, "FAIL", f"batches {list(BATCHES)}: max |Δlogit| {worst:.3g} of the logit scale against "
                     f"ONNX Runtime FP32 (limit {limit:g})",
                     "wrong results from this TensorRT/GPU/driver combination: update TensorRT and the driver, "
                     "run without CUDA graphs (cuda_graphs=False), and report this output")
        elif graphs and not still_graphs:
            msg = "; ".join(str(w.message) for w in caught) or "capture failed"
            self.add(name, "FAIL", f"results match, but CUDA graph capture failed: {msg}",
                     "run with cuda_graphs=False (the default), and report this output")
        else:
            self.add(name, "PASS", f"batches {list(BATCHES)}: max |Δlogit| {worst:.2g} of the logit scale against "
                     f"ONNX Runtime FP32 (limit {limit:g})")

    def model_check(self) -> None:
        path = Path(self.model)
        if not path.exists():
            self.add("model", "FAIL", f"{path}: no such file", "pass the path of an .onnx model or .engine")
            return
        try:
            from runtime.check import self_check
        except ImportError:
            self.add("model", "SKIP", "this version has no artifact self-check (runtime.check)")
            return
        from runtime.errors import SelfCheckError

        try:
            report = self_check(str(path), backend="auto")
        except SelfCheckError as e:
            if getattr(e, "report", None) is None:  # the artifact carries no golden references
                self.add("model", "SKIP", str(e))
                return
            report = e.report
        except (OSError, ValueError, RuntimeError) as e:
            self.add("model", "FAIL", f"{path}: cannot be opened here: {e}",
                     "check the file, or rebuild it on this machine (python -m export.build_engine ...)")
            return
        text = report.render().strip()
        for line in text.splitlines():
            self.echo(f"{'':<4}  {'':<16} {line}")
        if report.ok:
            self.add("model", "PASS", f"{path}: self-check passed")
        else:
            self.add("model", "FAIL", f"{path}: self-check failed (see above)",
                     "rebuild the artifact on this machine (python -m export.build_engine ...), see the report")

    def summary(self) -> None:
        n = {s: sum(c.status == s for c in self.checks) for s in STATUS}
        counts = f"{n['PASS']} passed, {n['FAIL']} failed, {n['SKIP']} skipped"
        if self.failed:
            self.echo(f"RESULT: FAIL ({counts}); fix the FAIL lines above, then run python -m runtime.doctor again "
                      f"(exit {EXIT_FAIL})")
        elif not self.applicable:
            self.echo(f"RESULT: not applicable: no NVIDIA GPU and no TensorRT here, so nothing GPU-side to check "
                      f"({counts}; exit {EXIT_NOT_APPLICABLE})")
        else:
            self.echo(f"RESULT: PASS ({counts}; exit {EXIT_OK})")


class _Collect(logging.Handler):
    def __init__(self, into: list[str]) -> None:
        super().__init__(logging.WARNING)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        self.into.append(record.getMessage())


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m runtime.doctor",
        description="Is this machine's GPU stack ready for the classifier? Versions and whether they fit, pinned "
                    "memory, tiny FP16/INT8 engines built and run against ONNX Runtime, and an artifact's self-check.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"exit status: {EXIT_OK} every applicable check passed, {EXIT_FAIL} a check failed, "
               f"{EXIT_NOT_APPLICABLE} no NVIDIA GPU and no TensorRT here (nothing GPU-side to check)\n\n"
               "examples:\n  python -m runtime.doctor\n  python -m runtime.doctor --model models/sem.int8.engine\n")
    p.add_argument("--model", help="also run this artifact's self-check (.onnx or .engine)")
    p.add_argument("--device", type=int, default=0, help="CUDA device index (default 0)")
    args = p.parse_args(argv)
    return Doctor(args.device, args.model).run()


if __name__ == "__main__":
    sys.exit(main())
