"""Evaluation: metrics against scikit-learn on constructed predictions, and the CLI's files for a checkpoint."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score

from runtime.contract import CLASSES, ModelMetadata
from runtime.preprocess import Preprocessor
from runtime.scores import msp
from train.checkpoint import save_checkpoint
from train.evaluate import compute_metrics, expected_calibration_error, main
from train.models import build_model

OTHER = CLASSES.index("other")


def _onehot_probs(pred: np.ndarray, conf: float = 0.9) -> np.ndarray:
    p = np.full((len(pred), 8), (1 - conf) / 7)
    p[np.arange(len(pred)), pred] = conf
    return p


def test_compute_metrics_rejection_on_and_off() -> None:
    labels = np.array([0, 0, 1, 1, 2, 2, 7, 7])
    pred = np.array([0, 1, 1, 1, 2, 0, 7, 0])
    rejected = np.array([False, True, False, False, False, False, False, True])
    m = compute_metrics(labels, _onehot_probs(pred), rejected, CLASSES)
    final = np.where(rejected, OTHER, pred)
    present = np.unique(labels)
    assert m["rejection_off"]["macro_f1"] == pytest.approx(f1_score(labels, pred, labels=present, average="macro"))
    assert m["macro_f1"] == pytest.approx(f1_score(labels, final, labels=present, average="macro"))
    assert m["accuracy"] == pytest.approx((final == labels).mean())
    assert m["rejection_off"]["accuracy"] == pytest.approx((pred == labels).mean())
    assert m["rejection_on"]["coverage"] == pytest.approx(6 / 8) and m["rejection_on"]["rejected"] == 2
    assert m["rejection_on"]["selective_accuracy"] == pytest.approx(5 / 6)
    assert np.array_equal(np.array(m["confusion_matrix"]).sum(1)[[0, 1, 2, 7]], [2, 2, 2, 2])
    assert m["confusion_matrix"][7][7] == 2  # the rejected 'other' image counts as correct
    for key in ("macro_precision", "macro_recall", "weighted_precision", "weighted_recall", "weighted_f1", "ece",
                "nll", "reliability"):
        assert key in m
    assert set(CLASSES) <= set(m["per_class"])


def test_compute_metrics_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="probs"):
        compute_metrics([0, 1], np.zeros((3, 8)), [False, False], CLASSES)


def test_ece_on_constructed_confidences() -> None:
    ece, _ = expected_calibration_error(np.ones(10), np.ones(10))
    assert ece == pytest.approx(0.0)
    ece, _ = expected_calibration_error(np.full(10, 0.95), np.r_[np.ones(5), np.zeros(5)])
    assert ece == pytest.approx(0.45)


def _checkpoint(tmp_path: Path) -> Path:
    model = build_model("efficientnet_lite0", weights="lite0")  # real features, so logits spread out
    torch.nn.init.normal_(model.classifier[-1].weight, std=0.05)  # decisive: no near-ties between the two paths
    # 64 px: at 32 px the pretrained Lite0 features are mostly dead (1×1 final maps).
    meta = ModelMetadata(input_size=(64, 64), arch="efficientnet_lite0", threshold=0.5, temperature=1.5)
    return save_checkpoint(tmp_path / "model.pt", model, meta, epoch=1)


def test_cli_writes_every_metric_and_plot(tmp_path: Path, make_class_dataset: Callable[..., Path],
                                          capsys: pytest.CaptureFixture[str]) -> None:
    data = make_class_dataset(tmp_path / "test", per_class=2, size=32, splits=())
    (data / "clean" / "bad.png").write_bytes(b"nope")
    out = tmp_path / "eval"
    assert main(["--model", str(_checkpoint(tmp_path)), "--data", str(data), "--out", str(out), "--tta"]) == 0
    printed = capsys.readouterr().out
    assert "macro-F1" in printed and "coverage" in printed
    for name in ("metrics.json", "confusion_matrix.png", "confusion_matrix.csv", "reliability.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    m = json.loads((out / "metrics.json").read_text())
    assert m["num_samples"] == 16 and m["model"]["threshold"] == 0.5 and m["model"]["tta"]
    assert any("bad.png" in p for p in m["model"]["skipped_files"])
    assert (out / "confusion_matrix.csv").read_text().splitlines()[0].endswith(",".join(CLASSES))


def test_cli_reports_missing_or_foreign_model(tmp_path: Path, make_class_dataset: Callable[..., Path],
                                              capsys: pytest.CaptureFixture[str]) -> None:
    data = make_class_dataset(tmp_path / "test", per_class=1, size=32, splits=())
    assert main(["--model", str(tmp_path / "none.pt"), "--data", str(data)]) == 2
    assert "none.pt" in capsys.readouterr().err
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"junk")
    assert main(["--model", str(junk), "--data", str(data)]) == 2
    assert "junk.pt: not a checkpoint" in capsys.readouterr().err


def test_onnx_model_goes_through_the_runtime_and_agrees_with_the_checkpoint(
        tmp_path: Path, make_class_dataset: Callable[..., Path]) -> None:
    pytest.importorskip("onnxruntime")
    export = pytest.importorskip("export.onnx_export")
    from train.checkpoint import model_from_checkpoint

    data = make_class_dataset(tmp_path / "test", per_class=2, size=32, splits=())
    torch.manual_seed(0)
    model, meta = model_from_checkpoint(_checkpoint(tmp_path))
    # Threshold at this data's median score, so the rule rejects some images and keeps others whatever the head.
    pre = Preprocessor(meta)
    x = torch.from_numpy(np.stack([pre(p) for p in sorted(data.rglob("*.png"))]))
    with torch.inference_mode():
        scores = msp(model(x).numpy(), meta.temperature)
    meta = meta.with_updates(threshold=float(np.median(scores)))
    ckpt = save_checkpoint(tmp_path / "model.pt", model, meta, epoch=1)
    onnx_path = export.export_onnx(model, meta, tmp_path / "model.onnx", simplify=False)
    out = tmp_path / "eval_onnx"
    assert main(["--model", str(onnx_path), "--data", str(data), "--out", str(out), "--backend", "cpu"]) == 0
    got = json.loads((out / "metrics.json").read_text())
    assert got["model"]["format"] == "onnx" and got["num_samples"] == 16
    assert main(["--model", str(ckpt), "--data", str(data), "--out", str(tmp_path / "eval_pt")]) == 0
    want = json.loads((tmp_path / "eval_pt" / "metrics.json").read_text())
    # Same preprocessing, weights, temperature and rule: same predictions from both paths.
    assert got["confusion_matrix"] == want["confusion_matrix"]
    assert got["rejection_on"]["rejected"] == want["rejection_on"]["rejected"]
    assert 0 < want["rejection_on"]["rejected"] < 16  # the rule was exercised both ways
    assert abs(got["nll"] - want["nll"]) < 1e-3
