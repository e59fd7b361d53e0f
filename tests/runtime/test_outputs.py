"""Outputs: records appended and flushed per frame (never truncating), videos readable, clear errors otherwise."""

from __future__ import annotations

import csv
import io
import json

import cv2
import numpy as np
import pytest

from runtime.classifier import Prediction
from runtime.outputs import (
    RECORD_FIELDS,
    ConsoleOutput,
    CsvOutput,
    JsonlOutput,
    OutputError,
    OutputWriteError,
    VideoOutput,
    draw_overlay,
    open_output,
)
from runtime.sources import Frame


def make_result(index: int = 0, rejected: bool = False, error: str | None = None, image=None):
    from runtime.outputs import FrameResult

    frame = Frame(index=index, source=f"/data/img{index}.png", timestamp=1_700_000_000.0 + index, image=image)
    if error:
        return FrameResult(frame, None, error, 1.0)
    probs = np.full(8, 0.02, np.float32)
    probs[3] = 0.86
    pred = Prediction(label="other" if rejected else "cracks", index=7 if rejected else 3, top_label="cracks",
                      top_index=3, confidence=0.86, probs=probs, logits=np.zeros(8, np.float32), rejected=rejected,
                      score=0.86, timings={"total": 5.0}, source=frame.source)
    return FrameResult(frame, pred, None, 5.25, fps=29.5)


def test_jsonl_record_fields_and_per_record_flush(tmp_path):
    path = tmp_path / "out" / "res.jsonl"
    out = open_output(str(path))
    assert isinstance(out, JsonlOutput)
    out.write(make_result(0))
    # flushed before close: another process tailing the file sees it now
    rec = json.loads(path.read_text().splitlines()[0])
    assert tuple(rec) == RECORD_FIELDS
    assert rec["source"] == "/data/img0.png" and rec["frame"] == 0 and rec["label"] == "cracks"
    assert rec["confidence"] == pytest.approx(0.86) and rec["rejected"] is False and rec["error"] is None
    assert rec["latency_ms"] == pytest.approx(5.25) and rec["timestamp"].startswith("2023-11-14T22:13:20")
    out.write(make_result(1, rejected=True))
    out.write(make_result(2, error="/data/img2.png: cannot decode image"))
    out.close()
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["label"] for r in recs] == ["cracks", "other", None]
    assert recs[1]["top_label"] == "cracks" and recs[2]["error"].startswith("/data/img2.png")


def test_jsonl_appends_and_repairs_a_torn_last_line(tmp_path):
    path = tmp_path / "res.jsonl"
    path.write_text('{"earlier": 1}\n{"torn": ')  # a previous run killed mid-write
    out = JsonlOutput(path)
    out.write(make_result(0))
    out.close()
    lines = path.read_text().splitlines()
    assert lines[0] == '{"earlier": 1}' and lines[1] == '{"torn": '
    assert json.loads(lines[2])["label"] == "cracks"


def test_csv_header_once_and_appends(tmp_path):
    path = tmp_path / "res.csv"
    for i in range(2):
        out = open_output(str(path))
        assert isinstance(out, CsvOutput) and out.path == path
        out.write(make_result(i, rejected=bool(i)))
        out.close()
    rows = list(csv.DictReader(path.open()))
    assert len(rows) == 2 and rows[0]["label"] == "cracks" and rows[1]["label"] == "other"
    assert rows[1]["top_label"] == "cracks" and rows[1]["rejected"] == "True" and rows[0]["error"] == ""
    assert path.read_text().count("source,frame") == 1


def test_csv_with_foreign_header_is_left_alone(tmp_path):
    path = tmp_path / "res.csv"
    path.write_text("name,value\nx,1\n")
    out = CsvOutput(path)
    out.write(make_result(0))
    out.close()
    assert path.read_text() == "name,value\nx,1\n"
    assert out.path == tmp_path / "res-1.csv" and "cracks" in out.path.read_text()


def test_video_output_is_readable_and_never_overwrites(tmp_path):
    path = tmp_path / "annotated.avi"
    path.write_bytes(b"someone else's video")
    out = open_output(str(path), fps=10)
    assert isinstance(out, VideoOutput) and out.path == tmp_path / "annotated-1.avi"
    img = np.full((61, 80), 128, np.uint8)  # odd height, grey: converted and padded
    for i in range(5):
        out.write(make_result(i, image=img))
    out.write(make_result(5, error="broken frame"))  # an error frame still gets a (grey card) frame
    assert not out.path.exists()  # written under a temporary name until complete
    out.close()
    assert path.read_bytes() == b"someone else's video"
    cap = cv2.VideoCapture(str(out.path))
    n = 0
    while cap.read()[0]:
        n += 1
    cap.release()
    assert n == 6
    assert not list(tmp_path.glob(".*partial*"))


def test_overlay_draws_on_any_frame_type():
    for img in (np.zeros((50, 60), np.uint16), np.zeros((50, 60, 4), np.uint8), np.zeros((50, 60), np.float32)):
        drawn = draw_overlay(img, make_result(0, rejected=True))
        assert drawn.shape == (50, 60, 3) and drawn.dtype == np.uint8 and drawn.any()
    assert draw_overlay(None, make_result(0, error="x"), size=(64, 48)).shape == (48, 64, 3)


def test_console_lines(tmp_path):
    buf = io.StringIO()
    out = open_output("-", stream=buf)
    assert isinstance(out, ConsoleOutput)
    out.write(make_result(0))
    out.write(make_result(1, rejected=True))
    out.write(make_result(2, error="/data/img2.png: cannot decode image"))
    lines = buf.getvalue().splitlines()
    assert lines[0].split() == ["frame", "source", "label", "conf", "score", "ms"]
    assert "cracks" in lines[1] and "0.860" in lines[1]
    assert "other (cracks?)" in lines[2]
    assert "ERROR" in lines[3] and "cannot decode image" in lines[3]


def test_display_without_gui_says_how_to_get_one(monkeypatch):
    monkeypatch.setattr(cv2, "getBuildInformation", lambda: "  GUI:                           NONE\n")
    with pytest.raises(OutputError) as info:
        open_output("display://0")
    msg = str(info.value)
    assert "pip uninstall opencv-python-headless && pip install opencv-python" in msg and "--headless" in msg


@pytest.mark.parametrize("uri", ["results.txt", "rtmp://host/live", "noext"])
def test_unknown_outputs_are_refused(uri, tmp_path):
    with pytest.raises(OutputError, match="unknown output"):
        open_output(uri)


def test_unwritable_output_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="cannot open"):
        open_output(str(blocker / "res.jsonl"))


# ------------------------------------------------------------------------------------------------ failures, invalid
def invalid_prediction(reason: str = "blank", source: str = "/data/blank.png"):
    """A frame the frame-quality gate refused, as the agreed interface describes it."""
    return Prediction(label="invalid", index=-1, top_label="", top_index=-1, confidence=0.0,
                      probs=np.zeros(8, np.float32), logits=np.full(8, np.nan, np.float32), rejected=True,
                      score=float("nan"), timings={"total": 0.4}, source=source, reason=reason)


def budget_write(budget: int):
    """An ``os.write`` that behaves like a filesystem with ``budget`` bytes free: a short write when the request
    does not fit, then ENOSPC."""
    import errno
    import os

    left = {"n": budget}

    def write(fd, data):
        if left["n"] <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = os.write(fd, bytes(data[:left["n"]]))
        left["n"] -= n
        return n

    return write


def test_jsonl_on_dev_full_names_the_file():
    out = JsonlOutput("/dev/full")
    with pytest.raises(OutputWriteError) as info:
        out.write(make_result(0))
    assert str(info.value).startswith("/dev/full: ") and "No space left on device" in str(info.value)
    out.close()


def test_csv_on_dev_full_names_the_file():
    with pytest.raises(OutputWriteError) as info:  # the header is the first write
        CsvOutput("/dev/full")
    assert str(info.value).startswith("/dev/full: ") and "No space left on device" in str(info.value)


@pytest.mark.parametrize("cls", [JsonlOutput, CsvOutput])
def test_a_full_disk_never_leaves_a_torn_record(cls, tmp_path, monkeypatch):
    path = tmp_path / f"res.{'jsonl' if cls is JsonlOutput else 'csv'}"
    first = cls(path)  # header (CSV) and 3 records fit; the disk fills up in the middle of a later one
    for i in range(3):
        first.write(make_result(i))
    first.close()
    size = path.stat().st_size
    record = len(path.read_bytes().splitlines(keepends=True)[-1])
    monkeypatch.setattr("runtime.outputs._write", budget_write(int(2.5 * record)))
    out = cls(path)
    written = 0
    with pytest.raises(OutputWriteError) as info:
        for i in range(3, 100):
            out.write(make_result(i))
            written += 1
    out.close()
    assert written == 2 and str(info.value).startswith(str(path)) and "No space left" in str(info.value)
    data = path.read_bytes()
    assert len(data) == size + 2 * record and data.endswith(b"\n")  # cut back to the last whole record
    if cls is JsonlOutput:
        assert [json.loads(line)["frame"] for line in data.splitlines()] == [0, 1, 2, 3, 4]
    else:
        assert [r["frame"] for r in csv.DictReader(io.StringIO(data.decode()))] == ["0", "1", "2", "3", "4"]


def test_invalid_frames_carry_their_reason_in_every_record(tmp_path):
    from runtime.outputs import FrameResult

    frame = Frame(index=0, source="/data/blank.png", timestamp=1_700_000_000.0)
    bad = FrameResult(frame, invalid_prediction("blank"), None, 0.4)
    jsonl, csv_path, buf = JsonlOutput(tmp_path / "r.jsonl"), CsvOutput(tmp_path / "r.csv"), io.StringIO()
    console = ConsoleOutput(buf)
    for out in (jsonl, csv_path, console):
        out.write(make_result(1))
        out.write(bad)
        out.close()
    good, inv = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert good["reason"] is None and good["label"] == "cracks"
    assert inv["label"] == "invalid" and inv["reason"] == "blank" and inv["rejected"] is True
    assert inv["top_label"] is None and inv["score"] is None and inv["error"] is None
    rows = list(csv.DictReader((tmp_path / "r.csv").open()))
    assert rows[0]["reason"] == "" and rows[1]["label"] == "invalid" and rows[1]["reason"] == "blank"
    line = buf.getvalue().splitlines()[2]
    assert "invalid (blank)" in line and "nan" not in line
    assert draw_overlay(np.zeros((40, 60), np.uint8), bad).any()


def test_broken_stdout_is_an_output_error_naming_stdout():
    class Broken(io.StringIO):
        def write(self, s):
            raise BrokenPipeError(32, "Broken pipe")

    with pytest.raises(OutputWriteError, match="stdout: cannot write: Broken pipe"):
        ConsoleOutput(Broken()).write(make_result(0))


@pytest.mark.parametrize(("sources", "expected"), [
    (["rtsp://user:secret@10.0.0.7/cam1", "rtsp://user:secret@10.0.0.8/cam1"], ["cam1", "cam1-2"]),
    (["/data/lot7.mp4", "/dev/video0", "0"], ["lot7", "video0", "0"]),
    (["../../etc/passwd", "shots/*.tif", "rtsp://10.0.0.9:554/", ".."], ["passwd", "shots", "10-0-0-9-554", "source"]),
    (["gst://v4l2src device=/dev/video1 ! videoconvert ! appsink", "csi://0?width=1920&fps=30"],
     ["video1-videoconvert-appsink", "0"]),
])
def test_source_slugs_are_safe_file_name_parts(sources, expected):
    from runtime.outputs import source_slugs

    slugs = source_slugs(sources)
    assert slugs == expected
    for slug in slugs:
        assert slug and all(c.isalnum() or c in "-_" for c in slug) and "secret" not in slug and len(slug) <= 40


def test_per_source_outputs_stay_next_to_the_output_asked_for(tmp_path):
    from runtime.outputs import open_outputs

    out = tmp_path / "v.avi"
    opened = open_outputs([str(out), str(tmp_path / "r.jsonl")], ["../../x/evil.mp4", "rtsp://u:pw@h/../../cam"])
    try:
        videos = [o for o in opened if isinstance(o, VideoOutput)]
        assert [o.path for o in videos] == [tmp_path / "v.evil.avi", tmp_path / "v.cam.avi"]
        assert [o.for_source for o in videos] == ["../../x/evil.mp4", "rtsp://u:pw@h/../../cam"]
        assert isinstance(opened[-1], JsonlOutput) and opened[-1].for_source is None  # records: every source
    finally:
        for o in opened:
            o.close()
