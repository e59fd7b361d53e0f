"""Shared test fixtures: tiny synthetic datasets in the project's ``<class>/`` folder layout (numpy + cv2 only)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest

from runtime.contract import CLASSES


def write_class_images(folder: Path, class_index: int, n: int, size: int, rng: np.random.Generator) -> list[Path]:
    """``n`` grey PNGs whose stripe period and orientation depend on the class, plus noise (learnable, not trivial)."""
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    period = 3.0 + 1.5 * (class_index % 4)
    paths = []
    for i in range(n):
        coord = xx if class_index < 4 else yy
        img = 0.5 + 0.35 * np.sin(2 * np.pi * coord / period + rng.uniform(0, 2 * np.pi))
        img += rng.normal(0, 0.08, img.shape)
        arr = np.clip(img * 255, 0, 255).astype(np.uint8)
        p = folder / f"{class_index}_{i:03d}.png"
        cv2.imwrite(str(p), arr)
        paths.append(p)
    return paths


@pytest.fixture
def make_class_dataset() -> Callable[..., Path]:
    """Factory: ``make_class_dataset(root, per_class=3, size=32, splits=("train", "val"), classes=CLASSES, seed=0)``.

    Writes ``root/<split>/<class>/*.png`` (or ``root/<class>/`` when ``splits`` is empty) and returns ``root``.
    """

    def make(root: Path, per_class: int = 3, size: int = 32, splits: tuple[str, ...] = ("train", "val"),
             classes: tuple[str, ...] = CLASSES, seed: int = 0) -> Path:
        rng = np.random.default_rng(seed)
        for split in splits or ("",):
            for idx, name in enumerate(classes):
                write_class_images(root / split / name if split else root / name, idx, per_class, size, rng)
        return root

    return make


@pytest.fixture
def tiny_dataset(tmp_path: Path, make_class_dataset: Callable[..., Path]) -> Path:
    """``tmp_path/data/{train,val,test}/<class>/`` with 3 images of 32 px per class and split."""
    return make_class_dataset(tmp_path / "data", per_class=3, size=32, splits=("train", "val", "test"))
