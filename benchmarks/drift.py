"""``python -m benchmarks.drift``: how soon the drift alarm notices a new defect type, and how often it raises one
on a station where nothing changed.

Outcomes come from a real model on generated images: the bundled model (or ``--model``) classifies
``train.synthetic`` images of every class it knows, rendered with seeds its training never used. One set
(``--val-per-class``) stands in for the validation data: its rejection rate and final-label mix are the reference
(:func:`runtime.drift.val_stats`, what training stores in the metadata). A second set (``--pool-per-class``) and
``--novel`` images of a defect type the model never saw (a long arc scratch across a clean scene, drawn here) give
each class's outcomes (final label, rejected), from which streams are resampled frame by frame.

Streams: known classes uniform (as in the validation set); after ``--warmup`` frames the new type replaces a share
``r`` of the frames. Reported per ``r``: frames from its first appearance to the alarm (median, 90th percentile,
share detected within ``--max-delay``), and false alarms per hour on a stream without new defects at ``--fps``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

import sem_extras
from runtime.contract import CLASSES, INVALID_LABEL, REJECT_LABEL
from runtime.drift import VAL_STATS_KEY, DriftConfig, DriftMonitor, val_stats

NOVEL = "scratch (new)"


def scratch_image(rng: np.random.Generator, size: int) -> np.ndarray:
    """A defect type the model has not seen: a long shallow arc scratch (dark or bright) across a clean scene."""
    import cv2

    from train.synthetic import render_sample

    img, _ = render_sample("clean", rng, size)
    mask = np.zeros(img.shape[:2], np.float32)
    r = rng.uniform(1.2, 3.0) * size
    ang = rng.uniform(0, 2 * np.pi)
    centre = (int(size / 2 + r * np.cos(ang)), int(size / 2 + r * np.sin(ang)))
    cv2.circle(mask, centre, int(r), 1.0, int(rng.integers(2, 4)), lineType=cv2.LINE_AA)
    mask = cv2.GaussianBlur(mask, (0, 0), 0.8)
    depth = rng.uniform(40, 80) * rng.choice([-1, 1])
    return np.clip(img.astype(np.float32) + depth * mask, 0, 255).astype(np.uint8)


def outcomes(clf: Any, per_class: int, novel: int, seed: int, size: int, progress: bool) -> dict[str, np.ndarray]:
    """``{class: array of (final label index, rejected)}`` of the model on freshly rendered images."""
    from train.synthetic import render_sample

    jobs = [(c, i) for c in CLASSES for i in range(per_class)] + [(NOVEL, i) for i in range(novel)]
    bar = _bar(len(jobs), f"classifying (seed {seed})", progress)
    found: dict[str, list[tuple[int, bool]]] = {}
    for cls, i in jobs:
        rng = np.random.default_rng([seed, CLASSES.index(cls) if cls in CLASSES else 99, i])
        img = scratch_image(rng, size) if cls == NOVEL else render_sample(cls, rng, size)[0]
        p = clf.predict(img)
        # -1: refused by the frame-quality gate (the drift alarm ignores such frames, as at run time)
        idx = clf.labels.index(p.label) if p.label in clf.labels else -1
        found.setdefault(cls, []).append((idx, bool(p.rejected)))
        bar.update(1)
    bar.close()
    return {c: np.array(v, dtype=np.int64) for c, v in found.items()}


class _P:
    __slots__ = ("label", "rejected")

    def __init__(self, label: str, rejected: bool) -> None:
        self.label, self.rejected = label, rejected


def _pool(out: dict[str, np.ndarray], labels: Sequence[str]) -> dict[str, list[_P]]:
    return {c: [_P(labels[int(a)] if a >= 0 else INVALID_LABEL, bool(b)) for a, b in v] for c, v in out.items()}


def delay_trials(pool: dict[str, list[_P]], reference: dict[str, Any], labels: Sequence[str], cfg: DriftConfig,
                 rate: float, trials: int, warmup: int, max_delay: int, seed: int) -> dict[str, Any]:
    """Frames from the new type's first appearance to the alarm, over ``trials`` streams."""
    rng = np.random.default_rng(seed)
    known = [pool[c] for c in CLASSES]
    novel = pool[NOVEL]
    delays: list[float] = []
    early = 0
    for _ in range(trials):
        mon = DriftMonitor(labels, reference, cfg)
        cls = rng.integers(len(known), size=warmup)
        pick = rng.random(warmup)
        for c, u in zip(cls, pick, strict=True):
            pl = known[c]
            if mon.update(pl[int(u * len(pl))]) == "raised":
                early += 1  # a false alarm before the new type appeared (counted, then the trial goes on)
        cls = rng.integers(len(known), size=max_delay)
        pick = rng.random(max_delay)
        new = rng.random(max_delay) < rate
        found = math.inf
        for k in range(max_delay):
            pl = novel if new[k] else known[cls[k]]
            mon.update(pl[int(pick[k] * len(pl))])
            if mon.state.alarm:
                found = k + 1
                break
        delays.append(found)
    d = np.array(delays)
    hit = np.isfinite(d)
    return {"rate": rate, "trials": trials, "detected": float(hit.mean()),
            "median_frames": float(np.median(d)) if hit.mean() >= 0.5 else None,
            "p90_frames": float(np.percentile(d, 90)) if hit.mean() >= 0.9 else None,
            "min_frames": float(d[hit].min()) if hit.any() else None, "alarms_before_onset": early,
            "delays": [x if math.isfinite(x) else None for x in delays]}


def false_alarms(pool: dict[str, list[_P]], reference: dict[str, Any], labels: Sequence[str], cfg: DriftConfig,
                 hours: float, fps: float, seed: int, progress: bool) -> dict[str, Any]:
    """Alarms raised on a stream of known classes only (``hours`` at ``fps``)."""
    rng = np.random.default_rng(seed)
    known = [pool[c] for c in CLASSES]
    n = int(hours * 3600 * fps)
    mon = DriftMonitor(labels, reference, cfg)
    raised = 0
    alarm_frames = 0
    chunk = 100_000
    bar = _bar(n, "no-drift stream", progress)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        cls = rng.integers(len(known), size=m)
        pick = rng.random(m)
        for c, u in zip(cls, pick, strict=True):
            pl = known[c]
            raised += mon.update(pl[int(u * len(pl))]) == "raised"
            alarm_frames += mon.state.alarm
        bar.update(m)
    bar.close()
    return {"hours": hours, "fps": fps, "frames": n, "alarms": raised, "per_hour": raised / hours,
            "time_in_alarm": alarm_frames / n}


def _bar(total: int, desc: str, enabled: bool) -> Any:
    try:
        from tqdm import tqdm
    except ModuleNotFoundError:
        enabled = False
    if not enabled:
        class _Nop:
            def update(self, n: int) -> None:
                pass

            def close(self) -> None:
                pass
        return _Nop()
    return tqdm(total=total, desc=desc, unit="f", leave=False, file=sys.stderr)


def table(result: dict[str, Any]) -> str:
    cfg = result["config"]
    lines = [f"| new type in | detected within {result['max_delay']} frames | frames to alarm: median | p90 |",
             "|---|---|---|---|"]
    for r in result["delay"]:
        med = "-" if r["median_frames"] is None else f"{r['median_frames']:.0f}"
        p90 = "-" if r["p90_frames"] is None else f"{r['p90_frames']:.0f}"
        lines.append(f"| {r['rate']:.0%} of frames | {r['detected']:.0%} | {med} | {p90} |")
    fa = result["false_alarms"]
    lines.append("")
    lines.append(f"False alarms without new defects: {fa['alarms']} in {fa['hours']:g} h at {fa['fps']:g} fps "
                 f"({fa['frames']} frames) = {fa['per_hour']:.2f} per hour; in alarm {fa['time_in_alarm']:.2%} of "
                 f"the time. Window {cfg['window']} frames, z {cfg['z']}, min excess {cfg['min_excess']}, mix limit "
                 f"{cfg['mix_limit']}.")
    ref = result["reference"]
    nov = result["novel_outcomes"]
    lines.append(f"Reference ({result['reference_from']}, {ref['n']} images): rejection rate "
                 f"{ref['rejection_rate']:.1%}. "
                 f"The new type: {nov['rejected']:.0%} rejected, the rest called "
                 + ", ".join(f"{k} {v:.0%}" for k, v in nov["labels"].items()) + ".")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    data = [[x for x in r["delays"] if x is not None] for r in result["delay"]]
    ax.boxplot(data, tick_labels=[f"{r['rate']:.0%}" for r in result["delay"]], whis=(5, 95), showfliers=False)
    ax.set_xlabel("share of frames showing the new defect type")
    ax.set_ylabel("frames until the drift alarm")
    ax.set_title(f"Drift alarm delay ({result['config']['window']}-frame window)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.drift", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="ONNX model (default: the bundled model)")
    p.add_argument("--size", type=int, default=128, help="rendered image side (the bundled model was trained on 128)")
    p.add_argument("--val-per-class", type=int, default=100, help="reference images per class (default 100)")
    p.add_argument("--pool-per-class", type=int, default=100, help="stream images per class (default 100)")
    p.add_argument("--novel", type=int, default=150, help="images of the new defect type (default 150)")
    p.add_argument("--rates", default="0.05,0.1,0.2", help="shares of frames showing the new type")
    p.add_argument("--trials", type=int, default=200, help="streams per rate (default 200)")
    p.add_argument("--warmup", type=int, default=1000, help="normal frames before the new type appears")
    p.add_argument("--max-delay", type=int, default=20000, help="frames after onset before giving up")
    p.add_argument("--hours", type=float, default=10.0, help="length of the no-drift stream (default 10)")
    p.add_argument("--fps", type=float, default=30.0, help="frame rate for false alarms per hour (default 30)")
    p.add_argument("--window", type=int, default=500, help="drift window (runtime.run --drift-window)")
    p.add_argument("--mix-limit", default="0.25", help="class-mix limit or off (runtime.run --drift-mix-limit)")
    p.add_argument("--z", type=float, default=4.0, help="rejection-rate limit in standard errors (DriftConfig.z)")
    p.add_argument("--min-excess", type=float, default=0.03, help="rejection-rate limit floor (DriftConfig.min_excess)")
    p.add_argument("--outcomes", metavar="JSON", help="reuse the model outcomes an earlier run saved (outcomes.json): "
                   "compare alarm settings without classifying again")
    p.add_argument("--reference", choices=("sample", "model"), default="sample",
                   help="the alarm's reference: the rendered validation stand-in (default), or the model's own "
                   "extra.val_stats as runtime.run uses it")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/drift", help="folder for result.json, table.md and delay.png")
    p.add_argument("--no-progress", action="store_true")
    return p


class NoReferenceError(ValueError):
    """The model's metadata holds no validation statistics to use as the alarm's reference."""


def drift_config(window: int, mix_limit: str, z: float, min_excess: float) -> DriftConfig:
    """The alarm settings as ``runtime.run`` makes them from its ``--drift-*`` flags (``mix_limit`` may be off)."""
    mix = None if mix_limit.lower() == "off" else float(mix_limit)
    return DriftConfig(window=window, min_frames=min(200, window), mix_limit=mix,
                       mix_clear=0.6 * mix if mix else 0.15, z=z, min_excess=min_excess).validate()


def load_or_classify(clf: Any, out: Path, saved: str | None, *, val_per_class: int, pool_per_class: int, novel: int,
                     seed: int, size: int, progress: bool) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(validation, stream) outcomes per class: read from ``saved`` (an earlier ``outcomes.json``), or classified
    now and saved to ``out/outcomes.json``."""
    if saved:
        doc = json.loads(Path(saved).read_text())
        return ({c: np.array(v, dtype=np.int64) for c, v in doc["val"].items()},
                {c: np.array(v, dtype=np.int64) for c, v in doc["stream"].items()})
    val = outcomes(clf, val_per_class, 0, 1000 + seed, size, progress)
    stream_out = outcomes(clf, pool_per_class, novel, 2000 + seed, size, progress)
    (out / "outcomes.json").write_text(json.dumps({
        "model": clf.describe(), "val": {c: v.tolist() for c, v in val.items()},
        "stream": {c: v.tolist() for c, v in stream_out.items()}}) + "\n")
    return val, stream_out


def novel_outcomes(nov: np.ndarray, labels: Sequence[str]) -> dict[str, Any]:
    """How the model answered the new defect type: rejected, invalid, and the share of each label it gave."""
    labels_nov = {labels[int(i)] if i >= 0 else INVALID_LABEL: float(np.mean((nov[:, 0] == i) & (nov[:, 1] == 0)))
                  for i in np.unique(nov[:, 0])}
    return {"rejected": float(np.mean((nov[:, 1] == 1) & (nov[:, 0] >= 0))),
            "invalid": float(np.mean(nov[:, 0] < 0)),
            "labels": {k: v for k, v in sorted(labels_nov.items(), key=lambda kv: -kv[1]) if v > 0}}


def alarm_study(clf: Any, val: dict[str, np.ndarray], stream_out: dict[str, np.ndarray], cfg: DriftConfig, *,
                reference_from: str = "sample", rates: Sequence[float] = (0.05, 0.1, 0.2), trials: int = 200,
                warmup: int = 1000, max_delay: int = 20000, hours: float = 10.0, fps: float = 30.0, seed: int = 0,
                progress: bool = True) -> dict[str, Any]:
    """Alarm delays per rate of the new type and false alarms per hour, from the per-class outcomes; the
    reference is the validation stand-in (``sample``) or the model's ``extra.val_stats`` (``model``)."""
    finals = np.concatenate([val[c][:, 0] for c in CLASSES])
    rejected = np.concatenate([val[c][:, 1] for c in CLASSES]).astype(bool)
    valid = finals >= 0
    reference = val_stats(finals[valid].tolist(), rejected[valid].tolist(), clf.labels)
    if reference_from == "model":
        reference = (clf.meta.extra or {}).get(VAL_STATS_KEY)
        if not reference:
            raise NoReferenceError(f"{clf.describe()}: no extra.{VAL_STATS_KEY} in its metadata")
    pool = _pool(stream_out, clf.labels)
    delay = [delay_trials(pool, reference, clf.labels, cfg, r, trials, warmup, max_delay, seed + k)
             for k, r in enumerate(rates)]
    fa = false_alarms(pool, reference, clf.labels, cfg, hours, fps, seed + 99, progress)
    return {"config": asdict(cfg), "reference": reference,
            "reference_from": "the model's extra.val_stats" if reference_from == "model" else "validation stand-in",
            "novel_outcomes": novel_outcomes(stream_out[NOVEL], clf.labels),
            "pool_rejection_rate": float(np.mean([np.mean(stream_out[c][:, 1]) for c in CLASSES])),
            "invalid": {"reference": int((~valid).sum()),
                        "stream": {c: int((v[:, 0] < 0).sum()) for c, v in stream_out.items()}},
            "max_delay": max_delay, "delay": delay, "false_alarms": fa}


def write_report(result: dict[str, Any], out: Path) -> str:
    """``result.json``, ``table.md`` and ``delay.png`` under ``out``; returns the table."""
    (out / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    text = table(result)
    (out / "table.md").write_text(text + "\n")
    plot(result, out / "delay.png")
    return text


@sem_extras.cli("benchmarks.drift")
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import train.synthetic  # noqa: F401 - fail early (train extra) before classifying anything
    from runtime import Classifier

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = drift_config(args.window, args.mix_limit, args.z, args.min_excess)
    clf = Classifier(args.model, threads=1)
    t0 = time.perf_counter()
    val, stream_out = load_or_classify(clf, out, args.outcomes, val_per_class=args.val_per_class,
                                       pool_per_class=args.pool_per_class, novel=args.novel, seed=args.seed,
                                       size=args.size, progress=not args.no_progress)
    try:
        study = alarm_study(clf, val, stream_out, cfg, reference_from=args.reference,
                            rates=[float(r) for r in args.rates.split(",")], trials=args.trials, warmup=args.warmup,
                            max_delay=args.max_delay, hours=args.hours, fps=args.fps, seed=args.seed,
                            progress=not args.no_progress)
    except NoReferenceError as e:
        print(e, file=sys.stderr)
        return 2
    result = {"model": clf.describe(), "command": "python -m benchmarks.drift " + " ".join(argv or sys.argv[1:]),
              **study, "elapsed_s": round(time.perf_counter() - t0, 1), "reject_label": REJECT_LABEL}
    text = write_report(result, out)
    print(text)
    print(f"\n{out / 'result.json'}, {out / 'table.md'}, {out / 'delay.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
