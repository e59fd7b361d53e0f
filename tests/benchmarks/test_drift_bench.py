"""benchmarks.drift: the stream simulation on hand-made outcome pools (the model part runs in the benchmark)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from benchmarks.drift import _P, NOVEL, NoReferenceError, alarm_study, delay_trials, false_alarms
from runtime.contract import CLASSES, INVALID_LABEL
from runtime.drift import VAL_STATS_KEY, DriftConfig

REF = {"n": 800, "rejection_rate": 0.0, "class_mix": {c: 1 / 8 for c in CLASSES}}
POOL = {c: [_P(c, False)] for c in CLASSES}


def test_a_new_type_that_is_always_rejected_is_found_and_a_matched_stream_is_quiet() -> None:
    pool = {**POOL, NOVEL: [_P("other", True)]}
    cfg = DriftConfig(window=200, min_frames=100, mix_limit=None)
    fast = delay_trials(pool, REF, CLASSES, cfg, 0.5, trials=5, warmup=300, max_delay=2000, seed=0)
    slow = delay_trials(pool, REF, CLASSES, cfg, 0.1, trials=5, warmup=300, max_delay=2000, seed=0)
    assert fast["detected"] == slow["detected"] == 1.0 and fast["alarms_before_onset"] == 0
    assert fast["median_frames"] < slow["median_frames"] <= 200
    none = delay_trials({**POOL, NOVEL: [_P("clean", False)]}, REF, CLASSES, cfg, 0.1, trials=2, warmup=300,
                        max_delay=500, seed=0)
    assert none["detected"] == 0.0 and none["median_frames"] is None and none["delays"] == [None, None]
    fa = false_alarms(POOL, REF, CLASSES, cfg, hours=0.01, fps=30, seed=1, progress=False)
    assert fa["frames"] == 1080 and fa["alarms"] == 0 and fa["per_hour"] == 0.0


class _FakeClassifier:
    labels = list(CLASSES)

    def __init__(self, extra: dict | None = None) -> None:
        self.meta = SimpleNamespace(extra=extra)

    def describe(self) -> str:
        return "fake.onnx"


def test_alarm_study_returns_delays_false_alarms_and_how_the_new_type_was_answered() -> None:
    other = CLASSES.index("other")
    val = {c: np.array([[i, 0]] * 10 + ([[-1, 0]] if c == "clean" else []), np.int64) for i, c in enumerate(CLASSES)}
    stream = {c: np.array([[i, 0]] * 10, np.int64) for i, c in enumerate(CLASSES)}
    stream[NOVEL] = np.array([[other, 1]] * 3 + [[-1, 0]], np.int64)
    cfg = DriftConfig(window=200, min_frames=100, mix_limit=None)
    kw = dict(rates=[0.5], trials=3, warmup=300, max_delay=2000, hours=0.01, fps=30, progress=False)
    study = alarm_study(_FakeClassifier(), val, stream, cfg, **kw)
    assert study["reference_from"] == "validation stand-in" and study["reference"]["n"] == 80
    assert study["invalid"]["reference"] == 1 and study["invalid"]["stream"][NOVEL] == 1
    assert study["delay"][0]["detected"] == 1.0 and study["false_alarms"]["alarms"] == 0
    assert study["novel_outcomes"] == {"rejected": 0.75, "invalid": 0.25, "labels": {INVALID_LABEL: 0.25}}
    with pytest.raises(NoReferenceError, match="fake.onnx: no extra.val_stats"):
        alarm_study(_FakeClassifier(extra={}), val, stream, cfg, reference_from="model", **kw)
    own = alarm_study(_FakeClassifier(extra={VAL_STATS_KEY: REF}), val, stream, cfg, reference_from="model", **kw)
    assert own["reference"] == REF and own["reference_from"] == "the model's extra.val_stats"
