"""Several sources in one ``runtime.run``: batching across sources, per-source records and state, reconnects."""

from __future__ import annotations

import io
import json
import threading
from pathlib import Path
from typing import Any

import pytest

from runtime.run import EXIT_OK, expand_sources, main, run


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


class CountingClassifier:
    """The real tiny classifier, counting how it was called (one frame or a batch)."""

    def __init__(self, clf: Any) -> None:
        self._clf = clf
        self.batches: list[int] = []
        self.singles = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._clf, name)

    def predict(self, x: Any, source: str | None = None) -> Any:
        self.singles += 1
        return self._clf.predict(x, source=source)

    def predict_batch(self, items: Any, **kw: Any) -> Any:
        items = list(items)
        self.batches.append(len(items))
        return self._clf.predict_batch(items, **kw)


def test_two_videos_are_batched_and_every_record_names_its_source(clf, video_writer, tmp_path):
    a = video_writer(tmp_path / "a.avi", [0.05] * 30)
    b = video_writer(tmp_path / "b.avi", [0.95] * 20)
    jsonl = tmp_path / "r.jsonl"
    counting = CountingClassifier(clf)
    err = io.StringIO()
    summary = run([str(a), str(b)], classifier=counting, outputs=[str(jsonl)], err=err, batch_timeout_ms=200)
    recs = records(jsonl)
    assert summary.exit_code == EXIT_OK and summary.frames == 50 == len(recs)
    by_src = {s: [r for r in recs if r["source"] == s] for s in (str(a), str(b))}
    assert [r["frame"] for r in by_src[str(a)]] == list(range(30))  # every frame, in order, per source
    assert [r["frame"] for r in by_src[str(b)]] == list(range(20))
    assert {r["label"] for r in by_src[str(a)]} == {"clean"} and {r["label"] for r in by_src[str(b)]} == {"bridges"}
    # a pass takes a frame of each, topped up with frames already waiting: fewer backend calls than frames
    assert counting.batches and max(counting.batches) >= 2 and sum(counting.batches) >= 30
    assert summary.batches < summary.frames
    states = {s["name"]: s for s in summary.to_dict()["sources"]}
    assert states[str(a)]["frames"] == 30 and states[str(b)]["frames"] == 20
    assert all(s["state"] == "ended" for s in states.values())
    text = err.getvalue()
    assert "2 sources" in text and "batching" in text and f"{b} (video) ended: 20 frames" in text


def test_streams_file_and_duplicates(tmp_path, video_file):
    lst = tmp_path / "cams.streams"
    lst.write_text(f"# station 3\n{video_file}\n\nrtsp://user:secret@10.0.0.7/cam\n")
    assert expand_sources([str(lst)]) == [str(video_file), "rtsp://user:secret@10.0.0.7/cam"]
    with pytest.raises(ValueError, match="given twice") as e:
        expand_sources([str(lst), "rtsp://user:secret@10.0.0.7/cam"])
    assert "secret" not in str(e.value)  # credentials never in messages
    (tmp_path / "empty.streams").write_text("# nothing\n")
    with pytest.raises(ValueError, match="no sources"):
        expand_sources([str(tmp_path / "empty.streams")])
    with pytest.raises(FileNotFoundError, match="streams list"):
        expand_sources([str(tmp_path / "missing.streams")])


class Station:
    """Capture factory for two fake cameras: video0 runs forever; video1 gives 5 frames, then cannot be reopened
    for ``down`` attempts, then runs again."""

    def __init__(self, fake_capture: Any, down: int = 3, down_at_start: bool = False) -> None:
        self.fake, self.down, self.opens = fake_capture, down, {"/dev/video0": 0, "/dev/video1": 0}
        self.down_at_start = down_at_start
        self.lock = threading.Lock()

    def __call__(self, location: Any) -> Any:
        with self.lock:
            self.opens[location] += 1
            n = self.opens[location]
        if location == "/dev/video0":
            return self.fake(frames=None, value=0.05, delay=0.005)
        if self.down_at_start:
            return None if n <= self.down else self.fake(frames=None, value=0.95, delay=0.005)
        if n == 1:
            return self.fake(frames=5, value=0.95, delay=0.005)
        return None if n <= 1 + self.down else self.fake(frames=None, value=0.95, delay=0.005)


def test_a_failing_camera_reconnects_while_the_other_goes_on(clf, fake_capture, tmp_path):
    station = Station(fake_capture)
    jsonl = tmp_path / "r.jsonl"
    err = io.StringIO()
    summary = run(["/dev/video0", "/dev/video1"], classifier=clf, outputs=[str(jsonl)], max_frames=160,
                  capture_factory=station, err=err, backoff=(0.01, 0.04))
    recs = records(jsonl)
    per = {s: sum(r["source"] == s for r in recs) for s in ("/dev/video0", "/dev/video1")}
    assert per["/dev/video0"] > 5 and per["/dev/video1"] > 5  # video1 came back after its outage
    assert station.opens["/dev/video1"] >= 5
    st = {s["name"]: s for s in summary.streams}
    assert st["/dev/video1"]["reconnects"] >= 1 and st["/dev/video0"]["reconnects"] == 0
    assert summary.exit_code == EXIT_OK and summary.stopped_by == "max-frames"
    assert "/dev/video1: cannot reopen" in err.getvalue()


def test_a_camera_down_at_start_does_not_stop_the_others(clf, fake_capture, tmp_path):
    station = Station(fake_capture, down=10**6, down_at_start=True)
    err = io.StringIO()
    summary = run(["/dev/video0", "/dev/video1"], classifier=clf, outputs=[], quiet=True, max_frames=40,
                  capture_factory=station, err=err, backoff=(0.01, 0.02))
    st = {s["name"]: s for s in summary.streams}
    assert st["/dev/video0"]["frames"] == 40 and st["/dev/video1"]["frames"] == 0
    assert st["/dev/video1"]["state"] == "reconnecting" and st["/dev/video1"]["reconnects"] >= 1
    assert "/dev/video1 (camera) reconnecting: 0 frames" in err.getvalue()
    # alone, a camera that cannot be opened is a setup error, as before
    with pytest.raises(OSError, match="cannot open"):
        run(["/dev/video1"], classifier=clf, outputs=[], quiet=True, capture_factory=station, err=io.StringIO())


def test_a_broken_file_source_fails_alone(clf, video_writer, tmp_path, fake_capture):
    good = video_writer(tmp_path / "good.avi", [0.05] * 12)
    bad = video_writer(tmp_path / "bad.avi", [0.95] * 12)

    class Exploding(fake_capture):
        def read(self):  # noqa: ANN202
            if self.count >= 3:
                raise RuntimeError("decoder crashed")
            return super().read()

    import cv2

    def factory(location: Any) -> Any:
        return Exploding(frames=None, value=0.95) if str(location).endswith("bad.avi") else cv2.VideoCapture(location)

    summary = run([str(good), str(bad)], classifier=clf, outputs=[], quiet=True, capture_factory=factory,
                  err=io.StringIO())
    st = {s["name"]: s for s in summary.streams}
    assert st[str(good)]["frames"] == 12 and st[str(good)]["state"] == "ended"
    assert st[str(bad)]["errors"] == 1 and "decoder crashed" in summary.error_examples[0]
    assert summary.exit_code == 3  # an input could not be read: a supervisor must know


def test_cli_takes_several_sources(tiny_model, video_writer, tmp_path, capsys):
    a = video_writer(tmp_path / "a.avi", [0.05] * 6)
    b = video_writer(tmp_path / "b.avi", [0.95] * 6)
    jsonl = tmp_path / "r.jsonl"
    code = main(["--source", str(a), "--source", str(b), "--model", str(tiny_model), "--headless", "--quiet",
                 "--output", str(jsonl), "--batch-timeout", "50", "--no-status"])
    assert code == EXIT_OK and len(records(jsonl)) == 12
    assert "2 sources" in capsys.readouterr().err


def test_a_file_backlog_is_classified_in_batches_in_order(clf, video_writer, tmp_path):
    video = video_writer(tmp_path / "v.avi", [0.05, 0.95] * 15)

    class Slow(CountingClassifier):  # inference slower than decoding: frames wait, and go in together
        def predict(self, x: Any, source: str | None = None) -> Any:
            import time

            time.sleep(0.01)
            return super().predict(x, source)

        def predict_batch(self, items: Any, **kw: Any) -> Any:
            import time

            time.sleep(0.01)
            return super().predict_batch(items, **kw)

    slow = Slow(clf)
    jsonl = tmp_path / "r.jsonl"
    summary = run(str(video), classifier=slow, outputs=[str(jsonl)], err=io.StringIO())
    recs = records(jsonl)
    assert [r["frame"] for r in recs] == list(range(30))
    assert [r["label"] for r in recs] == ["clean", "bridges"] * 15
    assert slow.batches and max(slow.batches) > 1 and summary.batches < 30


def test_status_line_shows_each_sources_state_fps_and_drops(clf, fake_capture):
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    err = Tty()
    station = Station(fake_capture, down=10**6, down_at_start=True)
    run(["/dev/video0", "/dev/video1"], classifier=clf, outputs=[], quiet=True, max_frames=30,
        capture_factory=station, err=err, backoff=(0.01, 0.02))
    lines = [t for t in err.getvalue().split("\r\x1b[K") if t.startswith("[run] ") and " frames " in t]
    assert lines, err.getvalue()
    line = lines[-1]  # the last status line drawn
    assert "| /dev/video0 running" in line and " fps drop " in line
    assert "| /dev/video1 reconnecting 0.0 fps drop 0" in line


def _brightness(path: Path) -> list[float]:
    """The median grey level of every frame of a video (the overlay text leaves the median alone)."""
    import cv2
    import numpy as np

    cap = cv2.VideoCapture(str(path))
    levels = []
    while True:
        ok, img = cap.read()
        if not ok:
            break
        levels.append(float(np.median(img)) / 255)
    cap.release()
    return levels


def test_several_sources_get_a_video_each(clf, video_writer, tmp_path):
    """A video output with several sources: one file per source, each holding that source's frames alone."""
    (tmp_path / "cams").mkdir()
    a = video_writer(tmp_path / "cams" / "a.avi", [0.05] * 12)
    b = video_writer(tmp_path / "b.avi", [0.95] * 8)
    out = tmp_path / "out" / "annotated.avi"
    err = io.StringIO()
    summary = run([str(a), str(b)], classifier=clf, outputs=[str(out)], quiet=True, err=err, batch_timeout_ms=200)
    assert summary.exit_code == EXIT_OK and summary.frames == 20
    per_source = {p.name: _brightness(p) for p in out.parent.iterdir()}
    assert set(per_source) == {"annotated.a.avi", "annotated.b.avi"}  # nothing else, no mixed annotated.avi
    assert len(per_source["annotated.a.avi"]) == 12 and max(per_source["annotated.a.avi"]) < 0.3
    assert len(per_source["annotated.b.avi"]) == 8 and min(per_source["annotated.b.avi"]) > 0.7
    assert summary.outputs == [str(out.parent / "annotated.a.avi"), str(out.parent / "annotated.b.avi")]
    assert "annotated.a.avi" in err.getvalue()  # the summary names each file


def test_several_sources_get_a_window_each(clf, video_writer, tmp_path, monkeypatch):
    """display://0 with several sources: a window per source (OpenCV's window calls recorded here, as this
    OpenCV has no GUI), each showing its own source's frames only."""
    import cv2
    import numpy as np

    shown: dict[str, list[float]] = {}
    monkeypatch.setattr("runtime.outputs.gui_problem", lambda: None)
    monkeypatch.setattr(cv2, "namedWindow", lambda name, flags=0: shown.setdefault(name, []))
    monkeypatch.setattr(cv2, "imshow", lambda name, img: shown[name].append(float(np.median(img)) / 255))
    monkeypatch.setattr(cv2, "waitKey", lambda delay=0: -1)
    monkeypatch.setattr(cv2, "getWindowProperty", lambda name, prop: 1.0)
    monkeypatch.setattr(cv2, "destroyWindow", lambda name: None)
    a = video_writer(tmp_path / "left.avi", [0.05] * 10)
    b = video_writer(tmp_path / "right.avi", [0.95] * 6)
    summary = run([str(a), str(b)], classifier=clf, outputs=["display://0"], quiet=True, err=io.StringIO())
    assert summary.exit_code == EXIT_OK and summary.outputs == ["display (left)", "display (right)"]
    assert set(shown) == {"SEM classifier (0) left", "SEM classifier (0) right"}
    assert len(shown["SEM classifier (0) left"]) == 10 and max(shown["SEM classifier (0) left"]) < 0.3
    assert len(shown["SEM classifier (0) right"]) == 6 and min(shown["SEM classifier (0) right"]) > 0.7


def test_one_source_keeps_its_video_name(clf, video_file, tmp_path):
    out = tmp_path / "annotated.avi"
    summary = run(str(video_file), classifier=clf, outputs=[str(out)], quiet=True, err=io.StringIO())
    assert summary.exit_code == EXIT_OK and [p.name for p in tmp_path.glob("annotated*")] == ["annotated.avi"]
