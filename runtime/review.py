"""``--review DIR``: the frames a person should look at, saved for review: rejected to ``other``, refused as invalid
by the frame-quality gate, or classified with a low margin between the two most likely classes.

Each becomes ``DIR/pending/<name>.png`` (the decoded frame, lossless, 8 or 16 bit) and ``<name>.json`` (why, label,
top-k with probabilities, every class's probability, score and threshold, source, frame, time, model). Names are
built here from a running number, the time, the reason and a cleaned, shortened form of the source's name plus a
hash of it: nothing from a source name can leave ``DIR`` or collide. The queue keeps to a disk budget: when full,
the oldest pending frames are deleted first and counted (``DIR/queue.json`` keeps the counts across runs).
Saving runs in its own thread so the frame loop never waits for the disk; frames that arrive while it is behind
by more than a few dozen are skipped and counted.

A person sorts frames by moving each ``.png`` (its ``.json`` may go along) from ``pending/`` into
``DIR/<class>/`` (a class of the model, or a new one); ``python -m train.review --queue DIR --data DATASET`` then
moves the sorted images into the training set.
"""

from __future__ import annotations

import json
import math
import os
import queue
import re
import sys
import threading
from collections import deque
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from runtime.contract import INVALID_LABEL
from runtime.files import atomic_write_bytes, atomic_write_text, sha256_bytes
from runtime.frameloop import LoopHook

PENDING = "pending"
STATE_FILE = "queue.json"
WHY = ("rejected", "invalid", "low_margin")
DEFAULT_BUDGET_MB = 1024.0
DEFAULT_MARGIN = 0.10
TOP_K = 3
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def why_review(pred: Any, margin: float = DEFAULT_MARGIN) -> str | None:
    """Why this prediction goes to review (``rejected``, ``invalid``, ``low_margin``), or None."""
    if pred is None:
        return None  # unreadable: no image to look at (the error record says what happened)
    if pred.label == INVALID_LABEL:
        return "invalid"
    if pred.rejected:
        return "rejected"
    if margin > 0 and pred_margin(pred) < margin:
        return "low_margin"
    return None


def pred_margin(pred: Any) -> float:
    """Top-1 minus top-2 calibrated probability (1.0 when there are no probabilities)."""
    probs = np.asarray(getattr(pred, "probs", None) if getattr(pred, "probs", None) is not None else [], np.float64)
    if probs.size < 2 or not np.isfinite(probs).all():
        return 1.0
    two = np.partition(probs, -2)[-2:]
    return float(two[1] - two[0])


def safe_name(source: str, limit: int = 32) -> str:
    """A file-name fragment for ``source``: its last path part, cleaned to ``[A-Za-z0-9._-]``, shortened, never
    starting with a dot, plus 8 hex of a hash of the whole source (two sources never share a name)."""
    from runtime.sources import redact

    shown = redact(source)
    last = re.split(r"[\\/]+", shown.rstrip("/\\"))[-1] if shown else ""
    slug = _SAFE.sub("_", last).strip("._-")[:limit] or "src"
    return f"{slug}-{sha256_bytes(str(source).encode('utf-8', 'surrogateescape'))[:8]}"


def encode_png(image: np.ndarray) -> bytes:
    """The frame as PNG: 8- and 16-bit grey/BGR as they are (lossless), other types as 8-bit."""
    img = image
    if img.dtype not in (np.uint8, np.uint16):
        from runtime.outputs import to_bgr8

        img = to_bgr8(img)
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(img))
    if not ok:
        raise ValueError(f"cannot encode a {img.dtype} {img.shape} frame as PNG")
    return buf.tobytes()


class ReviewQueue(LoopHook):
    """Saves frames for review into ``folder`` (see the module docstring); also a frame-loop hook
    (``on_result``/``status``/``on_close``) for :mod:`runtime.run`."""

    def __init__(self, folder: str | os.PathLike[str], *, budget_mb: float = DEFAULT_BUDGET_MB,
                 margin: float = DEFAULT_MARGIN, labels: Sequence[str] | None = None, model: str = "",
                 threshold: float | None = None, backlog: int = 64,
                 log: Callable[[str], None] | None = None) -> None:
        self.folder = Path(folder)
        self.pending_dir = self.folder / PENDING
        try:
            self.pending_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OSError(e.errno, f"--review {self.folder}: cannot create {self.pending_dir}: {e.strerror}") from None
        if not os.access(self.pending_dir, os.W_OK):
            raise PermissionError(f"--review {self.folder}: {self.pending_dir} is not writable")
        self.budget = int(budget_mb * 1e6)
        if self.budget <= 0:
            raise ValueError(f"--review-budget must be positive, got {budget_mb} MB")
        self.margin = float(margin)
        self.labels = list(labels) if labels is not None else None
        self.model, self.threshold = model, threshold
        self._log = log or (lambda m: print(f"[review] {m}", file=sys.stderr, flush=True))
        state = self._read_state()
        self.seq = int(state.get("next", 1))
        self.dropped_total = int(state.get("dropped", 0))  # across runs
        self.saved = self.dropped = self.skipped = self.failed = 0  # this run
        self.by_why: dict[str, int] = dict.fromkeys(WHY, 0)
        self._items: deque[tuple[str, int]] = deque()  # (stem, bytes) oldest first
        self.bytes = 0
        for png in sorted(self.pending_dir.glob("*.png")):
            size = png.stat().st_size + _size(png.with_suffix(".json"))
            self._items.append((png.stem, size))
            self.bytes += size
            try:
                self.seq = max(self.seq, int(png.stem.split("-", 1)[0]) + 1)
            except ValueError:
                pass
        self._q: queue.Queue[tuple[int, str, Any, dict[str, Any]] | None] = queue.Queue(maxsize=backlog)
        self.last_error: str | None = None
        self._thread = threading.Thread(target=self._work, name="review-writer", daemon=True)
        self._thread.start()

    # -- state
    def _read_state(self) -> dict[str, Any]:
        try:
            d = json.loads((self.folder / STATE_FILE).read_text())
            return d if isinstance(d, dict) else {}
        except (OSError, ValueError):
            return {}

    def _write_state(self) -> None:
        atomic_write_text(self.folder / STATE_FILE, json.dumps(
            {"next": self.seq, "dropped": self.dropped_total, "pending_bytes": self.bytes,
             "budget_bytes": self.budget}, indent=1) + "\n")

    # -- adding
    def consider(self, result: Any) -> str | None:
        """Queue ``result`` (a :class:`~runtime.outputs.FrameResult`) for saving if it needs review; returns why
        (or None). Never blocks: when the writer is behind, the frame is skipped and counted."""
        pred = result.prediction
        why = why_review(pred, self.margin)
        if why is None:
            return None
        image = result.frame.image
        if image is None:
            self.skipped += 1
            return None
        doc = self._describe(result, why)
        seq = self.seq
        self.seq += 1
        try:
            self._q.put_nowait((seq, why, image, doc))
        except queue.Full:
            self.skipped += 1
            return None
        self.by_why[why] += 1
        return why

    def _describe(self, result: Any, why: str) -> dict[str, Any]:
        from runtime.sources import redact

        p, f = result.prediction, result.frame
        probs = np.asarray(p.probs, np.float64) if p.probs is not None else np.zeros(0)
        labels = self.labels or [str(i) for i in range(len(probs))]
        order = np.argsort(-probs)[:TOP_K] if probs.size and np.isfinite(probs).all() else []
        ts = f.timestamp
        return {
            "why": why, "source": redact(f.source), "frame": f.index,
            "time": datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds"), "unix_time": round(ts, 3),
            "label": p.label, "top_label": p.top_label or None, "reason": p.reason or None,
            "confidence": round(float(p.confidence), 6), "score": _num(p.score), "threshold": self.threshold,
            "margin": round(pred_margin(p), 6) if why != "invalid" else None,
            "top_k": [{"label": labels[i], "prob": round(float(probs[i]), 6)} for i in order],
            "probs": ({labels[i]: round(float(v), 6) for i, v in enumerate(probs)}
                      if why != "invalid" and probs.size == len(labels) else {}),
            "model": self.model,
        }

    # -- the writer thread
    def _work(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            seq, why, image, doc = item
            try:
                self._save(seq, why, image, doc)
            except Exception as e:  # noqa: BLE001 - a full disk costs review frames, never the run
                self.failed += 1
                if self.last_error is None:
                    self._log(f"cannot save a frame for review in {self.pending_dir}: {type(e).__name__}: {e} "
                              "(the run goes on; further failures are counted)")
                self.last_error = f"{type(e).__name__}: {e}"

    def _save(self, seq: int, why: str, image: np.ndarray, doc: dict[str, Any]) -> None:
        stamp = datetime.fromtimestamp(doc["unix_time"], UTC).strftime("%Y%m%dT%H%M%S")
        stem = f"{seq:08d}-{stamp}-{why}-{safe_name(doc['source'])}"
        png = encode_png(image)
        doc = {**doc, "image": f"{stem}.png"}
        meta = (json.dumps(doc, indent=1, ensure_ascii=False) + "\n").encode()
        size = len(png) + len(meta)
        while self._items and self.bytes + size > self.budget:
            self._drop_oldest()
        if size > self.budget:
            raise ValueError(f"one frame ({size} bytes) is larger than the whole review budget")
        atomic_write_bytes(self.pending_dir / f"{stem}.png", png)
        atomic_write_bytes(self.pending_dir / f"{stem}.json", meta)
        self._items.append((stem, size))
        self.bytes += size
        self.saved += 1
        if self.saved % 20 == 1:
            self._write_state()

    def _drop_oldest(self) -> None:
        stem, size = self._items.popleft()
        for suffix in (".png", ".json"):
            (self.pending_dir / f"{stem}{suffix}").unlink(missing_ok=True)  # a person may have sorted it already
        self.bytes -= size
        self.dropped += 1
        self.dropped_total += 1

    def close(self, timeout: float = 30.0) -> None:
        """Save what is queued (up to ``timeout`` s), then write the counts."""
        try:
            self._q.put(None, timeout=timeout)
        except queue.Full:
            pass
        self._thread.join(timeout)
        self._write_state()

    # -- runtime.frameloop.LoopHook
    def on_result(self, loop: Any, feed: Any, result: Any) -> None:
        self.consider(result)

    def status(self, loop: Any) -> str:
        queued = sum(self.by_why.values())
        return f"review {queued}" + (f" (dropped {self.dropped})" if self.dropped else "")

    def on_close(self, loop: Any, summary: Any) -> None:
        self.close()
        self._log(self.summary_text())

    def summary_text(self) -> str:
        whys = ", ".join(f"{k} {v}" for k, v in self.by_why.items() if v) or "none"
        text = (f"{self.saved} frames saved to {self.pending_dir} ({whys}); {self.bytes / 1e6:.1f} of "
                f"{self.budget / 1e6:.0f} MB used")
        if self.dropped:
            text += f"; {self.dropped} oldest dropped to stay within the budget ({self.dropped_total} in all)"
        if self.skipped:
            text += f"; {self.skipped} skipped (no image, or the writer was behind)"
        if self.failed:
            text += f"; {self.failed} could not be saved: {self.last_error}"
        return text


def _size(p: Path) -> int:
    try:
        return p.stat().st_size
    except OSError:
        return 0


def _num(v: float) -> float | None:
    v = float(v)
    return round(v, 6) if math.isfinite(v) else None


__all__ = ["ReviewQueue", "why_review", "pred_margin", "safe_name", "encode_png", "PENDING", "WHY"]
