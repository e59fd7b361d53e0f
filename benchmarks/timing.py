"""Timing that survives a noisy machine: interleaved rounds, robust statistics, paired ratios.

On a shared CPU a slow minute hits whichever configuration happens to be running. So configurations are run
interleaved (A B C, B C A, C A B, … one short block each per round, the start rotating) and every comparison is made
per round — the ratio of two configurations' medians within the same round — so a slow round slows both sides. The
spread of those per-round values is reported next to every number, and a comparison whose per-round range straddles
1.0 (or whose per-round medians disagree by more than ``max_spread``) is flagged as too noisy to conclude.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

#: Stage names in the order they happen; runners report the subset that applies to them, plus "total".
STAGES = ("decode", "preprocess", "h2d", "inference", "d2h", "postprocess")
TOTAL = "total"


def summarize(samples_ms: Sequence[float]) -> dict[str, float]:
    """median, p90, p99, min, max, mean (ms) and n of a list of per-iteration times."""
    a = np.asarray(samples_ms, np.float64)
    if a.size == 0:
        raise ValueError("no samples to summarize")
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"median_ms": float(p50), "p90_ms": float(p90), "p99_ms": float(p99), "min_ms": float(a.min()),
            "max_ms": float(a.max()), "mean_ms": float(a.mean()), "n": int(a.size)}


class Runner(Protocol):
    """One configuration. ``step()`` processes one batch and returns stage → milliseconds, including "total"."""

    def step(self) -> dict[str, float]: ...


@dataclass
class Samples:
    """Every timed iteration of one configuration, with the round it ran in."""

    stages: dict[str, list[float]] = field(default_factory=dict)
    rounds: list[int] = field(default_factory=list)

    def add(self, timings: dict[str, float], round_index: int) -> None:
        for k, v in timings.items():
            self.stages.setdefault(k, []).append(float(v))
        self.rounds.append(round_index)

    def round_medians(self, stage: str = TOTAL) -> list[float]:
        vals = np.asarray(self.stages[stage])
        rounds = np.asarray(self.rounds)
        return [float(np.median(vals[rounds == r])) for r in sorted(set(self.rounds))]


def run_interleaved(runners: Sequence[Runner], iters: int, warmup: int, rounds: int,
                    progress: Callable[[int], None] | None = None) -> list[Samples]:
    """Run every runner ``iters`` timed times in total, spread over ``rounds`` interleaved rounds.

    Each runner first gets ``warmup`` untimed steps. Within a round a runner runs one untimed step (its caches were
    just evicted by the others; a deployed process runs one model only) and then its block of timed steps.
    ``progress(n)`` is called after every timed block with the number of steps done.
    """
    rounds = max(1, min(rounds, iters))
    per_round = [iters // rounds + (1 if r < iters % rounds else 0) for r in range(rounds)]
    samples = [Samples() for _ in runners]
    for runner in runners:
        for _ in range(warmup):
            runner.step()
    n = len(runners)
    for r in range(rounds):
        for j in range(n):
            i = (r + j) % n  # rotate who goes first so no configuration always follows the same neighbour
            runners[i].step()
            for _ in range(per_round[r]):
                samples[i].add(runners[i].step(), r)
            if progress:
                progress(per_round[r])
    return samples


def spread(round_medians: Sequence[float]) -> dict[str, float]:
    """Min–max of per-round medians, absolute and relative to their median (``rel`` = (max − min) / median)."""
    a = np.asarray(round_medians, np.float64)
    med = float(np.median(a))
    return {"lo_ms": float(a.min()), "hi_ms": float(a.max()),
            "rel": float((a.max() - a.min()) / med) if med > 0 else math.inf}


def paired_ratio(a: Samples, b: Samples, stage_a: str = TOTAL, stage_b: str = TOTAL,
                 batch_scale: float = 1.0) -> dict[str, Any]:
    """Per-round ratio of ``a``'s median to ``b``'s median (``batch_scale`` multiplies ``b``).

    Returns the median ratio over rounds, its min–max, and ``conclusive``: False when the range straddles 1.0, i.e.
    within the noise the two could be equally fast.
    """
    ra, rb = a.round_medians(stage_a), b.round_medians(stage_b)
    common = min(len(ra), len(rb))
    if common == 0:
        raise ValueError("no common rounds")
    ratios = np.asarray(ra[:common]) / (np.asarray(rb[:common]) * batch_scale)
    lo, hi = float(ratios.min()), float(ratios.max())
    return {"ratio": float(np.median(ratios)), "lo": lo, "hi": hi, "rounds": int(common),
            "conclusive": bool(not (lo <= 1.0 <= hi)) if common > 1 else False}


class Stopwatch:
    """Accumulates named stage times for one step: ``with sw("preprocess"): ...``; ``sw.result()`` adds total."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}
        self._t0 = time.perf_counter()
        self._stage: str | None = None
        self._start = 0.0

    def __call__(self, stage: str) -> Stopwatch:
        self._stage = stage
        return self

    def __enter__(self) -> Stopwatch:
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._stage is not None
        self.times[self._stage] = self.times.get(self._stage, 0.0) + (time.perf_counter() - self._start) * 1e3

    def result(self) -> dict[str, float]:
        out = dict(self.times)
        out[TOTAL] = (time.perf_counter() - self._t0) * 1e3
        return out
