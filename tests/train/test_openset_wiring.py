"""A feature-space score chosen at training time travels into the checkpoint, the ONNX graph and the Classifier."""

from __future__ import annotations

import glob
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.contract import ModelMetadata
from train.checkpoint import load_checkpoint
from train.openset import CHECKPOINT_KEY


@pytest.mark.slow
def test_train_with_vim_exports_a_score_output_the_classifier_uses(tmp_path: Path) -> None:
    data, run, onnx_path = tmp_path / "data", tmp_path / "run", tmp_path / "m.onnx"
    py = [sys.executable, "-m"]
    subprocess.run(py + ["train.synthetic", "--out", str(data), "--per-class", "10", "--size", "64", "--seed", "5",
                         "--quiet"], check=True)
    subprocess.run(py + ["train", "--data", str(data), "--out", str(run), "--img-size", "64", "--epochs", "1",
                         "--batch-size", "16", "--score", "vim", "--no-progress", "--threads", "1"], check=True)
    ckpt = load_checkpoint(run / "best.pt")
    meta = ModelMetadata.from_dict(ckpt["metadata"])
    assert meta.score == "vim" and meta.score_output == "score" and meta.threshold is not None
    assert CHECKPOINT_KEY in ckpt  # statistics fitted on the training split, stored with the model
    subprocess.run(py + ["export", "--checkpoint", str(run / "best.pt"), "--out", str(onnx_path), "--parity-data",
                         str(data / "val")], check=True)

    from runtime import Classifier

    clf = Classifier(onnx_path)
    assert clf.meta.score_output == "score"
    paths = sorted(glob.glob(str(data / "test" / "*" / "*.png")))
    preds = clf.predict_batch(paths)
    raw = clf.infer(clf.backend.input_buffer(1))
    assert "score" in raw  # the graph carries the score
    for p in preds:
        assert p.rejected == (not p.score >= clf.meta.threshold)
    # Raising the threshold above every score rejects everything, as documented.
    strict = Classifier(onnx_path, threshold=max(p.score for p in preds) + 1.0).predict_batch(paths)
    assert all(p.rejected and p.label == "other" for p in strict)
