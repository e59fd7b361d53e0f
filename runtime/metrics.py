"""``--metrics-port N``: a Prometheus endpoint for ``python -m runtime.run`` (prometheus-client, the station extra).

Served on ``http://HOST:N/metrics`` by prometheus-client's own server thread; HOST is 127.0.0.1 unless ``--host``
says otherwise. Every name starts with ``sem_``; ``source`` labels are the sources' names with credentials
removed.

==========================================  =============================================================
``sem_frames_total{source}``                frames handled (classified, invalid or failed)
``sem_results_total{source,label}``         classified frames by final label (``other`` = rejected)
``sem_rejections_total{source}``            classified, then rejected to ``other``
``sem_invalid_frames_total{source,reason}`` frames the frame-quality gate refused, by reason
``sem_input_errors_total{source}``          frames that could not be read or classified
``sem_stage_latency_seconds{stage}``        histogram per stage: ``prepare`` (grey, resize, gate; in the
                                            feeder thread), ``preprocess``/``inference``/``postprocess``
                                            (per frame; a batch's share) and ``end_to_end`` (capture to
                                            result for live sources, decode + inference work for files)
``sem_batch_size``                          histogram of frames per inference call
``sem_fps{source}``                         frames per second over the last ~60 frames
``sem_source_up{source}``                   1 while the source delivers, 0 otherwise
``sem_source_state{source,state}``          1 for the source's current state (running, reconnecting, ...)
``sem_source_dropped_frames_total{source}`` live frames the classifier had no time for
``sem_source_reconnects_total{source}``     reopen attempts
``sem_run_info{model}``                     the model and backend (value 1)
==========================================  =============================================================
"""

from __future__ import annotations

import math
import threading
from typing import Any

from runtime.frameloop import FrameLoop, LoopHook, SourceFeed
from runtime.summary import RunSummary

STATES = ("connecting", "running", "reconnecting", "ended", "failed", "stopped")
STAGES = ("preprocess", "inference", "postprocess")
# Seconds: from 0.5 ms (a batch's share of inference on a GPU) to 10 s (a stalled camera's frame).
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
INSTALL_HINT = ("--metrics-port needs prometheus-client: pip install 'sem-defect-classifier[station]' "
                "(or pip install prometheus-client)")


def _client() -> Any:
    try:
        import prometheus_client
    except ImportError:
        raise RuntimeError(INSTALL_HINT) from None
    return prometheus_client


class MetricsHook(LoopHook):
    """Counts every result into a private registry and serves it; per-source state is read at scrape time, so a
    camera that is down shows as down even when no frame arrives."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        pc = _client()
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        self._gauge, self._counter = GaugeMetricFamily, CounterMetricFamily
        self.registry = pc.CollectorRegistry(auto_describe=True)
        self.host, self.port = host, port
        reg = self.registry
        self.frames = pc.Counter("sem_frames", "Frames handled (classified, invalid or failed)", ["source"],
                                 registry=reg)
        self.results = pc.Counter("sem_results", "Classified frames by final label (other = rejected)",
                                  ["source", "label"], registry=reg)
        self.rejections = pc.Counter("sem_rejections", "Classified frames rejected to other", ["source"],
                                     registry=reg)
        self.invalid = pc.Counter("sem_invalid_frames", "Frames the frame-quality gate refused, by reason",
                                  ["source", "reason"], registry=reg)
        self.errors = pc.Counter("sem_input_errors", "Frames that could not be read or classified", ["source"],
                                 registry=reg)
        self.latency = pc.Histogram("sem_stage_latency_seconds", "Latency per pipeline stage", ["stage"],
                                    buckets=LATENCY_BUCKETS, registry=reg)
        self.batch = pc.Histogram("sem_batch_size", "Frames per inference call", buckets=(1, 2, 3, 4, 6, 8, 16, 32),
                                  registry=reg)
        self.info = pc.Gauge("sem_run_info", "The model and backend of this run", ["model"], registry=reg)
        self._loop: FrameLoop | None = None
        self._lock = threading.Lock()
        reg.register(_SourceCollector(self))
        try:
            self._server, self._thread = pc.start_http_server(port, addr=host, registry=reg)
        except OSError as e:
            raise OSError(e.errno, f"cannot serve metrics on {host}:{port}: {e.strerror or e}") from None
        self.port = self._server.server_port  # the real one when 0 asked for any free port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    # hooks ---------------------------------------------------------------------------------------------------
    def on_start(self, loop: FrameLoop) -> None:
        self._loop = loop
        self.info.labels(model=loop.summary.model).set(1)
        for f in loop.feeds:  # every source appears at once, also before its first frame
            self.frames.labels(source=f.name)
            self.errors.labels(source=f.name)
            self.rejections.labels(source=f.name)

    def on_batch(self, loop: FrameLoop, size: int, infer_ms: float) -> None:
        self.batch.observe(size)

    def on_result(self, loop: FrameLoop, feed: SourceFeed, result: Any) -> None:
        name = feed.name
        self.frames.labels(source=name).inc()
        frame, p = result.frame, result.prediction
        if frame.prepare_ms:
            self.latency.labels(stage="prepare").observe(frame.prepare_ms / 1e3)
        if p is None:
            self.errors.labels(source=name).inc()
            return
        if p.reason:
            self.invalid.labels(source=name, reason=p.reason).inc()
        else:
            self.results.labels(source=name, label=p.label).inc()
            if p.rejected:
                self.rejections.labels(source=name).inc()
        for stage in STAGES:
            ms = p.timings.get(stage)
            if ms is not None and math.isfinite(ms) and (ms > 0 or stage != "inference"):
                self.latency.labels(stage=stage).observe(ms / 1e3)
        if math.isfinite(result.latency_ms):
            self.latency.labels(stage="end_to_end").observe(result.latency_ms / 1e3)

    def on_close(self, loop: FrameLoop, summary: RunSummary) -> None:
        self.close()

    def close(self) -> None:
        server = getattr(self, "_server", None)
        if server is not None:
            self._server = None
            server.shutdown()
            server.server_close()


class _SourceCollector:
    """Per-source gauges read from the loop when Prometheus scrapes."""

    def __init__(self, hook: MetricsHook) -> None:
        self.hook = hook

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Any:
        loop = self.hook._loop
        G, C = self.hook._gauge, self.hook._counter  # noqa: N806 - prometheus_client's classes
        fps = G("sem_fps", "Frames per second over the last ~60 frames", labels=["source"])
        up = G("sem_source_up", "1 while the source delivers frames", labels=["source"])
        state = G("sem_source_state", "1 for the source's current state", labels=["source", "state"])
        dropped = C("sem_source_dropped_frames", "Live frames the classifier had no time for", labels=["source"])
        reconnects = C("sem_source_reconnects", "Reopen attempts", labels=["source"])
        for f in (loop.feeds if loop is not None else []):
            st = f.state
            fps.add_metric([f.name], f.fps_now if st == "running" else 0.0)
            up.add_metric([f.name], 1.0 if st == "running" else 0.0)
            for s in STATES:
                state.add_metric([f.name, s], 1.0 if s == st else 0.0)
            dropped.add_metric([f.name], float(f.total_dropped))
            reconnects.add_metric([f.name], float(f.total_reconnects))
        yield from (fps, up, state, dropped, reconnects)
        drift = getattr(loop, "drift_state", None)  # runtime.drift.DriftState, present when the drift alarm is on
        if drift is not None:
            for name, text, value in (
                    ("sem_drift_alarm", "1 while the drift alarm is raised", float(drift.alarm)),
                    ("sem_drift_ready", "1 once the window holds enough frames for a verdict", float(drift.ready)),
                    ("sem_drift_rejection_rate", "Rejection rate over the drift window", drift.rejection_rate),
                    ("sem_drift_rejection_limit", "Rejection rate above which the alarm is raised",
                     drift.rejection_limit),
                    ("sem_drift_mix_distance", "Total-variation distance of the window's class mix from the reference",
                     drift.mix_distance)):
                g = G(name, text)
                g.add_metric([], float(value))
                yield g
            raised = C("sem_drift_alarms", "Drift alarms raised")
            raised.add_metric([], float(drift.alarms_raised))
            yield raised


__all__ = ["MetricsHook", "INSTALL_HINT"]
