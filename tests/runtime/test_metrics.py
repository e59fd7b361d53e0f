"""``--metrics-port``: a real Prometheus endpoint scraped during a run (prometheus-client's parser reads it)."""

from __future__ import annotations

import io
import socket
import time
import urllib.request
from typing import Any

import pytest

from runtime.run import LoopHook, run

pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


class Scraper(LoopHook):
    """Scrapes the run's metrics endpoint after ``at`` results (from the loop thread, while the run goes on). With
    ``until``, scrapes again (the loop waits) until that sample is at least 1: events of a source's own thread,
    such as a reopen attempt after its backoff, need not have happened yet on a loaded machine."""

    def __init__(self, at: int, until: tuple[str, tuple[tuple[str, str], ...]] | None = None) -> None:
        self.at, self.n, self.text, self.url, self.until = at, 0, "", "", until

    def on_start(self, loop: Any) -> None:
        self.url = next(h.url for h in loop.hooks if hasattr(h, "registry"))

    def on_result(self, loop: Any, feed: Any, result: Any) -> None:
        self.n += 1
        if self.n == self.at:
            deadline = time.monotonic() + 20
            while True:
                with urllib.request.urlopen(self.url, timeout=10) as r:
                    self.text = r.read().decode()
                if self.until is None or samples(self.text).get(self.until, 0) >= 1 or time.monotonic() > deadline:
                    break
                time.sleep(0.05)


def test_metrics_endpoint_during_a_two_source_run(clf, video_writer, fake_capture, tmp_path):
    video = video_writer(tmp_path / "a.avi", [0.05, 0.95, 0.5] * 10)  # clean, bridges, other (rejected)
    down = {"n": 0}

    def factory(location: Any) -> Any:  # /dev/video7: a camera that never opens
        if location == "/dev/video7":
            down["n"] += 1
            return None
        import cv2

        return cv2.VideoCapture(location)

    scraper = Scraper(at=24, until=("sem_source_reconnects_total", (("source", "/dev/video7"),)))
    err = io.StringIO()
    summary = run([str(video), "/dev/video7"], classifier=clf, outputs=[], quiet=True, err=err, metrics_port=0,
                  hooks=[scraper], capture_factory=factory, backoff=(0.01, 0.02), max_frames=30, loop=True)
    assert summary.frames == 30 and scraper.text, err.getvalue()
    assert scraper.url.startswith("http://127.0.0.1:")  # loopback unless --host says otherwise
    assert "Prometheus metrics on http://127.0.0.1:" in err.getvalue()
    m = samples(scraper.text)
    v = str(video)
    assert m[("sem_frames_total", (("source", v),))] == 24
    assert m[("sem_results_total", (("label", "clean"), ("source", v)))] == 8
    assert m[("sem_results_total", (("label", "bridges"), ("source", v)))] == 8
    assert m[("sem_rejections_total", (("source", v),))] == 8
    assert m[("sem_input_errors_total", (("source", v),))] == 0
    assert m[("sem_source_up", (("source", v),))] == 1
    assert m[("sem_source_up", (("source", "/dev/video7"),))] == 0
    assert m[("sem_source_state", (("source", "/dev/video7"), ("state", "reconnecting")))] == 1
    assert m[("sem_source_reconnects_total", (("source", "/dev/video7"),))] >= 1
    assert m[("sem_frames_total", (("source", "/dev/video7"),))] == 0
    assert m[("sem_stage_latency_seconds_count", (("stage", "inference"),))] == 24
    assert m[("sem_stage_latency_seconds_count", (("stage", "end_to_end"),))] == 24
    assert m[("sem_batch_size_count", ())] >= 1
    assert ("sem_fps", (("source", v),)) in m
    assert any(k[0] == "sem_run_info" for k in m)
    # the server is gone with the run
    port = int(scraper.url.split(":")[2].split("/")[0])
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_invalid_frames_by_reason_and_errors(clf, image_dir, tmp_path):
    from runtime.classifier import Prediction

    class Gate:
        def __init__(self, c: Any) -> None:
            self._c = c

        def __getattr__(self, n: str) -> Any:
            return getattr(self._c, n)

        def predict(self, x: Any, source: str | None = None) -> Any:
            if source and "dark" in source:
                import numpy as np

                return Prediction(label="invalid", index=-1, top_label="", top_index=-1, confidence=0.0,
                                  probs=np.zeros(8, np.float32), logits=np.zeros(8, np.float32), rejected=True,
                                  score=float("nan"), timings={"total": 0.1}, source=source, reason="blank")
            return self._c.predict(x, source=source)

    scraper = Scraper(at=6)
    run(str(image_dir), classifier=Gate(clf), outputs=[], quiet=True, err=io.StringIO(), metrics_port=0,
        hooks=[scraper])
    m = samples(scraper.text)
    src = str(image_dir)
    inv = {k: v for k, v in m.items() if k[0] == "sem_invalid_frames_total"}
    assert list(inv.values()) == [1] and dict(next(iter(inv))[1])["reason"] == "blank"
    assert sum(v for k, v in m.items() if k[0] == "sem_input_errors_total") == 1  # the corrupt PNG
    assert dict(next(iter(inv))[1])["source"] == src


def test_port_in_use_is_a_setup_error(clf, image_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        with pytest.raises(OSError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            run(str(image_dir), classifier=clf, outputs=[], quiet=True, err=io.StringIO(), metrics_port=port)


def test_without_prometheus_client_the_cli_says_what_to_install(tiny_model, image_dir, monkeypatch, capsys):
    import sys

    from runtime.run import EXIT_USAGE, main

    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # as if not installed
    code = main(["--source", str(image_dir), "--model", str(tiny_model), "--headless", "--quiet",
                 "--metrics-port", "0"])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE and "needs prometheus-client" in err and "[station]" in err and "Traceback" not in err


def test_drift_alarm_is_exported(make_model, tmp_path):
    """The drift monitor's state reaches /metrics: alarm raised once the held-out class floods the window."""
    from runtime.drift import DriftConfig
    from tests.runtime.test_drift import drift_model, drift_video

    scraper = Scraper(at=340)  # past the alarm (frame ~205 of 350, see test_drift)
    run(str(drift_video(tmp_path)), model=str(drift_model(make_model)), outputs=[], quiet=True, headless=True,
        err=io.StringIO(), drift_config=DriftConfig(window=100, min_frames=50), threads=1, metrics_port=0,
        hooks=[scraper])
    m = samples(scraper.text)
    assert m[("sem_drift_ready", ())] == 1 and m[("sem_drift_alarm", ())] == 1
    assert m[("sem_drift_alarms_total", ())] == 1
    assert m[("sem_drift_rejection_rate", ())] > m[("sem_drift_rejection_limit", ())]
