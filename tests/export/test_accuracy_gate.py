"""The accuracy gate compares a reduced-precision variant with FP32 and refits its confidence calibration."""

from __future__ import annotations

import numpy as np

from export.accuracy_gate import accuracy_gate
from runtime.contract import ModelMetadata


def _logits(n: int = 240, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 8
    logits = rng.normal(0, 1, (n, 8)).astype(np.float32)
    logits[np.arange(n), labels] += 4.0
    return logits, labels


def test_identical_variant_passes_and_keeps_a_working_threshold():
    logits, labels = _logits()
    meta = ModelMetadata(threshold=0.5, temperature=1.0)
    res = accuracy_gate(logits, logits.copy(), labels, meta, "int8", max_drop_pt=1.0)
    assert res.passed and res.top1_agreement == 1.0
    assert res.accuracy_drop_pt == 0 and res.threshold is not None


def test_compressed_confidences_get_a_lower_temperature_and_big_drops_fail():
    logits, labels = _logits()
    meta = ModelMetadata(threshold=0.5)
    squashed = accuracy_gate(logits, logits * 0.3, labels, meta, "int8")
    assert squashed.passed and squashed.temperature < 0.6  # INT8-like compressed logits are sharpened back
    rng = np.random.default_rng(1)
    broken = logits.copy()
    flip = rng.random(len(labels)) < 0.2
    broken[flip] = rng.normal(0, 1, (flip.sum(), 8))
    res = accuracy_gate(logits, broken, labels, meta, "int8", max_drop_pt=1.0)
    assert not res.passed and res.accuracy_drop_pt > 1.0
