"""The frame loop of ``python -m runtime.run``: sources in, results out, one inference loop in between.

:class:`FrameLoop` owns the sources (a :class:`SourceFeed` each: capture, preparation and backoff in their own
threads), the outputs, the :class:`~runtime.summary.RunSummary` and the status line; :class:`LoopHook` objects
(metrics, drift alarm, review queue) watch every result. ``runtime.run`` builds one from its arguments.
"""

from __future__ import annotations

import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from typing import Any, TextIO

import numpy as np

from runtime.outputs import FrameResult, Output, OutputWriteError
from runtime.scores import is_rejected
from runtime.sources import Frame, Source, SourceSpec, prepare_frame, redact
from runtime.summary import RunSummary, StatusLine, is_invalid

ON_OUTPUT_ERROR = ("stop", "continue")  # what the loop does when an output fails (--on-output-error)


# ------------------------------------------------------------------------------------------------ smoothing
class ProbabilitySmoother:
    """Average calibrated probabilities (and scores) over the last ``n`` frames of a video, then decide again.

    The smoothed top class is the argmax of the mean probabilities; the score is the mean top probability for MSP
    and the mean score otherwise; rejection is the one rule (:func:`runtime.scores.is_rejected`) at the classifier's
    threshold.
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

        if is_invalid(pred):
            return pred
        self._probs.append(pred.probs)
        self._scores.append(pred.score)
        if self.n == 1:
            return pred
        probs = np.mean(self._probs, axis=0).astype(np.float32)
        top = int(probs.argmax())
        meta = self.clf.meta
        score = float(probs[top]) if (meta.score == "msp" and not meta.score_output) else float(np.mean(self._scores))
        rejected = bool(is_rejected(score, self.clf.threshold))
        labels = self.clf.labels
        return Prediction(label=labels[self.clf.reject_index] if rejected else labels[top],
                          index=self.clf.reject_index if rejected else top, top_label=labels[top], top_index=top,
                          confidence=float(probs[top]), probs=probs, logits=pred.logits, rejected=rejected,
                          score=score, timings=pred.timings, source=pred.source)


# ------------------------------------------------------------------------------------------------ sources
def _error_text(e: BaseException, frame: Frame) -> str:
    msg = str(e) or type(e).__name__
    return msg if frame.source in msg else f"{frame.source} [frame {frame.index}]: {msg}"


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
        self._delay = backoff[0]  # the wait before the next reopen (doubles up to backoff[1], reset by a frame)

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
        elif is_invalid(p):
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
        self._delay = self.backoff[0]
        try:
            while not self._stop.is_set():
                opening = self.src is None
                try:
                    if opening:
                        self.src = self._opener()
                        if self.error is not None:
                            self._log(f"{self.name}: opened")
                        opening = False
                    self._set("running")
                    self._pump()
                except Exception as e:  # noqa: BLE001 - down or broken: a live source is retried, a file is not
                    if self._wait_to_retry(e, opening):
                        continue
                    return
                if self._stop.is_set():
                    self._stopped()
                else:
                    self._set("ended")
                return
            self._stopped()
        except BaseException as e:  # noqa: BLE001 - never leave the loop waiting on a dead feeder
            self._set("failed", f"{type(e).__name__}: {e}")

    def _pump(self) -> None:
        """Prepare every frame of the open source and hand it to the loop, until its end or the stop."""
        for frame in self.src:  # type: ignore[union-attr]
            self._delay = self.backoff[0]
            # Preprocessing here: a stage of its own between decode (the source's thread) and inference
            prepare_frame(frame, self.prepare, self.keep_image)
            self._enqueue(frame)
            if self._stop.is_set():
                break

    def _enqueue(self, frame: Frame) -> None:
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
            # Live: take the next frame only once the loop has this one, so only frames that will be classified
            # are prepared (the capture thread keeps the newest, counting the rest).
            while self.live and self.pending and not self._stop.is_set():
                self._cond.wait(0.1)

    def _wait_to_retry(self, e: Exception, opening: bool) -> bool:
        """The source could not be opened or broke: a file source has failed (False); a live one is closed and
        waits out its backoff before it is reopened (True)."""
        why = f"{type(e).__name__}: {e}"
        if not self.live:
            self._set("failed", why)
            return False
        self._set("reconnecting", why)
        then = f"cannot open ({why}); retrying" if opening else f"{why}; reopening"
        self._log(f"{self.name}: {then} in {self._delay:.1f} s")
        self._drop_source()
        self._stop.wait(self._delay)
        self._delay = min(self._delay * 2, self.backoff[1])
        with self._cond:
            self.reconnects += 1
        return True

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
    back to their source (smoothing is per source) and written to every output (an output made for one source,
    ``for_source``, gets that source's results only). ``runtime.run.open_loop`` builds one.
    """

    def __init__(self, clf: Any, feeds: list[SourceFeed], outputs: list[Output], summary: RunSummary, *,
                 status_line: StatusLine, err: TextIO, stop: threading.Event, cond: threading.Condition,
                 on_output_error: str = "stop", max_frames: int | None = None, batch_timeout_ms: float = 5.0,
                 max_batch: int | None = None, hooks: list[LoopHook] | None = None,
                 owns_classifier: bool = False) -> None:
        self.clf, self.feeds, self.outputs, self.summary = clf, feeds, outputs, summary
        self.owns_classifier = owns_classifier  # closed by run() at the end
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
        try:
            preds = self.clf.predict_batch([_pixels(fr) for _, fr in good], on_error="keep",
                                           sources=[fr.source for _, fr in good])
        except Exception:  # noqa: BLE001 - a batch that fails as a whole: classify one by one, each error its own
            return [_classify(self.clf, fr, f.smoother, f.live) for f, fr in batch]
        now = time.time()
        results = {id(fr): _failed(fr, pred) if isinstance(pred, BaseException)
                   else _decided(fr, pred, f.smoother, f.live, now) for (f, fr), pred in zip(good, preds, strict=True)}
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
        self._write(feed, result)
        for h in self.hooks:
            h.on_result(self, feed, result)
        if self.status_line.enabled:  # the text is built per frame only when a status line is shown
            self.status_line.update(self._status_text(result), force=self.console)
        return self._stop_reason()

    def _write(self, feed: SourceFeed, result: FrameResult) -> None:
        """To every working output (one made for another source excepted)."""
        if self.console:
            self.status_line.clear()
        for i, o in enumerate(self.outputs):
            if i in self.broken or getattr(o, "for_source", None) not in (None, feed.uri):
                continue
            try:
                o.write(result)
            except Exception as e:  # noqa: BLE001 - full disk, dead window: said; the others still get it
                self._output_failed(i, o, e)

    def _stop_reason(self) -> str | None:
        """Why the run must stop after this result (``RunSummary.stopped_by``), or None."""
        if self.broken and (self.on_output_error == "stop" or len(self.broken) == len(self.outputs)):
            return "output-error"  # with "continue", when no output is left to write to
        if any(o.stop_requested for i, o in enumerate(self.outputs) if i not in self.broken):
            return "window"
        if self.max_frames and self.summary.frames >= self.max_frames:
            return "max-frames"
        return None

    # the loop ----------------------------------------------------------------------------------------------------
    def run(self) -> RunSummary:
        """Classify until every source is done or something ends the run (see ``RunSummary.stopped_by``); then
        close sources, outputs and hooks, print the summary on ``err`` and return it. Never raises for a bad frame
        or output; an unexpected error ends the loop with ``stopped_by="internal-error"`` (traceback on ``err``)."""
        try:
            self._start()  # an output or hook that cannot start (a port in use) raises from here: a setup error
            try:
                self._loop()
            except Exception as e:  # noqa: BLE001 - a bug must not lose what was written: close outputs, say so
                self.summary.stopped_by, self.summary.internal_error = "internal-error", f"{type(e).__name__}: {e}"
                self.status_line.clear()
                traceback.print_exc(file=self.err)
            finally:
                self.finish()
        finally:
            self._report()
        return self.summary

    def _start(self) -> None:
        self.started = time.perf_counter()
        for o in self.outputs:
            attach = getattr(o, "attach", None)  # outputs that show more than results (the live view)
            if attach is not None:
                attach(self)
        for h in self.hooks:
            h.on_start(self)
        for f in self.feeds:
            f.start()

    def _loop(self) -> None:
        summary = self.summary
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
            for (feed, _), result in zip(batch, results, strict=True):
                why = self._deliver(feed, result)
                if why:
                    summary.stopped_by = why
                    return
        if self.stop.is_set() and summary.stopped_by == "end":
            summary.stopped_by = "signal"

    def _report(self) -> None:
        """The end of a run: the status line gives way to the summary; a classifier the loop owns is closed (frees
        GPU buffers for TensorRT)."""
        self.status_line.finish()
        print(self.summary.format(), file=self.err, flush=True)
        if self.owns_classifier:
            self.clf.close()

    def finish(self) -> None:
        """Stop and close the sources, close the outputs, complete the summary, tell the hooks."""
        summary = self.summary
        summary.elapsed_s = self.elapsed_s
        self._close_sources()
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

    def _close_sources(self) -> None:
        summary = self.summary
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


def _pixels(frame: Frame) -> Any:
    """What the classifier gets: the feeder's prepared frame, else the decoded image."""
    return frame.prepared if frame.prepared is not None else frame.image


def _failed(frame: Frame, e: BaseException) -> FrameResult:
    """An error record for a frame that could not be classified; an unexpected error names its type."""
    from runtime.errors import InputError

    extra = "" if isinstance(e, (InputError, OSError)) else f" ({type(e).__name__})"
    return FrameResult(frame, None, _error_text(e, frame) + extra, frame.prepare_ms)


def _decided(frame: Frame, pred: Any, smoother: ProbabilitySmoother | None, live: bool,
             now: float | None = None) -> FrameResult:
    """A classified frame's result, smoothed per source when asked."""
    if smoother is not None:
        pred = smoother.update(pred)
    # Live: capture-to-result age (what a station waits). Files: decode + inference work (queue wait excluded).
    if live:
        latency = ((now if now is not None else time.time()) - frame.timestamp) * 1e3
    else:
        latency = frame.prepare_ms + pred.timings.get("total", 0.0)
    return FrameResult(frame, pred, None, latency)


def _classify(clf: Any, frame: Frame, smoother: ProbabilitySmoother | None, live: bool) -> FrameResult:
    """One frame through ``clf.predict``; never raises (a bad frame becomes an error record)."""
    if frame.error is not None:
        return FrameResult(frame, None, _error_text(frame.error, frame), frame.prepare_ms)
    try:
        pred = clf.predict(_pixels(frame), source=frame.source)
    except Exception as e:  # noqa: BLE001 - never die on a frame; say what happened and go on
        return _failed(frame, e)
    return _decided(frame, pred, smoother, live)
