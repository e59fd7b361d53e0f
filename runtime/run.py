"""``python -m runtime.run``: classify a camera, stream, video, image or folder, frame by frame, and keep going.

Decoding runs in its own thread (files: a bounded prefetch queue; cameras: newest frame only), inference in the
main thread, results go to every ``--output`` (records flushed per frame). A status line on stderr shows fps,
latency and dropped frames; Ctrl-C or SIGTERM stops cleanly (outputs flushed and closed, summary printed).
A bad image or frame becomes an error record and the run goes on; a frame the frame-quality gate refuses is an
``invalid`` record with its reason. The exit code tells a supervisor what happened (``EXIT_*`` below, one home).
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import threading
import time
import traceback
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from runtime.contract import INVALID_LABEL
from runtime.liveview import LOCALHOST, TOKEN_ENV, is_loopback
from runtime.outputs import RECORD_FIELDS, FrameResult, Output, OutputWriteError, VideoOutput, gui_problem, open_output
from runtime.sources import Frame, Source, SourceSpec, open_source, parse_source, prepare_frame, redact

# Exit codes: the one home for them (the --help epilog and RunSummary.exit_code use these).
EXIT_OK = 0  # every input was classified, or was an invalid frame the quality gate refused (also after a clean stop)
EXIT_INTERNAL = 1  # an unexpected internal error (traceback printed); Python's own code for an uncaught exception
EXIT_USAGE = 2  # nothing ran: bad arguments, source or model not found or not loadable, self-check failed
EXIT_INPUT = 3  # some inputs could not be read or classified (error records written, the rest processed)
EXIT_OUTPUT = 4  # an output could not be opened or written (disk full, permission, broken pipe); the file is named
EXIT_INTERRUPTED = 130  # a second Ctrl-C: stopped at once
ON_OUTPUT_ERROR = ("stop", "continue")
EXIT_CODES: dict[int, str] = {
    EXIT_OK: "every input classified (or refused as invalid by the frame-quality gate); also after Ctrl-C/SIGTERM",
    EXIT_INTERNAL: "internal error (a traceback is printed)",
    EXIT_USAGE: "nothing ran: bad arguments, source or model not found or not loadable, self-check failed",
    EXIT_INPUT: "some inputs could not be read or classified (error records written, the rest processed), or "
                "the source failed or gave no frames",
    EXIT_OUTPUT: "an output could not be opened or written (disk full, permission, broken pipe; the file is "
                 "named); the run stops there unless --on-output-error continue",
    EXIT_INTERRUPTED: "interrupted by a second Ctrl-C",
}

EPILOG = """\
sources (--source):
  /dev/video0, v4l2:///dev/video0, 0       camera (V4L2 device or index); newest frame only, drops counted
  rtsp://user:pass@host:554/stream          network stream (also http(s)://); reconnects with backoff
  clip.mp4, file://clip.mp4                 video file, every frame (--loop to repeat)
  wafer.png, samples/, 'shots/*.tif'        an image, a folder (recursive), a glob
  csi://0?width=1920&fps=30, gst://PIPELINE Jetson CSI camera / GStreamer pipeline (OpenCV with GStreamer only)
outputs (--output, repeatable; default: a line per frame on stdout):
  display://0   window with label/confidence/fps (needs opencv-python, not -headless)
  out.mp4       video with the overlay (.avi, .mkv too)
  res.jsonl     one JSON record per frame (appended, each record written whole); res.csv likewise; - for stdout
  mqtt://host:1883/topic   one JSON message per result, QoS 1; journalled on disk while the broker is away, sent
                when it is back (mqtts:// for TLS, ?ca=FILE; login from SEM_MQTT_USERNAME/SEM_MQTT_PASSWORD)
  http://:8080  live view in a browser: latest frame per source with its overlay, class counts, rejection
                rate, source states; listens on --host (127.0.0.1); beyond it a token is required (--http-token)
records: {fields}.
  label is a class, "other" (rejected), "invalid" (no usable content; reason says why: blank, saturated, noise,
  defocus, out_of_range), or empty with error set (the input could not be read or classified). Record files are
  appended to, never truncated; a CSV with another header is left alone and res-1.csv started next to it.

several sources (--source repeated, or cams.streams with one SRC per line): a capture thread per source, one
  inference loop batching a frame of each across sources; records name their source; a failing live source is
  reopened with backoff while the others go on; the status line and summary show each source's state, fps, drops.

examples:
  python -m runtime.run --source samples/
  python -m runtime.run --source /dev/video0 --output display://0 --smoothing 5
  python -m runtime.run --source rtsp://10.0.0.7/cam --headless --output results.jsonl
  python -m runtime.run --source review.mp4 --model model.int8.onnx --output annotated.mp4 --output res.csv
  python -m runtime.run --source 'lot42/**/*.png' --threshold 0.6 --output lot42.jsonl --quiet
  python -m runtime.run --source rtsp://10.0.0.7/a --source rtsp://10.0.0.8/b --headless --output station.jsonl
  python -m runtime.run --source cams.streams --output http://:8080 --metrics-port 9108 --headless -q
""".replace("{fields}", ", ".join(RECORD_FIELDS))


def _exit_code_help() -> str:
    import textwrap

    lines = ["exit codes:"]
    for code, text in EXIT_CODES.items():
        lines += textwrap.wrap(text, 112, initial_indent=f"  {code:<5}", subsequent_indent=" " * 7)
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ smoothing
class ProbabilitySmoother:
    """Average calibrated probabilities (and scores) over the last ``n`` frames of a video, then decide again.

    The smoothed top class is the argmax of the mean probabilities; the score is the mean top probability for MSP
    and the mean score otherwise; rejection uses the classifier's threshold.
    """

    def __init__(self, clf: Any, n: int) -> None:
        self.clf = clf
        self.n = max(1, int(n))
        self._probs: deque[np.ndarray] = deque(maxlen=self.n)
        self._scores: deque[float] = deque(maxlen=self.n)

    def reset(self) -> None:
        self._probs.clear()
        self._scores.clear()

    def update(self, pred: Any) -> Any:
        """The smoothed prediction for this frame. An invalid frame (no usable content) passes through as it is
        and does not enter the average."""
        from runtime.classifier import Prediction

        if _is_invalid(pred):
            return pred
        self._probs.append(pred.probs)
        self._scores.append(pred.score)
        if self.n == 1:
            return pred
        probs = np.mean(self._probs, axis=0).astype(np.float32)
        top = int(probs.argmax())
        meta = self.clf.meta
        score = float(probs[top]) if (meta.score == "msp" and not meta.score_output) else float(np.mean(self._scores))
        thr = self.clf.threshold
        rejected = thr is not None and not (score >= thr)
        labels = self.clf.labels
        return Prediction(label=labels[self.clf.reject_index] if rejected else labels[top],
                          index=self.clf.reject_index if rejected else top, top_label=labels[top], top_index=top,
                          confidence=float(probs[top]), probs=probs, logits=pred.logits, rejected=rejected,
                          score=score, timings=pred.timings, source=pred.source)


# ------------------------------------------------------------------------------------------------ status + summary
class StatusLine:
    """One status line on stderr: redrawn in place on a terminal, a plain line every ``log_every`` s otherwise."""

    def __init__(self, stream: TextIO, enabled: bool = True, log_every: float = 10.0) -> None:
        self.stream = stream
        self.enabled = enabled
        self.tty = enabled and hasattr(stream, "isatty") and stream.isatty()
        self.log_every = log_every
        self._last = 0.0
        self._shown = False

    def clear(self) -> None:
        if self.tty and self._shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._shown = False

    def update(self, text: str, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if self.tty:
            if force or not self._shown or now - self._last >= 0.2:
                self.stream.write("\r\x1b[K" + text)
                self.stream.flush()
                self._last, self._shown = now, True
        elif now - self._last >= self.log_every:  # logs/pipes: a line per interval, never one per frame
            if self._last:
                self.stream.write(text + "\n")
                self.stream.flush()
            self._last = now

    def finish(self) -> None:
        if self.tty and self._shown:
            self.stream.write("\n")
            self.stream.flush()
            self._shown = False


def _is_invalid(pred: Any) -> bool:
    """A frame the frame-quality gate refused: its own outcome, neither a class nor ``other``."""
    return pred.label == INVALID_LABEL


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


@dataclass
class RunSummary:
    source: str
    model: str = ""
    frames: int = 0
    classified: int = 0  # got a class (or other); invalid frames and errors are counted apart
    errors: int = 0  # could not be read or classified
    rejected: int = 0  # classified, then rejected to other
    dropped: int = 0
    reconnects: int = 0
    elapsed_s: float = 0.0
    latencies_ms: list[float] = field(default_factory=list, repr=False)
    labels: Counter[str] = field(default_factory=Counter)  # classified frames by final label
    invalid_reasons: Counter[str] = field(default_factory=Counter)  # invalid frames by reason
    stopped_by: str = "end"  # end | signal | max-frames | window | source-error | output-error | internal-error
    source_error: str | None = None
    internal_error: str | None = None
    outputs: list[str] = field(default_factory=list)
    output_errors: list[str] = field(default_factory=list)  # one message per failed output, naming it
    error_examples: list[str] = field(default_factory=list, repr=False)  # the first few frame errors
    streams: list[dict[str, Any]] = field(default_factory=list)  # one entry per source (SourceFeed.to_dict)
    batches: int = 0  # inference calls; frames / batches is the mean batch across sources

    MAX_EXAMPLES = 5

    @property
    def invalid(self) -> int:
        return sum(self.invalid_reasons.values())

    def invalid_text(self) -> str:
        """``blank 2, noise 1``: invalid frames per reason, most frequent first."""
        return ", ".join(f"{k} {v}" for k, v in self.invalid_reasons.most_common())

    @property
    def fps(self) -> float:
        return self.frames / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def latency_mean_ms(self) -> float:
        return float(np.mean(self.latencies_ms)) if self.latencies_ms else math.nan

    @property
    def latency_p90_ms(self) -> float:
        return float(np.percentile(self.latencies_ms, 90)) if self.latencies_ms else math.nan

    def add(self, result: FrameResult) -> None:
        """Count one frame's outcome."""
        self.frames += 1
        p = result.prediction
        if p is None:
            self.errors += 1
            if len(self.error_examples) < self.MAX_EXAMPLES:
                self.error_examples.append(result.error or "unknown error")
            return
        self.latencies_ms.append(result.latency_ms)
        if _is_invalid(p):
            self.invalid_reasons[p.reason or "unspecified"] += 1
        else:
            self.classified += 1
            self.rejected += bool(p.rejected)
            self.labels[p.label] += 1

    @property
    def exit_code(self) -> int:
        """What a supervisor should read from this run (see ``EXIT_CODES``)."""
        if self.stopped_by == "internal-error":
            return EXIT_INTERNAL
        if self.output_errors:
            return EXIT_OUTPUT
        if self.errors or self.stopped_by == "source-error" or self.source_error or self.frames == 0:
            return EXIT_INPUT
        return EXIT_OK

    def outcome(self) -> str:
        code = self.exit_code
        if code == EXIT_OK:
            why = "every frame classified" + (" or refused as invalid" if self.invalid else "")
        elif code == EXIT_OUTPUT:
            why = _plural(len(self.output_errors), "output") + " failed"
        elif code == EXIT_INPUT:
            why = (_plural(self.errors, "input") + " could not be read or classified" if self.errors
                   else "the source failed" if self.stopped_by == "source-error"
                   else "a source failed" if self.source_error else "no frames could be read")
        else:
            why = "internal error"
        return f"exit {code}: {why}"

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "model": self.model, "frames": self.frames, "classified": self.classified,
                "invalid": self.invalid, "invalid_reasons": dict(self.invalid_reasons.most_common()),
                "errors": self.errors, "rejected": self.rejected, "dropped": self.dropped,
                "reconnects": self.reconnects, "elapsed_s": round(self.elapsed_s, 3), "fps": round(self.fps, 2),
                "latency_mean_ms": _round(self.latency_mean_ms), "latency_p90_ms": _round(self.latency_p90_ms),
                "labels": dict(self.labels.most_common()), "stopped_by": self.stopped_by,
                "source_error": self.source_error, "outputs": self.outputs, "output_errors": self.output_errors,
                "sources": self.streams, "batches": self.batches, "exit_code": self.exit_code}

    def format(self) -> str:
        labels = ", ".join(f"{k} {v}" for k, v in self.labels.most_common()) or "-"
        counts = f"{self.classified} classified, {_plural(self.errors, 'error')}"
        if self.invalid:
            counts += f", {self.invalid} invalid"
        if self.rejected:
            counts += f", {self.rejected} rejected to other"
        if self.latencies_ms:
            speed = (f"{self.fps:.1f} fps over {self.elapsed_s:.2f} s; latency mean {self.latency_mean_ms:.1f} ms, "
                     f"p90 {self.latency_p90_ms:.1f} ms")
        else:
            speed = f"no frames classified ({self.elapsed_s:.2f} s)"
        lines = [
            "-- summary " + "-" * 50,
            f"source    {self.source}",
            f"model     {self.model}",
            f"frames    {self.frames} ({counts})",
            f"speed     {speed}",
            f"labels    {labels}",
        ]
        if self.invalid:
            lines.append(f"invalid   {self.invalid} (no usable content): {self.invalid_text()}")
        if self.errors:
            more = self.errors - len(self.error_examples)
            lines += [f"error     {e}" for e in self.error_examples]
            if more > 0:
                lines.append(f"error     ... and {more} more (see the records)")
        if self.dropped or self.reconnects:
            lines.append(f"live      {self.dropped} frames dropped (classifier busy), {self.reconnects} reconnects")
        if len(self.streams) > 1:
            lines.append(f"batching  {self.frames} frames in {self.batches} inference calls "
                         f"(mean batch {self.frames / max(1, self.batches):.2f})")
            lines += [f"  {_stream_line(st)}" for st in self.streams]
        if self.outputs:
            lines.append(f"outputs   {', '.join(self.outputs)}")
        lines += [f"FAILED    {e}" for e in self.output_errors]
        stop = {"end": "end of source" + ("s" if len(self.streams) > 1 else ""), "signal": "stopped by signal",
                "max-frames": "--max-frames reached",
                "window": "window closed", "source-error": f"source failed: {self.source_error}",
                "output-error": ("every output failed" if len(self.output_errors) >= len(self.outputs) else
                                 "an output failed (--on-output-error continue keeps going without it)"),
                "internal-error": f"internal error: {self.internal_error}"}[self.stopped_by]
        lines.append(f"ended     {stop}; {self.outcome()}")
        return "\n".join(lines)


def _stream_line(st: dict[str, Any]) -> str:
    """One source in the summary: ``cam1 (stream) ended: 120 frames, 25.0 fps, 3 dropped, 1 reconnect``."""
    text = (f"{st['name']} ({st['kind']}) {st['state']}: {_plural(st['frames'], 'frame')}, {st['fps']:.1f} fps, "
            f"{st['dropped']} dropped, {_plural(st['reconnects'], 'reconnect')}")
    if st["errors"]:
        text += f", {_plural(st['errors'], 'error')}"
    if st["invalid"]:
        text += f", {st['invalid']} invalid"
    if st.get("error"):
        text += f"; {st['error']}"
    return text


def _round(v: float) -> float | None:
    return round(v, 3) if math.isfinite(v) else None


# ------------------------------------------------------------------------------------------------ the loop
def _error_text(e: BaseException, frame: Frame) -> str:
    msg = str(e) or type(e).__name__
    return msg if frame.source in msg else f"{frame.source} [frame {frame.index}]: {msg}"


def _check_args(smoothing: int, max_frames: int | None, threads: int | None, on_output_error: str,
                batch_timeout_ms: float = 5.0) -> None:
    if smoothing is None or smoothing < 0:
        raise ValueError(f"smoothing must be 0 (off) or a number of frames >= 1, got {smoothing}")
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be >= 1 (or None for no limit), got {max_frames}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1 (or None for the physical cores), got {threads}")
    if on_output_error not in ON_OUTPUT_ERROR:
        raise ValueError(f"on_output_error must be one of {', '.join(ON_OUTPUT_ERROR)}, got {on_output_error!r}")
    if not (batch_timeout_ms >= 0):
        raise ValueError(f"batch_timeout_ms must be >= 0, got {batch_timeout_ms}")


STREAMS_SUFFIX = ".streams"


def default_threads() -> int:
    """ONNX Runtime threads for a run when ``--threads`` is not given: the physical cores (``benchmarks.latency
    --pipeline-only`` compares it with one core left to decoding)."""
    from runtime.ort_backend import physical_cores

    return physical_cores()


def expand_sources(sources: str | list[str] | tuple[str, ...]) -> list[str]:
    """The SRC list a run reads: each ``--source``, with a ``*.streams`` file replaced by its lines (one URI per
    line; blank lines and ``#`` comments skipped). A source given twice is an error (records could not tell the
    two apart)."""
    items = [sources] if isinstance(sources, (str, os.PathLike)) else list(sources)
    out: list[str] = []
    for item in items:
        text = str(item).strip()
        if text.lower().endswith(STREAMS_SUFFIX) and "://" not in text:
            path = Path(text).expanduser()
            try:
                lines = path.read_text(encoding="utf-8").splitlines()
            except OSError as e:
                raise FileNotFoundError(e.errno or 2, f"cannot read the streams list: {e.strerror or e}",
                                        str(path)) from None
            found = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
            if not found:
                raise ValueError(f"{path}: no sources in this streams list (one URI per line)")
            out += found
        else:
            out.append(text)
    if not out:
        raise ValueError("no source given")
    seen: set[str] = set()
    for uri in out:
        if uri in seen:
            raise ValueError(f"{redact(uri)}: source given twice")
        seen.add(uri)
    return out


class SourceFeed:
    """One source inside the frame loop: its :class:`Source`, a feeder thread that prepares its frames
    (``Classifier.prepare``: grey, resize, quality gate) and moves them into ``pending`` (live sources: the newest
    frame only, older ones dropped and counted; files: a short queue, so decode stays ahead of inference), and its
    state for the status line, summary and metrics. Decode, preparation and inference so run in three threads.

    ``state``: ``connecting`` (not opened yet), ``running``, ``reconnecting`` (a live source waiting out its
    backoff), ``ended`` (end of file), ``failed`` (a file source that broke, or a live one given up on at stop),
    ``stopped``. A live source that fails is reopened with backoff for as long as the run lasts; the others go on.
    """

    FILE_QUEUE = 4  # prepared frames a file source may have waiting (also the most one batch takes from it)

    def __init__(self, uri: str, spec: SourceSpec, opener: Callable[[], Source], cond: threading.Condition,
                 stop: threading.Event, log: Callable[[str], None], backoff: tuple[float, float] = (0.5, 10.0),
                 src: Source | None = None, prepare: Callable[[Any], Any] | None = None,
                 keep_image: bool = True) -> None:
        self.uri, self.spec = uri, spec
        self.prepare, self.keep_image = prepare, keep_image
        self.name = redact(uri)
        self._opener = opener
        self._cond, self._stop, self._log = cond, stop, log
        self.backoff = backoff
        self.src = src
        self.pending: deque[Frame] = deque()
        self.done = False
        self._state = "connecting" if src is None else "running"
        self.error: str | None = None
        self.frames = self.errors = self.invalid = self.dropped = self.reconnects = 0
        self.smoother: ProbabilitySmoother | None = None
        self._recent: deque[float] = deque(maxlen=60)
        self.fps_now = 0.0
        self.last: FrameResult | None = None
        self._thread: threading.Thread | None = None
        self._closed_stats = (0, 0)  # dropped / reconnects of sources already closed (reopened live sources)

    # state -------------------------------------------------------------------------------------------------------
    @property
    def live(self) -> bool:
        return self.spec.is_live

    @property
    def state(self) -> str:
        if self._state == "running" and self.src is not None:
            return getattr(self.src, "state", "running")
        return self._state

    @property
    def total_dropped(self) -> int:
        return self.dropped + self._closed_stats[0] + (self.src.stats.dropped if self.src is not None else 0)

    @property
    def total_reconnects(self) -> int:
        return self.reconnects + self._closed_stats[1] + (self.src.stats.reconnects if self.src is not None else 0)

    def count(self, result: FrameResult) -> None:
        """Per-source counters and rate (the loop thread)."""
        self.frames += 1
        p = result.prediction
        if p is None:
            self.errors += 1
        elif _is_invalid(p):
            self.invalid += 1
        now = time.perf_counter()
        self._recent.append(now)
        if len(self._recent) > 1 and self._recent[-1] > self._recent[0]:
            self.fps_now = (len(self._recent) - 1) / (self._recent[-1] - self._recent[0])
        self.last = result

    def to_dict(self, elapsed_s: float) -> dict[str, Any]:
        return {"name": self.name, "kind": self.spec.kind, "state": self.state, "frames": self.frames,
                "errors": self.errors, "invalid": self.invalid, "dropped": self.total_dropped,
                "reconnects": self.total_reconnects, "fps": round(self.frames / elapsed_s, 2) if elapsed_s else 0.0,
                "error": self.error}

    def status_text(self) -> str:
        short = self.name if len(self.name) <= 24 else "..." + self.name[-21:]
        return f"{short} {self.state} {self.fps_now:.1f} fps drop {self.total_dropped}"

    # the feeder thread -------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._feed, name=f"feed:{self.name}", daemon=True)
        self._thread.start()

    def _set(self, state: str, error: str | None = None, done: bool = False) -> None:
        with self._cond:
            self._state = state
            if error is not None:
                self.error = error
            if done or state in ("ended", "failed", "stopped"):
                self.done = True
            self._cond.notify_all()

    def _stopped(self) -> None:
        """At stop: a live source still waiting to reconnect keeps saying so in the summary."""
        self._set("stopped" if self._state in ("running", "connecting") else self._state, done=True)

    def _drop_source(self) -> None:
        src, self.src = self.src, None
        if src is not None:
            self._closed_stats = (self._closed_stats[0] + src.stats.dropped,
                                  self._closed_stats[1] + src.stats.reconnects)
            try:
                src.close()
            except Exception:  # noqa: BLE001 - closing a broken capture must not stop the retry
                pass

    def _feed(self) -> None:
        delay = self.backoff[0]
        try:
            while not self._stop.is_set():
                if self.src is None:
                    try:
                        self.src = self._opener()
                    except Exception as e:  # noqa: BLE001 - a live source that is down is retried, a file is not
                        why = f"{type(e).__name__}: {e}"
                        if not self.live:
                            self._set("failed", why)
                            return
                        self._set("reconnecting", why)
                        self._log(f"{self.name}: cannot open ({why}); retrying in {delay:.1f} s")
                        self._stop.wait(delay)
                        delay = min(delay * 2, self.backoff[1])
                        with self._cond:
                            self.reconnects += 1
                        continue
                    if self.error is not None:
                        self._log(f"{self.name}: opened")
                self._set("running")
                try:
                    for frame in self.src:
                        delay = self.backoff[0]
                        # Preprocessing here: a stage of its own between decode (the source's thread) and inference
                        prepare_frame(frame, self.prepare, self.keep_image)
                        with self._cond:
                            if self.live:
                                if self.pending:
                                    self.pending.popleft()
                                    self.dropped += 1
                            else:
                                while len(self.pending) >= self.FILE_QUEUE and not self._stop.is_set():
                                    self._cond.wait(0.1)
                            self.pending.append(frame)
                            self._cond.notify_all()
                            # Live: take the next frame only once the loop has this one, so only frames that will
                            # be classified are prepared (the capture thread keeps the newest, counting the rest).
                            while self.live and self.pending and not self._stop.is_set():
                                self._cond.wait(0.1)
                        if self._stop.is_set():
                            break
                except Exception as e:  # noqa: BLE001 - this source broke; the others go on
                    why = f"{type(e).__name__}: {e}"
                    if not self.live:
                        self._set("failed", why)
                        return
                    self._set("reconnecting", why)
                    self._log(f"{self.name}: {why}; reopening in {delay:.1f} s")
                    self._drop_source()
                    self._stop.wait(delay)
                    delay = min(delay * 2, self.backoff[1])
                    with self._cond:
                        self.reconnects += 1
                    continue
                if self._stop.is_set():
                    self._stopped()
                else:
                    self._set("ended")
                return
            self._stopped()
        except BaseException as e:  # noqa: BLE001 - never leave the loop waiting on a dead feeder
            self._set("failed", f"{type(e).__name__}: {e}")

    def close(self) -> None:
        if self.src is not None:
            self.src.stop()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if not self.done:
            self._stopped()
        if self.src is not None:
            self.src.close()


class LoopHook:
    """Something that watches every result without being an output (metrics, alarms). All methods optional to
    override: ``on_start(loop)``, ``before_write(loop, feed, result)`` before the outputs write it (may add
    ``result.extra`` fields to its record), ``on_result(loop, feed, result)`` after the outputs were written,
    ``status(loop) -> str`` appended to the status line, ``on_close(loop, summary)`` before the summary prints."""

    def on_start(self, loop: FrameLoop) -> None:
        pass

    def before_write(self, loop: FrameLoop, feed: SourceFeed, result: FrameResult) -> None:
        pass

    def on_result(self, loop: FrameLoop, feed: SourceFeed, result: FrameResult) -> None:
        pass

    def on_batch(self, loop: FrameLoop, size: int, infer_ms: float) -> None:
        pass

    def status(self, loop: FrameLoop) -> str:
        return ""

    def on_close(self, loop: FrameLoop, summary: RunSummary) -> None:
        pass


class FrameLoop:
    """The frame loop of ``python -m runtime.run``: owns the sources (one :class:`SourceFeed` each), the outputs,
    the summary, the status line and the hooks; one inference loop batches frames across sources.

    Each pass takes at most one frame per source (the newest for live ones, the next for files), waiting up to
    ``batch_timeout_ms`` after the first frame for the other running sources, up to ``max_batch`` frames; one
    frame is classified with ``predict``, several with ``predict_batch`` in one backend call. Results are routed
    back to their source (smoothing is per source) and written to every output. Setup happens in :func:`run`.
    """

    def __init__(self, clf: Any, feeds: list[SourceFeed], outputs: list[Output], summary: RunSummary, *,
                 status_line: StatusLine, err: TextIO, stop: threading.Event, cond: threading.Condition,
                 on_output_error: str = "stop", max_frames: int | None = None, batch_timeout_ms: float = 5.0,
                 max_batch: int | None = None, hooks: list[LoopHook] | None = None) -> None:
        self.clf, self.feeds, self.outputs, self.summary = clf, feeds, outputs, summary
        self.status_line, self.err, self.stop, self._cond = status_line, err, stop, cond
        self.on_output_error, self.max_frames = on_output_error, max_frames
        self.batch_timeout = batch_timeout_ms / 1e3
        backend_max = getattr(getattr(clf, "backend", None), "max_batch", None) or getattr(clf, "max_batch", None)
        limit = max_batch or (backend_max if backend_max else getattr(clf, "batch_size", 8))
        self.limit = max(1, int(limit))  # frames per inference call
        self.max_batch = min(self.limit, len(feeds))  # a frame of each source: what a pass waits for
        # Only a classifier whose class has predict_batch (a wrapper that overrides predict alone keeps its say).
        self.can_batch = self.limit > 1 and any("predict_batch" in vars(k) for k in type(clf).__mro__)
        self.hooks: list[LoopHook] = list(hooks or [])
        self.broken: dict[int, str] = {}  # output index -> why it failed
        self.console = any(o.describe() == "stdout" for o in outputs)
        self._recent: deque[float] = deque(maxlen=60)
        self._rr = 0  # round-robin start, so no source is always first in (or left out of) a batch
        self.started = 0.0

    @property
    def elapsed_s(self) -> float:
        return time.perf_counter() - self.started if self.started else 0.0

    # collecting a batch ------------------------------------------------------------------------------------------
    def _collect(self) -> list[tuple[SourceFeed, Frame]] | None:
        """A frame of each source that has one (waiting up to the batch timeout for the others), topped up with
        more frames already waiting from file sources (they are every frame, in order, so a backlog is classified
        in fewer, larger calls); None when every source is done and drained."""
        with self._cond:
            deadline: float | None = None
            while not self.stop.is_set():
                ready = [f for f in self.feeds if f.pending]
                if not ready and all(f.done for f in self.feeds):
                    return None
                waiting_for = [f for f in self.feeds if not f.pending and f.state == "running"]
                now = time.perf_counter()
                if ready and (len(ready) >= self.max_batch or not waiting_for):
                    break
                if ready and deadline is None:
                    deadline = now + self.batch_timeout
                if ready and now >= deadline:  # type: ignore[operator]
                    break
                self._cond.wait(timeout=min(0.1, deadline - now) if deadline is not None else 0.1)
            else:
                return []
            n = len(self.feeds)
            order = [self.feeds[(self._rr + i) % n] for i in range(n)]
            self._rr = (self._rr + 1) % n
            limit = self.limit if self.can_batch else 1
            batch = [(f, f.pending.popleft()) for f in order if f.pending][:limit]
            for f in order:
                while len(batch) < limit and f.pending and not f.live:
                    batch.append((f, f.pending.popleft()))
            self._cond.notify_all()  # file feeders waiting for room
            return batch

    # classifying -------------------------------------------------------------------------------------------------
    def _classify_batch(self, batch: list[tuple[SourceFeed, Frame]]) -> list[FrameResult]:
        good = [(f, fr) for f, fr in batch if fr.error is None]
        if len(good) <= 1 or not self.can_batch:
            return [_classify(self.clf, fr, f.smoother, f.live) for f, fr in batch]
        from runtime.errors import InputError

        results: dict[int, FrameResult] = {}
        xs = [fr.prepared if fr.prepared is not None else fr.image for _, fr in good]
        try:
            preds = self.clf.predict_batch(xs, on_error="keep", sources=[fr.source for _, fr in good])
        except Exception:  # noqa: BLE001 - a batch that fails as a whole: classify one by one, each error its own
            return [_classify(self.clf, fr, f.smoother, f.live) for f, fr in batch]
        now = time.time()
        for (f, fr), pred in zip(good, preds, strict=True):
            if isinstance(pred, BaseException):
                extra = "" if isinstance(pred, (InputError, OSError)) else f" ({type(pred).__name__})"
                results[id(fr)] = FrameResult(fr, None, _error_text(pred, fr) + extra, fr.prepare_ms)
                continue
            if f.smoother is not None:
                pred = f.smoother.update(pred)
            latency = (now - fr.timestamp) * 1e3 if f.live else fr.prepare_ms + pred.timings.get("total", 0.0)
            results[id(fr)] = FrameResult(fr, pred, None, latency)
        return [results[id(fr)] if id(fr) in results else _classify(self.clf, fr, f.smoother, f.live)
                for f, fr in batch]

    # outputs -----------------------------------------------------------------------------------------------------
    def _output_failed(self, i: int, o: Output, e: BaseException) -> None:
        msg = str(e) if isinstance(e, OutputWriteError) else f"{o.describe()}: {type(e).__name__}: {e}"
        self.broken[i] = msg
        self.summary.output_errors.append(msg)
        self.status_line.clear()
        if len(self.broken) == len(self.outputs):
            then = "no output left, stopping"
        elif self.on_output_error == "stop":
            then = "stopping (--on-output-error continue keeps going without it)"
        else:
            then = "disabled, the run goes on"
        print(f"[run] output failed: {msg}; {then}", file=self.err, flush=True)

    def _status_text(self, result: FrameResult) -> str:
        s = self.summary
        fps_text = f"{result.fps:5.1f}" if result.fps else "    -"
        invalid_text = f"  invalid {s.invalid} ({s.invalid_text()})" if s.invalid else ""
        if len(self.feeds) == 1:
            f = self.feeds[0]
            tail = f"  dropped {f.total_dropped}  reconnects {f.total_reconnects}"
        else:
            tail = "  | " + " | ".join(f.status_text() for f in self.feeds)
        text = (f"[run] {s.frames} frames  {fps_text} fps  latency {result.latency_ms:6.1f} ms  "
                f"errors {s.errors}{invalid_text}{tail}")
        for h in self.hooks:
            extra = h.status(self)
            if extra:
                text += "  " + extra
        return text

    def _deliver(self, feed: SourceFeed, result: FrameResult) -> str | None:
        """Count, write and report one result; returns why the run must stop, or None."""
        self.summary.add(result)
        feed.count(result)
        self._recent.append(time.perf_counter())
        if len(self._recent) > 1 and self._recent[-1] > self._recent[0]:
            result.fps = (len(self._recent) - 1) / (self._recent[-1] - self._recent[0])
        for h in self.hooks:  # e.g. the drift alarm, which marks the record (runtime.drift)
            before = getattr(h, "before_write", None)
            if before is not None:
                before(self, feed, result)
        if self.console:
            self.status_line.clear()
        for i, o in enumerate(self.outputs):
            if i in self.broken:
                continue
            try:
                o.write(result)
            except Exception as e:  # noqa: BLE001 - full disk, dead window: said; the others still get it
                self._output_failed(i, o, e)
        for h in self.hooks:
            h.on_result(self, feed, result)
        self.status_line.update(self._status_text(result), force=self.console)
        if self.broken and (self.on_output_error == "stop" or len(self.broken) == len(self.outputs)):
            return "output-error"  # with "continue", when no output is left to write to
        if any(o.stop_requested for i, o in enumerate(self.outputs) if i not in self.broken):
            return "window"
        if self.max_frames and self.summary.frames >= self.max_frames:
            return "max-frames"
        return None

    # the loop ----------------------------------------------------------------------------------------------------
    def run(self) -> RunSummary:
        summary = self.summary
        self.started = time.perf_counter()
        for o in self.outputs:
            attach = getattr(o, "attach", None)  # outputs that show more than results (the live view)
            if attach is not None:
                attach(self)
        for h in self.hooks:
            h.on_start(self)
        for f in self.feeds:
            f.start()
        try:
            while not self.stop.is_set():
                batch = self._collect()
                if batch is None:
                    break
                if not batch:
                    continue
                t0 = time.perf_counter()
                results = self._classify_batch(batch)
                summary.batches += 1
                for h in self.hooks:
                    h.on_batch(self, len(batch), (time.perf_counter() - t0) * 1e3)
                why = None
                for (feed, _), result in zip(batch, results, strict=True):
                    why = self._deliver(feed, result)
                    if why:
                        break
                if why:
                    summary.stopped_by = why
                    break
            if self.stop.is_set() and summary.stopped_by == "end":
                summary.stopped_by = "signal"
        except Exception as e:  # noqa: BLE001 - a bug must not lose what was written: close outputs, say what happened
            summary.stopped_by, summary.internal_error = "internal-error", f"{type(e).__name__}: {e}"
            self.status_line.clear()
            traceback.print_exc(file=self.err)
        finally:
            self.finish()
        return summary

    def finish(self) -> None:
        summary = self.summary
        summary.elapsed_s = self.elapsed_s
        self.stop.set()  # ends every feeder (shared with the sources)
        for f in self.feeds:
            try:
                f.close()
            except Exception as e:  # noqa: BLE001 - one source's close must not cost the others' or the outputs
                print(f"[run] {f.name}: cannot close: {type(e).__name__}: {e}", file=self.err)
        summary.dropped = sum(f.total_dropped for f in self.feeds)
        summary.reconnects = sum(f.total_reconnects for f in self.feeds)
        summary.streams = [f.to_dict(summary.elapsed_s) for f in self.feeds]
        failed = [f for f in self.feeds if f.state == "failed"]
        if failed and summary.source_error is None:
            summary.source_error = "; ".join(f"{f.name}: {f.error}" for f in failed)
            if len(self.feeds) == 1 and summary.stopped_by == "end":
                summary.stopped_by = "source-error"
        for i, o in enumerate(self.outputs):
            try:
                o.close()
            except Exception as e:  # noqa: BLE001 - e.g. the final sync of a records file
                if i not in self.broken:
                    self._output_failed(i, o, e)
        summary.outputs = [o.describe() + (" (FAILED)" if i in self.broken else "")
                           for i, o in enumerate(self.outputs)]
        for h in self.hooks:
            try:
                h.on_close(self, summary)
            except Exception as e:  # noqa: BLE001
                print(f"[run] {type(h).__name__}: {type(e).__name__}: {e}", file=self.err)


def run(source: str | list[str], *, model: str | None = None, backend: str = "auto",
        threshold: float | str | None = None, smoothing: int = 0, outputs: list[str] | None = None,
        headless: bool = False, max_frames: int | None = None, loop: bool = False, quiet: bool = False,
        threads: int | None = None, classifier: Any = None, stop_event: threading.Event | None = None,
        capture_factory: Any = None, err: TextIO | None = None, out: TextIO | None = None, status: bool = True,
        on_output_error: str = "stop", self_check: bool | None = None, batch_timeout_ms: float = 5.0,
        max_batch: int | None = None, hooks: list[LoopHook] | None = None,
        backoff: tuple[float, float] = (0.5, 10.0), metrics_port: int | None = None, host: str = LOCALHOST,
        http_token: str | None = None, review: str | None = None, review_budget_mb: float = 1024.0,
        review_margin: float = 0.1, drift: str = "auto", drift_config: Any = None) -> RunSummary:
    """Classify every frame of ``source`` (one SRC, a list of them, or ``*.streams`` files) and write results to
    ``outputs``; returns the run's summary, whose ``exit_code`` says how it went (``EXIT_CODES``).

    Setup problems (bad argument, unknown source, missing model, failed self-check, unusable output) raise before
    anything runs; once running, bad frames become error records and only ``stop_event`` (or the end of every
    source, ``max_frames``, a closed window, a failed output with ``on_output_error="stop"``) ends the loop. With
    several sources, a live one that cannot be opened or fails is retried with ``backoff`` while the others go on.
    An unexpected error inside the loop ends it too: traceback on ``err``, outputs closed, summary returned with
    ``stopped_by="internal-error"``. ``self_check`` goes to :class:`~runtime.classifier.Classifier` (None: its
    automatic choice). ``hooks`` (:class:`LoopHook`) see every result. ``metrics_port`` serves Prometheus
    metrics (:mod:`runtime.metrics`; 0 = any free port); it and ``http://`` live views without a host bind to
    ``host``; a live view reachable from other machines needs ``http_token`` (or ``SEM_HTTP_TOKEN``).
    """
    err = err or sys.stderr
    _check_args(smoothing, max_frames, threads, on_output_error, batch_timeout_ms)
    stop = stop_event or threading.Event()
    uris = expand_sources(source)
    specs = [parse_source(u) for u in uris]  # fail fast on a typo before loading the model
    out_uris = list(outputs or [])
    if headless:
        out_uris = [u for u in out_uris if not str(u).lower().startswith("display://")]
    if not out_uris:
        out_uris = [] if quiet else ["-"]
        if not headless and gui_problem() is None:
            out_uris.append("display://0")

    own_classifier = classifier is None
    if classifier is None:
        from runtime.classifier import Classifier

        extra = {} if self_check is None else {"self_check": self_check}
        # No spinning: idle ONNX Runtime workers would busy-wait on the cores the decode thread needs.
        classifier = Classifier(model, backend, threshold, threads=threads or default_threads(), spin=False,
                                **extra)
    clf = classifier
    status_line = StatusLine(err, enabled=status)
    opened: list[Output] = []
    feeds: list[SourceFeed] = []
    hooks = list(hooks or [])
    own_hooks: list[Any] = []
    plant: list[Any] = []  # review queue, drift alarm, MQTT state (_plant_hooks)
    cond = threading.Condition()

    def log(m: str) -> None:
        status_line.clear()
        print(f"[source] {m}", file=err, flush=True)

    try:
        for uri in out_uris:
            opened.append(open_output(uri, stream=out, http={"host": host, "token": http_token}))
        if metrics_port is not None:
            from runtime.metrics import MetricsHook

            own_hooks.append(MetricsHook(metrics_port, host))
            hooks.insert(0, own_hooks[-1])  # counted before other hooks look
        plant += _plant_hooks(clf, opened, status_line, err, review=review, review_budget_mb=review_budget_mb,
                              review_margin=review_margin, drift=drift, drift_config=drift_config)
        hooks += plant
        needs_image = any(getattr(o, "needs_image", False) for o in opened) or review is not None
        for uri, spec in zip(uris, specs, strict=True):
            def opener(uri: str = uri) -> Source:  # decode only: the feeder prepares (a pipeline stage of its own)
                return open_source(uri, loop=loop, capture_factory=capture_factory, stop_event=stop, log=log,
                                   backoff=backoff)

            try:
                src: Source | None = opener()
            except OSError as e:
                if len(uris) == 1 or not spec.is_live:
                    raise
                # One of several cameras down at start: the station runs with the others and keeps trying.
                log(f"{redact(uri)}: cannot open ({e}); retrying in the background")
                src = None
            feeds.append(SourceFeed(uri, spec, opener, cond, stop, log, backoff=backoff, src=src,
                                    prepare=clf.prepare, keep_image=needs_image))
    except BaseException:
        for h in own_hooks + plant:
            h.close()
        for f in feeds:
            if f.src is not None:
                f.src.close()
        for o in opened:
            try:
                o.close()
            except Exception:  # noqa: BLE001 - the setup error is the one to report
                pass
        if own_classifier:
            clf.close()
        raise
    first = next((f.src for f in feeds if f.src is not None), None)
    for o in opened:
        if isinstance(o, VideoOutput) and o.frames == 0:
            # The source's own rate when known; a folder of images becomes a 5 fps slideshow.
            o.fps = (first.fps if first is not None else None) or (30.0 if specs[0].is_live else 5.0)

    if smoothing and smoothing > 1:
        for f in feeds:
            if f.spec.kind in ("video", "camera", "stream", "gst"):
                f.smoother = ProbabilitySmoother(clf, smoothing)
            else:
                print(f"[run] --smoothing {smoothing} ignored for {f.name}: it averages over consecutive video "
                      f"frames, and {f.name} is {f.spec.kind}", file=err)

    for o in opened:
        moved = getattr(o, "diverted_from", None)
        if moved is not None:
            print(f"[run] {moved} has other columns (another program's, or an older version's): appending to "
                  f"{o.path} instead", file=err)
    names = ", ".join(f"{f.name} ({f.spec.kind})" for f in feeds)
    summary = RunSummary(source=names, model=clf.describe(), outputs=[o.describe() for o in opened])
    frame_loop = FrameLoop(clf, feeds, opened, summary, status_line=status_line, err=err, stop=stop, cond=cond,
                           on_output_error=on_output_error, max_frames=max_frames, batch_timeout_ms=batch_timeout_ms,
                           max_batch=max_batch, hooks=hooks)
    print(f"[run] {clf.describe()}", file=err)
    for h in own_hooks:
        print(f"[run] Prometheus metrics on {h.url}" + ("" if is_loopback(h.host) else
              " (reachable from other machines, without authentication: firewall it)"), file=err)
    for o in opened:
        note = getattr(o, "startup_note", None)
        if note:
            print(f"[run] {note}", file=err)
    if len(feeds) == 1:
        f = feeds[0]
        live = ", live" if f.live else ""
        print(f"[run] source {f.name} ({f.spec.kind}{live}); outputs: {', '.join(summary.outputs) or 'none'}; "
              "Ctrl-C to stop", file=err, flush=True)
    else:
        print(f"[run] {len(feeds)} sources: {names}; batches of up to {frame_loop.max_batch} "
              f"(waiting at most {batch_timeout_ms:g} ms for the others); outputs: "
              f"{', '.join(summary.outputs) or 'none'}; Ctrl-C to stop", file=err, flush=True)
    try:
        frame_loop.run()
    finally:
        if own_classifier:
            clf.close()  # frees GPU buffers for TensorRT
        status_line.finish()
        print(summary.format(), file=err, flush=True)
    return summary


def _plant_hooks(clf: Any, opened: list[Output], status_line: StatusLine, err: TextIO, *, review: str | None,
                 review_budget_mb: float, review_margin: float, drift: str, drift_config: Any) -> list[Any]:
    """Station operations (docs/plant.md): MQTT state in the status line, the drift alarm (``drift``: ``auto`` =
    on when the model carries validation statistics or ``drift_config.learn`` is set, ``on``, ``off``), the
    review queue (``review``: its folder)."""
    from runtime.mqtt import MqttOutput, MqttStatusHook

    def logger(prefix: str) -> Any:
        def log(m: str) -> None:
            status_line.clear()
            print(f"[{prefix}] {m}", file=err, flush=True)
        return log

    hooks: list[Any] = []
    mqtt_outputs = [o for o in opened if isinstance(o, MqttOutput)]
    if mqtt_outputs:
        hooks.append(MqttStatusHook(mqtt_outputs))
    if drift not in ("auto", "on", "off"):
        raise ValueError(f"drift must be auto, on or off, got {drift!r}")
    if drift != "off":
        from runtime.drift import DriftConfig, DriftHook, DriftMonitor

        config = (drift_config or DriftConfig()).validate()
        try:
            monitor = DriftMonitor.from_metadata(clf.meta, config)
        except ValueError as e:
            if drift == "on":
                raise ValueError(f"--drift on: {e}") from None
            logger("drift")(f"off: {e}")
        else:
            hooks.append(DriftHook(monitor, log=logger("drift")))
    if review is not None:
        from runtime.review import ReviewQueue

        hooks.append(ReviewQueue(review, budget_mb=review_budget_mb, margin=review_margin, labels=clf.labels,
                                 model=clf.describe(), threshold=clf.threshold, log=logger("review")))
    return hooks


def _classify(clf: Any, frame: Frame, smoother: ProbabilitySmoother | None, live: bool) -> FrameResult:
    from runtime.errors import InputError

    if frame.error is not None:
        return FrameResult(frame, None, _error_text(frame.error, frame), frame.prepare_ms)
    x = frame.prepared if frame.prepared is not None else frame.image
    try:
        pred = clf.predict(x, source=frame.source)
    except (InputError, OSError) as e:
        return FrameResult(frame, None, _error_text(e, frame), frame.prepare_ms)
    except Exception as e:  # noqa: BLE001 - never die on a frame; say what happened and go on
        return FrameResult(frame, None, _error_text(e, frame) + f" ({type(e).__name__})", frame.prepare_ms)
    if smoother is not None:
        pred = smoother.update(pred)
    # Live: capture-to-result age (what a station waits). Files: decode + inference work (queue wait excluded).
    latency = (time.time() - frame.timestamp) * 1e3 if live else frame.prepare_ms + pred.timings.get("total", 0.0)
    return FrameResult(frame, pred, None, latency)


# ------------------------------------------------------------------------------------------------ CLI
def _int_at_least(low: int, what: str) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low} ({what}), got {value}")
        return value

    return parse


def _threshold_arg(text: str) -> str:
    from runtime.classifier import parse_threshold

    try:
        parse_threshold(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m runtime.run", description="Classify SEM images from a camera, stream, video or folder.",
        epilog=EPILOG + "\n" + _exit_code_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", "-s", required=True, action="append", metavar="SRC",
                   help="camera, stream URL, video, image, folder or glob (see below); repeat it, or give a "
                   "*.streams file (one SRC per line), for several sources in one process with batched inference")
    p.add_argument("--model", "-m", metavar="M", help="ONNX model or TensorRT engine (default: the bundled model)")
    p.add_argument("--backend", "-b", default="auto", choices=("auto", "ort", "cpu", "cuda", "trt"),
                   help="inference backend (default auto: TensorRT for engines, else ONNX Runtime)")
    p.add_argument("--threshold", "-t", metavar="T", type=_threshold_arg,
                   help="rejection threshold (reject when score < T), or 'off'; default: the model's calibrated "
                   "threshold")
    check = p.add_mutually_exclusive_group()
    check.add_argument("--self-check", dest="self_check", action="store_true", default=None,
                       help="check the model against its stored reference outputs on this machine before the first "
                       "frame, whatever its precision (default: INT8 models and TensorRT engines only)")
    check.add_argument("--no-self-check", dest="self_check", action="store_false",
                       help="skip that check, also for INT8 models and engines (you vouch for the artifact)")
    p.add_argument("--smoothing", type=_int_at_least(0, "0 is off"), default=0, metavar="N",
                   help="video: average probabilities over the last N frames (default off)")
    p.add_argument("--output", "-o", action="append", metavar="OUT", default=[],
                   help="display://0, a video (.mp4/.avi), records (.jsonl/.csv) or - for stdout; repeatable")
    p.add_argument("--on-output-error", choices=ON_OUTPUT_ERROR, default="stop",
                   help="when an output fails (disk full, permission, broken pipe): stop the run (default), or "
                   f"continue without that output; either way the exit code is {EXIT_OUTPUT}")
    p.add_argument("--headless", action="store_true", help="never open a window (display outputs are skipped)")
    p.add_argument("--max-frames", type=_int_at_least(1, "frames to classify"), metavar="K",
                   help="stop after K frames")
    p.add_argument("--loop", action="store_true", help="restart files, folders and videos at their end")
    p.add_argument("--quiet", "-q", action="store_true", help="no per-frame lines on stdout (status and summary "
                   "still on stderr)")
    p.add_argument("--no-status", action="store_true", help="no live status line")
    p.add_argument("--threads", type=_int_at_least(1, "ONNX Runtime threads"), metavar="N",
                   help="ONNX Runtime threads (default: physical cores)")
    net = p.add_argument_group("listening ports (live view, metrics)")
    net.add_argument("--metrics-port", type=_int_at_least(0, "0 = any free port"), metavar="N",
                     help="serve Prometheus metrics on http://HOST:N/metrics (needs prometheus-client: the station "
                     "extra)")
    net.add_argument("--host", default=LOCALHOST, metavar="ADDR",
                     help=f"address the metrics port and http:// live views without a host listen on (default "
                     f"{LOCALHOST}: this machine only; 0.0.0.0 for every interface)")
    net.add_argument("--http-token", metavar="TOKEN", default=None,
                     help=f"token the live view asks for (?token= or Authorization: Bearer); required when it "
                     f"listens beyond this machine; default: ${TOKEN_ENV}")
    plant = p.add_argument_group("review queue and drift alarm (docs/plant.md)")
    plant.add_argument("--review", metavar="DIR", help="save rejected, invalid and low-margin frames (PNG + JSON) "
                       "to DIR/pending/ for a person to sort; python -m train.review adds sorted ones to a dataset")
    plant.add_argument("--review-budget", type=float, default=1024.0, metavar="MB",
                       help="disk budget of DIR/pending/; the oldest frames are dropped first (default 1024)")
    plant.add_argument("--review-margin", type=float, default=0.1, metavar="M",
                       help="also save frames whose top two class probabilities are closer than M (default 0.1; "
                       "0 = off)")
    plant.add_argument("--drift", choices=("auto", "on", "off"), default="auto",
                       help="drift alarm on rejection rate and class mix against the model's validation data "
                       "(auto: when the model has those statistics or --drift-learn is given)")
    plant.add_argument("--drift-window", type=_int_at_least(10, "classified frames"), default=500, metavar="N",
                       help="frames in the rolling window (default 500)")
    plant.add_argument("--drift-learn", type=_int_at_least(0, "0 = use the validation data"), default=0,
                       metavar="N", help="take the station's first N frames as normal instead of the validation "
                       "data (a station whose mix differs from validation, or a model without its statistics)")
    plant.add_argument("--drift-mix-limit", default=0.25, type=_mix_limit_arg, metavar="D",
                       help="class-mix distance (0-1) that raises the alarm, or off (default 0.25)")
    p.add_argument("--batch-timeout", type=float, default=5.0, metavar="MS",
                   help="several sources: after the first frame, wait at most MS milliseconds for the other sources' "
                   "frames before running the batch (default 5)")
    p.add_argument("--max-batch", type=_int_at_least(1, "frames per inference call"), metavar="B",
                   help="several sources: at most B frames per inference call (default: the backend's limit)")
    return p


def _mix_limit_arg(text: str) -> float | None:
    from runtime.drift import parse_mix_limit

    try:
        return parse_mix_limit(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _drift_config(args: argparse.Namespace) -> Any:
    from runtime.drift import DriftConfig

    mix = args.drift_mix_limit
    return DriftConfig(window=args.drift_window, min_frames=min(200, args.drift_window), mix_limit=mix,
                       mix_clear=0.6 * mix if mix else 0.15, learn=args.drift_learn)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # bad arguments: argparse prints the usage and exits EXIT_USAGE (2)
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        if stop.is_set():  # second Ctrl-C: the user means it
            raise KeyboardInterrupt
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        summary = run(args.source, model=args.model, backend=args.backend, threshold=args.threshold,
                      smoothing=args.smoothing, outputs=args.output, headless=args.headless,
                      max_frames=args.max_frames, loop=args.loop, quiet=args.quiet, threads=args.threads,
                      stop_event=stop, status=not args.no_status, on_output_error=args.on_output_error,
                      self_check=args.self_check, batch_timeout_ms=args.batch_timeout, max_batch=args.max_batch,
                      metrics_port=args.metrics_port, host=args.host, http_token=args.http_token,
                      review=args.review, review_budget_mb=args.review_budget, review_margin=args.review_margin,
                      drift=args.drift, drift_config=_drift_config(args))
    except KeyboardInterrupt:
        print("[run] interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OutputWriteError as e:  # an output that cannot be opened or written at the start
        print(f"error: {e}", file=sys.stderr)
        return EXIT_OUTPUT
    except (OSError, ValueError, RuntimeError) as e:  # setup: missing model/source, bad metadata, self-check FAIL
        # (SelfCheckError is a ValueError), no GUI, ...
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    return summary.exit_code


if __name__ == "__main__":
    sys.exit(main())
