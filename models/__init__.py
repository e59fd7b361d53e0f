"""The bundled default model (installed as ``runtime.models``): ONNX FP32 and CPU INT8, with their model card."""
