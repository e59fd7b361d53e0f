"""Choose the calibration images: stratified per class, deterministic, and preprocessed the runtime's way.

A dataset root with ``train/`` uses ``train/<class>/``; a folder of class folders uses those; a flat folder of
images (``--calib-data``) is one unlabelled stratum. Quotas are balanced across classes (a rare class gets as many
images as a common one, up to what it has; what a small class cannot use goes to the others), because activation
ranges must cover every class the model will see, not just the common ones. The order within a class comes from a
seeded shuffle of the sorted file list, so the same data and seed always give the same set.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from runtime.contract import ModelMetadata
from runtime.errors import InputError
from runtime.folders import list_images, scan_class_folders
from runtime.preprocess import Preprocessor
from runtime.sources import IMAGE_SUFFIXES

log = logging.getLogger(__name__)

DEFAULT_SIZE = 512
#: Below this many images INT8 ranges get noisy (a single odd image moves a min/max range).
SMALL_SET = 128
#: A class with fewer images than this may be poorly covered by the ranges.
SMALL_CLASS = 8
UNLABELLED = "<unlabelled>"


@dataclass(frozen=True)
class CalibrationSet:
    """The chosen images, with the class each came from and the per-class counts."""

    paths: tuple[Path, ...]
    classes: tuple[str, ...]
    per_class: dict[str, int]
    available: dict[str, int]
    source: Path
    warnings: tuple[str, ...] = field(default_factory=tuple)

    def __len__(self) -> int:
        return len(self.paths)

    def summary(self) -> str:
        counts = ", ".join(f"{c}={self.per_class[c]}/{self.available[c]}" for c in self.per_class)
        return f"calibration set: {len(self)} images from {self.source} ({counts})"


def find_strata(data_dir: str | os.PathLike[str]) -> tuple[Path, dict[str, list[Path]]]:
    """Return (the folder used, {class: sorted image paths}). Raises ``FileNotFoundError``/``ValueError``."""
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: calibration data folder does not exist")
    base = root / "train" if (root / "train").is_dir() else root
    strata: dict[str, list[Path]] = {}
    for path, name in scan_class_folders(base, allow_empty=True):
        strata.setdefault(name, []).append(path)
    flat = list_images(base)
    if flat:
        strata[UNLABELLED if not strata else f"{UNLABELLED}({base.name})"] = flat
    if not strata:
        raise ValueError(f"{base}: no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))} directly in it "
                         "and in its class folders)")
    return base, strata


def balanced_quotas(available: dict[str, int], total: int) -> dict[str, int]:
    """Split ``total`` as evenly as possible over classes, never asking a class for more than it has."""
    quotas = {c: 0 for c in available}
    remaining = min(total, sum(available.values()))
    # Water-filling: the smallest classes take all they have, the rest split what is left evenly.
    order = sorted(available, key=lambda c: (available[c], c))
    for i, c in enumerate(order):
        left = len(order) - i
        share = remaining // left + (1 if remaining % left else 0)
        quotas[c] = min(available[c], share)
        remaining -= quotas[c]
    return quotas


def select_calibration_set(data_dir: str | os.PathLike[str], size: int = DEFAULT_SIZE, seed: int = 0,
                           classes: Sequence[str] | None = None, warn: bool = True) -> CalibrationSet:
    """Pick up to ``size`` images from ``data_dir``, balanced over classes, deterministically.

    ``classes`` restricts the strata to those class folders (e.g. the model's labels); unknown folders are then
    skipped with a warning. Warnings go to the log unless ``warn=False``; they are always in ``.warnings``.
    """
    if size < 1:
        raise ValueError(f"calibration set size must be at least 1, got {size}")
    base, strata = find_strata(data_dir)
    warnings: list[str] = []
    if classes is not None:
        wanted = set(classes)
        skipped = sorted(c for c in strata if c not in wanted and not c.startswith(UNLABELLED))
        if skipped:
            warnings.append(f"{base}: ignoring folders that are not model classes: {', '.join(skipped)}")
        strata = {c: v for c, v in strata.items() if c in wanted or c.startswith(UNLABELLED)}
        if not strata:
            raise ValueError(f"{base}: none of the folders are model classes ({', '.join(classes)})")
    available = {c: len(v) for c, v in strata.items()}
    quotas = balanced_quotas(available, size)
    rng = np.random.default_rng(seed)
    paths: list[Path] = []
    labels: list[str] = []
    for c, files in strata.items():
        order = rng.permutation(len(files))
        chosen = sorted(files[i] for i in order[: quotas[c]])
        paths += chosen
        labels += [c] * len(chosen)
    if len(paths) < size:
        warnings.append(f"{base}: only {len(paths)} images available (asked for {size}); using all of them")
    if len(paths) < SMALL_SET:
        warnings.append(f"calibration set is small ({len(paths)} images < {SMALL_SET}): INT8 ranges may be noisy; "
                        "check the accuracy gate")
    thin = [f"{c} ({quotas[c]})" for c in strata if quotas[c] < SMALL_CLASS]
    if thin:
        warnings.append(f"classes with fewer than {SMALL_CLASS} calibration images: {', '.join(thin)}")
    if classes is not None:
        missing = [c for c in classes if c not in strata]
        if missing and not any(c.startswith(UNLABELLED) for c in strata):
            warnings.append(f"{base}: no calibration images for class(es) {', '.join(missing)}")
    for w in warnings if warn else ():
        log.warning(w)
    return CalibrationSet(tuple(paths), tuple(labels), dict(quotas), available, base, tuple(warnings))


def calibration_batches(cset: CalibrationSet | Sequence[str | os.PathLike[str]], meta: ModelMetadata,
                        batch_size: int = 16, skipped: list[str] | None = None) -> Iterator[np.ndarray]:
    """Yield ``(N, C, H, W)`` float32 batches preprocessed exactly as the runtime does.

    Unreadable or invalid images are skipped; a message naming each goes to the log and to ``skipped``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    paths = cset.paths if isinstance(cset, CalibrationSet) else tuple(Path(p) for p in cset)
    pre = Preprocessor(meta)
    h, w = meta.input_size
    buf = np.empty((batch_size, meta.channels, h, w), np.float32)
    n = 0
    for p in paths:
        try:
            pre(p, out=buf[n])
        except (InputError, OSError) as e:
            msg = f"skipping calibration image: {e}"
            log.warning(msg)
            if skipped is not None:
                skipped.append(msg)
            continue
        n += 1
        if n == batch_size:
            yield buf.copy()
            n = 0
    if n:
        yield buf[:n].copy()


def load_calibration_array(cset: CalibrationSet | Sequence[str | os.PathLike[str]], meta: ModelMetadata,
                           skipped: list[str] | None = None) -> np.ndarray:
    """All calibration images as one ``(N, C, H, W)`` float32 array (512 × 3 × 224² is ~300 MB)."""
    batches = list(calibration_batches(cset, meta, 64, skipped))
    if not batches:
        raise ValueError("no usable calibration images (every image failed to load; see the log)")
    return np.concatenate(batches)
