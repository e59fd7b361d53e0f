"""``Backend``: the one interface between :class:`~runtime.classifier.Classifier` and whatever runs the network.

A backend owns one loaded model (ONNX Runtime session, TensorRT engine, a network served by Triton) and nothing of the
product's rules: preprocessing, the frame-quality gate, temperature and rejection stay in the classifier, so every
backend gives the same answers for the same float batch. The classifier stages each batch straight into the
backend's own input buffer (pinned memory for TensorRT), so the hot path allocates nothing per frame.

The backends: :class:`runtime.ort_backend.OrtBackend`, :class:`runtime.trt_backend.TrtBackend` and
:class:`runtime.triton_backend.TritonBackend` (a bare model on a Triton server, used by :mod:`runtime.remote`);
:func:`runtime.classifier.open_backend` picks one for a model file. A new backend is a file of its own with a class
that satisfies :class:`Backend` (``tests/runtime/test_backend_protocol.py`` checks each one), opened by
``open_backend``.
"""

from __future__ import annotations

from typing import Protocol, Self, runtime_checkable

import numpy as np

from runtime.contract import ModelMetadata


@runtime_checkable
class Backend(Protocol):
    """What the classifier, the on-target self-check and the benchmarks call on a loaded model.

    Attributes:
        meta: the model's contract (labels, input size, preprocessing, output names, temperature, rejection), read
            from the artifact itself and checked against the network's inputs and outputs when it is opened.
        max_batch: the largest batch the caller should stage in :meth:`input_buffer` at once (an engine profile's
            maximum, a fixed batch dimension, a server's ``max_batch_size``); ``None`` when any size runs.
    """

    meta: ModelMetadata
    max_batch: int | None

    def input_buffer(self, n: int) -> np.ndarray:
        """A writable float32 ``(n, C, H, W)`` array, reused across calls, for the caller to preprocess into;
        passing it (or its first rows) to :meth:`infer` saves a copy. ``n`` is at most :attr:`max_batch`."""
        ...

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """The network's raw outputs ``{output name: (N, ...) array}`` for a float32 ``(N, C, H, W)`` batch."""
        ...

    def describe(self) -> str:
        """One line for logs and reports: what runs the model, on which device, with which options."""
        ...

    def close(self) -> None:
        """Free the session, engine, buffers or connection; closing twice is harmless."""
        ...

    def __enter__(self) -> Self:
        ...

    def __exit__(self, *exc: object) -> None:
        ...


class ClosingContext:
    """``with backend: ...`` closes it on the way out: the context-manager half of :class:`Backend`, for backends to
    inherit. It defines no ``close`` of its own, so a backend without one still fails the protocol check."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()  # type: ignore[attr-defined]
