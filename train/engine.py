"""One epoch of training and one pass of validation, shared by ``python -m train`` and ``benchmarks.openset``.

Shaped like torchvision's classification reference (``train_one_epoch``, ``evaluate``): the caller builds the model,
loss, optimizer and scheduler (:mod:`train.loop`); these functions only step through batches, so the resumable run,
the data-parallel run and the benchmark's folds on cached activations train with the same code.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from train.evaluate import predict_logits


@dataclass
class EpochStats:
    """What one epoch of :func:`train_one_epoch` saw: loss and correct predictions summed over images, and where
    the time went (waiting for data vs stepping the model)."""

    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    steps: int = 0
    data_s: float = 0.0
    step_s: float = 0.0
    last_loss: float = float("nan")  # the last batch's mean loss

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.seen, 1)

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.seen, 1)


def train_one_epoch(model: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                    batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: str, *,
                    scaler: torch.amp.GradScaler | None = None, clip_norm: float | None = 5.0,
                    memory_format: torch.memory_format = torch.channels_last,
                    after_step: Callable[[int], None] | None = None, desc: str = "",
                    progress: bool = False) -> EpochStats:
    """Train ``model`` (the module to call: a DDP wrapper under torchrun) on ``batches`` of (images, labels).

    Per batch: forward (autocast on CUDA), loss, backward through ``scaler`` (AMP; None = plain), gradient-norm
    clipping at ``clip_norm`` (None = off), an optimizer step and a scheduler step (per-step schedules).
    ``after_step(step)`` runs after each step with the scheduler's step count (weight averaging, test hooks)."""
    use_amp = device.startswith("cuda")
    if scaler is None:
        scaler = torch.amp.GradScaler("cuda", enabled=False)
    model.train()
    stats = EpochStats()
    bar = tqdm(batches, desc=desc, leave=False, disable=not progress, dynamic_ncols=True)
    t0 = time.perf_counter()
    for x, y in bar:
        t1 = time.perf_counter()
        stats.data_s += t1 - t0
        x = x.to(device, non_blocking=True).contiguous(memory_format=memory_format)
        y = y.to(device, non_blocking=True)
        with torch.autocast("cuda", enabled=use_amp):
            logits = model(x)
            loss = criterion(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if clip_norm is not None:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        if after_step is not None:
            after_step(scheduler.last_epoch)
        stats.last_loss = float(loss.detach())
        stats.loss_sum += stats.last_loss * len(y)
        stats.correct += int((logits.argmax(1) == y).sum())
        stats.seen += len(y)
        stats.steps += 1
        t0 = time.perf_counter()
        stats.step_s += t0 - t1
        bar.set_postfix(loss=f"{stats.loss:.3f}")
    bar.close()
    return stats


def macro_f1(labels: np.ndarray, pred: np.ndarray) -> float:
    """Macro-F1 over the classes present in ``labels`` (the model-selection metric)."""
    from sklearn.metrics import f1_score

    return float(f1_score(labels, pred, labels=np.unique(labels), average="macro", zero_division=0))


@dataclass
class Evaluation:
    """A model's logits on a validation set, in dataset order, and the metrics the run selects and logs by."""

    logits: np.ndarray
    labels: np.ndarray

    @property
    def loss(self) -> float:
        return float(nn.functional.cross_entropy(torch.from_numpy(self.logits), torch.from_numpy(self.labels)))

    @property
    def accuracy(self) -> float:
        return float((self.logits.argmax(1) == self.labels).mean())

    @property
    def macro_f1(self) -> float:
        return macro_f1(self.labels, self.logits.argmax(1))


def evaluate(model: nn.Module, loader: Iterable[Any], device: str,
             gather: Callable[..., list[np.ndarray]] | None = None) -> Evaluation:
    """Logits of ``model`` (eval mode) over ``loader``; ``gather(logits, labels)`` reassembles the rows of every
    rank under torchrun (:meth:`train.distributed.DistContext.gather_rows`), so all ranks see the same metrics."""
    logits, labels = predict_logits(model, loader, device)
    if gather is not None:
        logits, labels = gather(logits, labels)
    return Evaluation(logits, labels)
