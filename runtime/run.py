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
import signal
import sys
import threading
import time
import traceback
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, TextIO

import numpy as np

from runtime.contract import INVALID_LABEL
from runtime.outputs import RECORD_FIELDS, FrameResult, Output, OutputWriteError, VideoOutput, gui_problem, open_output
from runtime.sources import Frame, Source, open_source, parse_source

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
outputs (--output, repeatable; default: a line per frame on stdout):
  display://0   window with label/confidence/fps (needs opencv-python, not -headless)
  out.mp4       video with the overlay (.avi, .mkv too)
  res.jsonl     one JSON record per frame (appended, each record written whole); res.csv likewise; - for stdout
records: {fields}.
  label is a class, "other" (rejected), "invalid" (no usable content; reason says why: blank, saturated, noise,
  defocus, out_of_range), or empty with error set (the input could not be read or classified). Record files are
  appended to, never truncated; a CSV with another header is left alone and res-1.csv started next to it.

examples:
  python -m runtime.run --source samples/
  python -m runtime.run --source /dev/video0 --output display://0 --smoothing 5
  python -m runtime.run --source rtsp://10.0.0.7/cam --headless --output results.jsonl
  python -m runtime.run --source review.mp4 --model model.int8.onnx --output annotated.mp4 --output res.csv
  python -m runtime.run --source 'lot42/**/*.png' --threshold 0.6 --output lot42.jsonl --quiet
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
        if self.errors or self.stopped_by == "source-error" or self.frames == 0:
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
                   else "the source failed" if self.stopped_by == "source-error" else "no frames could be read")
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
                "exit_code": self.exit_code}

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
        if self.outputs:
            lines.append(f"outputs   {', '.join(self.outputs)}")
        lines += [f"FAILED    {e}" for e in self.output_errors]
        stop = {"end": "end of source", "signal": "stopped by signal", "max-frames": "--max-frames reached",
                "window": "window closed", "source-error": f"source failed: {self.source_error}",
                "output-error": ("every output failed" if len(self.output_errors) >= len(self.outputs) else
                                 "an output failed (--on-output-error continue keeps going without it)"),
                "internal-error": f"internal error: {self.internal_error}"}[self.stopped_by]
        lines.append(f"ended     {stop}; {self.outcome()}")
        return "\n".join(lines)


def _round(v: float) -> float | None:
    return round(v, 3) if math.isfinite(v) else None


# ------------------------------------------------------------------------------------------------ the loop
def _error_text(e: BaseException, frame: Frame) -> str:
    msg = str(e) or type(e).__name__
    return msg if frame.source in msg else f"{frame.source} [frame {frame.index}]: {msg}"


def _check_args(smoothing: int, max_frames: int | None, threads: int | None, on_output_error: str) -> None:
    if smoothing is None or smoothing < 0:
        raise ValueError(f"smoothing must be 0 (off) or a number of frames >= 1, got {smoothing}")
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be >= 1 (or None for no limit), got {max_frames}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1 (or None for the physical cores), got {threads}")
    if on_output_error not in ON_OUTPUT_ERROR:
        raise ValueError(f"on_output_error must be one of {', '.join(ON_OUTPUT_ERROR)}, got {on_output_error!r}")


def run(source: str, *, model: str | None = None, backend: str = "auto", threshold: float | str | None = None,
        smoothing: int = 0, outputs: list[str] | None = None, headless: bool = False, max_frames: int | None = None,
        loop: bool = False, quiet: bool = False, threads: int | None = None, classifier: Any = None,
        stop_event: threading.Event | None = None, capture_factory: Any = None, err: TextIO | None = None,
        out: TextIO | None = None, status: bool = True, on_output_error: str = "stop",
        self_check: bool | None = None) -> RunSummary:
    """Classify every frame of ``source`` and write results to ``outputs``; returns the run's summary, whose
    ``exit_code`` says how it went (``EXIT_CODES``).

    Setup problems (bad argument, unknown source, missing model, failed self-check, unusable output) raise before
    anything runs; once running, bad frames become error records and only ``stop_event`` (or the end of the
    source, ``max_frames``, a closed window, a failed output with ``on_output_error="stop"``) ends the loop. An
    unexpected error inside the loop ends it too: traceback on ``err``, outputs closed, summary returned with
    ``stopped_by="internal-error"``. ``self_check`` goes to :class:`~runtime.classifier.Classifier` (None: its
    automatic choice).
    """
    err = err or sys.stderr
    _check_args(smoothing, max_frames, threads, on_output_error)
    stop = stop_event or threading.Event()
    spec = parse_source(source)  # fail fast on a typo before loading the model
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
        classifier = Classifier(model, backend, threshold, threads=threads, spin=False, **extra)
    clf = classifier
    status_line = StatusLine(err, enabled=status)
    opened: list[Output] = []
    src: Source | None = None
    try:
        for uri in out_uris:
            opened.append(open_output(uri, stream=out))
        needs_image = any(getattr(o, "needs_image", False) for o in opened)
        src = open_source(source, loop=loop, prepare=clf.prepare, keep_image=needs_image,
                          capture_factory=capture_factory, stop_event=stop,
                          log=lambda m: (status_line.clear(), print(f"[source] {m}", file=err, flush=True)))
    except BaseException:
        for o in opened:
            try:
                o.close()
            except Exception:  # noqa: BLE001 - the setup error is the one to report
                pass
        if own_classifier:
            clf.close()
        raise
    for o in opened:
        if isinstance(o, VideoOutput) and o.frames == 0:
            # The source's own rate when known; a folder of images becomes a 5 fps slideshow.
            o.fps = src.fps or (30.0 if src.is_live else 5.0)

    smoother = None
    if smoothing and smoothing > 1:
        if spec.kind in ("video", "camera", "stream"):
            smoother = ProbabilitySmoother(clf, smoothing)
        else:
            print(f"[run] --smoothing {smoothing} ignored: it averages over consecutive video frames, and "
                  f"{source} is {spec.kind}", file=err)

    for o in opened:
        moved = getattr(o, "diverted_from", None)
        if moved is not None:
            print(f"[run] {moved} has other columns (another program's, or an older version's): appending to "
                  f"{o.path} instead", file=err)
    summary = RunSummary(source=f"{source} ({spec.kind})", model=clf.describe(),
                         outputs=[o.describe() for o in opened])
    console = any(o.describe() == "stdout" for o in opened)
    print(f"[run] {clf.describe()}", file=err)
    print(f"[run] source {source} ({spec.kind}{', live' if src.is_live else ''}); outputs: "
          f"{', '.join(summary.outputs) or 'none'}; Ctrl-C to stop", file=err, flush=True)
    recent: deque[float] = deque(maxlen=60)
    broken: dict[int, str] = {}  # output index -> why it failed

    def output_failed(i: int, o: Output, e: BaseException) -> None:
        msg = str(e) if isinstance(e, OutputWriteError) else f"{o.describe()}: {type(e).__name__}: {e}"
        broken[i] = msg
        summary.output_errors.append(msg)
        status_line.clear()
        if len(broken) == len(opened):
            then = "no output left, stopping"
        elif on_output_error == "stop":
            then = "stopping (--on-output-error continue keeps going without it)"
        else:
            then = "disabled, the run goes on"
        print(f"[run] output failed: {msg}; {then}", file=err, flush=True)

    t_start = time.perf_counter()
    try:
        frames = iter(src)
        while not stop.is_set():
            try:
                frame = next(frames)
            except StopIteration:
                break
            except Exception as e:  # noqa: BLE001 - a source that dies mid-run ends the run, reported, not a crash
                summary.stopped_by, summary.source_error = "source-error", f"{type(e).__name__}: {e}"
                break
            result = _classify(clf, frame, smoother, src.is_live)
            summary.add(result)
            recent.append(time.perf_counter())
            if len(recent) > 1 and recent[-1] > recent[0]:
                result.fps = (len(recent) - 1) / (recent[-1] - recent[0])
            if console:
                status_line.clear()
            for i, o in enumerate(opened):
                if i in broken:
                    continue
                try:
                    o.write(result)
                except Exception as e:  # noqa: BLE001 - full disk, dead window: said; the others still get it
                    output_failed(i, o, e)
            stats = src.stats
            fps_text = f"{result.fps:5.1f}" if result.fps else "    -"
            invalid_text = f"  invalid {summary.invalid} ({summary.invalid_text()})" if summary.invalid else ""
            status_line.update(
                f"[run] {summary.frames} frames  {fps_text} fps  latency {result.latency_ms:6.1f} ms  "
                f"errors {summary.errors}{invalid_text}  dropped {stats.dropped}  reconnects {stats.reconnects}",
                force=console)
            if broken and (on_output_error == "stop" or len(broken) == len(opened)):
                summary.stopped_by = "output-error"  # with "continue", when no output is left to write to
                break
            if any(o.stop_requested for i, o in enumerate(opened) if i not in broken):
                summary.stopped_by = "window"
                break
            if max_frames and summary.frames >= max_frames:
                summary.stopped_by = "max-frames"
                break
        if stop.is_set() and summary.stopped_by == "end":
            summary.stopped_by = "signal"
    except Exception as e:  # noqa: BLE001 - a bug must not lose what was written: close outputs, say what happened
        summary.stopped_by, summary.internal_error = "internal-error", f"{type(e).__name__}: {e}"
        status_line.clear()
        traceback.print_exc(file=err)
    finally:
        summary.elapsed_s = time.perf_counter() - t_start
        src.close()
        summary.dropped, summary.reconnects = src.stats.dropped, src.stats.reconnects
        for i, o in enumerate(opened):
            try:
                o.close()
            except Exception as e:  # noqa: BLE001 - e.g. the final sync of a records file
                if i not in broken:
                    output_failed(i, o, e)
        summary.outputs = [o.describe() + (" (FAILED)" if i in broken else "") for i, o in enumerate(opened)]
        if own_classifier:
            clf.close()  # frees GPU buffers for TensorRT
        status_line.finish()
        print(summary.format(), file=err, flush=True)
    return summary


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
    p.add_argument("--source", "-s", required=True, metavar="SRC", help="camera, stream URL, video, image, folder "
                   "or glob (see below)")
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
    return p


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
                      self_check=args.self_check)
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
