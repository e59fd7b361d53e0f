"""Temperature fitting and rejection-threshold selection on constructed logits and scores."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.contract import CLASSES
from runtime.scores import logit_score
from train.confidence import calibrate, choose_threshold, fit_temperature, nll, reject_mask


def _overconfident(n: int = 400, c: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose arg-max is right ~70% of the time but that claim ~100% confidence."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, c, n)
    pred = np.where(rng.random(n) < 0.7, labels, rng.integers(0, c, n))
    logits = rng.normal(0, 1, (n, c))
    logits[np.arange(n), pred] += 12.0
    return logits.astype(np.float32), labels


def test_fit_temperature_lowers_nll_on_overconfident_logits() -> None:
    logits, labels = _overconfident()
    t = fit_temperature(logits, labels)
    assert t > 2.0
    assert nll(logits, labels, t) < 0.5 * nll(logits, labels, 1.0)
    # Accuracy is unchanged by construction: T never changes the arg-max.
    assert np.array_equal((logits / t).argmax(1), logits.argmax(1))


def test_fit_temperature_sharpens_underconfident_logits() -> None:
    logits, labels = _overconfident()
    t = fit_temperature(logits / 20.0, labels)
    assert t < 1.0


@pytest.mark.parametrize("target", [0.8, 0.9, 0.95, 0.99])
def test_choose_threshold_hits_target_recall(target: float) -> None:
    rng = np.random.default_rng(1)
    scores = rng.random(500)
    known = rng.random(500) < 0.8
    thr = choose_threshold(scores, known, target)
    kept = (scores[known] >= thr).mean()
    assert kept >= target
    # ... and it is the strictest threshold that does: the next known score up would fall short.
    higher = np.sort(scores[known])
    higher = higher[higher > thr]
    if higher.size:
        assert (scores[known] >= higher[0]).mean() < target


def test_choose_threshold_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="no known-class samples"):
        choose_threshold(np.array([0.5, 0.6]), np.array([False, False]), 0.95)
    with pytest.raises(ValueError, match="target recall"):
        choose_threshold(np.array([0.5]), None, 1.5)


def test_calibrate_counts_recall_over_non_other_classes() -> None:
    logits, labels = _overconfident(seed=2)
    other = CLASSES.index("other")
    # Make every 'other' image score very low: it must not drag the threshold down.
    logits[labels == other] = 0.0
    cal = calibrate(logits, labels, "msp", 0.9)
    s = logit_score("msp", logits, cal["temperature"])
    assert (s[labels != other] >= cal["threshold"]).mean() >= 0.9
    assert cal["known_recall"] >= 0.9
    assert cal["threshold"] > s[labels == other].max()
    assert cal["nll_after"] < cal["nll_before"]


def test_reject_mask_matches_the_runtime_rule() -> None:
    logits = np.zeros((3, 8), np.float32)
    logits[0, 7] = 0.1  # top class is 'other', low confidence: flagged (label is 'other' either way)
    logits[1, 0] = 0.1  # top class is 'clean', low confidence: rejected
    logits[2, 0] = 10.0  # confident: kept
    assert reject_mask(logits, 1.0, "msp", 0.9).tolist() == [True, True, False]
    assert not reject_mask(logits, 1.0, "msp", None).any()
    assert reject_mask(np.full((1, 8), np.nan, np.float32), 1.0, "max_logit", 0.0).tolist() == [True]
