"""INT8 calibration: choose the calibration images, compute activation ranges on the CPU, write Q/DQ ONNX.

Two consumers, two files (see :mod:`calibration.quantize`):

* **TensorRT** (``*.int8.qdq.onnx``): symmetric signed INT8 activations, per-channel symmetric weights, Q/DQ
  placed where TensorRT fuses them (every Conv/Gemm input and weight, the skip input of residual Adds, global
  average pooling, the squeeze-excitation multiply) — NVIDIA's EfficientNet placement, the same one NVIDIA
  ModelOpt writes. Precision comes from the file; the engine is strongly typed (TensorRT 10.x and 11.x).
* **CPU / ONNX Runtime** (``*.int8.cpu.onnx``): unsigned asymmetric activations and signed per-channel weights
  (U8S8, the form ONNX Runtime's VNNI kernels run; signed activations left convs unfused and ran slower than
  FP32), every supported op quantised so activations stay INT8 between convs.

Selection (:mod:`calibration.select`) is stratified per class and deterministic; batches are preprocessed with
:class:`runtime.preprocess.Preprocessor` from the model's own metadata, so calibration sees exactly what inference
sees. Run alone with ``python -m calibration --onnx m.onnx --data DIR --out DIR``.
"""

from __future__ import annotations

from calibration.select import CalibrationSet, calibration_batches, load_calibration_array, select_calibration_set

__all__ = ["CalibrationSet", "calibration_batches", "load_calibration_array", "select_calibration_set"]
