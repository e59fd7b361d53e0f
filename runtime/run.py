"""``python -m runtime.run``: classify a camera, stream, video, image or folder, frame by frame, and keep going.

Decoding runs in its own thread (files: a bounded prefetch queue; cameras: newest frame only), inference in the
main thread, results go to every ``--output`` (records flushed per frame). A status line on stderr shows fps,
latency and dropped frames; Ctrl-C or SIGTERM stops cleanly (outputs flushed and closed, summary printed, exit 0).
A bad image or frame becomes an error record and the run goes on.
"""

from __future__ import annotations

import argparse
import math
import signal
import sys
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, TextIO

import numpy as np

from runtime.outputs import FrameResult, Output, VideoOutput, gui_problem, open_output
from runtime.sources import Frame, Source, open_source, parse_source

EPILOG = """\
sources (--source):
  /dev/video0, v4l2:///dev/video0, 0       camera (V4L2 device or index); newest frame only, drops counted
  rtsp://user:pass@host:554/stream          network stream (also http(s)://); reconnects with backoff
  clip.mp4, file://clip.mp4                 video file, every frame (--loop to repeat)
  wafer.png, samples/, 'shots/*.tif'        an image, a folder (recursive), a glob
outputs (--output, repeatable; default: a line per frame on stdout):
  display://0   window with label/confidence/fps (needs opencv-python, not -headless)
  out.mp4       video with the overlay (.avi, .mkv too)
  res.jsonl     one JSON record per frame (appended, flushed per frame); res.csv likewise; - for stdout

examples:
  python -m runtime.run --source samples/
  python -m runtime.run --source /dev/video0 --output display://0 --smoothing 5
  python -m runtime.run --source rtsp://10.0.0.7/cam --headless --output results.jsonl
  python -m runtime.run --source review.mp4 --model model.int8.onnx --output annotated.mp4 --output res.csv
  python -m runtime.run --source 'lot42/**/*.png' --threshold 0.6 --output lot42.jsonl --quiet
"""


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
        from runtime.classifier import Prediction

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


@dataclass
class RunSummary:
    source: str
    model: str = ""
    frames: int = 0
    classified: int = 0
    errors: int = 0
    rejected: int = 0
    dropped: int = 0
    reconnects: int = 0
    elapsed_s: float = 0.0
    latencies_ms: list[float] = field(default_factory=list, repr=False)
    labels: Counter[str] = field(default_factory=Counter)
    stopped_by: str = "end"  # end | signal | max-frames | window | source-error
    source_error: str | None = None
    outputs: list[str] = field(default_factory=list)

    @property
    def fps(self) -> float:
        return self.frames / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def latency_mean_ms(self) -> float:
        return float(np.mean(self.latencies_ms)) if self.latencies_ms else math.nan

    @property
    def latency_p90_ms(self) -> float:
        return float(np.percentile(self.latencies_ms, 90)) if self.latencies_ms else math.nan

    @property
    def exit_code(self) -> int:
        return 1 if self.stopped_by == "source-error" else 0

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "model": self.model, "frames": self.frames, "classified": self.classified,
                "errors": self.errors, "rejected": self.rejected, "dropped": self.dropped,
                "reconnects": self.reconnects, "elapsed_s": round(self.elapsed_s, 3), "fps": round(self.fps, 2),
                "latency_mean_ms": _round(self.latency_mean_ms), "latency_p90_ms": _round(self.latency_p90_ms),
                "labels": dict(self.labels.most_common()), "stopped_by": self.stopped_by,
                "source_error": self.source_error, "outputs": self.outputs}

    def format(self) -> str:
        labels = ", ".join(f"{k} {v}" for k, v in self.labels.most_common()) or "-"
        lines = [
            "-- summary " + "-" * 50,
            f"source    {self.source}",
            f"model     {self.model}",
            f"frames    {self.frames} ({self.classified} classified, {self.errors} error"
            + ("" if self.errors == 1 else "s")
            + (f", {self.rejected} rejected to other" if self.rejected else "") + ")",
            f"speed     {self.fps:.1f} fps over {self.elapsed_s:.2f} s; latency mean {self.latency_mean_ms:.1f} ms, "
            f"p90 {self.latency_p90_ms:.1f} ms",
            f"labels    {labels}",
        ]
        if self.dropped or self.reconnects:
            lines.append(f"live      {self.dropped} frames dropped (classifier busy), {self.reconnects} reconnects")
        if self.outputs:
            lines.append(f"outputs   {', '.join(self.outputs)}")
        stop = {"end": "end of source", "signal": "stopped by signal", "max-frames": "--max-frames reached",
                "window": "window closed", "source-error": f"source failed: {self.source_error}"}[self.stopped_by]
        lines.append(f"ended     {stop}")
        return "\n".join(lines)


def _round(v: float) -> float | None:
    return round(v, 3) if math.isfinite(v) else None


# ------------------------------------------------------------------------------------------------ the loop
def _error_text(e: BaseException, frame: Frame) -> str:
    msg = str(e) or type(e).__name__
    return msg if frame.source in msg else f"{frame.source} [frame {frame.index}]: {msg}"


def run(source: str, *, model: str | None = None, backend: str = "auto", threshold: float | str | None = None,
        smoothing: int = 0, outputs: list[str] | None = None, headless: bool = False, max_frames: int | None = None,
        loop: bool = False, quiet: bool = False, threads: int | None = None, classifier: Any = None,
        stop_event: threading.Event | None = None, capture_factory: Any = None, err: TextIO | None = None,
        out: TextIO | None = None, status: bool = True) -> RunSummary:
    """Classify every frame of ``source`` and write results to ``outputs``; returns the run's summary.

    Setup problems (unknown source, missing model, unusable output) raise before anything runs; once running,
    bad frames become error records and only ``stop_event`` (or the end of the source, ``max_frames``, a closed
    window) ends the loop.
    """
    err = err or sys.stderr
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

        # No spinning: idle ONNX Runtime workers would busy-wait on the cores the decode thread needs.
        classifier = Classifier(model, backend, threshold, threads=threads, spin=False)
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
            o.close()
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

    summary = RunSummary(source=f"{source} ({spec.kind})", model=clf.describe(),
                         outputs=[o.describe() for o in opened])
    console = any(o.describe() == "stdout" for o in opened)
    print(f"[run] {clf.describe()}", file=err)
    print(f"[run] source {source} ({spec.kind}{', live' if src.is_live else ''}); outputs: "
          f"{', '.join(summary.outputs) or 'none'}; Ctrl-C to stop", file=err, flush=True)
    recent: deque[float] = deque(maxlen=60)
    broken_outputs: set[int] = set()
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
            summary.frames += 1
            recent.append(time.perf_counter())
            if len(recent) > 1 and recent[-1] > recent[0]:
                result.fps = (len(recent) - 1) / (recent[-1] - recent[0])
            if result.prediction is None:
                summary.errors += 1
            else:
                summary.classified += 1
                summary.rejected += result.prediction.rejected
                summary.labels[result.prediction.label] += 1
                summary.latencies_ms.append(result.latency_ms)
            if console:
                status_line.clear()
            for i, o in enumerate(opened):
                if i in broken_outputs:
                    continue
                try:
                    o.write(result)
                except Exception as e:  # noqa: BLE001 - a full disk or dead window must not stop the others
                    broken_outputs.add(i)
                    status_line.clear()
                    print(f"[run] output {o.describe()} failed and is disabled: {type(e).__name__}: {e}",
                          file=err, flush=True)
            stats = src.stats
            fps_text = f"{result.fps:5.1f}" if result.fps else "    -"
            status_line.update(
                f"[run] {summary.frames} frames  {fps_text} fps  latency {result.latency_ms:6.1f} ms  "
                f"errors {summary.errors}  dropped {stats.dropped}  reconnects {stats.reconnects}", force=console)
            if any(o.stop_requested for o in opened):
                summary.stopped_by = "window"
                break
            if max_frames and summary.frames >= max_frames:
                summary.stopped_by = "max-frames"
                break
        if stop.is_set() and summary.stopped_by == "end":
            summary.stopped_by = "signal"
    finally:
        summary.elapsed_s = time.perf_counter() - t_start
        src.close()
        summary.dropped, summary.reconnects = src.stats.dropped, src.stats.reconnects
        for o in opened:
            try:
                o.close()
            except Exception as e:  # noqa: BLE001
                print(f"[run] closing {o.describe()} failed: {e}", file=err)
        summary.outputs = [o.describe() for o in opened]  # video outputs get their final name on close
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
    latency = (time.time() - frame.timestamp) * 1e3 if live else frame.prepare_ms + pred.timings["total"]
    return FrameResult(frame, pred, None, latency)


# ------------------------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m runtime.run", description="Classify SEM images from a camera, stream, video or folder.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", "-s", required=True, metavar="SRC", help="camera, stream URL, video, image, folder "
                   "or glob (see below)")
    p.add_argument("--model", "-m", metavar="M", help="ONNX model or TensorRT engine (default: the bundled model)")
    p.add_argument("--backend", "-b", default="auto", choices=("auto", "ort", "cpu", "cuda", "trt"),
                   help="inference backend (default auto: TensorRT for engines, else ONNX Runtime)")
    p.add_argument("--threshold", "-t", metavar="T", help="rejection threshold (reject when score < T), or 'off'; "
                   "default: the model's calibrated threshold")
    p.add_argument("--smoothing", type=int, default=0, metavar="N",
                   help="video: average probabilities over the last N frames (default off)")
    p.add_argument("--output", "-o", action="append", metavar="OUT", default=[],
                   help="display://0, a video (.mp4/.avi), records (.jsonl/.csv) or - for stdout; repeatable")
    p.add_argument("--headless", action="store_true", help="never open a window (display outputs are skipped)")
    p.add_argument("--max-frames", type=int, metavar="K", help="stop after K frames")
    p.add_argument("--loop", action="store_true", help="restart files, folders and videos at their end")
    p.add_argument("--quiet", "-q", action="store_true", help="no per-frame lines on stdout (status and summary "
                   "still on stderr)")
    p.add_argument("--no-status", action="store_true", help="no live status line")
    p.add_argument("--threads", type=int, metavar="N", help="ONNX Runtime threads (default: physical cores)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
                      stop_event=stop, status=not args.no_status)
    except KeyboardInterrupt:
        print("[run] interrupted", file=sys.stderr)
        return 130
    except (OSError, ValueError, RuntimeError) as e:  # setup: missing model/source, bad metadata, no GUI, ...
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    return summary.exit_code


if __name__ == "__main__":
    sys.exit(main())
