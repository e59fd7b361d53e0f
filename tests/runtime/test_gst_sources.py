"""Jetson sources: ``csi://`` and ``gst://`` URIs become GStreamer pipelines; without a GStreamer OpenCV (the pip
wheels) they fail before anything runs, naming this OpenCV's video I/O backends."""

from __future__ import annotations

import io

import cv2
import pytest

import runtime.sources as sources
from runtime.run import EXIT_USAGE, main, run
from runtime.sources import gst_pipeline, gstreamer_problem, open_source, opencv_video_io, parse_source, redact

BUILD_WITH = """General configuration for OpenCV 4.8.0 =====================================
  Video I/O:
    DC1394:                      NO
    FFMPEG:                      YES
      avcodec:                   YES (58.54.100)
    GStreamer:                   YES (1.20.3)
    v4l/v4l2:                    YES (linux/videodev2.h)

  Parallel framework:            pthreads
"""
BUILD_WITHOUT = BUILD_WITH.replace("YES (1.20.3)", "NO")


def test_csi_uri_becomes_an_argus_pipeline():
    p = gst_pipeline("csi://1?width=1280&height=720&fps=60&flip=2")
    assert p.startswith("nvarguscamerasrc sensor-id=1 ! video/x-raw(memory:NVMM),width=1280,height=720,"
                        "framerate=60/1 ! nvvidconv flip-method=2 ! video/x-raw,format=BGRx ! videoconvert")
    assert p.endswith("appsink drop=1 max-buffers=1")
    assert "sensor-id=0" in gst_pipeline("csi://") and "width=1920,height=1080,framerate=30/1" in gst_pipeline(
        "csi://0")


@pytest.mark.parametrize("uri, match", [
    ("csi://cam", "sensor must be a number"), ("csi://0?zoom=2", "unknown option 'zoom'"),
    ("csi://0?fps=fast", "fps must be a whole number"), ("csi://0?flip=9", "out of range"),
    ("csi://0?width=0", "out of range"), ("gst://", "empty pipeline"),
])
def test_bad_jetson_uris_are_named(uri, match):
    with pytest.raises(ValueError, match=match):
        gst_pipeline(uri)


def test_gst_pipeline_gets_an_appsink_when_it_has_none():
    assert gst_pipeline("gst://videotestsrc ! appsink") == "videotestsrc ! appsink"
    p = gst_pipeline("gst://rtspsrc location=rtsp://cam/s ! rtph264depay ! h264parse ! nvv4l2decoder ! nvvidconv")
    assert p.endswith("nvvidconv ! videoconvert ! video/x-raw,format=BGR ! appsink drop=1 max-buffers=1")


def test_video_io_backends_are_read_from_the_build_information():
    assert opencv_video_io(BUILD_WITH) == {"DC1394": "NO", "FFMPEG": "YES", "GStreamer": "YES (1.20.3)",
                                          "v4l/v4l2": "YES (linux/videodev2.h)"}
    assert gstreamer_problem(BUILD_WITH) is None
    why = gstreamer_problem(BUILD_WITHOUT)
    assert "without GStreamer" in why and "FFMPEG YES" in why and "GStreamer NO" in why and "python3-opencv" in why
    assert "GStreamer" in opencv_video_io()  # this machine's real OpenCV lists it (YES or NO)


@pytest.mark.skipif(gstreamer_problem() is None, reason="this OpenCV has GStreamer")
def test_without_gstreamer_the_error_comes_before_the_model_loads(capsys):
    with pytest.raises(ValueError, match="built without GStreamer"):
        parse_source("csi://0")
    # the CLI: exit 2 and one clear line; the model is never loaded (a missing one would be another error)
    code = main(["--source", "gst://rtspsrc location=rtsp://op:hunter2@cam/s ! decodebin", "--model", "/nope.onnx",
                 "--headless", "--quiet"])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE and "built without GStreamer" in err and "video I/O: FFMPEG YES" in err
    assert "hunter2" not in err and "rtsp://***@cam/s" in err


def test_with_gstreamer_the_pipeline_reaches_the_capture(monkeypatch, clf, fake_capture):
    monkeypatch.setattr(sources, "gstreamer_problem", lambda build_info=None: None)
    spec = parse_source("csi://0?fps=15")
    assert spec.kind == "gst" and spec.is_live and spec.location == gst_pipeline("csi://0?fps=15")
    seen = []

    def factory(location):
        seen.append(location)
        return fake_capture(frames=None, delay=0.002)

    src = open_source("csi://0?fps=15", capture_factory=factory)
    try:
        frame = next(iter(src))
        assert frame.source == "csi://0?fps=15" and frame.image is not None
    finally:
        src.close()
    assert seen[0].startswith("nvarguscamerasrc sensor-id=0")
    # the whole run: a live source like a camera, records named by the URI (login removed)
    uri = "gst://rtspsrc location=rtsp://op:hunter2@cam/s user-pw=hunter2 ! decodebin"
    summary = run(uri, classifier=clf, outputs=[], quiet=True, capture_factory=factory, max_frames=5,
                  err=io.StringIO())
    assert summary.frames == 5 and "hunter2" not in summary.source and "hunter2" not in str(summary.streams)


def test_default_capture_asks_for_the_gstreamer_backend(monkeypatch):
    calls = []
    monkeypatch.setattr(cv2, "VideoCapture", lambda *a: calls.append(a))
    sources._default_capture("videotestsrc ! appsink")
    assert calls == [("videotestsrc ! appsink", cv2.CAP_GSTREAMER)]


def test_redact_removes_logins_inside_pipelines():
    assert redact("gst://rtspsrc location=rtsp://u:p@h/x user-id=u user-pw=p ! appsink") == \
        "gst://rtspsrc location=rtsp://***@h/x user-id=*** user-pw=*** ! appsink"
    assert redact("rtsp://u:p@h/x") == "rtsp://***@h/x" and redact("/data/a@b.png") == "/data/a@b.png"
