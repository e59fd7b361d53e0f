"""Inference runtime for SEM defect classification: what inspection-station code imports.

Depends on numpy, OpenCV and ONNX Runtime only (TensorRT and cuda-python optional); never on torch.
"""

from __future__ import annotations

from runtime.contract import CLASSES, REJECT_LABEL, ModelMetadata, __version__
from runtime.errors import BackendUnavailable, InputError, MetadataError
from runtime.preprocess import Preprocessor, load_grey, preprocess, read_image

__all__ = [
    "CLASSES", "REJECT_LABEL", "ModelMetadata", "__version__", "BackendUnavailable", "InputError", "MetadataError",
    "Preprocessor", "load_grey", "preprocess", "read_image",
]
