"""``python -m runtime.run`` for a supervisor: exit codes, failed outputs (a real full tmpfs, /dev/full, injected
faults, a broken pipe), records that are never torn, invalid frames counted per reason, arguments refused."""

from __future__ import annotations

import errno
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from runtime.classifier import Prediction
from runtime.run import (
    EXIT_CODES,
    EXIT_INPUT,
    EXIT_INTERNAL,
    EXIT_OK,
    EXIT_OUTPUT,
    EXIT_USAGE,
    RunSummary,
    main,
    run,
)

REPO = Path(__file__).resolve().parents[2]


def records(path: Path) -> list[dict]:
    data = path.read_bytes()
    assert not data or data.endswith(b"\n"), f"{path} ends inside a record: {data[-80:]!r}"
    return [json.loads(line) for line in data.decode().splitlines()]


def cli(*args: str, timeout: float = 60, **kw: Any) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "runtime.run", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout, **kw)


@pytest.fixture
def long_video(tmp_path, video_writer) -> Path:
    return video_writer(tmp_path / "long.avi", [0.05, 0.95] * 100, size=32)  # 200 frames


@pytest.fixture
def good_dir(tmp_path, grey_image) -> Path:
    d = tmp_path / "good"
    d.mkdir()
    for i, v in enumerate((0.05, 0.95, 0.1)):
        cv2.imwrite(str(d / f"img{i}.png"), grey_image(v))
    return d


def invalid_prediction(reason: str, source: str) -> Any:
    return Prediction(label="invalid", index=-1, top_label="", top_index=-1, confidence=0.0,
                      probs=np.zeros(8, np.float32), logits=np.full(8, np.nan, np.float32), rejected=True,
                      score=float("nan"), timings={"total": 0.3}, source=source, reason=reason)


class GatedClassifier:
    """The real tiny classifier, with a stand-in quality gate: files named ``*blank*``/``*noise*`` are invalid."""

    def __init__(self, clf: Any) -> None:
        self._clf = clf

    def __getattr__(self, name: str) -> Any:
        return getattr(self._clf, name)

    def predict(self, x: Any, source: str | None = None) -> Any:
        for reason in ("blank", "noise"):
            if source and reason in Path(source).name:
                return invalid_prediction(reason, source)
        return self._clf.predict(x, source=source)


# ------------------------------------------------------------------------------------------------ the codes
def test_exit_codes_are_distinct_and_documented_in_help(capsys):
    assert len(set(EXIT_CODES)) == len(EXIT_CODES) and {EXIT_OK, EXIT_INPUT, EXIT_OUTPUT, EXIT_USAGE} <= set(EXIT_CODES)
    assert EXIT_OK == 0 and EXIT_USAGE == 2  # 2 is also what argparse exits with on a bad argument
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "exit codes:" in text and "--on-output-error" in text and "--self-check" in text
    for code in EXIT_CODES:
        assert f"\n  {code} " in text
    assert "reason" in text and "invalid" in text


@pytest.mark.parametrize(("changes", "code"), [
    ({}, EXIT_OK),
    ({"stopped_by": "signal"}, EXIT_OK),
    ({"errors": 1}, EXIT_INPUT),
    ({"stopped_by": "source-error"}, EXIT_INPUT),
    ({"frames": 0}, EXIT_INPUT),
    ({"frames": 0, "stopped_by": "signal"}, EXIT_INPUT),  # e.g. a camera that never gave a frame
    ({"errors": 1, "output_errors": ["x.jsonl: No space left on device"]}, EXIT_OUTPUT),
    ({"errors": 1, "output_errors": ["x"], "stopped_by": "internal-error"}, EXIT_INTERNAL),
])
def test_exit_code_precedence(changes, code):
    s = RunSummary(source="s", frames=3)
    for k, v in changes.items():
        setattr(s, k, v)
    assert s.exit_code == code and f"exit {code}:" in s.format()


def test_all_good_inputs_exit_0(tiny_model, good_dir):
    r = cli("--source", str(good_dir), "--model", str(tiny_model), "--headless", "--quiet")
    assert r.returncode == EXIT_OK, r.stderr
    assert "exit 0: every frame classified" in r.stderr


def test_unreadable_inputs_exit_3_and_the_rest_is_recorded(tiny_model, tmp_path, grey_image):
    d = tmp_path / "mixed"
    d.mkdir()
    for i in range(8):
        if i < 5:
            (d / f"img{i}.png").write_bytes(b"not a png " * i)  # 5 of 8 unreadable
        else:
            cv2.imwrite(str(d / f"img{i}.png"), grey_image(0.05))
    jsonl = tmp_path / "mixed.jsonl"
    r = cli("--source", str(d), "--model", str(tiny_model), "--headless", "--quiet", "--output", str(jsonl))
    assert r.returncode == EXIT_INPUT, r.stderr
    recs = records(jsonl)
    assert len(recs) == 8 and sum(r["error"] is not None for r in recs) == 5
    assert [r["label"] for r in recs[5:]] == ["clean"] * 3
    assert "exit 3: 5 inputs could not be read" in r.stderr and "img0.png" in r.stderr and "nan" not in r.stderr


def test_a_single_unreadable_file_exits_3_without_nan(tiny_model, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"x" * 20)
    r = cli("--source", str(bad), "--model", str(tiny_model), "--headless", "--quiet")
    assert r.returncode == EXIT_INPUT, r.stderr
    assert "no frames classified" in r.stderr and "nan" not in r.stderr.lower()
    assert "broken.png" in r.stderr


@pytest.mark.parametrize(("args", "words"), [
    (["--max-frames", "-1"], "--max-frames: must be >= 1"),
    (["--max-frames", "0"], "--max-frames: must be >= 1"),
    (["--smoothing", "-3"], "--smoothing: must be >= 0"),
    (["--threads", "-2"], "--threads: must be >= 1"),
    (["--threads", "0"], "--threads: must be >= 1"),
    (["--threads", "two"], "--threads: expected a whole number"),
    (["--threshold", "high"], "threshold must be a number or 'off'"),
    (["--on-output-error", "ignore"], "--on-output-error: invalid choice"),
    (["--self-check", "--no-self-check"], "not allowed with argument"),
])
def test_bad_arguments_are_refused_with_a_clear_message(args, words, image_dir, capsys):
    with pytest.raises(SystemExit) as info:
        main(["--source", str(image_dir), *args])
    assert info.value.code == EXIT_USAGE
    assert words in capsys.readouterr().err


@pytest.mark.parametrize("kw", [{"max_frames": -1}, {"max_frames": 0}, {"smoothing": -3}, {"threads": -2},
                                {"on_output_error": "ignore"}])
def test_run_refuses_bad_arguments_too(kw, clf, image_dir):
    with pytest.raises(ValueError):
        run(str(image_dir), classifier=clf, outputs=[], quiet=True, err=io.StringIO(), **kw)


# ------------------------------------------------------------------------------------------------ self-check
def _checked_model(tiny_model: Path, tmp_path: Path, meta_factory, perturb: float = 0.0) -> Path:
    """A copy of the tiny model with a golden sidecar: its true logits, or those plus ``perturb`` on one class."""
    import shutil

    from runtime.check import Goldens, write_golden_sidecar
    from runtime.scores import logit_score

    model = shutil.copy(tiny_model, tmp_path / "checked.onnx")
    meta = meta_factory()
    grey = np.stack([np.full(meta.input_size, v, np.uint8) for v in (10, 60, 128, 200, 250)])
    std, mean = np.asarray(meta.std), np.asarray(meta.mean)
    g = Goldens(grey=grey, scale=(1 / (255 * std)).astype(np.float32), offset=(-mean / std).astype(np.float32),
                logits=np.zeros((5, 8)), score=np.zeros(5), score_name=meta.score, temperature=meta.temperature,
                labels=meta.labels, reference={"name": "tiny.onnx", "precision": "fp32"})
    z = g.inputs()[:, 0].mean(axis=(1, 2))  # the tiny model: logits = mean of channel 0 x [-3, 3, 0, ...]
    g.logits = (z[:, None] * np.array([-3.0, 3.0, 0, 0, 0, 0, 0, 0], np.float32)).astype(np.float32)
    g.logits[:, 2] += perturb
    g.score = logit_score(meta.score, g.logits, meta.temperature)
    write_golden_sidecar(model, g)
    return Path(model)


def test_self_check_flags_decide_whether_a_drifting_model_runs(tiny_model, good_dir, tmp_path, meta_factory):
    bad = _checked_model(tiny_model, tmp_path, meta_factory, perturb=4.0)
    base = ("--source", str(good_dir), "--model", str(bad), "--headless", "--quiet")
    assert cli(*base).returncode == EXIT_OK  # FP32: no automatic self-check
    r = cli(*base, "--self-check")
    assert r.returncode == EXIT_USAGE and "self-check FAILED" in r.stderr and str(bad) in r.stderr
    assert "--no-self-check" in r.stderr and "summary" not in r.stderr  # refused before the first frame
    assert cli(*base, "--no-self-check").returncode == EXIT_OK


def test_self_check_passes_on_a_faithful_model_and_refuses_a_model_without_goldens(tiny_model, good_dir, tmp_path,
                                                                                   meta_factory):
    good = _checked_model(tiny_model, tmp_path, meta_factory)
    r = cli("--source", str(good_dir), "--model", str(good), "--headless", "--quiet", "--self-check")
    assert r.returncode == EXIT_OK, r.stderr
    r = cli("--source", str(good_dir), "--model", str(tiny_model), "--headless", "--quiet", "--self-check")
    assert r.returncode == EXIT_USAGE and "no golden references" in r.stderr and str(tiny_model) in r.stderr


# ------------------------------------------------------------------------------------------------ invalid frames
def test_invalid_frames_are_counted_per_reason_and_exit_0(clf, tmp_path, grey_image):
    d = tmp_path / "gate"
    d.mkdir()
    for name, v in (("a_dark", 0.05), ("b_blank", 0.5), ("c_bright", 0.95), ("d_noise", 0.5), ("e_blank2", 0.5)):
        cv2.imwrite(str(d / f"{name}.png"), grey_image(v))
    jsonl, err = tmp_path / "gate.jsonl", io.StringIO()
    summary = run(str(d), classifier=GatedClassifier(clf), outputs=[str(jsonl)], err=err)
    recs = records(jsonl)
    assert [(r["label"], r["reason"]) for r in recs] == [
        ("clean", None), ("invalid", "blank"), ("bridges", None), ("invalid", "noise"), ("invalid", "blank")]
    assert summary.exit_code == EXIT_OK and summary.classified == 2 and summary.invalid == 3
    assert dict(summary.invalid_reasons) == {"blank": 2, "noise": 1} and summary.rejected == 0
    assert "invalid" not in summary.labels and summary.to_dict()["invalid_reasons"] == {"blank": 2, "noise": 1}
    text = err.getvalue()
    assert "5 (2 classified, 0 errors, 3 invalid)" in text
    assert "invalid   3 (no usable content): blank 2, noise 1" in text and "nan" not in text


def _scene(level: float, size: int = 128) -> np.ndarray:
    """Structure (a grating, a line, a ring) around brightness ``level``: usable content for the quality gate."""
    y, x = np.mgrid[0:size, 0:size]
    img = level * 255 + 40 * np.sin(x / 5.0) * np.cos(y / 7.0)
    img[40:44, :] += 40
    cv2.circle(img, (size // 2, size // 2), size // 6, level * 255 + 40, 2)
    return np.clip(img, 0, 255).astype(np.uint8)


def test_the_real_quality_gate_through_the_cli(make_model, meta_factory, tmp_path):
    """The tiny model with the gate on (default limits): content-free frames are invalid records with their reason,
    frames with structure are classified, the run exits 0. (Which frame gets which reason is runtime.quality's to
    test; these three are far from every limit.)"""
    model = make_model("gated.onnx", meta=meta_factory(quality=None))
    d = tmp_path / "frames"
    d.mkdir()
    y, x = np.mgrid[0:128, 0:128]
    frames = {"1_dark": _scene(0.2), "2_blank": np.full((128, 128), 128, np.uint8),
              "3_noise": np.random.default_rng(0).integers(0, 256, (128, 128)).astype(np.uint8),
              "4_bright": _scene(0.8), "5_saturated": np.where(x < 80, 255, _scene(0.5)).astype(np.uint8)}
    for name, img in frames.items():
        cv2.imwrite(str(d / f"{name}.png"), img)
    jsonl, csv_path = tmp_path / "gate.jsonl", tmp_path / "gate.csv"
    r = cli("--source", str(d), "--model", str(model), "--headless", "--quiet", "-o", str(jsonl), "-o", str(csv_path))
    assert r.returncode == EXIT_OK, r.stderr
    got = [(Path(r["source"]).stem, r["label"], r["reason"]) for r in records(jsonl)]
    assert got == [("1_dark", "clean", None), ("2_blank", "invalid", "blank"), ("3_noise", "invalid", "noise"),
                   ("4_bright", "bridges", None), ("5_saturated", "invalid", "saturated")]
    import csv

    rows = list(csv.DictReader(csv_path.open(newline="")))
    assert [(row["label"], row["reason"]) for row in rows][1:3] == [("invalid", "blank"), ("invalid", "noise")]
    assert "frames    5 (2 classified, 0 errors, 3 invalid)" in r.stderr
    assert "invalid   3 (no usable content): blank 1, noise 1, saturated 1" in r.stderr
    assert "exit 0: every frame classified or refused" in r.stderr


def test_only_invalid_frames_report_latency_not_nan(clf, tmp_path, grey_image):
    img = tmp_path / "x_blank.png"
    cv2.imwrite(str(img), grey_image(0.5))
    err = io.StringIO()
    summary = run(str(img), classifier=GatedClassifier(clf), outputs=[], quiet=True, err=err)
    assert summary.exit_code == EXIT_OK and summary.invalid == 1 and "nan" not in err.getvalue()


def test_status_line_shows_invalid_count(clf, tmp_path, grey_image):
    d = tmp_path / "s"
    d.mkdir()
    cv2.imwrite(str(d / "a_blank.png"), grey_image(0.5))
    cv2.imwrite(str(d / "b_noise.png"), grey_image(0.5))
    cv2.imwrite(str(d / "c_blank.png"), grey_image(0.5))

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    err = Tty()
    run(str(d), classifier=GatedClassifier(clf), outputs=["-"], out=io.StringIO(), err=err)
    assert "errors 0  invalid 3 (blank 2, noise 1)" in err.getvalue()


def test_smoothing_lets_invalid_frames_through_unaveraged(clf, grey_image):
    from runtime.run import ProbabilitySmoother

    sm = ProbabilitySmoother(clf, 3)
    a = sm.update(clf.predict(grey_image(0.05)))
    inv = sm.update(invalid_prediction("blank", "f"))
    b = sm.update(clf.predict(grey_image(0.05)))
    assert inv.label == "invalid" and inv.reason == "blank"
    assert a.label == b.label == "clean" and len(sm._probs) == 2


# ------------------------------------------------------------------------------------------------ failed outputs
def test_dev_full_records_exit_4_naming_the_file(tiny_model, long_video, tmp_path):
    for fmt in ("jsonl", "csv"):  # CSV fails on its header, before the first frame; JSONL on the first record
        link = tmp_path / f"full.{fmt}"
        link.symlink_to("/dev/full")  # /dev/full under a name with the record suffix
        r = cli("--source", str(long_video), "--model", str(tiny_model), "--headless", "--quiet",
                "--output", str(link))
        assert r.returncode == EXIT_OUTPUT, r.stderr
        assert f"{link}: cannot write record: No space left on device" in r.stderr


def test_injected_full_disk_stops_the_run_and_keeps_records_whole(clf, long_video, tmp_path, monkeypatch):
    jsonl, other = tmp_path / "full.jsonl", tmp_path / "other.jsonl"
    monkeypatch.setattr("runtime.outputs._write", _budget_write(3000, only="full.jsonl"))
    err = io.StringIO()
    summary = run(str(long_video), classifier=clf, outputs=[str(jsonl), str(other)], err=err)
    kept = records(jsonl)
    assert 3 <= len(kept) < 20 and summary.stopped_by == "output-error"
    assert summary.frames == len(kept) + 1 == len(records(other))  # the failing frame still reached the other
    assert summary.exit_code == EXIT_OUTPUT and f"{jsonl}: cannot write record: No space left" in err.getvalue()
    assert [r["frame"] for r in kept] == list(range(len(kept)))


def test_on_output_error_continue_processes_everything(clf, long_video, tmp_path, monkeypatch):
    jsonl, other = tmp_path / "full.jsonl", tmp_path / "other.csv"
    monkeypatch.setattr("runtime.outputs._write", _budget_write(3000, only="full.jsonl"))
    err = io.StringIO()
    summary = run(str(long_video), classifier=clf, outputs=[str(jsonl), str(other)], err=err,
                  on_output_error="continue")
    assert summary.frames == 200 and summary.stopped_by == "end" and summary.exit_code == EXIT_OUTPUT
    assert len(other.read_text().splitlines()) == 201 and len(records(jsonl)) < 20
    text = err.getvalue()
    assert text.count("output failed:") == 1 and "disabled, the run goes on" in text
    assert f"FAILED    {jsonl}: cannot write record" in text and "exit 4: 1 output failed" in text


def test_continue_still_stops_when_no_output_is_left(clf, long_video, tmp_path, monkeypatch):
    jsonl, err = tmp_path / "full.jsonl", io.StringIO()
    monkeypatch.setattr("runtime.outputs._write", _budget_write(3000, only="full.jsonl"))
    summary = run(str(long_video), classifier=clf, outputs=[str(jsonl)], err=err, on_output_error="continue")
    assert summary.frames == len(records(jsonl)) + 1 < 200 and summary.exit_code == EXIT_OUTPUT
    assert "no output left, stopping" in err.getvalue() and "ended     every output failed" in err.getvalue()


def test_a_csv_with_other_columns_is_kept_and_the_switch_is_said(clf, good_dir, tmp_path):
    old = tmp_path / "res.csv"
    old.write_text("source,frame,label\nx.png,0,clean\n")  # e.g. written by a version without `reason`
    err = io.StringIO()
    summary = run(str(good_dir), classifier=clf, outputs=[str(old)], err=err)
    assert old.read_text() == "source,frame,label\nx.png,0,clean\n" and summary.exit_code == EXIT_OK
    assert len((tmp_path / "res-1.csv").read_text().splitlines()) == 4
    assert f"{old} has other columns" in err.getvalue() and str(tmp_path / "res-1.csv") in err.getvalue()


def test_an_internal_error_mid_run_closes_outputs_and_exits_1(clf, long_video, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = RunSummary.add

    def buggy(self, result):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyError("a bug")
        real(self, result)

    monkeypatch.setattr(RunSummary, "add", buggy)
    jsonl, err = tmp_path / "bug.jsonl", io.StringIO()
    summary = run(str(long_video), classifier=clf, outputs=[str(jsonl)], err=err)
    assert summary.exit_code == EXIT_INTERNAL and len(records(jsonl)) == 4
    assert "Traceback" in err.getvalue() and "internal error: KeyError" in err.getvalue()


def _budget_write(budget: int, only: str):
    left = {"n": budget}

    def write(fd, data):
        if not os.readlink(f"/proc/self/fd/{fd}").endswith(only):
            return os.write(fd, data)
        if left["n"] <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = os.write(fd, bytes(data[:left["n"]]))
        left["n"] -= n
        return n

    return write


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A real 16 KiB filesystem that fills up (needs root and permission to mount)."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"mounting a tmpfs is not permitted here: {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_real_full_filesystem_stops_with_exit_4_and_whole_records(tiny_model, long_video, tiny_tmpfs, tmp_path):
    jsonl = tiny_tmpfs / "res.jsonl"
    r = cli("--source", str(long_video), "--model", str(tiny_model), "--headless", "--quiet", "--output", str(jsonl))
    assert r.returncode == EXIT_OUTPUT, r.stderr
    assert f"{jsonl}: cannot write record: No space left on device" in r.stderr
    kept = records(jsonl)  # ends at a complete record
    assert 10 < len(kept) < 200 and [k["frame"] for k in kept] == list(range(len(kept)))
    assert f"frames    {len(kept) + 1} " in r.stderr and "ended     every output failed; exit 4" in r.stderr


def test_real_full_filesystem_continue_keeps_the_other_outputs(tiny_model, long_video, tiny_tmpfs, tmp_path):
    full, safe = tiny_tmpfs / "res.csv", tmp_path / "safe.jsonl"
    r = cli("--source", str(long_video), "--model", str(tiny_model), "--headless", "--quiet", "--output", str(full),
            "--output", str(safe), "--on-output-error", "continue")
    assert r.returncode == EXIT_OUTPUT, r.stderr
    assert len(records(safe)) == 200 and "frames    200 " in r.stderr
    data = full.read_bytes()
    assert data.endswith(b"\r\n") and 10 < data.count(b"\r\n") < 200
    assert f"FAILED    {full}: cannot write record: No space left on device" in r.stderr


# ------------------------------------------------------------------------------------------------ processes
def _start(tiny_model: Path, video: Path, *extra: str, **kw: Any) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "runtime.run", "--source", str(video), "--loop", "--model",
                             str(tiny_model), "--headless", "--no-status", *extra], cwd=REPO, env=env,
                            stderr=subprocess.PIPE, text=True, **kw)


def test_broken_pipe_on_stdout_exits_4_without_a_traceback(tiny_model, video_file):
    proc = _start(tiny_model, video_file, stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline().split()[:2] == ["frame", "source"]
        proc.stdout.readline()
        proc.stdout.close()  # the reader goes away (e.g. `| head -2`)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == EXIT_OUTPUT, err
    assert "stdout: cannot write: Broken pipe" in err and "Traceback" not in err and "Exception ignored" not in err


def test_sigkill_never_leaves_a_torn_record(tiny_model, video_file, tmp_path):
    jsonl = tmp_path / "kill.jsonl"
    proc = _start(tiny_model, video_file, "--quiet", "--output", str(jsonl), stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and proc.poll() is None:
            if jsonl.exists() and jsonl.stat().st_size > 20_000:
                break
            time.sleep(0.01)
        assert proc.poll() is None, proc.stderr.read()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    recs = records(jsonl)
    assert len(recs) > 40 and [r["frame"] for r in recs] == list(range(len(recs)))


def test_bundled_model_on_the_bundled_samples_exits_0_with_every_record(tmp_path):
    """The README quick start as a supervisor runs it: 16 records, none an error or invalid, exit 0."""
    jsonl = tmp_path / "samples.jsonl"
    r = cli("--source", str(REPO / "samples"), "--headless", "--quiet", "--threads", "1", "--output", str(jsonl),
            timeout=120)
    assert r.returncode == EXIT_OK, r.stderr
    recs = records(jsonl)
    assert len(recs) == 16 and all(r["error"] is None and r["label"] != "invalid" for r in recs)
    assert all(r["reason"] is None for r in recs) and "frames    16 (16 classified, 0 errors" in r.stderr
