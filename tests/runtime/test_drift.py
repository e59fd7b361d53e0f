"""Drift alarm: rolling-window rejection rate and class mix against the validation reference, with hysteresis."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from runtime.contract import CLASSES, ModelMetadata
from runtime.drift import (
    VAL_STATS_KEY,
    DriftConfig,
    DriftHook,
    DriftMonitor,
    val_stats,
    val_stats_from_confusion,
)

UNIFORM = {c: 1 / 8 for c in CLASSES}
REF = {"n": 800, "rejection_rate": 0.05, "class_mix": UNIFORM}


def p(label: str, rejected: bool = False) -> SimpleNamespace:
    return SimpleNamespace(label="other" if rejected else label, rejected=rejected)


def stream(rng: np.random.Generator, n: int, rej: float, classes: tuple[str, ...] = CLASSES) -> list[SimpleNamespace]:
    return [p(classes[rng.integers(len(classes))], bool(rng.random() < rej)) for _ in range(n)]


def feed(mon: DriftMonitor, preds: list[SimpleNamespace]) -> list[tuple[int, str]]:
    return [(i, ch) for i, x in enumerate(preds) if (ch := mon.update(x))]


def test_reference_statistics_from_validation() -> None:
    s = val_stats([0, 0, 1, 7], [False, False, False, True], CLASSES)
    assert s["n"] == 4 and s["rejection_rate"] == 0.25 and s["class_mix"]["clean"] == 0.5
    cm = [[2, 0] + [0] * 6, [0, 1] + [0] * 5 + [1]] + [[0] * 8] * 6
    assert val_stats_from_confusion(cm, 1, CLASSES) == s
    with pytest.raises(ValueError):
        val_stats([0], [], CLASSES)


def test_a_stream_like_validation_raises_no_alarm() -> None:
    mon = DriftMonitor(CLASSES, REF)
    changes = feed(mon, stream(np.random.default_rng(1), 20_000, 0.05))
    assert changes == [] and mon.state.ready and not mon.state.alarm
    assert abs(mon.state.rejection_rate - 0.05) < 0.04 and mon.state.mix_distance < 0.15
    assert mon.status_text() == "drift ok"


def test_more_rejections_raise_the_alarm_and_it_clears_with_hysteresis() -> None:
    rng = np.random.default_rng(2)
    mon = DriftMonitor(CLASSES, REF, DriftConfig(mix_limit=None))
    assert feed(mon, stream(rng, 1000, 0.05)) == []
    changes = feed(mon, stream(rng, 1000, 0.25))
    assert changes and changes[0][1] == "raised" and changes[0][0] < 200  # a 20-point jump is seen within 200 frames
    assert len(changes) == 1, "the alarm flickered"
    st = mon.state
    assert st.alarm and st.alarms_raised == 1 and "rejection rate" in st.reason and st.since is not None
    assert mon.status_text().startswith("DRIFT ALARM") and st.to_dict()["alarm"] is True
    back = feed(mon, stream(rng, 2000, 0.05))
    assert [c for _, c in back] == ["cleared"] and not mon.state.alarm and mon.state.reason == ""


def test_a_shift_of_the_class_mix_raises_the_alarm() -> None:
    rng = np.random.default_rng(3)
    mon = DriftMonitor(CLASSES, REF)
    feed(mon, stream(rng, 600, 0.05))
    changes = feed(mon, stream(rng, 1000, 0.05, classes=("clean", "cracks")))  # two classes only: distance 0.75
    assert changes[0][1] == "raised" and "class mix" in mon.state.reason and "rejection" not in mon.state.reason


def test_invalid_and_unreadable_frames_do_not_count() -> None:
    mon = DriftMonitor(CLASSES, REF)
    for _ in range(500):
        assert mon.update(SimpleNamespace(label="invalid", rejected=True)) is None
        assert mon.update(None) is None
    assert mon.state.frames == 0 and not mon.state.ready


def test_learning_the_station_reference_from_its_first_frames() -> None:
    rng = np.random.default_rng(4)
    mostly_clean = ("clean",) * 9 + ("cracks",)
    mon = DriftMonitor(CLASSES, REF, DriftConfig(learn=1000))  # validation is balanced, the station is not
    assert mon.status_text().startswith("drift learning")
    assert feed(mon, stream(rng, 6000, 0.02, mostly_clean)) == []
    assert mon.has_reference and abs(mon.p0 - 0.02) < 0.015 and "first 1000" in mon.state.reference
    with_val = DriftMonitor(CLASSES, REF)
    assert feed(with_val, stream(rng, 600, 0.02, mostly_clean))[0][1] == "raised"  # why learn exists


def test_monitor_from_model_metadata() -> None:
    meta = ModelMetadata(extra={VAL_STATS_KEY: REF})
    assert DriftMonitor.from_metadata(meta).p0 == 0.05
    with pytest.raises(ValueError, match="--drift-learn"):
        DriftMonitor.from_metadata(ModelMetadata())
    assert DriftMonitor.from_metadata(ModelMetadata(), DriftConfig(learn=300)).state.reference.startswith("learnt")
    with pytest.raises(ValueError):
        DriftConfig(window=100, min_frames=200).validate()


def test_hook_marks_records_and_publishes_changes() -> None:
    published: list[dict] = []
    logs: list[str] = []
    out = SimpleNamespace(publish_drift=published.append, describe=lambda: "mqtt://h:1883/t")
    loop = SimpleNamespace(outputs=[out, SimpleNamespace(describe=lambda: "res.jsonl")], status_line=None)
    hook = DriftHook(DriftMonitor(CLASSES, REF, DriftConfig(window=100, min_frames=50, mix_limit=None)), logs.append)
    hook.on_start(loop)
    rng = np.random.default_rng(5)
    marks = []
    for x in stream(rng, 100, 0.05) + stream(rng, 200, 0.6):
        res = SimpleNamespace(prediction=x, extra={})
        hook.before_write(loop, None, res)
        marks.append(res.extra.get("drift"))
    assert marks[0] is None and "ok" in marks and marks[-1] == "alarm"
    assert published and published[0]["event"] == "drift_raised" and published[0]["alarm"] is True
    assert any(m.startswith("ALARM: rejection rate") for m in logs) and "DRIFT ALARM" in hook.status(loop)
    hook.on_close(loop, None)
    assert "1 alarm(s) raised" in logs[-1]


def drift_video(tmp_path: Path) -> Path:
    from tests.runtime.conftest import write_video

    # 200 confident frames (dark = clean, bright = bridges, as on validation), then 150 mid-grey ones the tiny
    # model rejects: a new kind of image the model does not know.
    return write_video(tmp_path / "drift.avi", [0.05, 0.95] * 100 + [0.5] * 150, size=32)


def drift_model(make_model, rate: float = 0.0) -> Path:
    from tests.runtime.conftest import tiny_meta

    ref = {"n": 400, "rejection_rate": rate, "class_mix": {"clean": 0.5, "bridges": 0.5}}
    return make_model("drift.onnx", meta=tiny_meta(extra={VAL_STATS_KEY: ref}))


def test_run_raises_the_alarm_in_status_records_and_summary(make_model, tmp_path: Path) -> None:
    import io
    import json

    from runtime.run import run

    err = io.StringIO()
    jsonl = tmp_path / "res.jsonl"
    run(str(drift_video(tmp_path)), model=str(drift_model(make_model)), outputs=[str(jsonl)], headless=True,
        err=err, drift_config=DriftConfig(window=100, min_frames=50), threads=1)
    recs = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert len(recs) == 350 and recs[10]["drift"] is None and recs[100]["drift"] == "ok"
    first = next(i for i, r in enumerate(recs) if r["drift"] == "alarm")
    assert 200 < first < 215  # a few rejected frames past the 3% floor of a 100-frame window
    assert recs[-1]["drift"] == "alarm"
    text = err.getvalue()
    assert "[drift] ALARM: rejection rate" in text and "1 alarm(s) raised" in text


def test_run_without_validation_statistics(tiny_model: Path, image_dir: Path, tmp_path: Path) -> None:
    import io

    from runtime.run import main, run

    err = io.StringIO()
    run(str(image_dir), model=str(tiny_model), outputs=[], quiet=True, headless=True, err=err)
    assert "[drift] off: no reference" in err.getvalue()
    assert main(["--source", str(image_dir), "--model", str(tiny_model), "--drift", "on", "--headless"]) == 2


def test_mix_limit_argument() -> None:
    from runtime.drift import parse_mix_limit
    from runtime.run import build_parser

    assert parse_mix_limit("off") is None and parse_mix_limit("0.3") == 0.3
    for bad in ("abc", "0", "1.5"):
        with pytest.raises(ValueError, match="between 0 and 1"):
            parse_mix_limit(bad)
    args = build_parser().parse_args(["--source", "x", "--drift-mix-limit", "off"])
    assert args.drift_mix_limit is None
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--source", "x", "--drift-mix-limit", "2"])
