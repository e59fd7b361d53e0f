"""Rejection scores: how "known" a prediction looks, higher meaning more like the training classes.

Logit scores (MSP, max-logit, energy) are computed here from the logits of one forward pass; feature-space scores
are computed inside the exported graph and arrive as an extra output (``ModelMetadata.score_output``). New logit
scores register with :func:`register_score`; the rule ``reject unless score >= threshold`` is :func:`is_rejected`,
the one place it is written.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

ScoreFn = Callable[[np.ndarray, float], np.ndarray]
_SCORES: dict[str, ScoreFn] = {}


def register_score(name: str) -> Callable[[ScoreFn], ScoreFn]:
    def deco(fn: ScoreFn) -> ScoreFn:
        _SCORES[name] = fn
        return fn

    return deco


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature``, stable for large logits."""
    z = np.asarray(logits, np.float32) / np.float32(temperature)
    z = z - z.max(axis=-1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=-1, keepdims=True)
    return z


@register_score("msp")
def msp(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Maximum softmax probability after temperature scaling (Hendrycks & Gimpel 2017)."""
    return softmax(logits, temperature).max(axis=-1)


@register_score("max_logit")
def max_logit(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Largest raw logit: unlike MSP it keeps how strong the evidence is, not just how it is shared."""
    return np.asarray(logits, np.float32).max(axis=-1)


@register_score("energy")
def energy(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Negative free energy ``T · logsumexp(logits / T)`` (Liu et al. 2020); higher = more in-distribution."""
    z = np.asarray(logits, np.float64) / temperature
    m = z.max(axis=-1, keepdims=True)
    return (temperature * (m[..., 0] + np.log(np.exp(z - m).sum(axis=-1)))).astype(np.float32)


def logit_score(name: str, logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Score ``logits`` (N, C) with the named logit score → (N,)."""
    try:
        fn = _SCORES[name]
    except KeyError:
        raise ValueError(f"unknown rejection score {name!r}; known: {', '.join(sorted(_SCORES))}") from None
    return fn(logits, temperature)


def available_scores() -> tuple[str, ...]:
    return tuple(sorted(_SCORES))


def is_rejected(score: np.ndarray | float, threshold: float | None) -> np.ndarray:
    """THE rejection rule: True where a prediction goes to ``other``, i.e. ``not (score >= threshold)``.

    Written as a negated ``>=`` so a NaN score (a broken model output) is rejected, never trusted; the threshold is
    compared as float32, the precision scores are computed in. ``threshold=None`` (rejection off) rejects nothing.
    Returns a bool array of the score's shape (0-d for a scalar).
    """
    score = np.asarray(score)
    if threshold is None:
        return np.zeros(score.shape, bool)
    return ~(score >= np.float32(threshold))


# ------------------------------------------------------------------ feature-space scores (numpy references)
# In production these run inside the exported graph (train/openset.py builds the torch head; ONNX carries it as
# the ``score`` output). The numpy versions below are the reference the in-graph head is tested against, and what
# the open-set benchmark uses to score many variants from one feature extraction. They are written
# independently of the torch head (explicit precision matrices, full distance tables) so a test comparing the two
# checks the maths, not the same code twice. ``stats`` is the dict of arrays fitted by
# ``train.openset.fit_openset_stats`` (tensors converted with ``np.asarray``). All scores: higher = more known.

#: Scores computed from the 1280-d penultimate features; they need fitted statistics and a graph output.
FEATURE_SCORES = ("mahalanobis", "rel_mahalanobis", "knn", "vim")


def _stat(stats: dict[str, np.ndarray], key: str, score: str) -> np.ndarray:
    try:
        return np.asarray(stats[key], np.float64)
    except KeyError:
        raise ValueError(f"{score} score needs the fitted statistic {key!r}, which these statistics lack "
                         f"(have: {', '.join(sorted(stats))})") from None


def _sq_mahalanobis(features: np.ndarray, means: np.ndarray, whiten: np.ndarray) -> np.ndarray:
    """(N, K) squared distances ``(x-μ)ᵀ Σ⁻¹ (x-μ)`` with ``Σ⁻¹ = W Wᵀ`` formed explicitly."""
    precision = whiten @ whiten.T
    diff = np.asarray(features, np.float64)[:, None, :] - means[None, :, :]  # (N, K, D)
    return ((diff @ precision) * diff).sum(-1)


def mahalanobis_score(features: np.ndarray, stats: dict[str, np.ndarray]) -> np.ndarray:
    """``-min_k d²_k(x) / D``: squared Mahalanobis distance to the nearest class mean under the shared, shrunk
    class covariance (Lee et al. 2018), divided by the feature dimension so in-distribution values are O(1)."""
    means = _stat(stats, "class_means", "mahalanobis")
    d2 = _sq_mahalanobis(features, means, _stat(stats, "maha_whiten", "mahalanobis"))
    return (-d2.min(axis=1) / means.shape[1]).astype(np.float32)


def relative_mahalanobis_score(features: np.ndarray, stats: dict[str, np.ndarray]) -> np.ndarray:
    """``-min_k (d²_k(x) - d²_0(x)) / D`` (Ren et al. 2021): class distance minus the distance under one Gaussian
    fitted to all training features, which cancels directions every image varies along."""
    means = _stat(stats, "class_means", "rel_mahalanobis")
    d2 = _sq_mahalanobis(features, means, _stat(stats, "maha_whiten", "rel_mahalanobis"))
    d0 = _sq_mahalanobis(features, _stat(stats, "bg_mean", "rel_mahalanobis")[None, :],
                         _stat(stats, "bg_whiten", "rel_mahalanobis"))
    return (-(d2 - d0).min(axis=1) / means.shape[1]).astype(np.float32)


def knn_score(features: np.ndarray, stats: dict[str, np.ndarray], k: int | None = None) -> np.ndarray:
    """``-‖x̂ - b̂_(k)‖``: minus the distance from the L2-normalised feature to its k-th nearest L2-normalised
    training feature (Sun et al. 2022)."""
    bank = _stat(stats, "knn_bank", "knn")
    k = int(np.asarray(stats["knn_k"])) if k is None else int(k)
    if not 1 <= k <= len(bank):
        raise ValueError(f"knn: k={k} must be between 1 and the bank size {len(bank)}")
    x = np.asarray(features, np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    d2 = (x * x).sum(1)[:, None] + (bank * bank).sum(1)[None, :] - 2.0 * x @ bank.T
    kth = np.partition(d2, k - 1, axis=1)[:, k - 1]
    return (-np.sqrt(np.maximum(kth, 0.0))).astype(np.float32)


def vim_score(logits: np.ndarray, features: np.ndarray, stats: dict[str, np.ndarray]) -> np.ndarray:
    """ViM (Wang et al. 2022): ``energy(logits) - α‖P⊥(x - o)‖``, the norm of the feature's part outside the
    principal subspace of the training features (origin ``o = -W⁺b``) as a virtual logit."""
    origin = _stat(stats, "vim_origin", "vim")
    basis = _stat(stats, "vim_residual", "vim")  # (D, D - d): orthonormal basis of the residual space
    alpha = float(_stat(stats, "vim_alpha", "vim"))
    residual = (np.asarray(features, np.float64) - origin) @ basis
    return (energy(logits) - alpha * np.linalg.norm(residual, axis=1)).astype(np.float32)


def feature_score(name: str, logits: np.ndarray, features: np.ndarray, stats: dict[str, np.ndarray]) -> np.ndarray:
    """Score by name from one forward pass: logit scores use ``logits``, feature scores ``features`` + ``stats``."""
    if name in _SCORES:
        return logit_score(name, logits)
    if name == "mahalanobis":
        return mahalanobis_score(features, stats)
    if name == "rel_mahalanobis":
        return relative_mahalanobis_score(features, stats)
    if name == "knn":
        return knn_score(features, stats)
    if name == "vim":
        return vim_score(logits, features, stats)
    raise ValueError(f"unknown rejection score {name!r}; known: {', '.join(sorted(_SCORES) + list(FEATURE_SCORES))}")
