"""Drift alarm: is the station seeing what the model saw on validation data?

Training stores, in the model's metadata (``extra["val_stats"]``, :data:`VAL_STATS_KEY`), the rejection rate and
the mix of final labels the finished model gave on its validation split (:func:`val_stats`). At run time
:class:`DriftMonitor` keeps the last ``window`` classified frames (invalid frames and unreadable ones do not count:
they are about image quality, not about what is on the wafer) and compares:

- the rejection rate with the validation rate ``p0`` (measured on ``n0`` images): the alarm starts when it exceeds
  ``p0 + max(min_excess, z * sqrt(p0 (1 - p0) (1/n + 1/n0)))`` (a two-sample binomial limit: the window's noise and
  the reference's own; the floor keeps a model that rejects little on validation above its noise) and ends when it
  drops below ``p0 + off_fraction * excess``;
- the class mix with the validation mix, as the total-variation distance (half the L1 distance of the two label
  distributions; 0 = the same, 1 = disjoint): the alarm starts above ``mix_limit`` and ends below ``mix_clear``.

A new defect type shows up as more rejections (the open-set rejection working) and as a shift of the mix (the rest
of it classified as something). The gap between start and end limits (hysteresis) keeps one alarm from flickering.
Validation sets are often balanced while a station mostly sees ``clean``: then the mix check alarms at once; give
``learn=N`` (``--drift-learn N``) to take the station's own first N frames as the reference instead, or switch
the mix check off (``mix_limit=None``). A model without validation statistics needs ``learn``.

:attr:`DriftMonitor.state` (a :class:`DriftState`) is what metrics, the status line, the records and MQTT read.
"""

from __future__ import annotations

import math
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from runtime.contract import INVALID_LABEL

#: Key in :attr:`runtime.contract.ModelMetadata.extra` holding the validation statistics (:func:`val_stats`).
VAL_STATS_KEY = "val_stats"


def val_stats(final_labels: Sequence[int], rejected: Sequence[bool], labels: Sequence[str]) -> dict[str, Any]:
    """What the model did on validation data: ``{"n", "rejection_rate", "class_mix": {label: share}}``, from the
    final label index of each image (``other`` when rejected) and whether it was rejected."""
    n = len(final_labels)
    if n == 0 or len(rejected) != n:
        raise ValueError(f"need one final label and one rejected flag per image, got {n} and {len(rejected)}")
    counts = [0] * len(labels)
    for i in final_labels:
        counts[int(i)] += 1
    return {"n": n, "rejection_rate": round(sum(bool(r) for r in rejected) / n, 6),
            "class_mix": {lab: round(c / n, 6) for lab, c in zip(labels, counts, strict=True)}}


def val_stats_from_confusion(confusion: Sequence[Sequence[int]], rejected: int,
                             labels: Sequence[str]) -> dict[str, Any]:
    """:func:`val_stats` from a confusion matrix (true × final predicted, rejection on) and the rejected count."""
    cols = [sum(int(row[j]) for row in confusion) for j in range(len(labels))]
    n = sum(cols)
    if n == 0:
        raise ValueError("empty confusion matrix")
    return {"n": n, "rejection_rate": round(int(rejected) / n, 6),
            "class_mix": {lab: round(c / n, 6) for lab, c in zip(labels, cols, strict=True)}}


def parse_mix_limit(text: str) -> float | None:
    """``--drift-mix-limit``: a distance in (0, 1], or ``off`` (None)."""
    if str(text).strip().lower() == "off":
        return None
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"expected a distance between 0 and 1, or off; got {text!r}") from None
    if not 0 < value <= 1:
        raise ValueError(f"expected a distance between 0 and 1, or off; got {text!r}")
    return value


@dataclass
class DriftConfig:
    window: int = 500  # classified frames compared with the reference
    min_frames: int = 200  # no verdict before this many frames are in the window
    z: float = 4.0  # rejection rate: standard errors above the reference rate to start the alarm
    min_excess: float = 0.03  # ... and at least this much above it (absolute)
    off_fraction: float = 0.5  # the alarm ends below reference + this share of the start excess
    mix_limit: float | None = 0.25  # class mix: total-variation distance that starts the alarm (None: no mix check)
    mix_clear: float = 0.15  # ... and that ends it
    learn: int = 0  # take the first N classified frames of the run as the reference instead of the validation data

    def validate(self) -> DriftConfig:
        if self.window < 10 or not (1 <= self.min_frames <= self.window):
            raise ValueError(f"drift window must be >= 10 and min_frames in 1..window, got {self.window}, "
                             f"{self.min_frames}")
        if self.mix_limit is not None and not (0 < self.mix_clear <= self.mix_limit <= 1):
            raise ValueError(f"drift mix limits need 0 < clear <= limit <= 1, got {self.mix_clear}, {self.mix_limit}")
        if self.learn < 0 or (0 < self.learn < self.min_frames):
            raise ValueError(f"--drift-learn must be 0 or at least {self.min_frames} frames, got {self.learn}")
        return self


@dataclass
class DriftState:
    """The drift monitor now; what metrics and the status line read (``alarm`` is the one to alert on)."""

    alarm: bool = False
    ready: bool = False  # enough frames in the window for a verdict
    frames: int = 0  # classified frames seen
    window_frames: int = 0
    rejection_rate: float = 0.0
    rejection_reference: float = 0.0
    rejection_limit: float = 0.0
    mix_distance: float = 0.0
    mix_limit: float | None = None
    alarms_raised: int = 0
    reason: str = ""
    since: float | None = None  # unix time the current alarm started
    reference: str = "validation"  # or "learnt from the first N frames"
    window_mix: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("rejection_rate", "rejection_reference", "rejection_limit", "mix_distance"):
            d[k] = round(d[k], 5)
        d["window_mix"] = {k: round(v, 4) for k, v in self.window_mix.items()}
        return d


class DriftMonitor:
    """Rolling-window drift check against a reference (see the module docstring). :meth:`update` per
    prediction returns ``"raised"``/``"cleared"`` on a change of the alarm, else None."""

    def __init__(self, labels: Sequence[str], reference: Mapping[str, Any] | None,
                 config: DriftConfig | None = None) -> None:
        self.config = (config or DriftConfig()).validate()
        self.labels = list(labels)
        self._index = {lab: i for i, lab in enumerate(self.labels)}
        if reference is None and not self.config.learn:
            raise ValueError("no reference: the model has no validation statistics (extra.val_stats); "
                             "use --drift-learn N to learn the station's normal from its first N frames")
        self.state = DriftState(mix_limit=self.config.mix_limit)
        self.p0 = 0.0
        self.n0 = math.inf  # frames the reference was measured on
        self.mix0 = [0.0] * len(self.labels)
        if reference is not None and not self.config.learn:
            self._set_reference(float(reference["rejection_rate"]),
                                [float(reference.get("class_mix", {}).get(lab, 0.0)) for lab in self.labels],
                                float(reference.get("n") or math.inf))
        else:
            self.state.reference = f"learnt from the first {self.config.learn} frames"
        self._win: deque[tuple[int, bool]] = deque()
        self._counts = [0] * len(self.labels)
        self._rej = 0
        self._learning = bool(self.config.learn)
        self._rej_on = self._mix_on = False

    @classmethod
    def from_metadata(cls, meta: Any, config: DriftConfig | None = None) -> DriftMonitor:
        """A monitor for a model (its :class:`~runtime.contract.ModelMetadata`); ValueError when it has no
        validation statistics and ``config.learn`` is 0."""
        ref = (meta.extra or {}).get(VAL_STATS_KEY)
        return cls(meta.labels, ref if isinstance(ref, Mapping) and "rejection_rate" in ref else None, config)

    @property
    def has_reference(self) -> bool:
        return not self._learning

    def _set_reference(self, p0: float, mix: list[float], n0: float) -> None:
        self.n0 = n0 if n0 > 0 else math.inf
        total = sum(mix)
        self.p0 = min(max(p0, 0.0), 1.0)
        self.mix0 = [m / total for m in mix] if total > 0 else [1.0 / len(mix)] * len(mix)
        self.state.rejection_reference = self.p0

    def update(self, pred: Any, now: float | None = None) -> str | None:
        """Count one prediction (invalid and missing ones are ignored)."""
        if pred is None or pred.label == INVALID_LABEL:
            return None
        idx = self._index.get(pred.label)
        if idx is None:
            return None
        cfg, st = self.config, self.state
        rej = bool(pred.rejected)
        self._win.append((idx, rej))
        self._counts[idx] += 1
        self._rej += rej
        st.frames += 1
        if self._learning:
            if len(self._win) >= cfg.learn:  # the first N frames become the reference; the window starts afresh
                n = len(self._win)
                self._set_reference(self._rej / n, [c / n for c in self._counts], n)
                self._learning = False
                self._win.clear()
                self._counts = [0] * len(self.labels)
                self._rej = 0
            return None
        if len(self._win) > cfg.window:
            old, old_rej = self._win.popleft()
            self._counts[old] -= 1
            self._rej -= old_rej
        n = len(self._win)
        st.window_frames = n
        st.rejection_rate = self._rej / n
        st.mix_distance = 0.5 * sum(abs(c / n - m) for c, m in zip(self._counts, self.mix0, strict=True))
        excess = max(cfg.min_excess, cfg.z * math.sqrt(self.p0 * (1 - self.p0) * (1 / n + 1 / self.n0)))
        st.rejection_limit = self.p0 + excess
        st.ready = n >= cfg.min_frames
        if not st.ready:
            return None
        if self._rej_on:
            self._rej_on = st.rejection_rate >= self.p0 + cfg.off_fraction * excess
        else:
            self._rej_on = st.rejection_rate > st.rejection_limit
        if cfg.mix_limit is not None:
            self._mix_on = st.mix_distance >= cfg.mix_clear if self._mix_on else st.mix_distance > cfg.mix_limit
        was = st.alarm
        st.alarm = self._rej_on or self._mix_on
        st.reason = self._reason() if st.alarm else ""
        if st.alarm and not was:
            st.alarms_raised += 1
            st.since = time.time() if now is None else now
            st.window_mix = {lab: c / n for lab, c in zip(self.labels, self._counts, strict=True) if c}
            return "raised"
        if was and not st.alarm:
            st.since = None
            return "cleared"
        return None

    def _reason(self) -> str:
        st, parts = self.state, []
        if self._rej_on:
            parts.append(f"rejection rate {st.rejection_rate:.1%} over the last {st.window_frames} frames "
                         f"({st.reference} {self.p0:.1%}, limit {st.rejection_limit:.1%})")
        if self._mix_on:
            parts.append(f"class mix differs from {st.reference} (distance {st.mix_distance:.2f} > "
                         f"{self.config.mix_limit:.2f})")
        return "; ".join(parts)

    def status_text(self) -> str:
        st = self.state
        if self._learning:
            return f"drift learning {len(self._win)}/{self.config.learn}"
        if st.alarm:
            return (f"DRIFT ALARM (rejected {st.rejection_rate:.0%} > {st.rejection_limit:.0%}, "
                    f"mix {st.mix_distance:.2f})")
        return "drift ok" if st.ready else "drift -"


class DriftHook:
    """The drift monitor inside ``runtime.run``'s frame loop: counts each result before the outputs write it (so its
    record says ``"drift": "alarm"`` from the frame that raised it), says changes on stderr and publishes them to
    every MQTT output (``<topic>/drift``)."""

    def __init__(self, monitor: DriftMonitor, log: Callable[[str], None] | None = None) -> None:
        self.monitor = monitor
        self._log = log or (lambda m: print(f"[drift] {m}", file=sys.stderr, flush=True))

    @property
    def state(self) -> DriftState:
        return self.monitor.state

    def on_start(self, loop: Any) -> None:
        if loop is not None:
            loop.drift_state = self.state  # the one object metrics read (updated in place)
        ref = self.monitor.state.reference
        if self.monitor.has_reference:
            ref += f": rejection rate {self.monitor.p0:.1%}"
        self._log(f"watching rejection rate and class mix over {self.monitor.config.window} frames against {ref}")

    def before_write(self, loop: Any, feed: Any, result: Any) -> None:
        change = self.monitor.update(result.prediction)
        extra = getattr(result, "extra", None)
        if extra is not None and result.prediction is not None and self.monitor.has_reference:
            extra["drift"] = "alarm" if self.state.alarm else ("ok" if self.state.ready else None)
        if change:
            st = self.state
            text = f"ALARM: {st.reason}" if change == "raised" else "cleared: back within the limits"
            if loop is not None and getattr(loop, "status_line", None) is not None:
                loop.status_line.clear()
            self._log(text)
            event = {"event": "drift_" + change, "time": time.time(), **st.to_dict()}
            for o in getattr(loop, "outputs", []) or []:
                publish = getattr(o, "publish_drift", None)
                if publish is not None:
                    try:
                        publish(event)
                    except Exception as e:  # noqa: BLE001 - the output's own write reports a broken journal
                        self._log(f"cannot publish the drift event to {o.describe()}: {e}")

    def on_result(self, loop: Any, feed: Any, result: Any) -> None:
        pass

    def on_batch(self, loop: Any, size: int, infer_ms: float) -> None:
        pass

    def status(self, loop: Any) -> str:
        return self.monitor.status_text()

    def close(self) -> None:
        pass

    def on_close(self, loop: Any, summary: Any) -> None:
        st = self.state
        now = f"ALARM ({st.reason})" if st.alarm else ("ok" if st.ready else "no verdict (too few frames)")
        self._log(f"{st.alarms_raised} alarm(s) raised over {st.frames} classified frames; at the end: {now}")


__all__ = ["VAL_STATS_KEY", "parse_mix_limit", "val_stats", "val_stats_from_confusion", "DriftConfig", "DriftState",
           "DriftMonitor", "DriftHook"]
