"""``--ema``: the weight average is computed as documented, is what best.pt holds, and survives a resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import train.loop as loop
from train.checkpoint import load_checkpoint
from train.ema import WeightEMA
from train.loop import TrainConfig, train

TINY = dict(img_size=32, batch_size=4, threads=1, progress=False, patience=0, weights="none")


def _fill(model: nn.Module, value: float) -> None:
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.dtype.is_floating_point:
                t.fill_(value)


def test_weight_ema_is_the_bias_corrected_exponential_average() -> None:
    model = nn.Sequential(nn.Linear(2, 1), nn.BatchNorm1d(1))
    _fill(model, 100.0)  # the starting weights must get no share
    ema = WeightEMA(model, decay=0.5)
    seen = [1.0, 2.0, 4.0]
    for step, value in enumerate(seen):
        _fill(model, value)
        model[1].num_batches_tracked.fill_(7 + step)
        ema.update(model)
    w = np.array([0.5 ** 2, 0.5, 1.0])  # decay^(n-k)
    want = float((w * seen).sum() / w.sum())
    avg = ema.model.state_dict()
    for name in ("0.weight", "0.bias", "1.weight", "1.running_mean", "1.running_var"):
        assert torch.allclose(avg[name], torch.full_like(avg[name], want)), name
    assert int(avg["1.num_batches_tracked"]) == 9  # integer buffers are copied, not averaged
    assert ema.updates == 3 and not any(p.requires_grad for p in ema.model.parameters())
    assert all(p.requires_grad for p in model.parameters())  # the trained model is left alone
    for _ in range(40):
        ema.update(model)
    assert ema.current_decay() == pytest.approx(0.5)  # the correction fades: d reaches the decay asked for
    restored = WeightEMA(nn.Sequential(nn.Linear(2, 1), nn.BatchNorm1d(1)), decay=0.9)
    restored.load_state_dict(ema.state_dict())
    assert restored.updates == 43 and restored.decay == 0.5
    assert torch.equal(restored.model[0].weight, ema.model[0].weight)


@pytest.mark.parametrize("decay", [1.0, -0.1, 1.5])
def test_weight_ema_rejects_a_decay_outside_0_1(decay: float) -> None:
    with pytest.raises(ValueError, match="--ema"):
        WeightEMA(nn.Linear(2, 1), decay)


def test_ema_run_saves_the_average_as_best_and_logs_the_raw_score(tiny_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    # No content-free frames: with them, finalise re-estimates best.pt's BatchNorm statistics after selection.
    train(TrainConfig(data=str(tiny_dataset), out=str(out), epochs=1, ema=0.9, content_free=0.0, **TINY))
    best, last = load_checkpoint(out / "best.pt"), load_checkpoint(out / "last.pt")
    assert last["ema"]["updates"] == last["history"][0]["steps"] > 0
    for name, w in best["model"].items():
        assert torch.equal(w, last["ema"]["model"][name]), name
    differs = [n for n, w in best["model"].items() if w.is_floating_point() and not torch.equal(w, last["model"][n])]
    assert differs, "best.pt must hold the averaged weights, not the raw ones"
    history = json.loads((out / "history.json").read_text())
    assert 0.0 <= history[0]["val_macro_f1_raw"] <= 1.0


def test_ema_state_survives_an_interrupted_run(tiny_dataset: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = dict(data=str(tiny_dataset), epochs=2, ema=0.9, head_warmup_epochs=0, **TINY)
    train(TrainConfig(out=str(tmp_path / "ref"), **cfg))
    want = load_checkpoint(tmp_path / "ref" / "last.pt")["ema"]

    real_order = loop.epoch_order

    def stop_in_epoch_2(n: int, epoch: int, seed: int, weights: object = None) -> list[int]:
        if epoch == 1:
            raise KeyboardInterrupt("stopped before epoch 2")
        return real_order(n, epoch, seed, weights)

    run = tmp_path / "run"
    monkeypatch.setattr(loop, "epoch_order", stop_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(out=str(run), **cfg))
    assert load_checkpoint(run / "last.pt")["epoch"] == 1
    monkeypatch.setattr(loop, "epoch_order", real_order)
    train(TrainConfig(out=str(run), **cfg), resume=True)
    got = load_checkpoint(run / "last.pt")["ema"]
    assert got["updates"] == want["updates"]
    for name, w in want["model"].items():
        if w.is_floating_point():
            assert torch.allclose(got["model"][name], w, atol=1e-4, rtol=1e-3), name
