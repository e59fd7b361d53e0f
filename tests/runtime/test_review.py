"""--review DIR: which frames are saved, what their JSON says, names that cannot escape DIR, the disk budget."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from runtime.classifier import Prediction
from runtime.contract import CLASSES
from runtime.outputs import FrameResult
from runtime.review import PENDING, ReviewQueue, pred_margin, safe_name, why_review
from runtime.sources import Frame


def pred(probs: list[float] | None = None, *, rejected: bool = False, invalid: str = "") -> Prediction:
    if invalid:
        return Prediction(label="invalid", index=-1, top_label="", top_index=-1, confidence=0.0,
                          probs=np.zeros(8, np.float32), logits=np.full(8, np.nan, np.float32), rejected=True,
                          score=float("nan"), reason=invalid)
    p = np.asarray(probs, np.float32)
    top = int(p.argmax())
    return Prediction(label="other" if rejected else CLASSES[top], index=7 if rejected else top,
                      top_label=CLASSES[top], top_index=top, confidence=float(p[top]), probs=p,
                      logits=np.log(p + 1e-9), rejected=rejected, score=float(p[top]))


def result(p: Prediction, source: str = "cam0", image: np.ndarray | None = None, i: int = 0) -> FrameResult:
    img = np.full((40, 50), 77, np.uint8) if image is None else image
    return FrameResult(Frame(image=img, index=i, source=source, timestamp=time.time()), p, None, 1.0)


CONFIDENT = [0.9, 0.02, 0.02, 0.02, 0.01, 0.01, 0.01, 0.01]
CLOSE = [0.45, 0.40, 0.05, 0.04, 0.03, 0.01, 0.01, 0.01]


def test_which_frames_go_to_review() -> None:
    assert why_review(pred(CONFIDENT)) is None
    assert why_review(pred(CONFIDENT, rejected=True)) == "rejected"
    assert why_review(pred(invalid="blank")) == "invalid"
    assert why_review(pred(CLOSE)) == "low_margin" and abs(pred_margin(pred(CLOSE)) - 0.05) < 1e-6
    assert why_review(pred(CLOSE), margin=0.0) is None  # margin 0 turns low-margin saving off
    assert why_review(None) is None  # unreadable frames: nothing to look at


def test_saved_frame_and_its_json(tmp_path: Path) -> None:
    q = ReviewQueue(tmp_path / "rq", labels=CLASSES, model="tiny.onnx", threshold=0.5, log=lambda m: None)
    img16 = (np.arange(40 * 50, dtype=np.uint16).reshape(40, 50) * 29)
    assert q.consider(result(pred(CLOSE), "rtsp://op:hunter2@10.0.0.7/line3", img16, i=12)) == "low_margin"
    assert q.consider(result(pred(CONFIDENT))) is None
    q.close()
    pngs = sorted((tmp_path / "rq" / PENDING).glob("*.png"))
    assert len(pngs) == 1 and q.saved == 1
    back = cv2.imread(str(pngs[0]), cv2.IMREAD_UNCHANGED)
    assert back.dtype == np.uint16 and np.array_equal(back, img16)  # lossless, 16 bit kept
    doc = json.loads(pngs[0].with_suffix(".json").read_text())
    assert doc["why"] == "low_margin" and doc["frame"] == 12 and doc["image"] == pngs[0].name
    assert [t["label"] for t in doc["top_k"]] == ["clean", "bridges", "gaps"] and doc["top_k"][0]["prob"] == 0.45
    assert set(doc["probs"]) == set(CLASSES) and doc["threshold"] == 0.5 and doc["model"] == "tiny.onnx"
    assert doc["source"] == "rtsp://***@10.0.0.7/line3"
    assert "hunter2" not in pngs[0].name and "hunter2" not in pngs[0].with_suffix(".json").read_text()


@pytest.mark.parametrize("source", ["../../../../etc/cron.d/x", "/abs/path/../../..", "..", "", "a\\..\\..\\b",
                                    "rtsp://u:p@h/../../x?y=../../z", "name with spaces\n/and\0nul",
                                    "\u00e9t\u00e9/\u2603.png", "." * 300, "x" * 5000])
def test_no_source_name_can_leave_the_folder(tmp_path: Path, source: str) -> None:
    root = tmp_path / "rq"
    q = ReviewQueue(root, labels=CLASSES, log=lambda m: None)
    q.consider(result(pred(CONFIDENT, rejected=True), source))
    q.close()
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {p.parent for p in files} <= {root, root / PENDING}
    saved = sorted((root / PENDING).iterdir())
    assert len(saved) == 2 and all(len(p.name) < 120 and not p.name.startswith(".") for p in saved)
    assert "/" not in safe_name(source) and "\\" not in safe_name(source) and ".." not in safe_name(source)[:2]


def test_disk_budget_drops_oldest_first_and_counts(tmp_path: Path) -> None:
    root = tmp_path / "rq"
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 255, (64, 64), np.uint8) for _ in range(12)]  # noise: ~4 kB PNG each
    one = len(cv2.imencode(".png", imgs[0])[1]) + 600
    q = ReviewQueue(root, budget_mb=5.5 * one / 1e6, labels=CLASSES, log=lambda m: None)
    for i, img in enumerate(imgs):
        q.consider(result(pred(CONFIDENT, rejected=True), f"cam{i}", img, i=i))
    q.close()
    pend = sorted((root / PENDING).glob("*.json"))
    frames = [json.loads(p.read_text())["frame"] for p in pend]
    assert q.dropped == 12 - len(pend) > 0 and frames == list(range(12 - len(pend), 12))  # the newest kept
    assert q.bytes <= q.budget and sum(p.stat().st_size for p in (root / PENDING).iterdir()) <= q.budget
    state = json.loads((root / "queue.json").read_text())
    assert state["dropped"] == q.dropped and "dropped" in q.summary_text()
    # the next run continues the numbering and the count, and respects what is already there
    q2 = ReviewQueue(root, budget_mb=5.5 * one / 1e6, labels=CLASSES, log=lambda m: None)
    q2.consider(result(pred(CONFIDENT, rejected=True), "cam99", imgs[0], i=99))
    q2.close()
    names = sorted(p.name for p in (root / PENDING).glob("*.png"))
    assert names[-1].startswith("00000013-") and q2.dropped_total == q.dropped + q2.dropped


def test_a_full_disk_costs_review_frames_not_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import runtime.review as review

    def full(path: os.PathLike[str], data: bytes) -> None:
        raise OSError(28, "No space left on device")

    logs: list[str] = []
    q = ReviewQueue(tmp_path / "rq", labels=CLASSES, log=logs.append)
    monkeypatch.setattr(review, "atomic_write_bytes", full)
    for i in range(3):
        q.consider(result(pred(CONFIDENT, rejected=True), i=i))
    q.close()
    assert q.failed == 3 and q.saved == 0 and len(logs) == 1 and "No space left" in logs[0]
    assert "could not be saved" in q.summary_text()


def test_run_with_review_saves_the_rejected_and_invalid_frames(clf, image_dir: Path, tmp_path: Path) -> None:
    """Through the CLI loop: the mid-grey image the tiny model rejects is saved with its JSON; confident ones are
    not; the corrupt one (no image) is not; names stay inside DIR."""
    import io

    from runtime.run import run

    err = io.StringIO()
    rq = tmp_path / "rq"
    summary = run(str(image_dir), classifier=clf, outputs=[], quiet=True, headless=True, err=err, review=str(rq),
                  review_margin=0.0)
    assert summary.frames == 6
    docs = [json.loads(p.read_text()) for p in sorted((rq / PENDING).glob("*.json"))]
    assert [d["why"] for d in docs] == ["rejected"] and docs[0]["source"].endswith("img3_mid.png")
    assert docs[0]["top_k"][0]["prob"] < 0.5 and (rq / PENDING / docs[0]["image"]).is_file()
    assert "[review] 1 frames saved" in err.getvalue()
    # a second run numbers on after the first (nothing overwritten)
    run(str(image_dir), classifier=clf, outputs=[], quiet=True, headless=True, err=err, review=str(rq),
        review_margin=0.2)
    assert len(list((rq / PENDING).glob("*.png"))) == 2


def test_review_folder_that_cannot_be_used_is_a_setup_error(tiny_model: Path, image_dir: Path,
                                                             tmp_path: Path) -> None:
    from runtime.run import main

    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["--source", str(image_dir), "--model", str(tiny_model), "--headless", "--review",
                 str(blocker / "rq")]) == 2
