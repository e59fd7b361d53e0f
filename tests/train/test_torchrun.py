"""``torchrun --nproc-per-node 2 -m train``: two processes with gloo on CPU train a tiny synthetic set, a rank killed
mid-epoch makes torchrun restart the group, which resumes from ``last.pt``; only rank 0 writes; the final model has
the single-process checkpoint layout, exports to ONNX and evaluates the same as its checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from runtime.contract import CLASSES
from train.checkpoint import load_checkpoint
from train.distributed import DistContext
from train.loop import PAUSE_ENV
from train.models import build_model

REPO = Path(__file__).resolve().parents[2]


def test_shards_cover_the_epoch_and_change_with_it() -> None:
    order = list(range(11))
    shards = [DistContext(rank=r, world=2).shard(order, 3, seed=0, shuffle=True) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 6  # padded like DistributedSampler: equal steps on every rank
    assert set(shards[0]) | set(shards[1]) == set(order)
    assert DistContext(rank=0, world=2).shard(order, 4, seed=0, shuffle=True) != shards[0]  # reseeded per epoch
    weighted = [5, 5, 1, 7, 2]  # a class-balanced draw, identical on every rank, is split, not reshuffled
    assert DistContext(rank=1, world=2).shard(weighted, 0, seed=0, shuffle=False) == [5, 7, 5]
    assert DistContext().shard(order, 3, seed=0, shuffle=True) == order  # one process: unchanged


@pytest.mark.slow
def test_torchrun_two_ranks_train_resume_after_a_rank_is_killed_and_export(
        tmp_path: Path, make_class_dataset: Callable[..., Path]) -> None:
    data = make_class_dataset(tmp_path / "data", per_class=4, size=32, splits=("train", "val"))
    out = tmp_path / "run"
    flag = tmp_path / "paused"
    steps = 4  # 32 images + 2 content-free → 17 per rank → 4 batches of 4 (the trailing 1 is dropped)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--max-restarts", "1", "-m", "train", "--data", str(data), "--out", str(out), "--epochs", "2",
           "--img-size", "32", "--batch-size", "4", "--weights", "none", "--threads", "1", "--patience", "0",
           "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", PAUSE_ENV: f"{steps + 2}:{flag}"}
    log = tmp_path / "torchrun.log"
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        pid_file = flag.with_name(flag.name + ".pid")
        while not (flag.exists() and pid_file.exists()):
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no pause within 240 s"
            time.sleep(0.1)
        assert flag.read_text().split() == ["2", str(steps + 2)]  # epoch 2, its second step
        assert load_checkpoint(out / "last.pt")["epoch"] == 1
        os.kill(int(pid_file.read_text()), signal.SIGKILL)  # the last rank only; torchrun restarts the group
        rc = proc.wait(timeout=240)
    finally:
        proc.kill()
    text = log.read_text()
    assert rc == 0, text[-4000:]
    train_log = (out / "train.log").read_text()
    assert "DDP: 2 processes (gloo" in train_log and "effective batch 8 (4 per process)" in train_log
    assert "torchrun restart 1: resuming" in train_log and "resuming" in train_log
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2] and all(h["steps"] == steps for h in history)
    assert train_log.count("epoch 1/2:") == 1  # rank 0 alone logs; epoch 1 not redone after the restart

    best = load_checkpoint(out / "best.pt")
    # The single-process layout (no DDP "module." prefix) and the final calibration from rank 0.
    assert set(best["model"]) == set(build_model(best["arch"], len(CLASSES), "none").state_dict())
    assert best["metadata"]["temperature"] > 0 and best["metadata"]["threshold"] is not None
    assert json.loads((out / "summary.json").read_text())["epochs_run"] == 2

    from export.__main__ import main as export_main
    from train.evaluate import main as evaluate_main

    torch.set_num_threads(1)
    onnx_path = tmp_path / "ddp.onnx"
    assert export_main(["--checkpoint", str(out / "best.pt"), "--out", str(onnx_path), "--no-simplify"]) == 0
    for name, model in (("pt", out / "best.pt"), ("onnx", onnx_path)):
        assert evaluate_main(["--model", str(model), "--data", str(data / "val"), "--out", str(tmp_path / name)]) == 0
    pt, ox = (json.loads((tmp_path / n / "metrics.json").read_text()) for n in ("pt", "onnx"))
    assert ox["macro_f1"] == pytest.approx(pt["macro_f1"], abs=0.05)
    assert ox["accuracy"] == pytest.approx(pt["accuracy"], abs=0.05)
