"""``benchmarks.latency --pipeline-only``: decode/inference overlap of runtime.run and the multi-camera station
(one process vs one per camera), measured end to end on a tiny model (the machinery, not the speeds)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from benchmarks import latency


@pytest.mark.slow
def test_pipeline_only_measures_overlap_and_station(tiny_models: Path, tmp_path: Path) -> None:
    rc = latency.main(["--model", str(tiny_models), "--pipeline-only", "--pipeline-frames", "20", "--rounds", "1",
                       "--frame-size", "64", "--station-sources", "2", "--station-fps", "25",
                       "--station-seconds", "1.5", "--station-size", "64", "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    doc = json.loads((tmp_path / "latency.json").read_text())
    ov = doc["pipeline"]["overlap"]
    assert ov["status"] == "ok" and ov["codec"] == "MJPG" and ov["frames"] == 20
    keys = ("decode", "predict", "predict_spin", "predict_run_threads", "run", "run_all_cores")
    rates, per, cpu = ov["medians_fps"], ov["rates_fps"], ov["cpu_ms_per_frame"]
    assert all(rates[k] > 0 and len(per[k]) == 1 and cpu[k][0] >= 0 for k in keys)  # CPU: 10 ms ticks
    # the goal's reference: the faster of the two all-core predict rates, or decoding when that is slower
    goal = ov["ratios"]["run"]
    best = max(per["predict"][0], per["predict_spin"][0])
    assert goal["rounds"][0] == pytest.approx(per["run"][0] / min(per["decode"][0], best), rel=1e-6)
    assert goal["median"] == goal["rounds"][0] and ov["meets_goal"] == (goal["median"] >= latency.OVERLAP_GOAL)
    same = ov["ratios"]["run_vs_same_threads"]["rounds"][0]
    assert same == pytest.approx(per["run"][0] / min(per["decode"][0], per["predict_run_threads"][0]), rel=1e-6)
    assert ov["run_default_threads"] == max(1, ov["physical_cores"] - 1)
    st = doc["pipeline"]["station"]
    modes = [r["mode"] for r in st["rows"]]
    assert modes == ["one process", "2 processes"]
    one, many = st["rows"]
    assert one["processes"] == 1 and many["processes"] == 2
    assert one["frames"] > 0 and many["frames"] > 0 and one["throughput_fps"] > 0
    assert many["mean_batch"] == 1.0 and one["mean_batch"] >= 1.0
    assert one["latency_p50_ms"] > 0 and one["latency_p90_ms"] >= one["latency_p50_ms"]
    md = (tmp_path / "latency.md").read_text()
    assert "decode overlapping inference" in md and "one process (batched) vs one process each" in md


def test_paced_capture_plays_a_video_at_a_cameras_rate(tmp_path: Path) -> None:
    frames = [np.full((32, 32), v, np.uint8) for v in (10, 200)]
    video = latency.write_mjpg(tmp_path / "cam.avi", frames, 4)
    cap = latency.PacedCapture(str(video), fps=50)
    try:
        t0 = time.perf_counter()
        got = [cap.read() for _ in range(10)]  # loops past the 4 frames of the file
        took = time.perf_counter() - t0
    finally:
        cap.release()
    assert all(ok for ok, _ in got) and got[0][1].shape[:2] == (32, 32)
    assert took >= 9 / 50 * 0.9  # paced: ten frames at 50 fps take about 0.2 s
    rate, kept, cpu_ms = latency.decode_rate(video, keep=2)
    assert rate > 0 and len(kept) == 2 and cpu_ms >= 0


@pytest.mark.parametrize(("cores", "threads"), [(1, 1), (2, 1), (8, 7)])
def test_run_leaves_a_core_to_decoding(monkeypatch: pytest.MonkeyPatch, cores: int, threads: int) -> None:
    """runtime.run's default ONNX Runtime threads, which the overlap check measures: all physical cores but one."""
    import runtime.ort_backend
    from runtime.run import default_threads

    monkeypatch.setattr(runtime.ort_backend, "physical_cores", lambda *a, **k: cores)
    assert default_threads() == threads


def test_overlap_table_is_formatted() -> None:
    keys = [k for k, _ in latency.OVERLAP_COLUMNS]
    ov = {"status": "ok", "frames": 300, "frame_size": 1024, "content": "synthetic", "physical_cores": 2,
          "run_default_threads": 1, "medians_fps": dict(zip(keys, (200.0, 120.0, 125.0, 140.0, 141.0, 133.0))),
          "medians_cpu_ms": {k: 4.0 for k in keys}, "goal": 0.8, "meets_goal": True, "conclusive": True,
          "ratios": {"run": {"median": 1.13, "min": 0.9, "max": 1.2, "rounds": [0.9, 1.13, 1.2]},
                     "run_all_cores": {"median": 1.0, "min": 1.0, "max": 1.0, "rounds": [1.0]},
                     "run_vs_same_threads": {"median": 1.0, "min": 1.0, "max": 1.0, "rounds": [1.0]}}}
    md = latency.format_station({"overlap": ov})
    assert "| fps | 200.0 | 120.0 | 125.0 | 140.0 | 141.0 | 133.0 |" in md
    assert "predict, all cores (2 thr)" in md and "runtime.run (default) (1 thr)" in md
    assert "| 0.90, 1.13, 1.20 | 1.13× (0.90–1.20) |" in md and "≥ 0.8×? yes" in md


def test_station_table_is_formatted() -> None:
    row = {"fps_per_camera": 30.0, "mode": "one process", "processes": 1, "throughput_fps": 119.5, "frames": 1800,
           "dropped": 3, "latency_p50_ms": 21.0, "latency_p90_ms": 40.0, "mean_batch": 3.9}
    md = latency.format_station({"station": {"status": "ok", "sources": 4, "frame_size": 512, "seconds": 15.0,
                                             "content": "synthetic", "rows": [row]}})
    assert "| 30 | one process | 119.5 | 3 | 21.0 | 40.0 | 3.90 |" in md
    assert "skipped: x" in latency.format_station({"station": {"status": "skipped", "reason": "x"}})
