"""``python -m runtime.run``: the loop over every source kind, outputs, smoothing, errors, and clean shutdown."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from runtime.run import EXIT_INPUT, ProbabilitySmoother, main, run

REPO = Path(__file__).resolve().parents[2]


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_folder_run_writes_every_record_and_keeps_going_past_bad_images(clf, image_dir, tmp_path):
    out, err = io.StringIO(), io.StringIO()
    jsonl, csv_path = tmp_path / "res.jsonl", tmp_path / "res.csv"
    summary = run(str(image_dir), classifier=clf, outputs=[str(jsonl), str(csv_path), "-"], headless=True,
                  out=out, err=err)
    recs = records(jsonl)
    assert len(recs) == 6 == summary.frames and summary.errors == 1 and summary.classified == 5
    assert [r["frame"] for r in recs] == list(range(6))
    bad = [r for r in recs if r["error"]]
    assert len(bad) == 1 and "img5_corrupt.png" in bad[0]["error"] and bad[0]["label"] is None
    by_name = {Path(r["source"]).name: r for r in recs}
    assert by_name["img2_dark.png"]["label"] == "clean" and by_name["img10_bright.png"]["label"] == "bridges"
    assert by_name["img3_mid.png"]["label"] == "other" and by_name["img3_mid.png"]["rejected"] is True
    assert all(r["latency_ms"] > 0 for r in recs if not r["error"])
    assert len(csv_path.read_text().splitlines()) == 7
    assert len(out.getvalue().splitlines()) == 7  # header + a line per frame
    text = err.getvalue()
    assert "summary" in text and "6 (5 classified, 1 error" in text and "end of source" in text
    assert summary.exit_code == EXIT_INPUT and summary.labels["clean"] >= 1  # one unreadable input
    assert "error     " in text and "img5_corrupt.png" in text and "exit 3: 1 input could not be read" in text


def test_video_run_with_smoothing_and_max_frames(clf, video_file, tmp_path):
    jsonl = tmp_path / "v.jsonl"
    summary = run(str(video_file), classifier=clf, outputs=[str(jsonl)], smoothing=4, max_frames=8,
                  err=io.StringIO())
    recs = records(jsonl)
    assert len(recs) == 8 and summary.stopped_by == "max-frames"
    assert all(r["source"] == str(video_file) for r in recs)
    # alternating dark/bright frames: averaged over 4 the probabilities tie between clean and bridges,
    # so the smoothed confidence is ~0.5 instead of ~0.98 per frame
    assert recs[0]["confidence"] > 0.9 and all(r["confidence"] < 0.6 for r in recs[3:])


def test_smoother_averages_probabilities(clf, grey_image):
    sm = ProbabilitySmoother(clf, 3)
    a = sm.update(clf.predict(grey_image(0.05)))
    b = sm.update(clf.predict(grey_image(0.95)))
    assert a.label == "clean" and b.probs[0] == pytest.approx(b.probs[1], abs=0.02)
    assert b.rejected == (b.score < clf.threshold)


def test_run_writes_annotated_video(clf, video_file, tmp_path):
    mp4 = tmp_path / "annotated.avi"
    summary = run(str(video_file), classifier=clf, outputs=[str(mp4)], err=io.StringIO())
    assert mp4.stat().st_size > 0 and summary.frames == 12


def test_live_source_failing_mid_stream_keeps_the_run_alive(clf, fake_capture, tmp_path):
    made = []

    def factory(loc):
        cap = fake_capture(frames=4) if not made else fake_capture(value=0.95, delay=0.002)
        made.append(cap)
        return cap

    jsonl = tmp_path / "live.jsonl"
    summary = run("/dev/video0", classifier=clf, outputs=[str(jsonl)], max_frames=12, capture_factory=factory,
                  err=io.StringIO())
    recs = records(jsonl)
    assert len(recs) == 12 and summary.reconnects >= 1 and len(made) >= 2
    assert recs[-1]["label"] == "bridges" and all(r["error"] is None for r in recs)


def test_stop_event_ends_a_looping_run_cleanly(clf, video_file, tmp_path):
    stop = threading.Event()
    jsonl = tmp_path / "loop.jsonl"
    threading.Timer(0.5, stop.set).start()
    summary = run(str(video_file), classifier=clf, outputs=[str(jsonl)], loop=True, stop_event=stop,
                  err=io.StringIO())
    assert summary.stopped_by == "signal" and summary.frames == len(records(jsonl)) > 12


def test_setup_errors_exit_2_with_a_message(tmp_path, tiny_model, image_dir, capsys):
    assert main(["--source", str(tmp_path / "nothing-here"), "--model", str(tiny_model)]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["--source", str(image_dir), "--model", str(tmp_path / "missing.onnx")]) == 2
    assert "missing.onnx" in capsys.readouterr().err


def test_display_request_without_gui_exits_2(image_dir, tiny_model, capsys):
    from runtime.outputs import gui_problem

    if gui_problem() is None:
        pytest.skip("this OpenCV can open windows")
    assert main(["--source", str(image_dir), "--model", str(tiny_model), "--output", "display://0"]) == 2
    assert "opencv-python-headless" in capsys.readouterr().err
    # --headless drops the display and runs (exit 3: the folder holds one corrupt image)
    assert main(["--source", str(image_dir), "--model", str(tiny_model), "--output", "display://0",
                 "--headless", "--quiet"]) == EXIT_INPUT


def test_help_has_examples(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "examples:" in text and "/dev/video0" in text and "display://0" in text


def test_sigterm_stops_cleanly_with_records_flushed(tiny_model, video_file, tmp_path):
    jsonl = tmp_path / "term.jsonl"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [sys.executable, "-m", "runtime.run", "--source", str(video_file), "--loop", "--model", str(tiny_model),
         "--output", str(jsonl), "--headless", "--quiet"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if jsonl.exists() and len(jsonl.read_text().splitlines()) >= 5:
                break
            if proc.poll() is not None:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "summary" in err and "stopped by signal" in err
    recs = records(jsonl)  # every line complete JSON
    assert len(recs) >= 5 and [r["frame"] for r in recs] == list(range(len(recs)))
    assert f"frames    {len(recs)} " in err
