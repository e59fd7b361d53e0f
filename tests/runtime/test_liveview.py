"""The live view (``--output http://...``): served during a run, loaded by a real headless Chromium; token and
loopback rules; frames encoded only when a viewer asks."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from runtime.liveview import LiveViewOutput
from runtime.outputs import OutputError
from runtime.run import EXIT_USAGE, LoopHook, main, run

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
BROWSER_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


class Grab(LoopHook):
    """Hands the run's live view to the test once the loop starts."""

    def __init__(self) -> None:
        self.view: LiveViewOutput | None = None
        self.ready = threading.Event()

    def on_start(self, loop: Any) -> None:
        self.view = next(o for o in loop.outputs if isinstance(o, LiveViewOutput))
        self.ready.set()


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes, Any]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read(), r.headers
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers


def start_run(sources: list[str], clf: Any, **kw: Any) -> tuple[threading.Thread, threading.Event, Grab, dict]:
    stop, grab, box = threading.Event(), Grab(), {}

    def target() -> None:
        box["summary"] = run(sources, classifier=clf, outputs=kw.pop("outputs", ["http://127.0.0.1:0"]), loop=True,
                             stop_event=stop, hooks=[grab], err=io.StringIO(), **kw)

    t = threading.Thread(target=target, daemon=True)
    t.start()
    assert grab.ready.wait(30)
    return t, stop, grab, box


def browser(args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    profile = tmp / f"profile-{time.monotonic_ns()}"
    return subprocess.run([CHROMIUM, *BROWSER_FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                          text=True, timeout=90)


def test_headless_chromium_shows_frames_and_numbers_during_a_run(clf, video_writer, tmp_path):
    if CHROMIUM is None:
        if os.environ.get("SEM_BROWSER_REQUIRED"):
            pytest.fail("chromium is not installed (apt-get install chromium); SEM_BROWSER_REQUIRED is set")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    bright = video_writer(tmp_path / "bright.avi", [0.95] * 20, size=128)  # bridges
    dark = video_writer(tmp_path / "dark.avi", [0.05, 0.05, 0.5] * 7, size=128)  # clean, and rejected to other
    t, stop, grab, box = start_run([str(bright), str(dark)], clf)
    try:
        view = grab.view
        while view.frames < 40:
            time.sleep(0.05)
        shot = tmp_path / "live.png"
        r = browser(["--window-size=1040,560", "--timeout=3000", f"--screenshot={shot}", view.url], tmp_path)
        assert shot.is_file(), r.stderr[-2000:]
        dom = browser(["--timeout=3000", "--dump-dom", view.url], tmp_path).stdout
        encoded_while_viewed = view.encoded
    finally:
        stop.set()
        t.join(30)
    # the numbers and each source's state, as the browser rendered them
    frames = int(dom.split('id="frames">')[1].split("<")[0])
    assert frames >= 40
    assert str(bright) in dom and str(dark) in dom and dom.count(">running<") == 2
    for label in ("bridges", "clean", "other"):
        assert f"<td>{label}</td>" in dom
    assert "%" in dom.split('id="rej">')[1][:12]
    # the pictures: the bright source's frame is on the page (the page itself is dark)
    img = cv2.imread(str(shot), cv2.IMREAD_GRAYSCALE)
    assert img is not None and img.shape == (560, 1040)
    assert (img > 200).mean() > 0.05
    # frames were encoded for the page, at its rate: a handful, while the run classified thousands
    assert 0 < encoded_while_viewed < box["summary"].frames / 5
    if os.environ.get("SEM_LIVEVIEW_SHOT"):  # docs: keep the picture
        shutil.copy(shot, os.environ["SEM_LIVEVIEW_SHOT"])


def test_nothing_is_encoded_without_a_viewer(clf, video_file, tmp_path):
    t, stop, grab, box = start_run([str(video_file)], clf)
    view = grab.view
    while view.frames < 200:
        time.sleep(0.02)
    assert view.encoded == 0  # classification never paid for the page
    stop.set()
    t.join(30)
    assert view.encoded == 0 and box["summary"].frames >= 200
    # after the run the server is gone
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(view.url, timeout=5)


def test_frame_endpoint_encodes_once_per_frame_and_says_what_it_shows(clf, grey_image):
    from runtime.outputs import FrameResult
    from runtime.sources import Frame

    view = LiveViewOutput("127.0.0.1", 0)
    try:
        frame = Frame(index=3, source="cam", timestamp=time.time(), image=grey_image(0.95, 64))
        view.write(FrameResult(frame, clf.predict(frame.image), None, 1.0))
        for _ in range(3):
            code, body, headers = get(view.url + "frame/0.jpg")
            assert code == 200 and body[:2] == b"\xff\xd8"
        assert view.encoded == 1
        info = json.loads(headers["X-Result"])
        assert info["label"] == "bridges" and info["frame"] == 3
        st = json.loads(get(view.url + "status.json")[1])
        assert st["frames"] == 1 and st["labels"] == {"bridges": 1} and st["sources"][0]["name"] == "cam"
        assert get(view.url + "frame/9.jpg")[0] == 404
        img = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_GRAYSCALE)
        assert img.shape == (64, 64)
    finally:
        view.close()


def test_token_rules(monkeypatch):
    monkeypatch.delenv("SEM_HTTP_TOKEN", raising=False)
    with pytest.raises(OutputError, match="reachable from other machines.*--http-token"):
        LiveViewOutput.from_uri("http://0.0.0.0:0")
    with pytest.raises(OutputError, match="no path"):
        LiveViewOutput.from_uri("http://user:pw@127.0.0.1:0/x")
    view = LiveViewOutput.from_uri("http://0.0.0.0:0", token="s3cret")
    try:
        assert "token required" in view.startup_note and "s3cret" not in view.startup_note
        base = f"http://127.0.0.1:{view.port}/"
        assert get(base)[0] == 401 and get(base + "status.json")[0] == 401
        assert get(base + "?token=wrong")[0] == 401
        assert get(base + "?token=s3cret")[0] == 200
        assert get(base + "status.json", {"Authorization": "Bearer s3cret"})[0] == 200
    finally:
        view.close()
    monkeypatch.setenv("SEM_HTTP_TOKEN", "from-env")
    view = LiveViewOutput.from_uri("http://:0", host="0.0.0.0")  # empty host: --host
    try:
        assert view.host == "0.0.0.0" and get(f"http://127.0.0.1:{view.port}/?token=from-env")[0] == 200
    finally:
        view.close()


def test_cli_refuses_an_open_live_view_without_token(tiny_model, video_file, monkeypatch, capsys):
    monkeypatch.delenv("SEM_HTTP_TOKEN", raising=False)
    code = main(["--source", str(video_file), "--model", str(tiny_model), "--headless", "--quiet",
                 "--output", "http://0.0.0.0:0"])
    assert code == EXIT_USAGE and "--http-token" in capsys.readouterr().err
    code = main(["--source", str(video_file), "--model", str(tiny_model), "--headless", "--quiet", "--no-status",
                 "--output", "http://:0", "--host", "0.0.0.0", "--http-token", "tok-123"])
    err = capsys.readouterr().err
    assert code == 0 and "token required" in err and "tok-123" not in err
