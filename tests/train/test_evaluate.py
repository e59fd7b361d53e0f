"""Evaluation: metrics against scikit-learn on constructed predictions, and the CLI's files for a checkpoint."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    log_loss,
    precision_recall_fscore_support,
)

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


def test_every_metric_value_matches_scikit_learn() -> None:
    """Values, not key presence: each number against scikit-learn (or, for ECE, a direct count) on varied data."""
    rng = np.random.default_rng(3)
    n = 200
    labels = rng.integers(0, 8, n)
    labels[labels == 5] = 4  # class 5 absent from the ground truth (macro averages over present classes)
    logits = rng.normal(0, 1, (n, 8)) + 2.5 * np.eye(8)[labels] * rng.uniform(0, 1, (n, 1))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    rejected = probs.max(1) < 0.4
    m = compute_metrics(labels, probs, rejected, CLASSES)
    top = probs.argmax(1)
    final = np.where(rejected, OTHER, top)
    present = np.unique(labels)
    idx = list(range(8))
    for got, pred in ((m, final), (m["rejection_off"], top)):
        assert got["accuracy"] == pytest.approx(accuracy_score(labels, pred))
        for avg, lab in (("macro", present), ("weighted", idx)):
            p, r, f, _ = precision_recall_fscore_support(labels, pred, labels=lab, average=avg, zero_division=0)
            assert (got[f"{avg}_precision"], got[f"{avg}_recall"], got[f"{avg}_f1"]) == pytest.approx((p, r, f))
    assert m["confusion_matrix"] == confusion_matrix(labels, final, labels=idx).tolist()
    assert m["rejection_off"]["confusion_matrix"] == confusion_matrix(labels, top, labels=idx).tolist()
    p, r, f, support = precision_recall_fscore_support(labels, final, labels=idx, zero_division=0)
    for i, name in enumerate(CLASSES):
        row = m["per_class"][name]
        assert (row["precision"], row["recall"], row["f1-score"], row["support"]) == pytest.approx(
            (p[i], r[i], f[i], support[i])), name
    assert m["nll"] == pytest.approx(log_loss(labels, probs, labels=idx))
    accepted = ~rejected
    assert m["rejection_on"]["coverage"] == pytest.approx(accepted.mean())
    assert m["rejection_on"]["rejected"] == int(rejected.sum())
    assert m["rejection_on"]["selective_accuracy"] == pytest.approx(accuracy_score(labels[accepted], top[accepted]))
    # ECE (not in scikit-learn): 15 equal-width confidence bins, |accuracy - confidence| weighted by bin size.
    conf, correct = probs.max(1), top == labels
    bins = np.minimum((conf * 15).astype(int) - (conf * 15 == np.floor(conf * 15)), 14).clip(0)
    want = sum((bins == b).mean() * abs(correct[bins == b].mean() - conf[bins == b].mean())
               for b in range(15) if (bins == b).any())
    assert m["ece"] == pytest.approx(want) and m["ece"] > 0.01
    assert sum(b["count"] for b in m["reliability"]) == n


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
    assert len(m["model"]["tta_views"]) == 8  # square input: every flip and 90° turn
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
    from export import onnx_export as export  # ours: an import error here is a failure, never a skip
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


def test_tta_on_non_square_inputs_averages_the_views_that_keep_the_shape() -> None:
    """--tta used to average nothing for non-square inputs while metrics.json said "tta": true."""
    from train.evaluate import TTA_VIEWS, predict_logits, tta_views

    assert tta_views(64, 64) == tuple(range(8)) and tta_views(48, 64) == (0, 2, 4, 6)
    assert [TTA_VIEWS[k] for k in tta_views(48, 64)] == ["identity", "rot180", "hflip", "vflip"]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 46 * 62, 8))
    x = torch.rand(5, 3, 48, 64)
    loader = [(x, torch.zeros(5, dtype=torch.long))]
    plain, _ = predict_logits(model, loader)
    tta, _ = predict_logits(model, loader, tta=True)
    with torch.inference_mode():
        views = [x, torch.flip(x, (2, 3)), torch.flip(x, (3,)), torch.flip(x, (2,))]
        want = torch.stack([model(v) for v in views]).mean(0).numpy()
    np.testing.assert_allclose(tta, want, rtol=1e-5, atol=1e-6)
    assert np.abs(tta - plain).max() > 1e-3  # the views were really applied


def test_cli_records_the_tta_views_it_applied(tmp_path: Path, make_class_dataset: Callable[..., Path]) -> None:
    data = make_class_dataset(tmp_path / "test", per_class=1, size=32, splits=())
    model = build_model("efficientnet_lite0", weights="none")
    ckpt = save_checkpoint(tmp_path / "wide.pt", model, ModelMetadata(input_size=(32, 48), arch="efficientnet_lite0"),
                           epoch=1)
    for flag, views in (([], []), (["--tta"], ["identity", "rot180", "hflip", "vflip"])):
        out = tmp_path / f"eval{len(flag)}"
        assert main(["--model", str(ckpt), "--data", str(data), "--out", str(out), *flag]) == 0
        m = json.loads((out / "metrics.json").read_text())["model"]
        assert m["tta"] is bool(flag) and m["tta_views"] == views
