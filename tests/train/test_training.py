"""End-to-end training runs on tiny synthetic data: artifacts, final metadata, and resume after a real SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from runtime.contract import CLASSES
from tests.conftest import write_class_images
from train.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from train.confidence import T_MAX, T_MIN
from train.loop import PAUSE_ENV, TrainConfig, augment_config, epoch_order, train

REPO = Path(__file__).resolve().parents[2]
TINY = dict(img_size=32, batch_size=4, threads=1, progress=False, patience=0)


#: A run that can learn the conftest stripes in seconds: 64 px (at 32 px Lite0's last feature maps are 1×1), no
#: flips/rotations (they would erase the stripe orientation that tells half the classes apart), no head-only epoch.
LEARNABLE = dict(img_size=64, batch_size=8, epochs=4, lr=1e-3, head_lr=3e-3, head_warmup_epochs=0, warmup_epochs=0.0,
                 augment="none", progress=False, patience=0, seed=0)
CHANCE = 1 / len(CLASSES)


@pytest.fixture(scope="module")
def learned_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """One training run on a learnable fixture (8 images per class and split), shared by the tests below."""
    root = tmp_path_factory.mktemp("learnable")
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 8), ("test", 2)):
        for idx, name in enumerate(CLASSES):
            write_class_images(root / "data" / split / name, idx, n, 32, rng)
    out = root / "run"
    # threads=0 (torch's default): the metadata must still say how many threads actually ran.
    summary = train(TrainConfig(data=str(root / "data"), out=str(out), threads=0, **LEARNABLE))
    return out, summary


def test_train_end_to_end_writes_calibrated_best_checkpoint(learned_run: tuple[Path, dict]) -> None:
    out, summary = learned_run
    for name in ("best.pt", "last.pt", "history.csv", "history.json", "curves.png", "summary.json",
                 "eval_val/metrics.json", "eval_test/metrics.json", "eval_test/confusion_matrix.png"):
        assert (out / name).is_file(), name
    ckpt = torch.load(out / "best.pt", map_location="cpu", weights_only=True)
    assert {"model", "arch", "metadata", "epoch", "optimizer", "scheduler", "rng", "history", "args"} <= set(ckpt)
    model, meta = model_from_checkpoint(out / "best.pt")
    assert not model.training
    assert meta.labels == CLASSES and meta.input_size == (64, 64) and meta.arch == "efficientnet_lite0"
    assert meta.mean == pytest.approx((127 / 255,) * 3) and meta.std == pytest.approx((128 / 255,) * 3)
    assert meta.threshold is not None and meta.score == "energy"
    assert len(meta.data_fingerprint) == 64
    assert meta.extra["train_args"]["epochs"] == 4 and "macro_f1" in meta.extra["val_metrics"]
    assert meta.extra["torch_threads"] == torch.get_num_threads() >= 1  # what ran, so a rerun can match it
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert all(0.0 <= h["data_frac"] < 1.0 and h["threads"] == torch.get_num_threads() for h in history)
    assert "test" in summary and summary["best_epoch"] == ckpt["epoch"]


def test_training_learns_and_calibrates_off_the_clamps(learned_run: tuple[Path, dict]) -> None:
    """A run that learned nothing (chance accuracy, temperature pinned at a bound) must not pass as a good one."""
    out, summary = learned_run
    history = json.loads((out / "history.json").read_text())
    train_loss = [h["train_loss"] for h in history]
    val_loss = [h["val_loss"] for h in history]
    assert train_loss[-1] < 0.8 * train_loss[0], train_loss
    assert min(val_loss[1:]) < 0.8 * val_loss[0], val_loss
    val_acc = summary["val"]["rejection_off"]["accuracy"]  # best.pt on val, arg-max
    assert val_acc >= 4 * CHANCE, (val_acc, [h["val_acc"] for h in history])
    cal = summary["calibration"]
    assert T_MIN * 1.01 < cal["temperature"] < T_MAX / 1.01, cal  # fitted, not pinned at a bound of the search
    assert cal["nll_after"] < cal["nll_before"], cal  # and it improved the fit (not the T = 1 fallback)
    _, meta = model_from_checkpoint(out / "best.pt")
    assert meta.temperature == pytest.approx(cal["temperature"])


def test_training_skips_bad_files_and_missing_classes(tmp_path: Path,
                                                      make_class_dataset: Callable[..., Path]) -> None:
    data = make_class_dataset(tmp_path / "data", per_class=2, size=32, splits=("train", "val"))
    (data / "train" / "clean" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    (data / "train" / "gaps" / "Thumbs.db").write_bytes(b"\0\1")
    for f in (data / "train" / "ler").iterdir():
        f.unlink()
    for name in CLASSES:  # an empty test split, as `train.synthetic --split 0.9,0.1,0` leaves it
        (data / "test" / name).mkdir(parents=True)
    out = tmp_path / "run"
    summary = train(TrainConfig(data=str(data), out=str(out), epochs=1, weights="none", **TINY))
    assert (out / "best.pt").is_file()
    assert "test" not in summary and "no usable images" in summary["test_skipped"]
    assert json.loads((out / "summary.json").read_text())["best_epoch"] == 1


def test_resume_refuses_a_file_that_is_not_a_checkpoint(tiny_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "last.pt").write_bytes(b"half a file")
    with pytest.raises(CheckpointError, match="last.pt"):
        train(TrainConfig(data=str(tiny_dataset), out=str(out), epochs=1, **TINY), resume=True)
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_checkpoint(out / "last.pt")


def test_epoch_order_is_a_function_of_seed_and_epoch() -> None:
    assert epoch_order(50, 3, 0) == epoch_order(50, 3, 0)
    assert epoch_order(50, 3, 0) != epoch_order(50, 4, 0)
    assert sorted(epoch_order(50, 3, 0)) == list(range(50))


def _cli(data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "train", "--data", str(data), "--out", str(out), "--epochs", "3",
            "--img-size", "32", "--batch-size", "4", "--weights", "none", "--threads", "1", "--patience", "0",
            "--no-progress", *extra]


@pytest.mark.slow
def test_resume_after_sigkill_mid_epoch_finishes_the_same_schedule(tmp_path: Path,
                                                                   make_class_dataset: Callable[..., Path]) -> None:
    data = make_class_dataset(tmp_path / "data", per_class=5, size=32, splits=("train", "val"))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}

    ref = tmp_path / "uninterrupted"
    subprocess.run(_cli(data, ref), cwd=REPO, env=env, check=True, capture_output=True, timeout=300)

    steps = json.loads((ref / "history.json").read_text())[0]["steps"]
    assert steps >= 4, steps  # room for a step strictly inside epoch 2

    run = tmp_path / "killed"
    flag = tmp_path / "paused"
    # The child stops right after optimizer step `steps + 2` (inside epoch 2) and waits there to be killed.
    paused_env = {**env, PAUSE_ENV: f"{steps + 2}:{flag}"}
    log = tmp_path / "killed.log"
    with log.open("w") as err:
        proc = subprocess.Popen(_cli(data, run), cwd=REPO, env=paused_env, stderr=err, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not flag.exists():
            assert proc.poll() is None, f"exited {proc.returncode} before the pause: {log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, "no pause within 240 s"
            time.sleep(0.05)
        assert flag.read_text().split() == ["2", str(steps + 2)]  # epoch 2, its second step
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL
    seen = log.read_text()
    assert "epoch 2/3 started" in seen and "epoch 2/3:" not in seen, seen[-2000:]
    # Killed mid-epoch 2: only epoch 1 was checkpointed.
    assert load_checkpoint(run / "last.pt")["epoch"] == 1

    done = subprocess.run(_cli(data, run, "--resume"), cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming" in done.stderr
    got = json.loads((run / "history.json").read_text())
    want = json.loads((ref / "history.json").read_text())
    assert [h["epoch"] for h in got] == [1, 2, 3]
    assert [h["order_digest"] for h in got] == [h["order_digest"] for h in want]
    assert load_checkpoint(run / "last.pt")["epoch"] == 3
    for g, w in zip(got, want):
        assert abs(g["train_loss"] - w["train_loss"]) < 1e-3 * max(1.0, w["train_loss"])
        assert abs(g["val_loss"] - w["val_loss"]) < 1e-3 * max(1.0, w["val_loss"])
    assert load_checkpoint(run / "best.pt")["metadata"]["threshold"] is not None


def test_anomaly_p_reaches_the_augmentation_and_is_range_checked() -> None:
    assert augment_config(TrainConfig(anomaly_p=0.3)).anomaly_p == 0.3
    assert augment_config(TrainConfig()).anomaly_p == 0.0
    with pytest.raises(ValueError, match="--anomaly-p"):
        augment_config(TrainConfig(anomaly_p=1.5))
    with pytest.raises(ValueError, match="--augment preset"):  # not a silent no-op
        augment_config(TrainConfig(anomaly_p=0.3, augment="none"))


def test_crop_scale_overrides_the_preset_so_a_border_defect_stays_in_the_crop() -> None:
    from train.data import augment_grey

    grey = np.full((64, 64), 100, np.uint8)
    grey[:8, :8] = 255  # a small bright "defect" in a corner

    def kept(cfg: TrainConfig) -> float:
        aug = augment_config(cfg)
        rng = np.random.default_rng(0)
        outs = [augment_grey(grey, (32, 32), aug, rng) for _ in range(200)]
        return float(np.mean([o.max() - np.median(o) > 0.1 for o in outs]))

    assert augment_config(TrainConfig(augment="default", crop_scale=(0.85, 1.0))).crop_scale == (0.85, 1.0)
    assert augment_config(TrainConfig(augment="light")).crop_scale == (0.8, 1.0)  # None keeps the preset's
    assert augment_config(TrainConfig(augment="none", crop_scale=(0.9, 1.0))) is None
    # Acquisition changes (dimming, low contrast) off: this is about where the crop falls, not about contrast.
    assert kept(TrainConfig(augment="default", crop_scale=(1.0, 1.0), acquisition_p=0.0)) == 1.0
    assert kept(TrainConfig(augment="default", acquisition_p=0.0)) < 0.9  # the preset's 0.6–1.0 crops lose it often
    with pytest.raises(ValueError, match="crop-scale"):
        augment_config(TrainConfig(crop_scale=(0.9, 0.5)))


def test_cli_groups_hold_every_option_once_and_parse_to_the_config() -> None:
    from dataclasses import fields

    from train.__main__ import build_parser, config_from_args

    ap = build_parser()
    grouped = [a.dest for g in ap._action_groups if g.title not in ("options", "positional arguments")
               for a in g._group_actions]
    assert sorted(grouped) == sorted({f.name for f in fields(TrainConfig)} | {"resume"})  # each flag in one group
    assert {g.title.split()[0] for g in ap._action_groups} >= {"data", "model", "optimisation", "regularisation",
                                                                "open-set", "device", "output"}
    argv = ["--data", "D", "--out", "O", "--arch", "efficientnet_b0", "--weights", "none", "--epochs", "5",
            "--img-size", "64", "--batch-size", "4", "--lr", "0.1", "--head-lr", "0.2", "--layer-decay", "0.9",
            "--weight-decay", "0.01", "--head-warmup-epochs", "0", "--warmup-epochs", "0.5", "--label-smoothing",
            "0", "--balance", "sampler", "--augment", "light", "--crop-scale", "0.8", "1", "--anomaly-p", "0.1",
            "--intensity", "bit_depth", "--acquisition-p", "0", "--content-free", "0", "--patience", "3",
            "--ema", "0.99", "--seed", "7", "--workers", "2", "--threads", "1", "--cache", "no", "--score", "knn",
            "--target-recall", "0.9", "--device", "cpu", "--no-progress", "--resume"]
    args = ap.parse_args(argv)
    assert args.resume
    assert config_from_args(args) == TrainConfig(
        data="D", out="O", arch="efficientnet_b0", weights="none", epochs=5, img_size=64, batch_size=4, lr=0.1,
        head_lr=0.2, layer_decay=0.9, weight_decay=0.01, head_warmup_epochs=0, warmup_epochs=0.5,
        label_smoothing=0.0, balance="sampler", augment="light", crop_scale=[0.8, 1.0], anomaly_p=0.1,
        intensity="bit_depth", acquisition_p=0.0, content_free=0.0, patience=3, ema=0.99, seed=7, workers=2,
        threads=1, cache=False, score="knn", target_recall=0.9, device="cpu", progress=False)
    assert config_from_args(ap.parse_args(["--data", "D", "--out", "O"])) == TrainConfig(data="D", out="O")
