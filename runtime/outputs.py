"""Where ``python -m runtime.run`` sends results: :func:`open_output` for each ``--output`` URI.

==========================  ===========================================================================
``display://0``             a window with the frame, label, confidence and fps (needs OpenCV with GUI)
``out.mp4``, ``out.avi``     the frames with the same overlay, as a video (``.mkv``/``.mov`` too)
``results.jsonl``            one JSON object per frame (``.ndjson`` too)
``results.csv``              one CSV row per frame
``-`` or ``stdout://``       one aligned text line per frame on stdout (the default when headless)
==========================  ===========================================================================

Every record has: ``source`` (path or URI), ``frame`` (index), ``timestamp`` (ISO 8601 and unix seconds),
``label``, ``confidence``, ``rejected``, ``reason``, ``top_label``, ``score``, ``latency_ms`` and ``error`` (null
when fine). A frame the frame-quality gate refuses has ``label`` ``"invalid"`` and a ``reason`` (``"blank"``,
``"noise"``, ...); a frame that could not be read or classified has ``label`` null and the ``error``.
Record files are appended to, never truncated, and each record goes to the file in one ``write`` on an ``O_APPEND``
descriptor: it is there whole or not at all. A failed write (disk full, permission, I/O error) cuts the file back to
its last complete record and raises :class:`OutputWriteError` naming the file. A CSV whose header differs from ours
(another program's, or an older version with other columns) is left alone and a new file is started next to it.
Videos are written to a temporary name and renamed when complete. A run with several sources writes a video per
source (``out.mp4`` → ``out.<source>.mp4``, the name part built by :func:`source_slugs`) and opens a window per
source, so frames of different sources never mix; records, MQTT and the live view name each result's source.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import math
import os
import re
import stat
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import cv2
import numpy as np

from runtime.sources import Frame, redact

VIDEO_SUFFIXES = {".mp4": "mp4v", ".m4v": "mp4v", ".mov": "mp4v", ".avi": "MJPG", ".mkv": "MJPG"}
RECORD_FIELDS = ("source", "frame", "timestamp", "unix_time", "label", "confidence", "rejected", "reason",
                 "top_label", "score", "latency_ms", "error")
NO_GUI_HELP = ("this OpenCV has no GUI support (the package depends on opencv-python-headless, which has none). "
               "For a window: pip uninstall opencv-python-headless && pip install opencv-python; or run with "
               "--headless and write a video (--output out.mp4) instead")


class OutputError(RuntimeError):
    """An output that cannot be used (no GUI, unknown type, no video encoder); the message names it."""


class OutputWriteError(OutputError):
    """Opening or writing an output failed in the operating system (disk full, permission, broken pipe, I/O
    error); the message names the file."""


#: The one call every record goes through (a test injects faults here).
_write = os.write


@dataclass(slots=True, eq=False)
class FrameResult:
    """A frame and what became of it: a prediction, or an error message."""

    frame: Frame
    prediction: Any = None  # runtime.classifier.Prediction, or None on error
    error: str | None = None
    latency_ms: float = 0.0
    fps: float = 0.0
    #: Fields hooks add to the record before the outputs write it (``"drift"``: runtime.drift); JSON records and
    #: MQTT messages carry them, CSV keeps its fixed columns.
    extra: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        p = self.prediction
        ts = self.frame.timestamp
        rec = {
            "source": self.frame.source,
            "frame": self.frame.index,
            "timestamp": datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds"),
            "unix_time": round(ts, 3),
            "label": p.label if p is not None else None,
            "confidence": round(float(p.confidence), 6) if p is not None else None,
            "rejected": bool(p.rejected) if p is not None else None,
            "reason": (p.reason or None) if p is not None else None,
            "top_label": (p.top_label or None) if p is not None else None,
            "score": _num(p.score) if p is not None else None,
            "latency_ms": round(self.latency_ms, 3),
            "error": self.error,
        }
        if self.extra:
            rec.update(self.extra)
        return rec


def _num(v: float) -> float | None:
    v = float(v)
    return round(v, 6) if math.isfinite(v) else None


class Output:
    """Base class: ``write`` each :class:`FrameResult`, ``close`` at the end. ``stop_requested`` lets a window's
    close button or ``q`` end the run."""

    path: Path | None = None
    stop_requested: bool = False
    #: The SRC whose results alone this output gets (a video or window per source, :func:`open_outputs`); None:
    #: every source's results.
    for_source: str | None = None

    def write(self, result: FrameResult) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def describe(self) -> str:
        return str(self.path) if self.path else type(self).__name__


def _free_path(path: Path) -> Path:
    """``path`` if unused, else ``name-1.ext``, ``name-2.ext``, ... (never overwrite someone's results)."""
    if not path.exists():
        return path
    for i in range(1, 10_000):
        cand = path.with_name(f"{path.stem}-{i}{path.suffix}")
        if not cand.exists():
            return cand
    raise OutputError(f"{path}: no free file name next to it")


def _why(e: OSError) -> str:
    return e.strerror or str(e) or type(e).__name__


class _AppendedRecords(Output):
    """A records file opened with ``O_APPEND``: each record is written whole, in one ``write``, or not at all.

    Visible to a reader tailing the file as soon as :meth:`_append` returns; :meth:`close` also syncs it to disk.
    """

    def _open(self, path: Path) -> None:
        self.path = path
        self._fd = -1
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
            self._regular = stat.S_ISREG(os.fstat(self._fd).st_mode)
        except OSError as e:
            raise OutputWriteError(f"{path}: cannot open for writing: {_why(e)}") from None

    def _append(self, text: str) -> None:
        """Write ``text`` at the end of the file whole; on failure cut the file back to where it ended before."""
        if self._fd < 0:
            raise OutputWriteError(f"{self.path}: already closed")
        data = memoryview(text.encode("utf-8"))
        start = os.fstat(self._fd).st_size if self._regular else 0
        done = 0
        try:
            while done < len(data):  # a short write (disk filling up) is followed by the error on the next call
                n = _write(self._fd, data[done:])
                if n <= 0:
                    raise OSError(errno.EIO, "write wrote nothing")
                done += n
        except BaseException as e:
            undo = self._cut_back(start) if done else ""
            if isinstance(e, OSError):
                raise OutputWriteError(f"{self.path}: cannot write record: {_why(e)}{undo}") from None
            raise

    def _cut_back(self, size: int) -> str:
        """Truncate a partly written record away; returns a note for the message if that was not possible."""
        if not self._regular:
            return " (the last record may be incomplete: not a regular file)"
        try:
            os.ftruncate(self._fd, size)
            return ""
        except OSError as e:
            return f" (the last record may be incomplete: truncating failed: {_why(e)})"

    def close(self) -> None:
        if self._fd < 0:
            return
        fd, self._fd = self._fd, -1
        try:
            if self._regular:
                os.fsync(fd)
        except OSError as e:
            raise OutputWriteError(f"{self.path}: cannot sync to disk: {_why(e)}") from None
        finally:
            os.close(fd)


class JsonlOutput(_AppendedRecords):
    """One JSON object per line, appended whole per record."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        path = Path(path)
        needs_newline = path.is_file() and path.stat().st_size > 0 and self._tail_is_torn(path)
        self._open(path)
        if needs_newline:  # a previous run killed mid-line (older versions): keep it, start ours on a fresh line
            self._append("\n")

    @staticmethod
    def _tail_is_torn(path: Path) -> bool:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) != b"\n"

    def write(self, result: FrameResult) -> None:
        self._append(json.dumps(result.record(), ensure_ascii=False) + "\n")


class CsvOutput(_AppendedRecords):
    """One CSV row per frame; header written once per file; a file with another header is not touched (then
    ``diverted_from`` is the path asked for and ``path`` the free name next to it that is written instead)."""

    diverted_from: Path | None = None

    def __init__(self, path: str | os.PathLike[str]) -> None:
        path = Path(path)
        write_header, fix_newline = True, False
        if path.is_file() and path.stat().st_size > 0:
            with open(path, encoding="utf-8", errors="replace", newline="") as f:
                first = next(csv.reader(f), [])
            if tuple(first) == RECORD_FIELDS:
                write_header = False
                with open(path, "rb") as f:
                    f.seek(-1, os.SEEK_END)
                    fix_newline = f.read(1) != b"\n"
            else:
                self.diverted_from = path
                path = _free_path(path)
        self._buf = io.StringIO()
        self._w = csv.writer(self._buf)
        self._open(path)
        if fix_newline:
            self._append("\r\n")
        if write_header:
            self._append(self._row(RECORD_FIELDS))

    def _row(self, values: Any) -> str:
        self._buf.seek(0)
        self._buf.truncate()
        self._w.writerow(values)
        return self._buf.getvalue()

    def write(self, result: FrameResult) -> None:
        rec = result.record()
        self._append(self._row(["" if rec[k] is None else rec[k] for k in RECORD_FIELDS]))


class ConsoleOutput(Output):
    """One aligned line per frame on stdout, with a header line first."""

    def __init__(self, stream: TextIO | None = None, width: int = 44) -> None:
        self._stream = stream
        self.width = width
        self._header_done = False

    @property
    def stream(self) -> TextIO:
        return self._stream or sys.stdout

    def _short(self, s: str) -> str:
        return s if len(s) <= self.width else "..." + s[-(self.width - 3):]

    def write(self, result: FrameResult) -> None:
        lines = []
        if not self._header_done:
            lines.append(f"{'frame':>6}  {'source':<{self.width}}  {'label':<18} {'conf':>6} {'score':>8} "
                         f"{'ms':>7}")
        f, p = result.frame, result.prediction
        head = f"{f.index:>6}  {self._short(f.source):<{self.width}}  "
        if p is None:
            lines.append(head + f"ERROR  {result.error}")
        else:
            if p.reason:
                label = f"{p.label} ({p.reason})"
            else:
                label = p.label + (f" ({p.top_label}?)" if p.rejected else "")
            score = f"{p.score:>8.4g}" if math.isfinite(p.score) else f"{'-':>8}"
            lines.append(head + f"{label:<18} {p.confidence:>6.3f} {score} {result.latency_ms:>7.1f}")
        try:
            self.stream.write("\n".join(lines) + "\n")
            self.stream.flush()
        except (OSError, ValueError) as e:  # ValueError: stdout closed
            why = _why(e) if isinstance(e, OSError) else str(e)
            raise OutputWriteError(f"stdout: cannot write: {why}") from None
        self._header_done = True

    def describe(self) -> str:
        return "stdout"


def to_bgr8(image: np.ndarray) -> np.ndarray:
    """Any decoded frame (grey/BGR/BGRA, 8/16-bit or float 0–1) → 8-bit BGR for drawing and video."""
    img = image
    if img.dtype == np.uint16:
        img = (img >> 8).astype(np.uint8)
    elif img.dtype.kind == "f":
        img = (np.clip(np.nan_to_num(img), 0, 1) * 255).astype(np.uint8)
    elif img.dtype != np.uint8:
        img = np.clip(img, 0, 255).astype(np.uint8)
    if img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 1):
        return cv2.cvtColor(img.reshape(img.shape[:2]), cv2.COLOR_GRAY2BGR)
    if img.shape[2] == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2BGR)
    if img.shape[2] == 2:
        return cv2.cvtColor(np.ascontiguousarray(img[:, :, 0]), cv2.COLOR_GRAY2BGR)
    return np.ascontiguousarray(img)


def draw_overlay(image: np.ndarray | None, result: FrameResult, size: tuple[int, int] | None = None) -> np.ndarray:
    """The frame (or a grey card if it could not be decoded) with label, confidence and fps drawn on it."""
    if image is None:
        h, w = size[::-1] if size else (480, 640)
        canvas = np.full((h, w, 3), 40, np.uint8)
    else:
        canvas = to_bgr8(image)
        if size and (canvas.shape[1], canvas.shape[0]) != size:
            canvas = cv2.resize(canvas, size, interpolation=cv2.INTER_AREA)
        elif canvas is image:
            canvas = canvas.copy()
    h, w = canvas.shape[:2]
    scale = max(0.5, min(w, h) / 700)
    thick = max(1, int(round(scale * 2)))
    p = result.prediction
    if p is None:
        text, colour = f"ERROR: {result.error or ''}"[:80], (0, 0, 255)
    elif p.reason:
        text, colour = f"{p.label}: {p.reason}", (255, 0, 255)
    elif p.rejected:
        text, colour = f"{p.label} ({p.top_label}? {p.confidence:.0%})", (0, 165, 255)
    else:
        text, colour = f"{p.label} {p.confidence:.0%}", (0, 220, 0)
    y = int(30 * scale) + 4
    for line, col in ((text, colour), (f"{result.fps:.1f} fps  {result.latency_ms:.1f} ms", (255, 255, 255))):
        cv2.putText(canvas, line, (8, y), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), thick + 2, cv2.LINE_AA)
        cv2.putText(canvas, line, (8, y), cv2.FONT_HERSHEY_SIMPLEX, scale, col, thick, cv2.LINE_AA)
        y += int(34 * scale) + 4
    return canvas


class VideoOutput(Output):
    """Frames with the overlay as a video; frame size is fixed by the first frame (later ones are resized)."""

    needs_image = True

    def __init__(self, path: str | os.PathLike[str], fps: float | None = None) -> None:
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix not in VIDEO_SUFFIXES:
            raise OutputError(f"{path}: unsupported video type; use one of {', '.join(sorted(VIDEO_SUFFIXES))}")
        self.path = _free_path(path)
        self._fourcc = VIDEO_SUFFIXES[suffix]
        self.fps = fps if fps and fps > 0 else 30.0
        self._tmp = self.path.with_name(f".{self.path.stem}.partial{suffix}")
        self._writer: Any = None
        self._size: tuple[int, int] | None = None
        self.frames = 0
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputWriteError(f"{self.path}: cannot create folder: {_why(e)}") from None

    def _open(self, size: tuple[int, int]) -> None:
        w, h = size
        size = (w + (w % 2), h + (h % 2))  # most encoders want even sides
        writer = cv2.VideoWriter(str(self._tmp), cv2.VideoWriter_fourcc(*self._fourcc), self.fps, size)
        if not writer.isOpened():
            raise OutputError(f"{self.path}: OpenCV cannot write {self._fourcc} video here (no encoder?); "
                              "try .avi")
        self._writer, self._size = writer, size

    def write(self, result: FrameResult) -> None:
        img = result.frame.image
        if self._writer is None:
            self._open((img.shape[1], img.shape[0]) if img is not None else (640, 480))
        self._writer.write(draw_overlay(img, result, self._size))
        self.frames += 1

    def close(self) -> None:
        if self._writer is not None:
            self._writer.release()
            self._writer = None
            try:
                os.replace(self._tmp, self.path)
            except OSError as e:
                raise OutputWriteError(f"{self.path}: cannot finish the video ({self._tmp}): {_why(e)}") from None


def gui_problem() -> str | None:
    """Why cv2 cannot open windows here (no GUI build, or no display on Linux), or None when it can."""
    info = cv2.getBuildInformation()
    gui_line = next((ln for ln in info.splitlines() if ln.strip().startswith("GUI:")), "GUI: NONE")
    if "NONE" in gui_line.upper():
        return NO_GUI_HELP
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return "no display (DISPLAY is not set): run with --headless, or set DISPLAY / use X forwarding"
    return None


def gui_available() -> bool:
    return gui_problem() is None


class DisplayOutput(Output):
    """An OpenCV window with the overlay; ``q`` or Esc (or closing the window) stops the run."""

    needs_image = True

    def __init__(self, name: str = "0", slug: str | None = None) -> None:
        problem = gui_problem()
        if problem:
            raise OutputError(f"display://{name}: {problem}")
        self.slug = slug  # one source of several: its own window
        self.window = f"SEM classifier ({name})" + (f" {slug}" if slug else "")
        try:
            cv2.namedWindow(self.window, cv2.WINDOW_NORMAL)
        except cv2.error as e:
            raise OutputError(f"display://{name}: cannot open a window: {e}") from None

    def write(self, result: FrameResult) -> None:
        img = draw_overlay(result.frame.image, result)
        cv2.imshow(self.window, img)
        key = cv2.waitKey(1) & 0xFF
        if key in (ord("q"), 27):
            self.stop_requested = True
        try:
            if cv2.getWindowProperty(self.window, cv2.WND_PROP_VISIBLE) < 1:
                self.stop_requested = True
        except cv2.error:
            self.stop_requested = True

    def close(self) -> None:
        try:
            cv2.destroyWindow(self.window)
            cv2.waitKey(1)
        except cv2.error:
            pass

    def describe(self) -> str:
        return f"display ({self.slug})" if self.slug else "display"


def _parse(uri: str | os.PathLike[str]) -> tuple[str, str]:
    """``(kind, target)`` of one OUT: kind is http, display, console, mqtt, jsonl, csv or video; target the rest
    (a file path without ``file://``, a window name, the URI itself). Raises :class:`OutputError` naming it."""
    text = str(uri).strip()
    low = text.lower()
    if low.startswith("http://"):
        return "http", text
    if low.startswith("display://"):
        return "display", text[len("display://"):] or "0"
    if low in ("-", "stdout", "stdout://", "console://"):
        return "console", text
    if low.startswith(("mqtt://", "mqtts://")):
        return "mqtt", text
    if low.startswith("file://"):
        text = text[len("file://"):]
    elif "://" in low:
        raise OutputError(f"{text.split('://', 1)[0]}://...: unknown output; use display://0, mqtt://host/topic, "
                          "a .mp4/.avi file, a .jsonl or .csv file, or -")
    suffix = Path(text).suffix.lower()
    kind = ({".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv"} | dict.fromkeys(VIDEO_SUFFIXES, "video")).get(suffix)
    if not kind:
        raise OutputError(f"{text}: unknown output type {suffix or '(no extension)'}; use display://0, "
                          ".mp4/.avi/.mkv, .jsonl or .csv, or - for stdout")
    return kind, text


def open_output(uri: str | os.PathLike[str], *, fps: float | None = None, stream: TextIO | None = None,
                http: dict[str, Any] | None = None, slug: str | None = None) -> Output:
    """Open one OUT (see module docstring). Raises :class:`OutputError` naming the URI when it cannot be used.
    ``http``: ``host`` and ``token`` for an ``http://`` live view (runtime.liveview). ``slug``: the output is for
    one source of several (:func:`source_slugs`): a video is written to ``NAME.<slug>.mp4``, a window is its own."""
    kind, target = _parse(uri)
    if kind == "http":  # the live view in a browser (runtime/liveview.py; stdlib http.server)
        from runtime.liveview import LiveViewOutput

        return LiveViewOutput.from_uri(target, **(http or {}))
    if kind == "mqtt":  # results to an MQTT broker (runtime/mqtt.py; paho-mqtt)
        from runtime.mqtt import MqttOutput

        return MqttOutput(target)
    if kind == "display":
        return DisplayOutput(target, slug)
    if kind == "console":
        return ConsoleOutput(stream)
    if kind == "jsonl":
        return JsonlOutput(target)
    if kind == "csv":
        return CsvOutput(target)
    path = Path(target)
    return VideoOutput(path.with_name(f"{path.stem}.{slug}{path.suffix}") if slug else path, fps)


def open_outputs(uris: list[str], sources: list[str], *, stream: TextIO | None = None,
                 http: dict[str, Any] | None = None) -> list[Output]:
    """Every OUT of a run over ``sources`` (their SRC strings), in order. With several sources a video or a
    display is opened once per source (``out.mp4`` → ``out.<slug>.mp4``, a window each, ``for_source`` set), so
    frames of different sources never share a file or a window; the other outputs get every source's results
    (each record names its source). On an error, what was opened is closed again and the error raised."""
    slugs = source_slugs(sources) if len(sources) > 1 else []
    opened: list[Output] = []
    try:
        for uri in uris:
            if not slugs or _parse(uri)[0] not in ("video", "display"):
                opened.append(open_output(uri, stream=stream, http=http))
                continue
            for src, slug in zip(sources, slugs, strict=True):
                opened.append(open_output(uri, stream=stream, http=http, slug=slug))
                opened[-1].for_source = src
    except BaseException:
        for o in opened:
            try:
                o.close()
            except Exception:  # noqa: BLE001 - the opening error is the one to report
                pass
        raise
    return opened


_SLUG_BAD = re.compile(r"[^A-Za-z0-9_-]+")
_SUFFIX = re.compile(r"\.[A-Za-z][A-Za-z0-9]{0,4}$")  # .mp4, .png: dropped from a file name (not from 10.0.0.7)


def _slug(uri: str) -> str:
    """The last meaningful part of a source's redacted name, as letters, digits, ``-`` and ``_`` only."""
    text = redact(uri).split("://", 1)[-1].split("?", 1)[0].rsplit("@", 1)[-1]
    for part in reversed(re.split(r"[/\\]", text)):
        slug = _SLUG_BAD.sub("-", _SUFFIX.sub("", part)).strip("-_")[:32].strip("-_")
        if slug:
            return slug
    return "source"


def source_slugs(sources: list[str]) -> list[str]:
    """A short file-name part per source, for what a run with several sources writes per source: built by the
    runtime from the end of each redacted SRC (``rtsp://user:pw@10.0.0.7/cam1`` → ``cam1``, ``/data/lot7.mp4`` →
    ``lot7``) with letters, digits, ``-`` and ``_`` only, so no source name can make a path or carry a password;
    numbered (``lot7-2``) where two would be the same."""
    slugs: list[str] = []
    for uri in sources:
        base = slug = _slug(uri)
        n = 2
        while slug in slugs:
            slug, n = f"{base}-{n}", n + 1
        slugs.append(slug)
    return slugs


__all__ = ["FrameResult", "Output", "OutputError", "OutputWriteError", "JsonlOutput", "CsvOutput", "ConsoleOutput",
           "VideoOutput", "DisplayOutput", "open_output", "open_outputs", "source_slugs", "draw_overlay",
           "gui_available", "gui_problem", "RECORD_FIELDS"]
