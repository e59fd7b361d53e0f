"""The runtime imports without torch, onnx, TensorRT or cuda-python: stations install numpy, OpenCV and ORT only."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

PROBE = r"""
import sys
from importlib.abc import MetaPathFinder

BLOCKED = ("torch", "torchvision", "onnx", "tensorrt", "cuda", "pycuda")


class Block(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"blocked import of {name}")
        return None


sys.meta_path.insert(0, Block())
import runtime
import runtime.classifier, runtime.run, runtime.sources, runtime.outputs, runtime.ort_backend
import runtime.trt_backend, runtime.cuda_buffers
from runtime import Classifier, Prediction, infer_image
loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
print("LOADED", loaded)
assert not loaded, loaded
"""


def test_runtime_imports_without_torch_onnx_tensorrt_or_cuda():
    r = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr + r.stdout
    assert "LOADED []" in r.stdout


def test_import_runtime_does_not_load_onnxruntime():
    code = "import sys, runtime; print('onnxruntime' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "False", r.stderr
