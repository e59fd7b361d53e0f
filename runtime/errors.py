"""Exceptions the runtime raises, so station code can catch exactly what input can cause.

Everything caused by a bad image, frame or model file is a ``ValueError`` subclass (or an ``OSError`` for files
that are missing or unreadable), and every message names the input and what is wrong with it.
"""

from __future__ import annotations


class InputError(ValueError):
    """An image or frame that cannot be classified (empty, corrupt, NaN, absurd size, wrong type, ...)."""


class MetadataError(ValueError):
    """Model metadata that is missing, malformed, or does not match the model it travels with."""


class BackendUnavailable(RuntimeError):
    """A requested inference backend (e.g. TensorRT) is not installed or has no device here."""


class SelfCheckError(MetadataError):
    """An artifact that does not reproduce its stored golden references on this machine (or has none to check).

    ``artifact`` is the file, ``report`` the :class:`runtime.check.CheckReport` (``None`` when there was nothing to
    run), ``rebuild`` the command that rebuilds the artifact.
    """

    def __init__(self, message: str, artifact: str = "", report: object = None, rebuild: str = "") -> None:
        super().__init__(message)
        self.artifact = artifact
        self.report = report
        self.rebuild = rebuild
