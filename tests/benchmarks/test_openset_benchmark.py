"""The open-set benchmark's metrics on constructed scores, and a smoke run of its leave-one-class-out CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks.openset import (
    auroc,
    coverage_accuracy_curve,
    fpr_at_tpr,
    score_metrics,
    system_scores,
    unknown_destinations,
)
from runtime.contract import CLASSES


def test_auroc_orientation_known_is_positive():
    known, unknown = np.array([3.0, 4.0, 5.0]), np.array([0.0, 1.0])
    assert auroc(known, unknown) == 1.0
    assert auroc(unknown, known) == 0.0
    assert auroc(np.array([1.0, 2.0]), np.array([1.0, 2.0])) == pytest.approx(0.5)


def test_fpr_at_95_tpr_counts_unknowns_above_the_known_threshold():
    known = np.arange(100, dtype=float)  # 95% kept ⇒ threshold 5
    unknown = np.array([0.0, 4.0, 5.0, 50.0])
    assert fpr_at_tpr(known, unknown, 0.95) == pytest.approx(0.5)


def test_coverage_accuracy_curve_takes_the_most_confident_first():
    scores = np.array([0.9, 0.8, 0.1, 0.2])
    correct = np.array([True, True, False, False])
    curve = coverage_accuracy_curve(scores, correct, np.array([0.5, 1.0]))
    np.testing.assert_allclose(curve, [1.0, 0.5])


def test_score_metrics_at_the_val_threshold():
    other, held = CLASSES.index("other"), CLASSES.index("cracks")
    # Val: named known scores 1..20; 95% recall ⇒ threshold 2 (one image of 20 may fall below).
    s_val = np.arange(1.0, 21.0)
    val_named = np.ones(20, bool)
    # Test: 4 known images (clean, one wrongly predicted), 2 unknown (cracks), 1 `other`.
    labels = np.array([0, 0, 0, 0, held, held, other])
    pred = np.array([0, 0, 0, 1, 0, other, other])
    s_test = np.array([5.0, 6.0, 1.0, 7.0, 10.0, 0.0, 0.5])
    known = np.isin(labels, [0])
    unknown = labels == held
    m = score_metrics(s_val, val_named, s_test, known, unknown, pred, labels, other, 0.95)
    assert m["threshold"] == 2.0
    assert m["known_recall"] == pytest.approx(3 / 4)
    assert m["known_acc_no_reject"] == pytest.approx(3 / 4)
    assert m["known_acc_with_reject"] == pytest.approx(2 / 4)  # image 2 right but rejected, image 3 wrong
    assert m["known_selective_acc"] == pytest.approx(2 / 3)
    # Unknown 4 accepted as clean (wrong); unknown 5 rejected (and predicted other anyway) → 1 of 2 to `other`.
    assert m["unknown_to_other"] == pytest.approx(0.5)
    assert m["unknown_to_clean"] == pytest.approx(0.5)  # unknown 4: a new defect passed as clean (index 0)
    assert m["auroc"] == pytest.approx(auroc(s_test[known], s_test[unknown]))
    # Predicted clean but rejected is not a miss; and with `clean` itself held out the question does not arise.
    s_low = s_test.copy()
    s_low[4] = 1.0
    assert score_metrics(s_val, val_named, s_low, known, unknown, pred, labels, other, 0.95)["unknown_to_clean"] == 0
    clean_out = labels == 0
    m = score_metrics(s_val, val_named, s_test, labels == held, clean_out, pred, labels, other, 0.95)
    assert np.isnan(m["unknown_to_clean"])


def test_system_view_counts_a_confident_other_prediction_as_rejected():
    other, held = CLASSES.index("other"), CLASSES.index("cracks")
    labels = np.array([0, 0, 1, held, held])
    # The second unknown is predicted `other` with the highest score of all: the score alone calls it the most
    # "known" image, but runtime.Classifier labels it `other`, which is right.
    pred = np.array([0, 0, 1, 0, other])
    s_test = np.array([0.8, 0.9, 0.7, 0.75, 0.99])
    sys_s = system_scores(s_test, pred, other)
    assert sys_s[4] < s_test[:4].min() and np.array_equal(sys_s[:4], s_test[:4])
    known, unknown = labels != held, labels == held
    m = score_metrics(np.array([0.6, 0.7, 0.8]), np.ones(3, bool), s_test, known, unknown, pred, labels, other, 0.95)
    assert m["auroc"] == pytest.approx(1 / 3)  # of the 6 known/unknown pairs, only 2 ranked right
    assert m["auroc_system"] == pytest.approx(5 / 6)  # now only 0.7 < 0.75 is ranked wrong
    assert m["fpr95_system"] <= m["fpr95"]
    # One of three known images predicted `other`: no threshold keeps 95% of them, so FPR@95 is undefined.
    pred_k = pred.copy()
    pred_k[2] = other
    m = score_metrics(np.array([0.6, 0.7, 0.8]), np.ones(3, bool), s_test, known, unknown, pred_k, labels, other, 0.95)
    assert np.isnan(m["fpr95_system"]) and np.isfinite(m["fpr95"])
    # Nothing predicted `other`: both views agree.
    assert np.array_equal(system_scores(s_test, np.zeros(5, int), other), s_test)


def test_unknown_destinations_count_top1_predictions_of_the_heldout_images_only():
    held, cmp_, other = CLASSES.index("cracks"), CLASSES.index("cmp"), CLASSES.index("other")
    labels = np.array([held, held, held, held, 0, 0])
    pred = np.array([cmp_, cmp_, other, cmp_, 1, 1])  # the known images' predictions must not count
    logits = np.eye(len(CLASSES))[pred] * 5.0
    dest = unknown_destinations(logits, labels, held)
    assert dest == {"cmp": 0.75, "other": 0.25}
    assert list(dest) == ["cmp", "other"]  # largest share first
    assert unknown_destinations(logits, np.zeros(6, int), held) == {}


def test_typed_config_matches_the_cli_and_gives_the_trainer_its_configs(tmp_path):
    import math

    from benchmarks.openset import OpensetConfig, build_parser
    from train.loop import lr_lambdas

    cfg = OpensetConfig(**vars(build_parser().parse_args(["--out", str(tmp_path)])))
    assert cfg == OpensetConfig(out=str(tmp_path))  # the parser's defaults are the config's
    with pytest.raises(ValueError, match="output folder"):
        OpensetConfig()
    fold = cfg.fold_train_config(tmp_path / "fold")
    assert (fold.data, fold.out) == (str(tmp_path / "fold" / "data"), str(tmp_path / "fold" / "run"))
    assert (fold.patience, fold.warmup_epochs, fold.workers, fold.augment) == (0, 1.0, 0, "light")
    # Partial folds: top stages at lr, head at 3x, half an epoch of linear warm-up then cosine, for both groups.
    tc = cfg.partial_train_config()
    assert (tc.lr, tc.head_lr, tc.weight_decay, tc.label_smoothing, tc.balance) == (1e-3, 3e-3, 0.02, 0.1, "loss")
    steps = 10
    total, warm = cfg.epochs * steps, steps // 2
    lams = lr_lambdas([{"role": "backbone"}, {"role": "head"}], tc, steps)
    for st in range(total):
        want = (st + 1) / warm if st < warm else 0.5 * (1 + math.cos(math.pi * (st - warm) / (total - warm)))
        assert [lam(st) for lam in lams] == pytest.approx([want, want], abs=1e-12), st


@pytest.mark.slow
def test_cli_smoke_two_folds(tmp_path):
    from benchmarks.openset import main
    from train.synthetic import main as synth_main

    data = tmp_path / "synth"
    synth_main(["--out", str(data), "--per-class", "10", "--size", "48", "--seed", "3", "--quiet"])
    out = tmp_path / "out"
    assert main(["--data", str(data), "--out", str(out), "--heldout", "cracks", "ler", "--epochs", "1",
                 "--img-size", "32", "--views", "1", "--scores", "msp", "mahalanobis", "knn", "--knn-k", "2",
                 "--no-progress"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert [f["heldout"] for f in res["folds"]] == ["cracks", "ler"]
    for f in res["folds"]:
        assert set(f["scores"]) == {"msp", "mahalanobis", "mahalanobis+other", "knn", "knn+other"}
        assert f["test_unknown"] > 0 and f["test_known"] > 0
        assert sum(f["unknown_top1"].values()) == pytest.approx(1.0) and f["heldout"] not in f["unknown_top1"]
        assert all(0.0 <= m["unknown_to_clean"] <= 1.0 for m in f["scores"].values())  # cracks, ler: defects
        for m in f["scores"].values():
            assert 0.0 <= m["auroc"] <= 1.0 and 0.0 <= m["fpr95"] <= 1.0
            assert 0.0 <= m["auroc_system"] <= 1.0
            assert np.isnan(m["fpr95_system"]) or 0.0 <= m["fpr95_system"] <= 1.0  # NaN: 95% TPR out of reach
    assert res["default_score"] in res["mean"]
    for name in ("table.md", "auroc.png", "coverage_accuracy.png"):
        assert (out / name).stat().st_size > 0
    table = (out / "table.md").read_text()
    assert "Where the unknowns go" in table and "unknown→clean" in table


@pytest.fixture
def data_and_fresh_test(tmp_path):
    """A tiny synthetic dataset and a separate test-only set of 9 images per class (another seed)."""
    from train.synthetic import main as synth_main

    data, fresh = tmp_path / "synth", tmp_path / "fresh"
    synth_main(["--out", str(data), "--per-class", "6", "--size", "32", "--seed", "3", "--quiet"])
    synth_main(["--out", str(fresh), "--per-class", "9", "--size", "32", "--seed", "4", "--split", "0,0,1",
                "--quiet"])
    return data, fresh


def _ler_fold_counts(out, *args: str) -> tuple[int, int]:
    """Run a one-fold (ler held out) benchmark; return its (unknown, known) test image counts."""
    from benchmarks.openset import main

    assert main(["--out", str(out), "--heldout", "ler", "--epochs", "1", "--img-size", "32", "--scores", "energy",
                 "--no-progress", *args]) == 0
    fold = json.loads((out / "results.json").read_text())["folds"][0]
    return fold["test_unknown"], fold["test_known"]


@pytest.mark.slow
def test_cli_scores_a_separate_test_folder(tmp_path, data_and_fresh_test):
    """--test replaces DATA/test: every fold is measured on that folder's images (a larger, fresh test set)."""
    data, fresh = data_and_fresh_test
    # 9 fresh images per class: 9 of ler unknown, 9 of each of the other 6 named classes known (`other` left out).
    assert _ler_fold_counts(tmp_path / "out", "--data", str(data), "--views", "1", "--test", str(fresh / "test")) \
        == (9, 54)
    with pytest.raises(SystemExit, match="no such test folder"):
        _ler_fold_counts(tmp_path / "out", "--data", str(data), "--test", str(tmp_path / "missing"))


@pytest.mark.slow
def test_reuse_rescores_only_outputs_of_the_same_test_folder(tmp_path, data_and_fresh_test):
    """--reuse must not report old test outputs for a new --test: the fold model is kept, the test set re-extracted."""
    data, fresh = data_and_fresh_test
    out = tmp_path / "out"
    full = ("--data", str(data), "--mode", "full")
    default = _ler_fold_counts(out, *full)
    best = out / "folds" / "ler" / "run" / "best.pt"
    trained_at = best.stat().st_mtime_ns
    assert _ler_fold_counts(out, *full, "--reuse", "--test", str(fresh / "test")) == (9, 54)
    assert _ler_fold_counts(out, *full, "--reuse") == default != (9, 54)
    assert best.stat().st_mtime_ns == trained_at  # the fold model was reused, never retrained
