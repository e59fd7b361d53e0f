"""Open-set statistics and the in-graph score head: right answers on constructed data, and the same numbers after
checkpointing and ONNX export as the numpy references give."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from torch import nn

from runtime.contract import CLASSES, ModelMetadata
from runtime.scores import FEATURE_SCORES, feature_score
from train.openset import (
    ALL_SCORES,
    CHECKPOINT_KEY,
    SCORE_OUTPUT,
    ScoreHead,
    calibrate_threshold,
    check_stats,
    collect_outputs,
    fit_classes_for,
    fit_openset_from_loader,
    fit_openset_stats,
    metadata_updates,
    scored_model,
    stats_to_numpy,
)


def _clusters(seed: int = 0, d: int = 16, n: int = 60, classes: int = 3, spread: float = 1.0):
    """Well separated Gaussian clusters in ``d`` dimensions, plus a linear head that classifies them."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 6, size=(classes + 1, d))  # the last centre is the unknown class
    x = np.concatenate([c + spread * rng.normal(size=(n, d)) for c in centres])
    y = np.repeat(np.arange(classes + 1), n)
    w = centres[:classes] / np.linalg.norm(centres[:classes], axis=1, keepdims=True)
    b = np.zeros(classes)
    return x.astype(np.float32), y, w.astype(np.float32), b.astype(np.float32)


def test_feature_scores_reject_an_unseen_cluster():
    from sklearn.metrics import roc_auc_score

    x, y, w, b = _clusters()
    known = y < 3
    tr = np.zeros(len(y), bool)
    tr[np.flatnonzero(known)[::2]] = True  # fit on half of the known images, test on the rest + the unknown
    st = stats_to_numpy(fit_openset_stats(x[tr], y[tr], w, b, knn_k=3))
    test = ~tr
    logits = x @ w.T + b
    for name in FEATURE_SCORES:
        s = feature_score(name, logits[test], x[test], st)
        auc = roc_auc_score(known[test], s)
        assert auc > 0.95, (name, auc)


def test_relative_mahalanobis_rejects_images_off_the_training_manifold():
    """Fewer training images than dimensions, as with 1280-d features: the background Gaussian must be shrunk like
    the class Gaussian, or its distance outgrows the class distance off the manifold and d0 - d2 ranks unknown images
    above known ones (AUROC 0.33 here, 0.16 on the synthetic LOCO folds, before the shared shrinkage)."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    d, n, k = 128, 20, 7
    centres = rng.normal(0, 3, size=(k, d))
    x_train = np.concatenate([c + rng.normal(size=(n, d)) for c in centres])
    y_train = np.repeat(np.arange(k), n)
    known = np.concatenate([c + rng.normal(size=(n, d)) for c in centres])
    unknown = np.concatenate([c + 1.5 * rng.normal(size=(n, d)) for c in centres])  # wider than any known class
    w = (centres / np.linalg.norm(centres, axis=1, keepdims=True)).astype(np.float32)
    st = stats_to_numpy(fit_openset_stats(x_train.astype(np.float32), y_train, w, np.zeros(k, np.float32)))
    x = np.concatenate([known, unknown]).astype(np.float32)
    s = feature_score("rel_mahalanobis", x @ w.T, x, st)
    auc = roc_auc_score(np.r_[np.ones(len(known)), np.zeros(len(unknown))], s)
    assert auc > 0.9, auc


def test_fit_uses_only_the_requested_classes():
    x, y, w, b = _clusters()
    st = fit_openset_stats(x, y, w, b, fit_classes=[0, 2])
    assert st["class_ids"].tolist() == [0, 2]
    np.testing.assert_allclose(st["class_means"][1].numpy(), x[y == 2].mean(0), rtol=1e-4, atol=1e-4)
    assert fit_classes_for(CLASSES, include_reject_class=False) == list(range(7))
    assert fit_classes_for(CLASSES, include_reject_class=True) == list(range(8))


def test_fit_refuses_bad_features():
    x, y, w, b = _clusters()
    x[3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        fit_openset_stats(x, y, w, b)
    with pytest.raises(ValueError, match="at least 2"):
        fit_openset_stats(x[:1], y[:1], w, b)


@pytest.mark.parametrize("name", ALL_SCORES)
def test_torch_head_matches_numpy_reference(name):
    x, y, w, b = _clusters(seed=1)
    st = fit_openset_stats(x[y < 3], y[y < 3], w, b, knn_k=5)
    logits = x @ w.T + b
    head = ScoreHead(name, st)
    with torch.no_grad():
        got = head(torch.from_numpy(logits), torch.from_numpy(x)).numpy()
    want = feature_score(name, logits, x, stats_to_numpy(st))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(want).max())))


def test_stats_survive_a_weights_only_checkpoint():
    x, y, w, b = _clusters()
    st = fit_openset_stats(x, y, w, b)
    buf = io.BytesIO()
    torch.save({"model": {}, CHECKPOINT_KEY: st}, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=True)[CHECKPOINT_KEY]
    assert set(back) == set(st)
    for k in st:
        assert torch.equal(back[k], st[k]), k


def test_check_stats_names_what_is_missing():
    x, y, w, b = _clusters()
    st = fit_openset_stats(x, y, w, b)
    check_stats(None, "msp")  # logit scores need nothing
    with pytest.raises(ValueError, match="needs open-set statistics"):
        check_stats(None, "mahalanobis", source="best.pt")
    with pytest.raises(ValueError, match="knn_bank"):
        check_stats({k: v for k, v in st.items() if k != "knn_bank"}, "knn")
    with pytest.raises(ValueError, match="1280-d"):
        check_stats(st, "mahalanobis", feature_dim=1280)
    with pytest.raises(ValueError, match="unknown rejection score"):
        check_stats(st, "odin")


def test_metadata_updates_make_valid_metadata():
    m = ModelMetadata().with_updates(**metadata_updates("mahalanobis", -1.5)).validate()
    assert (m.score, m.threshold, m.score_output) == ("mahalanobis", -1.5, SCORE_OUTPUT)
    m = ModelMetadata().with_updates(**metadata_updates("energy", 3.0)).validate()
    assert m.score_output is None


# ------------------------------------------------------------------ a real (tiny) EfficientNet
@pytest.fixture(scope="module")
def tiny_b0():
    """EfficientNet-B0 (random init, 8 classes) whose BatchNorm stats are set from data, so features are not ~0."""
    from train.models import build_model

    torch.manual_seed(0)
    model = build_model("efficientnet_b0", num_classes=8, weights="none")
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # cumulative average over the calibration batches
    model.train()
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(32, 3, 32, 32, generator=gen)
    labels = torch.arange(32) % 8
    # Class-dependent brightness so classes differ in feature space.
    images += (labels.float() / 4.0)[:, None, None, None]
    with torch.no_grad():
        model(images)
    model.eval()
    out = collect_outputs(model, [(images[:16], labels[:16]), (images[16:], labels[16:])])
    lin = model.classifier[-1]
    stats = fit_openset_stats(out.features, out.labels, lin.weight, lin.bias,
                              fit_classes=fit_classes_for(CLASSES), knn_k=3)
    return model, stats, images, out


def test_scored_model_matches_reference_on_real_features(tiny_b0):
    model, stats, images, out = tiny_b0
    st_np = stats_to_numpy(stats)
    for name in ("mahalanobis", "knn", "vim"):
        with torch.no_grad():
            logits, score = scored_model(model, stats, name)(images[:8])
        np.testing.assert_allclose(logits.numpy(), out.logits[:8], rtol=1e-4, atol=1e-4)
        want = feature_score(name, out.logits[:8], out.features[:8], st_np)
        np.testing.assert_allclose(score.numpy(), want, rtol=2e-3, atol=2e-3 * max(1.0, float(np.abs(want).max())))


def test_calibrate_threshold_keeps_the_target_recall_of_named_classes(tiny_b0):
    model, stats, images, out = tiny_b0
    labels = torch.arange(len(images)) % 8
    t, rep = calibrate_threshold(model, stats, [(images, labels)], "mahalanobis", target_recall=0.75)
    with torch.no_grad():
        s = ScoreHead("mahalanobis", stats)(torch.from_numpy(out.logits), torch.from_numpy(out.features)).numpy()
    named = out.labels != CLASSES.index("other")
    assert rep["val_named_recall"] == pytest.approx((s[named] >= t).mean()) and rep["val_named_recall"] >= 0.75
    # The largest such threshold: the next named score above it would reject too many.
    assert (s[named] >= np.min(s[named][s[named] > t])).mean() < 0.75


@pytest.mark.slow
def test_onnx_knn_score_output_matches_reference(tiny_b0, tmp_path):
    import onnxruntime as ort

    model, stats, images, out = tiny_b0
    path = tmp_path / "knn.onnx"
    torch.onnx.export(scored_model(model, stats, "knn"), images[:2], str(path), dynamo=False, opset_version=17,
                      input_names=["images"], output_names=["logits", SCORE_OUTPUT],
                      dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}, SCORE_OUTPUT: {0: "batch"}})
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == ["logits", SCORE_OUTPUT]
    _, score = sess.run(None, {"images": images[:16].numpy()})
    want = feature_score("knn", out.logits[:16], out.features[:16], stats_to_numpy(stats))
    assert score.shape == (16,)
    np.testing.assert_allclose(score, want, rtol=2e-3, atol=2e-3)


@pytest.mark.slow
def test_exported_score_and_metadata_threshold_drive_classifier_decisions(tiny_b0, tmp_path):
    """The deployment path: export with the score head → Classifier reads the score output and rejects to
    `other` exactly when score < metadata threshold; overriding the threshold changes the decisions."""
    from export.onnx_export import export_onnx
    from runtime.classifier import Classifier
    from runtime.preprocess import Preprocessor

    model, stats, _, _ = tiny_b0
    meta = ModelMetadata(input_size=(32, 32), arch="efficientnet_b0", mean=(0.5,) * 3, std=(0.5,) * 3)
    rng = np.random.default_rng(0)
    greys = [rng.integers(0, 256, (40, 40), dtype=np.uint8) + np.uint8(i * 3) for i in range(16)]
    x = torch.from_numpy(np.stack([Preprocessor(meta)(g) for g in greys]))
    wrapped = scored_model(model, stats, "mahalanobis")
    with torch.no_grad():
        logits, score = (t.numpy() for t in wrapped(x))
    threshold = float(np.median(score))
    meta = meta.with_updates(**metadata_updates("mahalanobis", threshold))
    path = export_onnx(wrapped, meta, tmp_path / "scored.onnx")

    clf = Classifier(path, backend="cpu", warmup=False)
    preds = clf.predict_batch(greys)
    got_scores = np.array([p.score for p in preds])
    np.testing.assert_allclose(got_scores, score, rtol=1e-3, atol=1e-3 * max(1.0, float(np.abs(score).max())))
    rejected = np.array([p.rejected for p in preds])
    margin = np.abs(score - threshold) > 1e-4 * max(1.0, abs(threshold))  # skip exact ties at the median
    np.testing.assert_array_equal(rejected[margin], (score < threshold)[margin])
    assert 0 < rejected.sum() < len(preds)
    for p, top in zip(preds, logits.argmax(1)):
        assert p.top_index == top
        assert p.label == ("other" if p.rejected else CLASSES[top])
    # Overrides: "off" never rejects; a threshold above every score rejects everything to `other`.
    assert not any(p.rejected for p in Classifier(path, backend="cpu", threshold="off", warmup=False)
                   .predict_batch(greys))
    high = Classifier(path, backend="cpu", threshold=float(score.max()) + 1.0, warmup=False).predict_batch(greys)
    assert all(p.label == "other" for p in high)


def test_stats_from_checkpoint_checks_what_the_score_needs():
    from train.openset import stats_from_checkpoint

    x, y, w, b = _clusters()
    st = fit_openset_stats(x, y, w, b)
    assert stats_from_checkpoint({}, "msp") is None
    assert set(stats_from_checkpoint({CHECKPOINT_KEY: st}, "knn")) == set(st)
    with pytest.raises(ValueError, match="best.pt.*needs open-set statistics"):
        stats_from_checkpoint({}, "mahalanobis", source="best.pt")
    with pytest.raises(ValueError, match="not a dict of tensors"):
        stats_from_checkpoint({CHECKPOINT_KEY: {"knn_k": 3}})


def test_training_hook_fits_the_classes_the_data_has(tiny_b0, caplog):
    """A dataset without one class (no cracks at this fab, a leave-one-class-out fold) still gets statistics."""
    model, _, images, _ = tiny_b0
    labels = torch.arange(32) % 8
    keep = labels != CLASSES.index("cracks")
    with caplog.at_level("WARNING"):
        st = fit_openset_from_loader(model, [(images[keep], labels[keep])], progress=False, knn_k=2)
    assert st["class_ids"].tolist() == [0, 1, 2, 4, 5, 6]  # named classes present; `other` is never "known"
    assert "without cracks (0)" in caplog.text
