"""Rejection scores on constructed logits/features whose right answer is known; higher must mean "more known"."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.scores import (
    FEATURE_SCORES,
    available_scores,
    energy,
    feature_score,
    knn_score,
    logit_score,
    mahalanobis_score,
    max_logit,
    msp,
    relative_mahalanobis_score,
    vim_score,
)

CONFIDENT = np.array([[9.0, 0.0, 0.0, 0.0]], np.float32)
FLAT = np.array([[1.0, 1.0, 1.0, 1.0]], np.float32)


def test_logit_scores_rank_a_confident_prediction_above_a_flat_one():
    for name in ("msp", "max_logit", "energy"):
        assert logit_score(name, CONFIDENT)[0] > logit_score(name, FLAT)[0], name


def test_energy_keeps_evidence_strength_that_msp_discards():
    # Same softmax (shift invariance), but the second row has far stronger logits: MSP cannot tell them apart,
    # energy and max-logit must prefer the stronger evidence.
    weak = np.array([[2.0, 0.0, 0.0]], np.float32)
    strong = weak + 10.0
    assert msp(weak)[0] == pytest.approx(msp(strong)[0], abs=1e-6)
    assert energy(strong)[0] > energy(weak)[0] + 9.0
    assert max_logit(strong)[0] > max_logit(weak)[0]


def test_energy_is_logsumexp_and_stable_for_huge_logits():
    z = np.array([[1000.0, 1000.0]], np.float32)
    assert energy(z)[0] == pytest.approx(1000.0 + np.log(2.0), rel=1e-6)
    assert np.isfinite(msp(z)).all()


def test_unknown_score_names_the_known_ones():
    with pytest.raises(ValueError, match="msp"):
        logit_score("nope", CONFIDENT)
    with pytest.raises(ValueError, match="mahalanobis"):
        feature_score("nope", CONFIDENT, np.zeros((1, 2)), {})
    assert {"msp", "max_logit", "energy"} <= set(available_scores())


# ------------------------------------------------------------------ feature scores
def _gauss_stats(sigmas: tuple[float, ...] = (1.0, 0.1)) -> dict[str, np.ndarray]:
    """Two classes at (±5, 0) with shared covariance diag(sigmas²); background = one wide Gaussian at 0."""
    means = np.array([[5.0, 0.0], [-5.0, 0.0]])
    return {"class_means": means, "maha_whiten": np.diag(1.0 / np.asarray(sigmas)),
            "bg_mean": np.zeros(2), "bg_whiten": np.diag([1 / 5.0, 1 / 5.0])}


def test_mahalanobis_prefers_a_class_mean_over_a_far_point():
    st = _gauss_stats()
    s = mahalanobis_score(np.array([[5.0, 0.0], [-5.0, 0.0], [0.0, 3.0]]), st)
    assert s[0] == pytest.approx(0.0, abs=1e-6) and s[1] == pytest.approx(0.0, abs=1e-6)
    assert s[2] < s[0]


def test_mahalanobis_measures_distance_in_units_of_the_class_spread():
    # Equal Euclidean step from the mean: along the tight axis (σ=0.1) is 10× more surprising than along the wide one.
    st = _gauss_stats((1.0, 0.1))
    wide, tight = mahalanobis_score(np.array([[6.0, 0.0], [5.0, 1.0]]), st)
    assert wide == pytest.approx(-1.0 / 2, rel=1e-5)  # d² = 1, divided by D = 2
    assert tight == pytest.approx(-100.0 / 2, rel=1e-5)


def test_relative_mahalanobis_prefers_a_class_mean_over_a_far_point():
    st = _gauss_stats((1.0, 1.0))
    s = relative_mahalanobis_score(np.array([[5.0, 0.0], [0.0, 8.0]]), st)
    assert s[0] > s[1]


def test_knn_prefers_points_near_the_bank_and_ignores_feature_scale():
    bank = np.array([[1.0, 0.0, 0.0], [0.99, 0.1, 0.0], [0.0, 1.0, 0.0]])
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    st = {"knn_bank": bank, "knn_k": np.array(1)}
    near, far = knn_score(np.array([[2.0, 0.05, 0.0], [0.0, 0.0, 3.0]]), st)
    assert near > far
    assert far == pytest.approx(-np.sqrt(2.0), rel=1e-5)  # orthogonal to every bank vector
    # Normalised features: the score depends on direction only.
    assert knn_score(np.array([[20.0, 0.5, 0.0]]), st)[0] == pytest.approx(near, rel=1e-6)
    # k-th neighbour: with k=2 the near point's second neighbour is farther than its first.
    assert knn_score(np.array([[2.0, 0.05, 0.0]]), st, k=2)[0] < near
    with pytest.raises(ValueError, match="bank size"):
        knn_score(np.zeros((1, 3)) + 1, st, k=5)


def test_vim_penalises_the_part_of_a_feature_outside_the_principal_subspace():
    st = {"vim_origin": np.zeros(3), "vim_residual": np.array([[0.0], [0.0], [1.0]]), "vim_alpha": np.array(2.0)}
    logits = np.zeros((2, 4), np.float32)
    inside, outside = vim_score(logits, np.array([[3.0, 1.0, 0.0], [3.0, 1.0, 1.5]]), st)
    assert inside == pytest.approx(np.log(4.0), rel=1e-5)  # pure energy
    assert outside == pytest.approx(np.log(4.0) - 2.0 * 1.5, rel=1e-5)


def test_feature_score_dispatches_every_name_and_names_missing_statistics():
    rng = np.random.default_rng(0)
    f, lo = rng.normal(size=(5, 2)), rng.normal(size=(5, 3)).astype(np.float32)
    st = _gauss_stats() | {"knn_bank": np.eye(2), "knn_k": np.array(1), "vim_origin": np.zeros(2),
                           "vim_residual": np.array([[0.0], [1.0]]), "vim_alpha": np.array(1.0)}
    for name in FEATURE_SCORES + ("msp", "energy"):
        s = feature_score(name, lo, f, st)
        assert s.shape == (5,) and s.dtype == np.float32 and np.isfinite(s).all(), name
    with pytest.raises(ValueError, match="maha_whiten"):
        mahalanobis_score(f, {"class_means": st["class_means"]})


def test_is_rejected_is_not_score_at_least_threshold_and_rejects_nan():
    from runtime.scores import is_rejected

    scores = np.array([0.2, 0.5, 0.9, np.nan], np.float32)
    assert is_rejected(scores, 0.5).tolist() == [True, False, False, True]
    assert is_rejected(scores, 0.5).dtype == bool


def test_is_rejected_compares_in_float32():
    from runtime.scores import is_rejected

    # 0.7 as float32 is below 0.7 as float64: a score equal to float32(0.7) is at the threshold, so it is kept.
    assert not is_rejected(np.float32(0.7), 0.7)
    assert is_rejected(np.float32(0.7) - np.float32(1e-7), 0.7)


def test_is_rejected_without_threshold_rejects_nothing_and_keeps_shape():
    from runtime.scores import is_rejected

    out = is_rejected(np.full((2, 3), np.nan, np.float32), None)
    assert out.shape == (2, 3) and out.dtype == bool and not out.any()
    scalar = is_rejected(0.1, None)
    assert scalar.shape == () and not bool(scalar)
    assert is_rejected(0.1, 0.5).shape == () and bool(is_rejected(0.1, 0.5))
