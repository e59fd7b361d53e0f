"""train.engine (train_one_epoch, evaluate) and train.loop's set-up functions on tiny models, no images."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from train.engine import Evaluation, evaluate, macro_f1, train_one_epoch
from train.loop import TrainConfig, build_criterion, build_optimizer, build_scheduler, param_groups


class _Tiny(nn.Module):
    """Two-stage stand-in with the layout param_groups expects (``features`` stages, ``classifier``)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Sequential(nn.Linear(4, 8), nn.ReLU()), nn.Sequential(nn.Linear(8, 8)))
        self.classifier = nn.Sequential(nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _batches(n: int, bs: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 1).long()
    return [(x[i:i + bs], y[i:i + bs]) for i in range(0, n, bs)]


def _setup(cfg: TrainConfig, steps: int) -> tuple[nn.Module, nn.Module, torch.optim.Optimizer, object]:
    torch.manual_seed(0)
    model = _Tiny()
    crit = build_criterion(np.array([10, 5, 1]), cfg, "cpu")
    opt = build_optimizer(param_groups(model, cfg), cfg)
    return model, crit, opt, build_scheduler(opt, cfg, steps)


def test_train_one_epoch_counts_steps_calls_the_hook_and_learns() -> None:
    cfg = TrainConfig(epochs=3, lr=1e-2, head_lr=1e-2, head_warmup_epochs=0, warmup_epochs=0.5)
    data = _batches(40, 8)
    model, crit, opt, sched = _setup(cfg, len(data))
    seen_steps: list[int] = []
    first = train_one_epoch(model, crit, opt, sched, data, "cpu", memory_format=torch.contiguous_format,
                            after_step=seen_steps.append)
    assert (first.seen, first.steps) == (40, 5) and seen_steps == [1, 2, 3, 4, 5]
    assert 0 <= first.correct <= 40 and first.loss == pytest.approx(first.loss_sum / 40)
    assert math.isfinite(first.last_loss) and first.data_s >= 0 and first.step_s > 0
    for _ in range(2):
        last = train_one_epoch(model, crit, opt, sched, data, "cpu", memory_format=torch.contiguous_format)
    assert last.loss < first.loss
    assert sched.last_epoch == 15 and opt.param_groups[-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # cosine to 0


def test_clipping_is_what_the_clip_norm_argument_says() -> None:
    """No clipping and a huge limit give the same weights; a tiny limit changes them (the step is capped)."""
    cfg = TrainConfig(epochs=1, lr=1e-2, head_lr=1e-2, head_warmup_epochs=0, warmup_epochs=0.0)
    data = _batches(16, 8, seed=1)
    runs = {}
    for name, clip in (("off", None), ("huge", 1e9), ("tiny", 1e-4)):
        model, crit, opt, sched = _setup(cfg, len(data))
        train_one_epoch(model, crit, opt, sched, data, "cpu", clip_norm=clip, memory_format=torch.contiguous_format)
        runs[name] = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert torch.equal(runs["off"], runs["huge"])
    assert not torch.allclose(runs["off"], runs["tiny"])


def test_head_warmup_keeps_the_backbone_still_for_its_epochs() -> None:
    cfg = TrainConfig(epochs=2, head_warmup_epochs=1, warmup_epochs=1.0)
    data = _batches(16, 8)
    model, crit, opt, sched = _setup(cfg, len(data))
    before = [p.detach().clone() for p in model.features.parameters()]
    head_before = [p.detach().clone() for p in model.classifier.parameters()]
    train_one_epoch(model, crit, opt, sched, data, "cpu", memory_format=torch.contiguous_format)
    # AdamW's decoupled weight decay is scaled by the learning rate too, so a 0 rate leaves the weights exactly.
    assert all(torch.equal(a, b) for a, b in zip(before, model.features.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(head_before, model.classifier.parameters()))
    assert opt.param_groups[0]["lr"] > 0  # the backbone's warm-up has begun at the next epoch's first step


def test_build_criterion_weights_only_under_balance_loss() -> None:
    counts = np.array([6, 3, 0])
    weighted = build_criterion(counts, TrainConfig(balance="loss", label_smoothing=0.2), "cpu")
    assert weighted.weight.tolist() == pytest.approx([0.75, 1.5, 0.0]) and weighted.label_smoothing == 0.2
    assert build_criterion(counts, TrainConfig(balance="sampler"), "cpu").weight is None


def test_evaluate_metrics_and_gather() -> None:
    logits = np.array([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0], [0.0, 2.0]], np.float32)
    labels = np.array([0, 1, 1, 1])
    ev = Evaluation(logits, labels)
    assert ev.accuracy == 0.75 and ev.macro_f1 == pytest.approx(macro_f1(labels, logits.argmax(1)))
    want = float(nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels)))
    assert ev.loss == pytest.approx(want)

    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    loader = [(torch.randn(3, 1, 4, 4), torch.tensor([0, 1, 0]))]
    calls = []

    def gather(lg: np.ndarray, lb: np.ndarray) -> list[np.ndarray]:
        calls.append(len(lb))
        return [np.concatenate([lg, lg]), np.concatenate([lb, lb])]  # as if a second rank had the same rows

    ev = evaluate(model, loader, "cpu", gather)
    assert calls == [3] and ev.logits.shape == (6, 2) and ev.labels.tolist() == [0, 1, 0, 0, 1, 0]
    assert not model.training
