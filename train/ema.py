"""Exponential moving average of a model's weights and BatchNorm statistics (``python -m train --ema DECAY``).

Why: on ~500 real images the val and test scores of one recipe swing by several points from epoch to epoch and seed
to seed. An average over the last few hundred optimizer steps is a cheap way to damp that (no extra data, one extra
copy of the weights). The training trajectory itself is unchanged: the optimizer keeps stepping the raw weights; the
average is what gets validated, selected and saved as ``best.pt``.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from train.checkpoint import cpu_state_dict


class WeightEMA:
    """After the ``n``-th optimizer step, ``avg`` is the bias-corrected exponential average of the weights seen so
    far: ``Σ_k decay^(n−k)·w_k / Σ_k decay^(n−k)``. Updated as ``avg ← d·avg + (1−d)·w`` with
    ``d = decay·(1−decay^(n−1)) / (1−decay^n)``: the first update takes the weights as they are (the starting weights
    get no share, unlike a plain EMA that starts from them), and ``d`` rises to ``decay`` within a few ``1/(1−decay)``
    steps, so ``decay`` means the same on a short run as on a long one. Integer buffers (BatchNorm's
    ``num_batches_tracked``) are copied, not averaged."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"--ema {decay}: the decay must be between 0 and 1 (e.g. 0.99), or 0 for no EMA")
        self.decay = float(decay)
        self.updates = 0
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    def current_decay(self) -> float:
        """The ``d`` of the next update (0 for the first)."""
        n = self.updates + 1
        return self.decay * (1.0 - self.decay ** (n - 1)) / (1.0 - self.decay ** n)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        self.updates += 1
        src = model.state_dict()
        for name, avg in self.model.state_dict().items():
            w = src[name].detach()
            if avg.dtype.is_floating_point:
                avg.lerp_(w.to(avg.dtype), 1.0 - d)
            else:
                avg.copy_(w)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates, "model": cpu_state_dict(self.model)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay = float(state["decay"])
        self.updates = int(state["updates"])
        self.model.load_state_dict(state["model"])
