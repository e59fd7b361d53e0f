"""The Triton backend: a bare network (stock Triton model) answers ``infer``; everything else stays local.

Used by :mod:`runtime.remote` when the server's model is a plain network rather than a ``runtime.serve`` classifier;
the connection and retries belong to its :class:`~runtime.remote.RemoteClassifier`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from runtime.backend import ClosingContext


class TritonBackend(ClosingContext):
    """A :class:`~runtime.backend.Backend` answered by a bare network on the server: each ``infer`` is one float32
    request; the connection belongs to the :class:`~runtime.remote.RemoteClassifier`, which closes it."""

    def __init__(self, remote: Any, layout: dict[str, Any]) -> None:
        self.remote, self.meta = remote, remote.meta
        self.input_name, self.output_names = layout["input"], layout["outputs"]
        self.batched = layout["batched"]
        self.max_batch = remote.max_batch if self.batched else 1
        self._buf = np.empty((0, remote.meta.channels, *remote.meta.input_size), np.float32)

    def input_buffer(self, n: int) -> np.ndarray:
        if len(self._buf) < n:
            self._buf = np.empty((n, *self._buf.shape[1:]), np.float32)
        return self._buf[:n]

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        g, n = self.remote._grpc, len(batch)
        data = np.ascontiguousarray(batch, np.float32)
        if not self.batched and n > 1:  # max_batch_size 0: the dims carry a batch dimension of 1
            parts = [self.infer(data[i:i + 1]) for i in range(n)]
            return {k: np.concatenate([p[k] for p in parts]) for k in self.output_names}
        image = g.InferInput(self.input_name, list(data.shape), "FP32")
        image.set_data_from_numpy(data)
        result = self.remote._request([image], self.output_names, n)
        return {name: result.as_numpy(name) for name in self.output_names}

    def describe(self) -> str:
        return f"Triton at {self.remote.address} (bare model {self.remote.model_name!r})"

    def close(self) -> None:
        pass
