"""Training checkpoints: written atomically, read back with ``torch.load(weights_only=True)``.

A checkpoint is a plain dict holding only tensors, containers, numbers and strings (so the safe loader accepts it):
``model`` (state_dict), ``arch``, ``metadata`` (:meth:`ModelMetadata.to_dict`), and for resuming ``epoch``,
``optimizer``, ``scheduler``, ``rng``, ``history``, ``args``. Writes go through a memory buffer and
:func:`runtime.files.atomic_write_bytes`, so a kill at any moment leaves the previous file intact.
"""

from __future__ import annotations

import io
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from runtime.contract import ModelMetadata
from runtime.errors import MetadataError
from runtime.files import atomic_write_bytes


class CheckpointError(ValueError):
    """A file that is not (or no longer) a checkpoint written by this project."""


def cpu_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s weights and buffers as detached, contiguous CPU tensors, ready for ``torch.save``."""
    # contiguous(): channels_last strides are a training detail; consumers get the standard layout.
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def save_checkpoint(path: str | os.PathLike[str], model: nn.Module, meta: ModelMetadata, **state: Any) -> Path:
    """Write ``model``'s weights, ``meta`` and any extra resume ``state`` (epoch, optimizer, ...) atomically."""
    ckpt: dict[str, Any] = {"model": cpu_state_dict(model), "arch": meta.arch, "metadata": meta.to_dict()}
    ckpt.update(state)
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    return atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``); errors name the file and say what is wrong."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(2, "no such checkpoint", str(p))
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - every unpickling failure means the same thing to the user
        raise CheckpointError(f"{p}: not a checkpoint of this project (cannot be loaded safely: "
                              f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(ckpt, dict) or not {"model", "arch", "metadata"} <= set(ckpt):
        have = sorted(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{p}: not a checkpoint of this project (expected keys 'model', 'arch', 'metadata'; "
                              f"found {have})")
    return ckpt


def metadata_from_checkpoint(ckpt: dict[str, Any], source: str) -> ModelMetadata:
    try:
        return ModelMetadata.from_dict(ckpt["metadata"], source)
    except MetadataError as e:
        raise CheckpointError(str(e)) from None


def model_from_checkpoint(path: str | os.PathLike[str]) -> tuple[nn.Module, ModelMetadata]:
    """Rebuild the network stored in ``path`` → (model in eval mode on CPU, its metadata)."""
    from train.models import build_model  # local: keeps this module light for callers that only read metadata

    ckpt = load_checkpoint(path)
    meta = metadata_from_checkpoint(ckpt, str(path))
    model = build_model(ckpt["arch"], num_classes=meta.num_classes, weights="none")
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit a {ckpt['arch']} with {meta.num_classes} classes: "
                              f"{str(e).splitlines()[0]}") from None
    return model.eval(), meta


# ------------------------------------------------------------------ RNG state (safe-loadable form)
def get_rng_state() -> dict[str, Any]:
    """Every RNG that training touches, as tensors/lists/ints so ``weights_only`` loading accepts it."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "python": [int(py_state[0]), list(py_state[1]), py_state[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = [s for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    p = state["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
