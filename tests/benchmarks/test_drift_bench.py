"""benchmarks.drift: the stream simulation on hand-made outcome pools (the model part runs in the benchmark)."""

from __future__ import annotations

from benchmarks.drift import _P, NOVEL, delay_trials, false_alarms
from runtime.contract import CLASSES
from runtime.drift import DriftConfig

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
