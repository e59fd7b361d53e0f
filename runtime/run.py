"""``python -m runtime.run``: classify a camera, stream, video, image or folder, frame by frame, and keep going.

Decoding runs in its own thread (files: a bounded prefetch queue; cameras: newest frame only), inference in the
main thread, results go to every ``--output`` (records flushed per frame). A status line on stderr shows fps,
latency and dropped frames; Ctrl-C or SIGTERM stops cleanly (outputs flushed and closed, summary printed).
A bad image or frame becomes an error record and the run goes on; a frame the frame-quality gate refuses is an
``invalid`` record with its reason. The exit code tells a supervisor what happened (``EXIT_*``, whose one home is
:mod:`runtime.summary`).

Layers: :func:`main` parses the flags into a :class:`RunConfig` and calls :func:`run_command`; :func:`run` is the
same for a program or a notebook; :func:`open_loop` opens model, outputs, hooks and sources and returns the
:class:`~runtime.frameloop.FrameLoop` that runs them.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TextIO

from runtime.frameloop import ON_OUTPUT_ERROR, FrameLoop, LoopHook, ProbabilitySmoother, SourceFeed
from runtime.liveview import LOCALHOST, TOKEN_ENV, is_loopback
from runtime.outputs import RECORD_FIELDS, Output, OutputWriteError, VideoOutput, gui_problem, open_outputs
from runtime.sources import Source, SourceSpec, open_source, parse_source, redact
from runtime.summary import (
    EXIT_CODES,
    EXIT_INPUT,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_OUTPUT,
    EXIT_USAGE,
    RunSummary,
    StatusLine,
)

__all__ = ["EXIT_CODES", "EXIT_INPUT", "EXIT_INTERNAL", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_OUTPUT", "EXIT_USAGE",
           "ON_OUTPUT_ERROR", "FrameLoop", "LoopHook", "ProbabilitySmoother", "RunConfig", "RunSummary", "SourceFeed",
           "StatusLine", "build_parser", "default_threads", "expand_sources", "main", "open_loop", "run",
           "run_command"]

EPILOG = """\
sources (--source):
  /dev/video0, v4l2:///dev/video0, 0       camera (V4L2 device or index); newest frame only, drops counted
  rtsp://user:pass@host:554/stream          network stream (also http(s)://); reconnects with backoff
  clip.mp4, file://clip.mp4                 video file, every frame (--loop to repeat)
  wafer.png, samples/, 'shots/*.tif'        an image, a folder (recursive), a glob
  csi://0?width=1920&fps=30, gst://PIPELINE Jetson CSI camera / GStreamer pipeline (OpenCV with GStreamer only)
outputs (--output, repeatable; default: a line per frame on stdout):
  display://0   window with label/confidence/fps (needs opencv-python, not -headless); one per source
  out.mp4       video with the overlay (.avi, .mkv too); several sources: out.<source>.mp4 for each
  res.jsonl     one JSON record per frame (appended, each record written whole); res.csv likewise; - for stdout
  mqtt://host:1883/topic   one JSON message per result, QoS 1; journalled on disk while the broker is away, sent
                when it is back (mqtts:// for TLS, ?ca=FILE; login from SEM_MQTT_USERNAME/SEM_MQTT_PASSWORD)
  http://:8080  live view in a browser: latest frame per source with its overlay, class counts, rejection
                rate, source states; listens on --host (127.0.0.1); beyond it a token is required (--http-token)
records: {fields}
  (JSON and MQTT records add drift: ok/alarm while the drift alarm runs).
  label is a class, "other" (rejected), "invalid" (no usable content; reason says why: blank, saturated, noise,
  defocus, out_of_range), or empty with error set (the input could not be read or classified). Record files are
  appended to, never truncated; a CSV with another header is left alone and res-1.csv started next to it.

several sources (--source repeated, or cams.streams with one SRC per line): a capture thread per source, one
  inference loop batching a frame of each across sources; records name their source; a failing live source is
  reopened with backoff while the others go on; the status line and summary show each source's state, fps, drops;
  videos and windows are one per source (the name part is built from the end of the SRC: letters, digits, - and _).

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


# ------------------------------------------------------------------------------------------------ sources
STREAMS_SUFFIX = ".streams"


def default_threads() -> int:
    """ONNX Runtime threads for a run when ``--threads`` is not given: the physical cores but one, which is left to
    the capture/decode and preparation threads that run beside inference (docs/station.md, overlap); at least one."""
    from runtime.ort_backend import physical_cores

    return max(1, physical_cores() - 1)


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


# ------------------------------------------------------------------------------------------------ configuration
@dataclass
class RunConfig:
    """What a run is asked to do: :func:`run`'s keywords, ``python -m runtime.run``'s flags (same names)."""

    sources: str | list[str]  # SRC strings and *.streams files (expand_sources)
    model: str | None = None
    backend: str = "auto"
    threshold: float | str | None = None
    smoothing: int = 0
    outputs: list[str] = field(default_factory=list)
    headless: bool = False
    max_frames: int | None = None
    loop: bool = False
    quiet: bool = False
    threads: int | None = None
    status: bool = True
    on_output_error: str = "stop"
    self_check: bool | None = None
    batch_timeout_ms: float = 5.0
    max_batch: int | None = None
    backoff: tuple[float, float] = (0.5, 10.0)
    metrics_port: int | None = None
    host: str = LOCALHOST
    http_token: str | None = None
    review: str | None = None
    review_budget_mb: float = 1024.0
    review_margin: float = 0.1
    drift: str = "auto"
    drift_config: Any = None  # runtime.drift.DriftConfig; None: its defaults

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> RunConfig:
        """The config of parsed :func:`build_parser` arguments (its destinations are the field names)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in vars(args).items() if k in names}, drift_config=_drift_config(args))

    def validate(self) -> None:
        """Refuse values the CLI's argument types would refuse, naming the value (a ValueError)."""
        if self.smoothing is None or self.smoothing < 0:
            raise ValueError(f"smoothing must be 0 (off) or a number of frames >= 1, got {self.smoothing}")
        if self.max_frames is not None and self.max_frames < 1:
            raise ValueError(f"max_frames must be >= 1 (or None for no limit), got {self.max_frames}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1 (or None for the default), got {self.threads}")
        if self.on_output_error not in ON_OUTPUT_ERROR:
            raise ValueError(f"on_output_error must be one of {', '.join(ON_OUTPUT_ERROR)}, "
                             f"got {self.on_output_error!r}")
        if not (self.batch_timeout_ms >= 0):
            raise ValueError(f"batch_timeout_ms must be >= 0, got {self.batch_timeout_ms}")
        if self.drift not in ("auto", "on", "off"):
            raise ValueError(f"drift must be auto, on or off, got {self.drift!r}")

    def output_uris(self) -> list[str]:
        """The OUTs to open: ``outputs`` (windows left out when headless); none given: stdout unless quiet, and a
        window where one can open."""
        uris = [u for u in self.outputs if not (self.headless and str(u).lower().startswith("display://"))]
        if uris:
            return uris
        uris = [] if self.quiet else ["-"]
        if not self.headless and gui_problem() is None:
            uris.append("display://0")
        return uris

    def open_classifier(self) -> Any:
        from runtime.classifier import Classifier

        extra = {} if self.self_check is None else {"self_check": self.self_check}
        # No spinning: idle ONNX Runtime workers would busy-wait on the cores the decode thread needs.
        return Classifier(self.model, self.backend, self.threshold, threads=self.threads or default_threads(),
                          spin=False, **extra)


# ------------------------------------------------------------------------------------------------ the library call
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
    config = RunConfig(source, model=model, backend=backend, threshold=threshold, smoothing=smoothing,
                       outputs=list(outputs or []), headless=headless, max_frames=max_frames, loop=loop, quiet=quiet,
                       threads=threads, status=status, on_output_error=on_output_error, self_check=self_check,
                       batch_timeout_ms=batch_timeout_ms, max_batch=max_batch, backoff=backoff,
                       metrics_port=metrics_port, host=host, http_token=http_token, review=review,
                       review_budget_mb=review_budget_mb, review_margin=review_margin, drift=drift,
                       drift_config=drift_config)
    return open_loop(config, classifier=classifier, stop_event=stop_event, capture_factory=capture_factory, err=err,
                     out=out, hooks=hooks).run()


def open_loop(config: RunConfig, *, classifier: Any = None, stop_event: threading.Event | None = None,
              capture_factory: Any = None, err: TextIO | None = None, out: TextIO | None = None,
              hooks: list[LoopHook] | None = None) -> FrameLoop:
    """The :class:`FrameLoop` for ``config``, with model, outputs, hooks and sources open and the start announced
    on ``err``: call its ``run()``. Setup problems raise here, and what was opened is closed again.
    ``classifier``: used instead of loading ``config.model`` (then the caller closes it); ``stop_event``: set it
    to stop the run cleanly; ``capture_factory``: replaces ``cv2.VideoCapture``; ``out``: stdout for ``-``."""
    err = err or sys.stderr
    config.validate()
    stop = stop_event or threading.Event()
    uris = expand_sources(config.sources)
    specs = [parse_source(u) for u in uris]  # fail fast on a typo before loading the model
    clf = classifier if classifier is not None else config.open_classifier()
    status_line = StatusLine(err, enabled=config.status)
    with ExitStack() as undo:  # on a setup error: close what was opened, newest first
        if classifier is None:
            undo.callback(clf.close)
        opened = open_outputs(config.output_uris(), uris, stream=out,
                              http={"host": config.host, "token": config.http_token})
        undo.callback(_close_quietly, opened)
        metrics = _metrics_hooks(config)
        undo.callback(_close_quietly, metrics)
        plant = _plant_hooks(config, clf, opened, status_line, err)  # review queue, drift alarm, MQTT state
        undo.callback(_close_quietly, plant)
        cond = threading.Condition()
        feeds = _open_feeds(config, uris, specs, clf, cond=cond, stop=stop, log=_logger("source", status_line, err),
                            capture_factory=capture_factory, keep_image=_needs_image(config, opened), undo=undo)
        names = ", ".join(f"{f.name} ({f.spec.kind})" for f in feeds)
        summary = RunSummary(source=names, model=clf.describe(), outputs=[o.describe() for o in opened])
        frame_loop = FrameLoop(clf, feeds, opened, summary, status_line=status_line, err=err, stop=stop, cond=cond,
                               on_output_error=config.on_output_error, max_frames=config.max_frames,
                               batch_timeout_ms=config.batch_timeout_ms, max_batch=config.max_batch,
                               hooks=[*metrics, *(hooks or []), *plant], owns_classifier=classifier is None)
        undo.pop_all()  # from here the loop closes them
    _set_video_rates(frame_loop)
    _attach_smoothers(frame_loop, config.smoothing)
    _announce(frame_loop, metrics, config.batch_timeout_ms)
    return frame_loop


# ------------------------------------------------------------------------------------------------ setting up
def _close_quietly(things: list[Any]) -> None:
    for thing in things:
        try:
            thing.close()
        except Exception:  # noqa: BLE001 - the setup error is the one to report
            pass


def _logger(prefix: str, status_line: StatusLine, err: TextIO) -> Callable[[str], None]:
    """A ``[prefix] message`` line on ``err`` that the status line gives way to."""
    def log(m: str) -> None:
        status_line.clear()
        print(f"[{prefix}] {m}", file=err, flush=True)
    return log


def _needs_image(config: RunConfig, opened: list[Output]) -> bool:
    """Whether frames keep their decoded image after preparation (videos, windows, live view, review queue)."""
    return any(getattr(o, "needs_image", False) for o in opened) or config.review is not None


def _metrics_hooks(config: RunConfig) -> list[Any]:
    """The Prometheus endpoint (runtime.metrics) when a port is asked for: first among the hooks, so results are
    counted before other hooks look."""
    if config.metrics_port is None:
        return []
    from runtime.metrics import MetricsHook

    return [MetricsHook(config.metrics_port, config.host)]


def _plant_hooks(config: RunConfig, clf: Any, opened: list[Output], status_line: StatusLine,
                 err: TextIO) -> list[Any]:
    """Station operations (docs/plant.md): MQTT state in the status line, the drift alarm (``drift``: ``auto`` =
    on when the model carries validation statistics or ``drift_config.learn`` is set, ``on``, ``off``), the
    review queue (``review``: its folder)."""
    from runtime.mqtt import MqttOutput, MqttStatusHook

    hooks: list[Any] = []
    mqtt_outputs = [o for o in opened if isinstance(o, MqttOutput)]
    if mqtt_outputs:
        hooks.append(MqttStatusHook(mqtt_outputs))
    if config.drift != "off":
        from runtime.drift import DriftConfig, DriftHook, DriftMonitor

        drift_config = (config.drift_config or DriftConfig()).validate()
        log = _logger("drift", status_line, err)
        try:
            monitor = DriftMonitor.from_metadata(clf.meta, drift_config)
        except ValueError as e:
            if config.drift == "on":
                raise ValueError(f"--drift on: {e}") from None
            log(f"off: {e}")
        else:
            hooks.append(DriftHook(monitor, log=log))
    if config.review is not None:
        from runtime.review import ReviewQueue

        hooks.append(ReviewQueue(config.review, budget_mb=config.review_budget_mb, margin=config.review_margin,
                                 labels=clf.labels, model=clf.describe(), threshold=clf.threshold,
                                 log=_logger("review", status_line, err)))
    return hooks


def _open_feeds(config: RunConfig, uris: list[str], specs: list[SourceSpec], clf: Any, *,
                cond: threading.Condition, stop: threading.Event, log: Callable[[str], None], capture_factory: Any,
                keep_image: bool, undo: ExitStack) -> list[SourceFeed]:
    """A :class:`SourceFeed` per source, its source opened now (a source that cannot be opened is a setup error,
    except one live source of several: the station starts with the others and keeps trying)."""
    feeds: list[SourceFeed] = []
    for uri, spec in zip(uris, specs, strict=True):
        def opener(uri: str = uri) -> Source:  # decode only: the feeder prepares (a pipeline stage of its own)
            return open_source(uri, loop=config.loop, capture_factory=capture_factory, stop_event=stop, log=log,
                               backoff=config.backoff)

        try:
            src: Source | None = opener()
        except OSError as e:
            if len(uris) == 1 or not spec.is_live:
                raise
            log(f"{redact(uri)}: cannot open ({e}); retrying in the background")
            src = None
        else:
            undo.callback(src.close)
        feeds.append(SourceFeed(uri, spec, opener, cond, stop, log, backoff=config.backoff, src=src,
                                prepare=clf.prepare, keep_image=keep_image))
    return feeds


def _set_video_rates(frame_loop: FrameLoop) -> None:
    """A video output plays at its source's own rate when known (a shared one: the first source's); a folder of
    images becomes a 5 fps slideshow, a live source without a rate 30 fps."""
    feeds = frame_loop.feeds
    first = next((f.src for f in feeds if f.src is not None), None)
    for o in frame_loop.outputs:
        if not isinstance(o, VideoOutput) or o.frames:
            continue
        feed = next((f for f in feeds if f.uri == o.for_source), None)
        src = first if feed is None else feed.src
        live = (feed or feeds[0]).spec.is_live
        o.fps = (src.fps if src is not None else None) or (30.0 if live else 5.0)


def _attach_smoothers(frame_loop: FrameLoop, smoothing: int) -> None:
    if not smoothing or smoothing <= 1:
        return
    for f in frame_loop.feeds:
        if f.spec.kind in ("video", "camera", "stream", "gst"):
            f.smoother = ProbabilitySmoother(frame_loop.clf, smoothing)
        else:
            print(f"[run] --smoothing {smoothing} ignored for {f.name}: it averages over consecutive video "
                  f"frames, and {f.name} is {f.spec.kind}", file=frame_loop.err)


def _announce(frame_loop: FrameLoop, metrics: list[Any], batch_timeout_ms: float) -> None:
    """The start of a run on stderr: model, listening ports, output notes, sources."""
    err, feeds, summary = frame_loop.err, frame_loop.feeds, frame_loop.summary
    for o in frame_loop.outputs:
        moved = getattr(o, "diverted_from", None)
        if moved is not None:
            print(f"[run] {moved} has other columns (another program's, or an older version's): appending to "
                  f"{o.path} instead", file=err)
    print(f"[run] {frame_loop.clf.describe()}", file=err)
    for h in metrics:
        print(f"[run] Prometheus metrics on {h.url}" + ("" if is_loopback(h.host) else
              " (reachable from other machines, without authentication: firewall it)"), file=err)
    for o in frame_loop.outputs:
        note = getattr(o, "startup_note", None)
        if note:
            print(f"[run] {note}", file=err)
    outs = ", ".join(summary.outputs) or "none"
    if len(feeds) == 1:
        f = feeds[0]
        live = ", live" if f.live else ""
        print(f"[run] source {f.name} ({f.spec.kind}{live}); outputs: {outs}; Ctrl-C to stop", file=err, flush=True)
    else:
        print(f"[run] {len(feeds)} sources: {summary.source}; batches of up to {frame_loop.max_batch} "
              f"(waiting at most {batch_timeout_ms:g} ms for the others); outputs: {outs}; Ctrl-C to stop",
              file=err, flush=True)


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


DESCRIPTION = """\
Classify SEM images from a camera, stream, video or folder, frame by frame, and write each result to the outputs
as it comes, so a station or a supervisor can act on every image."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m runtime.run", description=DESCRIPTION, epilog=EPILOG + "\n" + _exit_code_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _source_args(p.add_argument_group("sources"))
    _model_args(p.add_argument_group("model and decision"))
    _output_args(p.add_argument_group("outputs"))
    _station_args(p.add_argument_group("station: listening ports, review queue, drift alarm (docs/plant.md)"))
    _behaviour_args(p.add_argument_group("behaviour"))
    return p


def _source_args(g: Any) -> None:
    g.add_argument("--source", "-s", dest="sources", required=True, action="append", metavar="SRC",
                   help="camera, stream URL, video, image, folder or glob (see below); repeat it, or give a "
                   "*.streams file (one SRC per line), for several sources in one process with batched inference")
    g.add_argument("--loop", action="store_true", help="restart files, folders and videos at their end")
    g.add_argument("--batch-timeout", dest="batch_timeout_ms", type=float, default=5.0, metavar="MS",
                   help="several sources: after the first frame, wait at most MS milliseconds for the other sources' "
                   "frames before running the batch (default 5)")
    g.add_argument("--max-batch", type=_int_at_least(1, "frames per inference call"), metavar="B",
                   help="several sources: at most B frames per inference call (default: the backend's limit)")


def _model_args(g: Any) -> None:
    g.add_argument("--model", "-m", metavar="M", help="ONNX model or TensorRT engine (default: the bundled model)")
    g.add_argument("--backend", "-b", default="auto", choices=("auto", "ort", "cpu", "cuda", "trt"),
                   help="inference backend (default auto: TensorRT for engines, else ONNX Runtime)")
    g.add_argument("--threshold", "-t", metavar="T", type=_threshold_arg,
                   help="rejection threshold (reject when score < T), or 'off'; default: the model's calibrated "
                   "threshold")
    check = g.add_mutually_exclusive_group()
    check.add_argument("--self-check", dest="self_check", action="store_true", default=None,
                       help="check the model against its stored reference outputs on this machine before the first "
                       "frame, whatever its precision (default: INT8 models and TensorRT engines only)")
    check.add_argument("--no-self-check", dest="self_check", action="store_false",
                       help="skip that check, also for INT8 models and engines (you vouch for the artifact)")
    g.add_argument("--smoothing", type=_int_at_least(0, "0 is off"), default=0, metavar="N",
                   help="video: average probabilities over the last N frames (default off)")
    g.add_argument("--threads", type=_int_at_least(1, "ONNX Runtime threads"), metavar="N",
                   help="ONNX Runtime threads (default: physical cores minus one, left to decoding; at least 1)")


def _output_args(g: Any) -> None:
    g.add_argument("--output", "-o", dest="outputs", action="append", metavar="OUT", default=[],
                   help="display://0, a video (.mp4/.avi), records (.jsonl/.csv) or - for stdout; repeatable")
    g.add_argument("--on-output-error", choices=ON_OUTPUT_ERROR, default="stop",
                   help="when an output fails (disk full, permission, broken pipe): stop the run (default), or "
                   f"continue without that output; either way the exit code is {EXIT_OUTPUT}")
    g.add_argument("--headless", action="store_true", help="never open a window (display outputs are skipped)")
    g.add_argument("--quiet", "-q", action="store_true", help="no per-frame lines on stdout (status and summary "
                   "still on stderr)")


def _station_args(g: Any) -> None:
    g.add_argument("--metrics-port", type=_int_at_least(0, "0 = any free port"), metavar="N",
                   help="serve Prometheus metrics on http://HOST:N/metrics (needs prometheus-client: the station "
                   "extra)")
    g.add_argument("--host", default=LOCALHOST, metavar="ADDR",
                   help=f"address the metrics port and http:// live views without a host listen on (default "
                   f"{LOCALHOST}: this machine only; 0.0.0.0 for every interface)")
    g.add_argument("--http-token", metavar="TOKEN", default=None,
                   help=f"token the live view asks for (?token= or Authorization: Bearer); required when it "
                   f"listens beyond this machine; default: ${TOKEN_ENV}")
    g.add_argument("--review", metavar="DIR", help="save rejected, invalid and low-margin frames (PNG + JSON) "
                   "to DIR/pending/ for a person to sort; python -m train.review adds sorted ones to a dataset")
    g.add_argument("--review-budget", dest="review_budget_mb", type=float, default=1024.0, metavar="MB",
                   help="disk budget of DIR/pending/; the oldest frames are dropped first (default 1024)")
    g.add_argument("--review-margin", type=float, default=0.1, metavar="M",
                   help="also save frames whose top two class probabilities are closer than M (default 0.1; "
                   "0 = off)")
    g.add_argument("--drift", choices=("auto", "on", "off"), default="auto",
                   help="drift alarm on rejection rate and class mix against the model's validation data "
                   "(auto: when the model has those statistics or --drift-learn is given)")
    g.add_argument("--drift-window", type=_int_at_least(10, "classified frames"), default=500, metavar="N",
                   help="frames in the rolling window (default 500)")
    g.add_argument("--drift-learn", type=_int_at_least(0, "0 = use the validation data"), default=0,
                   metavar="N", help="take the station's first N frames as normal instead of the validation "
                   "data (a station whose mix differs from validation, or a model without its statistics)")
    g.add_argument("--drift-mix-limit", default=0.25, type=_mix_limit_arg, metavar="D",
                   help="class-mix distance (0-1) that raises the alarm, or off (default 0.25)")


def _behaviour_args(g: Any) -> None:
    g.add_argument("--max-frames", type=_int_at_least(1, "frames to classify"), metavar="K",
                   help="stop after K frames")
    g.add_argument("--no-status", dest="status", action="store_false", help="no live status line")


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
def run_command(config: RunConfig) -> int:
    """``python -m runtime.run`` after parsing: run ``config`` with Ctrl-C/SIGTERM stopping it cleanly (a second
    Ctrl-C at once) and return the exit code (``EXIT_CODES``); a setup error is one line on stderr."""
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        if stop.is_set():  # second Ctrl-C: the user means it
            raise KeyboardInterrupt
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return open_loop(config, stop_event=stop).run().exit_code
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # bad arguments: argparse prints the usage and exits EXIT_USAGE (2)
    return run_command(RunConfig.from_args(args))


if __name__ == "__main__":
    sys.exit(main())
