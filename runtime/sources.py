"""Frame sources for ``python -m runtime.run``: one URI grammar, one factory, :func:`open_source`.

=================================  ===========================================================================
``/dev/video0``, ``v4l2:///dev/video0``  V4L2 camera (live)
``0``, ``1``                        camera by index (live)
``rtsp://user:pass@host/path``      network stream, also ``rtsp(s)``/``rtmp``/``http(s)``/``udp`` (live)
``clip.mp4``, ``file://clip.mp4``   video file: every frame, in order; ends the run at its end (or ``loop``)
``wafer.png``                       one image
``samples/``                        every image under a folder (recursive, natural sort order)
``'shots/*.tif'``, ``'d/**/*.png'`` a glob of images (sorted)
``csi://0?width=1920&fps=30``       Jetson CSI camera through nvarguscamerasrc (live; GStreamer OpenCV only)
``gst://<pipeline>``                a GStreamer pipeline ending in appsink (live; GStreamer OpenCV only)
=================================  ===========================================================================

``csi://`` and ``gst://`` need an OpenCV built with GStreamer (JetPack's ``python3-opencv`` is; the pip wheels are
not): without it they fail before anything runs, naming this OpenCV's video I/O backends. A ``gst://`` pipeline
without ``appsink`` gets ``! videoconvert ! video/x-raw,format=BGR ! appsink drop=1 max-buffers=1`` appended.

Live sources run a capture thread that keeps only the newest frame: frames the classifier had no time for are
dropped (and counted) rather than queued, so latency stays one frame. A live source that fails or stalls is reopened
with exponential backoff. File sources deliver every frame through a bounded prefetch queue filled by a decode
thread (which also runs the caller's ``prepare`` step), so decoding overlaps inference. Each :class:`Frame` carries
its source path/URI, frame index and timestamp; an image that cannot be read becomes a frame with ``error`` set and
the stream goes on.
"""

from __future__ import annotations

import glob
import os
import queue
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from runtime.errors import InputError
from runtime.preprocess import read_image

#: File suffixes read as images everywhere (sources, class folders for training, calibration and gates): the one list.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".pgm", ".ppm", ".pbm", ".webp",
                            ".jp2", ".exr", ".hdr", ".pnm", ".sr", ".ras"})
VIDEO_SUFFIXES = frozenset({".mp4", ".avi", ".mkv", ".mov", ".m4v", ".mpg", ".mpeg", ".wmv", ".webm", ".ts",
                            ".mts", ".flv", ".ogv", ".gif", ".mjpeg", ".mjpg", ".h264", ".h265", ".hevc"})
STREAM_SCHEMES = ("rtsp://", "rtsps://", "rtmp://", "http://", "https://", "udp://", "rtp://")
GLOB_CHARS = re.compile(r"[*?\[]")

Prepare = Callable[[np.ndarray], Any]
CaptureFactory = Callable[[Any], Any]


@dataclass(slots=True, eq=False)
class Frame:
    """One frame or image from a source, with where and when it came from."""

    index: int  # 0-based position in the stream (counts frames that failed to decode too)
    source: str  # image path for files and folders, the URI for videos and streams
    timestamp: float  # wall-clock time.time() when the frame was captured or read
    image: np.ndarray | None = None  # as decoded (BGR, grey, 16-bit ...); None after an error or when not kept
    error: Exception | None = None  # why this item could not be read or prepared
    prepared: Any = None  # the caller's prepare(image) result, computed in the decode thread
    prepare_ms: float = 0.0
    media_ms: float | None = None  # position inside a video file


@dataclass(slots=True)
class SourceStats:
    frames: int = 0  # delivered to the consumer
    dropped: int = 0  # live sources: captured but replaced by a newer frame before being consumed
    errors: int = 0  # frames delivered with an error
    reconnects: int = 0  # live sources: reopen attempts after a failure or stall


@dataclass(frozen=True, slots=True)
class SourceSpec:
    """What a SRC string means: ``kind`` is image, images, video, camera or stream."""

    kind: str
    location: Any  # path, list of paths, camera index or URL
    uri: str

    @property
    def is_live(self) -> bool:
        return self.kind in ("camera", "stream", "gst")


# ------------------------------------------------------------------------------------------------ parsing
_USERINFO = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]*@")
_GST_SECRET = re.compile(r"\b(user-id|user-pw|password|passwd)=(\"[^\"]*\"|\S+)", re.IGNORECASE)


def redact(uri: str) -> str:
    """``uri`` fit for logs, status lines and records about the source itself: ``rtsp://user:pass@host/x`` →
    ``rtsp://***@host/x`` (also inside a ``gst://`` pipeline, whose ``user-pw=`` and the like become ``***``);
    paths and URIs without credentials unchanged."""
    text = _USERINFO.sub(r"\1***@", str(uri))
    return _GST_SECRET.sub(r"\1=***", text) if text.lower().startswith("gst://") else text


# ------------------------------------------------------------------------------------------------ GStreamer
GST_APPSINK = "videoconvert ! video/x-raw,format=BGR ! appsink drop=1 max-buffers=1"
CSI_DEFAULTS = {"width": 1920, "height": 1080, "fps": 30, "flip": 0}


def opencv_video_io(build_info: str | None = None) -> dict[str, str]:
    """This OpenCV's video I/O backends and their status (``{"FFMPEG": "YES", "GStreamer": "NO", ...}``), from
    ``cv2.getBuildInformation()``."""
    info = cv2.getBuildInformation() if build_info is None else build_info
    out: dict[str, str] = {}
    in_video = False
    for line in info.splitlines():
        if line.strip() == "Video I/O:":
            in_video = True
            continue
        if in_video:
            if not line.strip():
                break
            if line.startswith("    ") and not line.startswith("      ") and ":" in line:
                key, value = line.split(":", 1)
                out[key.strip()] = value.strip()
    return out


def gstreamer_problem(build_info: str | None = None) -> str | None:
    """Why this OpenCV cannot open GStreamer pipelines (naming its video I/O backends), or None when it can."""
    backends = opencv_video_io(build_info)
    if backends.get("GStreamer", "NO").upper().startswith("YES"):
        return None
    have = ", ".join(f"{k} {v.split()[0] if v else '?'}" for k, v in backends.items()) or "none listed"
    return (f"this OpenCV ({cv2.__version__}) was built without GStreamer (video I/O: {have}); csi:// and gst:// "
            "need one that has it: on Jetson, JetPack's python3-opencv (make the venv with "
            "--system-site-packages and pip uninstall opencv-python-headless), elsewhere an OpenCV built with "
            "-DWITH_GSTREAMER=ON. Without GStreamer use the V4L2 device (/dev/videoN) or an rtsp:// URL")


def gst_pipeline(uri: str) -> str:
    """The GStreamer pipeline for ``csi://N[?width=&height=&fps=&flip=]`` or ``gst://<pipeline>`` (ending in an
    appsink OpenCV can read BGR frames from). Raises ``ValueError`` for a malformed URI."""
    import urllib.parse

    text = str(uri).strip()
    low = text.lower()
    if low.startswith("gst://"):
        pipe = text[len("gst://"):].strip()
        if not pipe:
            raise ValueError("gst://: empty pipeline; e.g. gst://videotestsrc ! appsink")
        if "appsink" not in pipe:
            pipe = f"{pipe} ! {GST_APPSINK}"
        return pipe
    if not low.startswith("csi://"):
        raise ValueError(f"{text}: not a csi:// or gst:// source")
    parts = urllib.parse.urlsplit(text)
    sensor = (parts.netloc + parts.path).strip("/") or "0"
    if not sensor.isdigit():
        raise ValueError(f"{text}: the CSI sensor must be a number (csi://0, csi://1)")
    opts: dict[str, int] = dict(CSI_DEFAULTS)
    for key, values in urllib.parse.parse_qs(parts.query, keep_blank_values=True).items():
        if key not in opts:
            raise ValueError(f"{text}: unknown option {key!r}; use {', '.join(CSI_DEFAULTS)}")
        try:
            opts[key] = int(values[-1])
        except ValueError:
            raise ValueError(f"{text}: {key} must be a whole number, got {values[-1]!r}") from None
        if opts[key] < (0 if key == "flip" else 1) or (key == "flip" and opts[key] > 7):
            raise ValueError(f"{text}: {key}={opts[key]} is out of range")
    return (f"nvarguscamerasrc sensor-id={int(sensor)} ! video/x-raw(memory:NVMM),width={opts['width']},"
            f"height={opts['height']},framerate={opts['fps']}/1 ! nvvidconv flip-method={opts['flip']} ! "
            f"video/x-raw,format=BGRx ! {GST_APPSINK}")


def _natural_key(path: str) -> list[Any]:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", path)]


def list_images(folder: Path) -> list[str]:
    """Image files under ``folder`` (recursive, hidden entries skipped), in natural sort order."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [os.path.join(root, f) for f in files
                  if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_SUFFIXES]
    return sorted(found, key=_natural_key)


def parse_source(uri: str | os.PathLike[str] | int) -> SourceSpec:
    """Interpret a SRC string (see the module docstring). Raises ``FileNotFoundError`` / ``ValueError``."""
    text = str(uri).strip()
    if not text:
        raise ValueError("empty source: pass a camera (/dev/video0, 0), a video, an image, a folder or a URL")
    low = text.lower()
    if text.isdigit():
        return SourceSpec("camera", int(text), text)
    if low.startswith("v4l2://"):
        dev = text[len("v4l2://"):]
        return SourceSpec("camera", dev if dev.startswith("/") else "/" + dev, text)
    if low.startswith(("csi://", "gst://")):
        pipeline = gst_pipeline(text)  # a malformed URI is named first, whatever this OpenCV can do
        problem = gstreamer_problem()
        if problem:
            raise ValueError(f"{redact(text)}: {problem}")
        return SourceSpec("gst", pipeline, text)
    if low.startswith(STREAM_SCHEMES):
        return SourceSpec("stream", text, text)
    if "://" in text and not low.startswith("file://"):
        raise ValueError(f"{text}: unknown source scheme; use /dev/videoN, v4l2://, a camera index, rtsp://, "
                         "http(s)://, file://, a video, an image, a folder or a glob")
    path_text = text[len("file://"):] if low.startswith("file://") else text
    path = Path(path_text).expanduser()
    if str(path).startswith("/dev/video"):
        return SourceSpec("camera", str(path), text)
    if path.is_dir():
        images = list_images(path)
        if not images:
            raise FileNotFoundError(2, "no images in folder (looked for .png, .jpg, .tif, .bmp, ... files)",
                                    str(path))
        return SourceSpec("images", images, text)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in IMAGE_SUFFIXES:
            return SourceSpec("image", [str(path)], text)
        if suffix in VIDEO_SUFFIXES:
            return SourceSpec("video", str(path), text)
        try:
            is_image = bool(cv2.haveImageReader(str(path)))
        except cv2.error:
            is_image = False
        return SourceSpec("image" if is_image else "video", [str(path)] if is_image else str(path), text)
    if GLOB_CHARS.search(path_text):
        matches = [m for m in glob.glob(os.path.expanduser(path_text), recursive=True)
                   if Path(m).suffix.lower() in IMAGE_SUFFIXES and os.path.isfile(m)]
        if not matches:
            raise FileNotFoundError(2, "no images match this pattern", path_text)
        return SourceSpec("images", sorted(matches, key=_natural_key), text)
    raise FileNotFoundError(2, "no such file, folder or device", path_text)


# ------------------------------------------------------------------------------------------------ base
class Source:
    """Iterate for :class:`Frame` objects; ``close()`` (or the context manager) stops threads and releases."""

    def __init__(self, spec: SourceSpec, stop_event: threading.Event | None = None) -> None:
        self.spec = spec
        self.uri = spec.uri
        self.stats = SourceStats()
        self.fps: float | None = None  # native rate when known (videos, cameras)
        self.state = "running"  # live sources: "reconnecting" while a failed capture waits to be reopened
        # Shared with the caller when given, so a signal handler's stop reaches waits inside the source at once.
        self._stop = stop_event or threading.Event()

    @property
    def is_live(self) -> bool:
        return self.spec.is_live

    def stop(self) -> None:
        """Ask iteration to end soon (safe from a signal handler or another thread)."""
        self._stop.set()

    def close(self) -> None:
        self.stop()

    def __iter__(self) -> Iterator[Frame]:
        raise NotImplementedError

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _default_capture(location: Any) -> Any:
    """cv2.VideoCapture for a file, device path, camera index, URL or GStreamer pipeline, with timeouts where
    OpenCV supports them."""
    if isinstance(location, str) and "appsink" in location and "!" in location:
        return cv2.VideoCapture(location, cv2.CAP_GSTREAMER)
    if isinstance(location, str) and location.lower().startswith(STREAM_SCHEMES):
        params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, 10000, cv2.CAP_PROP_READ_TIMEOUT_MSEC, 5000]
        return cv2.VideoCapture(location, cv2.CAP_FFMPEG, params)
    if isinstance(location, str) and location.startswith("/dev/video") and sys.platform.startswith("linux"):
        cap = cv2.VideoCapture(location, cv2.CAP_V4L2)
        cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # the driver queue adds latency; we want the newest frame
        return cap
    if isinstance(location, int):
        cap = cv2.VideoCapture(location)
        cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)
        return cap
    return cv2.VideoCapture(location)


# ------------------------------------------------------------------------------------------------ file sources
class _FileSource(Source):
    """Frames produced by ``_produce()`` in a decode thread into a bounded queue (the prefetch pipeline)."""

    _END = object()

    def __init__(self, spec: SourceSpec, prepare: Prepare | None, prefetch: int, keep_image: bool,
                 stop_event: threading.Event | None = None) -> None:
        super().__init__(spec, stop_event)
        self.prepare = prepare
        self.keep_image = keep_image
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max(1, prefetch))
        self._thread: threading.Thread | None = None

    def _produce(self) -> Iterator[Frame]:
        raise NotImplementedError

    def _finish(self, frame: Frame) -> Frame:
        """Runs in the decode thread: the caller's prepare step, errors kept on the frame."""
        return prepare_frame(frame, self.prepare, self.keep_image)

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _worker(self) -> None:
        try:
            for frame in self._produce():
                if not self._put(self._finish(frame)):
                    return
        except BaseException as e:  # noqa: BLE001 - hand the failure to the consumer thread instead of dying here
            self._put(e)
            return
        self._put(self._END)

    def __iter__(self) -> Iterator[Frame]:
        if self._thread is None:
            self._thread = threading.Thread(target=self._worker, name=f"decode:{self.uri}", daemon=True)
            self._thread.start()
        while not self._stop.is_set():
            try:
                item = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            if item is self._END:
                return
            if isinstance(item, BaseException):
                raise item
            self.stats.frames += 1
            self.stats.errors += item.error is not None
            yield item

    def close(self) -> None:
        self.stop()
        if self._thread is not None:
            while True:  # unblock a producer waiting on a full queue
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    break
            self._thread.join(timeout=5)


def prepare_frame(frame: Frame, prepare: Prepare | None, keep_image: bool = True) -> Frame:
    """Run ``prepare`` on ``frame.image`` into ``frame.prepared`` (timed in ``prepare_ms``); an error stays on the
    frame, naming it. Without ``keep_image`` the decoded image is let go once prepared. Any thread may call it."""
    if frame.error is None and prepare is not None and frame.image is not None and frame.prepared is None:
        t0 = time.perf_counter()
        try:
            frame.prepared = prepare(frame.image)
        except (InputError, OSError) as e:
            frame.error = _named(e, frame.source)
        except Exception as e:  # noqa: BLE001 - a frame that breaks preprocessing must not stop the stream
            frame.error = InputError(f"{frame.source}: cannot preprocess frame {frame.index}: "
                                     f"{type(e).__name__}: {e}")
        frame.prepare_ms = (time.perf_counter() - t0) * 1e3
    if not keep_image and frame.prepared is not None:
        frame.image = None
    return frame


def _named(e: Exception, name: str) -> Exception:
    """Make sure an error message names the item (InputError messages from preprocessing already do)."""
    return e if name in str(e) else InputError(f"{name}: {e}")


class ImageFilesSource(_FileSource):
    """One image, a folder or a glob: every file in order; unreadable ones become error frames."""

    def __init__(self, spec: SourceSpec, prepare: Prepare | None = None, prefetch: int = 4, loop: bool = False,
                 keep_image: bool = True, stop_event: threading.Event | None = None) -> None:
        super().__init__(spec, prepare, prefetch, keep_image, stop_event)
        self.paths: list[str] = list(spec.location)
        self.loop = loop

    def _produce(self) -> Iterator[Frame]:
        index = 0
        while True:
            for path in self.paths:
                if self._stop.is_set():
                    return
                frame = Frame(index=index, source=path, timestamp=time.time())
                try:
                    frame.image = read_image(path)
                except (InputError, OSError) as e:
                    frame.error = _named(e, path)
                except Exception as e:  # noqa: BLE001 - decoder crash on a hostile file: that item fails, not the run
                    frame.error = InputError(f"{path}: cannot read image: {type(e).__name__}: {e}")
                yield frame
                index += 1
            if not self.loop:
                return


class VideoFileSource(_FileSource):
    """Every frame of a video file, decoded ahead in a thread; ``loop`` restarts at the end."""

    def __init__(self, spec: SourceSpec, prepare: Prepare | None = None, prefetch: int = 4, loop: bool = False,
                 keep_image: bool = True, capture_factory: CaptureFactory | None = None,
                 stop_event: threading.Event | None = None) -> None:
        super().__init__(spec, prepare, prefetch, keep_image, stop_event)
        self.loop = loop
        self._factory = capture_factory or _default_capture
        cap = self._open()
        fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
        self.fps = fps if 0 < fps < 1000 else None
        self._cap = cap

    def _open(self) -> Any:
        cap = self._factory(self.spec.location)
        if cap is None or not cap.isOpened():
            raise OSError(5, "cannot open video (unsupported codec or container, or not a video)",
                          str(self.spec.location))
        return cap

    def _produce(self) -> Iterator[Frame]:
        index = 0
        cap = self._cap
        try:
            while not self._stop.is_set():
                read_in_pass = 0
                while not self._stop.is_set():
                    try:
                        ok, img = cap.read()
                    except Exception as e:  # noqa: BLE001 - a decoder failure ends the file with an error frame
                        yield Frame(index=index, source=self.uri, timestamp=time.time(),
                                    error=InputError(f"{self.uri}: cannot decode frame {index}: "
                                                     f"{type(e).__name__}: {e}"))
                        return
                    if not ok or img is None:
                        break
                    read_in_pass += 1
                    pos = cap.get(cv2.CAP_PROP_POS_MSEC)
                    yield Frame(index=index, source=self.uri, timestamp=time.time(), image=img,
                                media_ms=float(pos) if pos is not None and pos >= 0 else None)
                    index += 1
                if not self.loop or read_in_pass == 0:
                    return
                cap.release()
                cap = self._cap = self._open()
        finally:
            cap.release()


# ------------------------------------------------------------------------------------------------ live sources
class LiveSource(Source):
    """A camera or network stream: a capture thread keeps only the newest frame; failures reopen with backoff.

    ``stall_timeout``: seconds one ``read()`` may block before the capture is considered stuck and reopened (the
    stuck read is abandoned to its thread, which exits when the read returns). A read that fails is retried after
    ``backoff`` = (first, max) seconds, doubling each time.
    """

    def __init__(self, spec: SourceSpec, capture_factory: CaptureFactory | None = None, *,
                 stall_timeout: float = 5.0, backoff: tuple[float, float] = (0.5, 10.0),
                 log: Callable[[str], None] | None = None, stop_event: threading.Event | None = None) -> None:
        super().__init__(spec, stop_event)
        self.uri = redact(spec.uri)  # frames, records and logs name the stream without its login
        self._factory = capture_factory or _default_capture
        self.stall_timeout = stall_timeout
        self.backoff = backoff
        self._log = log or (lambda msg: print(f"[source] {msg}", file=sys.stderr, flush=True))
        self._cond = threading.Condition()
        self._latest: Frame | None = None
        self._index = 0
        self._generation = 0
        self._read_started: float | None = None  # monotonic time the current read() began, None outside reads
        self._threads: list[threading.Thread] = []
        # Fail fast on a wrong device or URL; after a good start, failures are retried forever.
        cap = self._factory(spec.location)
        if cap is None or not cap.isOpened():
            if cap is not None:
                cap.release()
            raise OSError(5, "cannot open camera or stream", self.uri)
        fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
        self.fps = fps if 0 < fps < 1000 else None
        self._start_capture(cap)

    def _start_capture(self, cap: Any = None) -> None:
        self._generation += 1
        t = threading.Thread(target=self._capture_loop, args=(self._generation, cap),
                             name=f"capture:{self.uri}", daemon=True)
        self._threads = [th for th in self._threads if th.is_alive()] + [t]
        self._read_started = None
        t.start()

    def _capture_loop(self, generation: int, cap: Any) -> None:
        delay = self.backoff[0]

        def current() -> bool:  # a newer capture thread (after a stall) or stop() retires this one
            return generation == self._generation and not self._stop.is_set()

        try:
            while current():
                if cap is None:
                    try:
                        cap = self._factory(self.spec.location)
                        opened = cap is not None and cap.isOpened()
                    except Exception:  # noqa: BLE001 - a reopen that throws is just a failed attempt
                        opened = False
                    if not opened:
                        if cap is not None:
                            cap.release()
                        cap = None
                        self.state = "reconnecting"
                        self._log(f"{self.uri}: cannot reopen; retrying in {delay:.1f} s")
                        self._stop.wait(delay)
                        delay = min(delay * 2, self.backoff[1])
                        continue
                    self._log(f"{self.uri}: reopened")
                self._read_started = time.monotonic()
                try:
                    ok, img = cap.read()
                except Exception:  # noqa: BLE001
                    ok, img = False, None
                if not current():
                    return
                self._read_started = None
                if not ok or img is None:
                    with self._cond:
                        self.stats.reconnects += 1
                        self.state = "reconnecting"
                    self._log(f"{self.uri}: capture failed; reopening in {delay:.1f} s")
                    cap.release()
                    cap = None
                    self._stop.wait(delay)
                    delay = min(delay * 2, self.backoff[1])
                    continue
                delay = self.backoff[0]
                with self._cond:
                    self.state = "running"
                    if self._latest is not None:
                        self.stats.dropped += 1
                    self._latest = Frame(index=self._index, source=self.uri, timestamp=time.time(), image=img)
                    self._index += 1
                    self._cond.notify()
        finally:
            if cap is not None:
                cap.release()

    def __iter__(self) -> Iterator[Frame]:
        while not self._stop.is_set():
            with self._cond:
                if self._latest is None:
                    self._cond.wait(timeout=0.1)
                frame, self._latest = self._latest, None
                started = self._read_started
                # Only a read that hangs counts as a stall; a capture waiting out its backoff is not stuck.
                stalled = frame is None and started is not None and time.monotonic() - started > self.stall_timeout
            if stalled and not self._stop.is_set():
                with self._cond:
                    self.stats.reconnects += 1
                    self.state = "reconnecting"
                self._log(f"{self.uri}: read stalled for over {self.stall_timeout:g} s; reopening")
                self._start_capture(None)
                continue
            if frame is not None:
                self.stats.frames += 1
                yield frame

    def close(self) -> None:
        self.stop()
        with self._cond:
            self._cond.notify_all()
        for t in self._threads:
            t.join(timeout=2)


# ------------------------------------------------------------------------------------------------ factory
def open_source(uri: str | os.PathLike[str] | int, *, loop: bool = False, prepare: Prepare | None = None,
                prefetch: int = 4, keep_image: bool = True, capture_factory: CaptureFactory | None = None,
                stall_timeout: float = 5.0, backoff: tuple[float, float] = (0.5, 10.0),
                stop_event: threading.Event | None = None, log: Callable[[str], None] | None = None) -> Source:
    """Open SRC (see module docstring). ``prepare`` runs on each decoded file frame in the decode thread.

    ``capture_factory(location)`` replaces ``cv2.VideoCapture`` (tests, custom cameras); ``stop_event``, when
    given, is the event that ends iteration (share it with a signal handler); ``log`` receives reconnect notes
    (default: stderr). Raises
    ``FileNotFoundError``/``OSError`` for sources that cannot be opened, ``ValueError`` for unknown schemes.
    """
    spec = parse_source(uri)
    if spec.kind in ("image", "images"):
        return ImageFilesSource(spec, prepare, prefetch, loop, keep_image, stop_event)
    if spec.kind == "video":
        return VideoFileSource(spec, prepare, prefetch, loop, keep_image, capture_factory, stop_event)
    return LiveSource(spec, capture_factory, stall_timeout=stall_timeout, backoff=backoff, log=log,
                      stop_event=stop_event)
