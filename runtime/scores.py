"""Rejection scores: how "known" a prediction looks, higher meaning more like the training classes.

Logit scores (MSP, max-logit, energy) are computed here from the logits of one forward pass; feature-space scores
are computed inside the exported graph and arrive as an extra output (``ModelMetadata.score_output``). New logit
scores register with :func:`register_score`, so the rule ``reject when score < threshold`` stays in one place.
"""

from __future__ import annotations

from typing import Callable

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
