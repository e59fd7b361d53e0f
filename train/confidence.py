"""Confidence calibration after training: a temperature fitted on val, and the rejection threshold.

Temperature scaling (Guo et al. 2017): one scalar ``T`` minimising the validation NLL of ``softmax(logits / T)``;
it changes confidences, never the predicted class.

Rejection: a prediction is sent to ``other`` when ``score < threshold`` (``runtime.scores.logit_score``: msp,
max_logit or energy, computed with the fitted ``T``). The threshold is chosen on val for a target *known-class
recall*: the fraction of val images of the known defect classes (every class except ``other``) whose score is at or
above the threshold, i.e. that are not rejected.

How the real ``other`` class interacts with rejection: ``other`` is both a trained class and where rejections go.
Images labelled ``other`` are therefore left out of the recall target: rejecting one of them sends it to its own
class, which is correct, so they must not pull the threshold down. A low-scoring top prediction of ``other`` is
flagged as rejected, as the runtime does; its label is ``other`` either way. The target recall thus bounds how many
genuine known-class images the rejection rule may turn into ``other`` on val (default at most 5%).
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import minimize_scalar

from runtime.contract import CLASSES, REJECT_LABEL
from runtime.scores import is_rejected, logit_score

T_MIN, T_MAX = 0.05, 20.0
DEFAULT_TARGET_RECALL = 0.95


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``labels`` under ``softmax(logits / temperature)``."""
    z = np.asarray(logits, np.float64) / float(temperature)
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(labels)), np.asarray(labels, np.int64)].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature in [0.05, 20] minimising val NLL (1-D bounded search over log T)."""
    logits = np.asarray(logits, np.float64)
    labels = np.asarray(labels, np.int64)
    if logits.ndim != 2 or len(logits) != len(labels) or len(labels) == 0:
        raise ValueError(f"need logits (N, C) and N labels, got {logits.shape} and {labels.shape}")
    res = minimize_scalar(lambda lt: nll(logits, labels, math.exp(lt)), bounds=(math.log(T_MIN), math.log(T_MAX)),
                          method="bounded", options={"xatol": 1e-4})
    t = float(math.exp(res.x))
    # Never worse than not calibrating at all (guards a degenerate search on tiny val sets).
    return t if nll(logits, labels, t) <= nll(logits, labels, 1.0) else 1.0


def choose_threshold(scores: np.ndarray, known: np.ndarray | None = None,
                     target_recall: float = DEFAULT_TARGET_RECALL) -> float:
    """Largest threshold keeping at least ``target_recall`` of the ``known`` samples (score >= threshold).

    ``known`` is a boolean mask of the samples the recall counts (None: all). Returns a float threshold.
    """
    s = np.asarray(scores, np.float64)
    if known is not None:
        s = s[np.asarray(known, bool)]
    if s.size == 0:
        raise ValueError("no known-class samples to choose a rejection threshold from")
    if not 0.0 < target_recall <= 1.0:
        raise ValueError(f"target recall must be in (0, 1], got {target_recall}")
    s = np.sort(s)
    # At most floor((1 - r) * n) samples may fall below the threshold.
    k = int(math.floor((1.0 - target_recall) * s.size + 1e-9))
    return float(s[min(k, s.size - 1)])


def calibrate(logits: np.ndarray, labels: np.ndarray, score: str = "msp",
              target_recall: float = DEFAULT_TARGET_RECALL,
              class_names: tuple[str, ...] = CLASSES) -> dict[str, float]:
    """Fit ``T`` and the threshold on val → {"temperature", "threshold", "known_recall", "nll_before", ...}."""
    labels = np.asarray(labels, np.int64)
    t = fit_temperature(logits, labels)
    s = logit_score(score, logits, t)
    reject = class_names.index(REJECT_LABEL) if REJECT_LABEL in class_names else -1
    known = labels != reject
    thr = choose_threshold(s, known, target_recall)
    return {"temperature": t, "threshold": thr, "score": score, "target_recall": target_recall,
            "known_recall": float((~is_rejected(s[known], thr)).mean()), "nll_before": nll(logits, labels, 1.0),
            "nll_after": nll(logits, labels, t)}


def reject_mask(logits: np.ndarray, temperature: float, score: str, threshold: float | None) -> np.ndarray:
    """True where the rule sends a prediction to ``other``: ``not (score >= threshold)``, as ``runtime.Classifier``.

    A low-scoring top prediction of ``other`` is flagged too (its label is ``other`` either way), and a NaN score is
    rejected, never trusted.
    """
    logits = np.asarray(logits, np.float32)
    if threshold is None:
        return np.zeros(len(logits), bool)
    return is_rejected(logit_score(score, logits, temperature), threshold)
