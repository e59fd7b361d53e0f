"""Inference runtime for SEM defect classification: what inspection-station code imports.

Depends on numpy, OpenCV and ONNX Runtime only (TensorRT and cuda-python optional); never on torch.
``Classifier``, ``Prediction`` and ``infer_image`` load lazily, so ``import runtime`` (done by training and export
code for the contract and preprocessing) does not pay for importing ONNX Runtime.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from runtime.contract import CLASSES, REJECT_LABEL, ModelMetadata, __version__
from runtime.errors import BackendUnavailable, InputError, MetadataError
from runtime.preprocess import Preprocessor, load_grey, preprocess, read_image

if TYPE_CHECKING:
    from runtime.classifier import Classifier, Prediction, infer_image

_LAZY = {"Classifier": "runtime.classifier", "Prediction": "runtime.classifier", "infer_image": "runtime.classifier"}

__all__ = [
    "CLASSES", "REJECT_LABEL", "ModelMetadata", "__version__", "BackendUnavailable", "InputError", "MetadataError",
    "Preprocessor", "load_grey", "preprocess", "read_image", "Classifier", "Prediction", "infer_image",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'runtime' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
