"""``python -m runtime.doctor``: here (no GPU, no TensorRT) it says so and exits "not applicable"; its GPU branches
run on the fake cuda-python and fake TensorRT of tests/fake_gpu.py (the real cuda_buffers, trt_build and TrtBackend
on top), including the failures it exists to catch."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from runtime import doctor
from runtime.trt_backend import TrtBackend

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fake_gpu import FakeCudart, _Config, cudaError_t, fake_tensorrt, install_cudart  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def run(argv: list[str] | None = None) -> tuple[int, str]:
    lines: list[str] = []
    d = doctor.Doctor(model=(argv or [None])[0], echo=lines.append)
    return d.run(), "\n".join(lines)


def status(out: str, name: str) -> str:
    return next(line.split()[0] for line in out.splitlines() if line[6:].startswith(name))


@pytest.fixture
def gpu(monkeypatch: pytest.MonkeyPatch):
    """A CUDA 12.6 driver, cuda-python 12.x, TensorRT 10.3 for CUDA 12 and an 'Orin' GPU, all fake."""
    cudart = install_cudart(monkeypatch, FakeCudart(driver=12060, runtime=12060))
    trt = fake_tensorrt("10.3.0.30", cudart)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr("runtime.cuda_buffers.cuda_python_version", lambda: "12.9.1")
    monkeypatch.setattr(doctor, "tensorrt_cuda_major", lambda trt: (12, "pip tensorrt-cu12 10.3.0"))
    monkeypatch.setattr(doctor, "nvidia_driver_text", lambda: "NVIDIA driver 560.35.03")
    return SimpleNamespace(cudart=cudart, trt=trt)


def test_here_it_says_there_is_no_gpu_and_exits_not_applicable(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    install_cudart(monkeypatch, FakeCudart(error=cudaError_t.cudaErrorInsufficientDriver, driver=0))
    monkeypatch.setattr(doctor, "nvidia_driver_text", lambda: "")
    code, out = run()
    assert code == doctor.EXIT_NOT_APPLICABLE == 3
    assert "no NVIDIA GPU or driver and no TensorRT on this machine" in out and "RESULT: not applicable" in out
    assert status(out, "python") == "PASS" and status(out, "onnxruntime") == "PASS"
    assert "FAIL" not in out


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None or Path("/proc/driver/nvidia/version").exists(),
                    reason="this machine has a GPU stack")
def test_the_real_command_on_this_machine(capsys):
    assert doctor.main([]) == doctor.EXIT_NOT_APPLICABLE
    assert "no NVIDIA GPU" in capsys.readouterr().out


def test_a_working_gpu_stack_passes_every_check(gpu):
    code, out = run()
    assert code == doctor.EXIT_OK, out
    for name in ("cuda-python", "driver", "cuda runtime", "gpu", "tensorrt", "pinned memory", "build fp16",
                 "build int8", "run fp16", "run fp16 +graphs", "run int8", "run int8 +graphs"):
        assert status(out, name) == "PASS", (name, out)
    assert "batches [1, 8, 3, 8, 1, 32, 5]" in out and "with the timing cache" in out
    assert "Orin, compute capability 8.7, 8 SMs" in out
    assert len(gpu.trt.build_log) == 4  # two precisions, twice each (timing cache)


def test_cuda_python_13_on_a_cuda_12_driver_fails_with_the_fix(monkeypatch):
    """What pip's unpinned resolution gave a JetPack 6 / CUDA 12 host: every CUDA call fails."""
    cudart = install_cudart(monkeypatch, FakeCudart(error=cudaError_t.cudaErrorInsufficientDriver, driver=12060,
                                                    runtime=13000))
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt("11.4.0.106", cudart))
    monkeypatch.setattr("runtime.cuda_buffers.cuda_python_version", lambda: "13.4.4")
    monkeypatch.setattr(doctor, "tensorrt_cuda_major", lambda trt: (13, "pip tensorrt-cu13 11.4.0.106"))
    code, out = run()
    assert code == doctor.EXIT_FAIL
    assert status(out, "cuda runtime") == "FAIL" and "cuda-python>=12.6,<13" in out
    assert status(out, "gpu") == "FAIL" and "cudaErrorInsufficientDriver" in out
    assert status(out, "tensorrt") == "FAIL" and "built for CUDA 13, the driver supports CUDA 12.6" in out
    assert status(out, "engines") == "SKIP"


def test_mismatched_tensorrt_and_cuda_python_fail(gpu, monkeypatch):
    monkeypatch.setattr("runtime.cuda_buffers.cuda_python_version", lambda: "13.4.4")
    code, out = run()
    assert code == doctor.EXIT_FAIL and status(out, "tensorrt") == "FAIL"
    assert "cuda-python 13.4.4 for CUDA 13" in out


def test_graphs_replayed_with_a_stale_shape_are_caught(gpu, monkeypatch):
    """The doctor catches finding #2: emulate the old backend (all graphs captured on one context)."""
    def one_context(self):
        if getattr(self, "_context", None) is not None:
            return self._context
        return orig(self)

    orig = TrtBackend._new_context
    monkeypatch.setattr(TrtBackend, "_new_context", one_context)
    code, out = run()
    assert code == doctor.EXIT_FAIL
    assert status(out, "run fp16") == "PASS" and status(out, "run fp16 +graphs") == "FAIL"
    assert "max |Δlogit|" in out and "cuda_graphs=False" in out


def test_a_refused_timing_cache_fails_the_build_check(gpu, monkeypatch):
    real = _Config.set_timing_cache
    monkeypatch.setattr(_Config, "set_timing_cache", lambda self, c, ignore: not c.entries and real(self, c, ignore))
    code, out = run()
    assert code == doctor.EXIT_FAIL and status(out, "build fp16") == "FAIL"
    assert "timing cache" in out and "refused" in out


def test_model_self_check_is_reported(gpu, monkeypatch, tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes(b"x")
    report = SimpleNamespace(ok=False, render=lambda: "logits off by 0.4 of the scale")
    monkeypatch.setattr("runtime.check.self_check", lambda path, backend="auto", **kw: report)
    code, out = run([str(model)])
    assert code == doctor.EXIT_FAIL and status(out, "model") == "FAIL" and "logits off by 0.4" in out
    report.ok = True
    code, out = run([str(model)])
    assert code == doctor.EXIT_OK and status(out, "model") == "PASS"
    monkeypatch.setitem(sys.modules, "runtime.check", None)  # a runtime without the self-check module
    code, out = run([str(model)])
    assert code == doctor.EXIT_OK and status(out, "model") == "SKIP"


def test_bundled_models_are_what_the_tool_makes(tmp_path):
    spec = importlib.util.spec_from_file_location("make_doctor_models", REPO / "tools" / "make_doctor_models.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    made = tool.build(tmp_path)
    for key, path in made.items():
        assert path.read_bytes() == doctor.MODELS[key].read_bytes(), f"{doctor.MODELS[key]} is stale: regenerate it"
    import onnx

    sys.path.insert(0, str(REPO / "tests" / "export"))
    from test_tensorrt_build_fp16 import assert_fp16_outside_qdq

    assert_fp16_outside_qdq(onnx.load(str(doctor.MODELS["int8"])))
    assert all(p.stat().st_size < 8192 for p in doctor.MODELS.values())
