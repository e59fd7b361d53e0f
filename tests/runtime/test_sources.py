"""Sources: the SRC grammar, every file kind, the prefetch pipeline, and live capture that drops, fails and stalls."""

from __future__ import annotations

import threading
import time

import cv2
import numpy as np
import pytest

from runtime.errors import InputError
from runtime.sources import LiveSource, open_source, parse_source


# ---------------------------------------------------------------------------------------------------- grammar
@pytest.mark.parametrize("uri, kind, location", [
    ("0", "camera", 0), ("2", "camera", 2), ("/dev/video0", "camera", "/dev/video0"),
    ("v4l2:///dev/video1", "camera", "/dev/video1"), ("rtsp://u:p@10.0.0.7:554/cam", "stream", None),
    ("https://host/stream.mjpg", "stream", None),
])
def test_live_grammar(uri, kind, location):
    spec = parse_source(uri)
    assert spec.kind == kind and spec.is_live
    assert spec.location == (location if location is not None else uri)


def test_file_grammar(image_dir, video_file, tmp_path):
    folder = parse_source(str(image_dir))
    names = [p.split("/")[-1] for p in folder.location]
    # natural path order (img2 before img10), recursive, non-images and hidden files skipped
    assert names == ["img1_rgb.png", "img2_dark.png", "img4_16bit.tif", "img5_corrupt.png", "img10_bright.png",
                     "img3_mid.png"]
    assert folder.location[-1].endswith("nested/img3_mid.png")
    assert folder.kind == "images" and not folder.is_live
    glob_spec = parse_source(str(image_dir / "img*.png"))
    assert [p.split("/")[-1] for p in glob_spec.location] == ["img1_rgb.png", "img2_dark.png", "img5_corrupt.png",
                                                              "img10_bright.png"]
    one = parse_source(f"file://{image_dir / 'img2_dark.png'}")
    assert one.kind == "image" and one.location == [str(image_dir / "img2_dark.png")]
    assert parse_source(str(video_file)).kind == "video"
    assert parse_source(f"file://{video_file}").location == str(video_file)
    odd = tmp_path / "frame.dat"  # unknown suffix: sniffed by content
    odd.write_bytes(cv2.imencode(".png", np.zeros((8, 8), np.uint8))[1].tobytes())
    assert parse_source(str(odd)).kind == "image"


@pytest.mark.parametrize("uri, error, match", [
    ("/no/such/thing.png", FileNotFoundError, "no such file"), ("", ValueError, "empty source"),
    ("csi://0", ValueError, "GStreamer"), ("ftp://host/x", ValueError, "unknown source scheme"),
])
def test_bad_sources_are_named(uri, error, match):
    with pytest.raises(error, match=match):
        parse_source(uri)


def test_empty_folder_and_unmatched_glob(tmp_path):
    with pytest.raises(FileNotFoundError, match="no images"):
        parse_source(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no images match"):
        parse_source(str(tmp_path / "*.png"))


# ---------------------------------------------------------------------------------------------------- files
def test_folder_yields_every_image_with_errors_in_place(image_dir):
    with open_source(str(image_dir)) as src:
        frames = list(src)
    assert [f.index for f in frames] == list(range(6))
    assert all(f.source.startswith(str(image_dir)) and f.timestamp > 0 for f in frames)
    bad = [f for f in frames if f.error is not None]
    assert len(bad) == 1 and "img5_corrupt.png" in str(bad[0].error) and isinstance(bad[0].error, InputError)
    assert frames[3] is bad[0] and frames[3].image is None
    assert frames[2].image.dtype == np.uint16  # decoded as stored
    assert src.stats.frames == 6 and src.stats.errors == 1


def test_prepare_runs_in_the_decode_thread_and_errors_stay_per_frame(image_dir):
    seen_threads = set()

    def prepare(img):
        seen_threads.add(threading.current_thread().name)
        if img.dtype == np.uint16:
            raise InputError("sixteen bits refused by this test")
        return img.shape

    with open_source(str(image_dir), prepare=prepare, keep_image=False) as src:
        frames = list(src)
    assert threading.current_thread().name not in seen_threads and len(seen_threads) == 1
    assert [f.prepared is not None for f in frames] == [True, True, False, False, True, True]
    assert "sixteen bits" in str(frames[2].error) and "img4_16bit.tif" in str(frames[2].error)
    assert frames[0].image is None  # not kept when prepared and not asked for
    assert all(f.prepare_ms >= 0 for f in frames)


def test_video_file_every_frame_in_order(video_file):
    with open_source(str(video_file)) as src:
        frames = list(src)
    assert len(frames) == 12 and [f.index for f in frames] == list(range(12))
    assert src.fps == pytest.approx(10.0)
    assert all(f.source == str(video_file) and f.image.shape == (64, 64, 3) for f in frames)
    means = [f.image.mean() / 255 for f in frames]
    assert means[0] < 0.2 and means[1] > 0.8  # frame order kept (dark, bright, ...)
    media = [f.media_ms for f in frames]
    assert media == sorted(media)


def test_video_loop_restarts(video_file):
    with open_source(str(video_file), loop=True) as src:
        frames = []
        for f in src:
            frames.append(f)
            if len(frames) == 30:
                break
    assert [f.index for f in frames] == list(range(30))


def test_image_folder_loop(image_dir):
    with open_source(str(image_dir / "img2_dark.png"), loop=True) as src:
        it = iter(src)
        assert [next(it).index for _ in range(5)] == [0, 1, 2, 3, 4]


def test_unreadable_video_is_an_error(tmp_path):
    bogus = tmp_path / "bogus.mp4"
    bogus.write_bytes(b"not a video at all")
    with pytest.raises(OSError, match="cannot open video"):
        open_source(str(bogus))


def test_video_decoder_failure_mid_file_ends_with_an_error_frame(video_file, fake_capture):
    class Exploding(fake_capture):
        def read(self):
            if self.count == 3:
                raise RuntimeError("decoder crashed")
            return super().read()

    with open_source(str(video_file), capture_factory=lambda loc: Exploding()) as src:
        frames = list(src)
    assert len(frames) == 4 and frames[-1].error is not None and "decoder crashed" in str(frames[-1].error)


def test_close_mid_stream_stops_the_decode_thread(video_file):
    src = open_source(str(video_file), prefetch=1, loop=True)
    it = iter(src)
    next(it)
    src.close()
    assert not src._thread.is_alive()


# ---------------------------------------------------------------------------------------------------- live
def test_live_keeps_only_the_newest_frame_and_counts_drops(fake_capture):
    src = open_source("0", capture_factory=lambda loc: fake_capture(delay=0.002))
    try:
        indices = []
        for f in src:
            indices.append(f.index)
            time.sleep(0.03)  # a slow classifier
            if len(indices) == 5:
                break
    finally:
        src.close()
    assert indices == sorted(indices) and indices[-1] - indices[0] > 4  # frames were skipped
    assert src.stats.dropped > 0 and src.stats.frames == 5
    assert src.fps == 25.0 and src.is_live


def test_live_source_that_fails_mid_stream_is_reopened(fake_capture):
    made = []

    def factory(loc):
        cap = fake_capture(frames=3, value=0.05) if not made else fake_capture(value=0.95)
        made.append(cap)
        return cap

    logs = []
    src = LiveSource(parse_source("/dev/video0"), factory, backoff=(0.01, 0.05), log=logs.append)
    try:
        frames = []
        for f in src:
            frames.append(f)
            if f.image.mean() > 200 and len(frames) >= 2:
                break
            time.sleep(0.005)
    finally:
        src.close()
    assert len(made) >= 2 and made[0].released
    assert src.stats.reconnects >= 1 and any("reopen" in m for m in logs)
    assert frames[-1].index > frames[0].index


def test_live_source_that_stalls_is_reopened(fake_capture):
    unblock = threading.Event()
    made = []

    def factory(loc):
        cap = fake_capture(frames=2, then="block", unblock=unblock) if not made else fake_capture(value=0.95)
        made.append(cap)
        return cap

    src = LiveSource(parse_source("rtsp://cam/stream"), factory, stall_timeout=0.3, backoff=(0.01, 0.05),
                     log=lambda m: None)
    try:
        t0 = time.monotonic()
        bright = None
        for f in src:
            if f.image.mean() > 200:
                bright = f
                break
            assert time.monotonic() - t0 < 5
    finally:
        unblock.set()
        src.close()
    assert bright is not None and len(made) >= 2 and src.stats.reconnects >= 1


def test_live_source_that_never_opens_fails_fast():
    class Closed:
        def isOpened(self):  # noqa: N802
            return False

        def release(self):
            pass

    with pytest.raises(OSError, match="cannot open camera"):
        open_source("/dev/video9", capture_factory=lambda loc: Closed())


def test_stop_from_another_thread_ends_live_iteration(fake_capture):
    stop = threading.Event()
    src = open_source("1", capture_factory=lambda loc: fake_capture(delay=0.01), stop_event=stop)
    threading.Timer(0.2, stop.set).start()
    t0 = time.monotonic()
    n = sum(1 for _ in src)
    src.close()
    assert n > 0 and time.monotonic() - t0 < 3
