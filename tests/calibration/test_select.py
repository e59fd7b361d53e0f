"""Calibration-set selection: stratified, deterministic, warns when small, preprocesses the runtime's way."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from calibration.select import (
    balanced_quotas,
    calibration_batches,
    load_calibration_array,
    select_calibration_set,
)
from runtime.contract import ModelMetadata
from runtime.preprocess import Preprocessor


def _dataset(root: Path, counts: dict[str, int], size: int = 20) -> Path:
    rng = np.random.default_rng(1)
    for c, n in counts.items():
        d = root / "train" / c
        d.mkdir(parents=True)
        for i in range(n):
            cv2.imwrite(str(d / f"{i:03d}.png"), rng.integers(0, 255, (size, size), dtype=np.uint8))
    return root


def test_quotas_are_balanced_and_capped() -> None:
    q = balanced_quotas({"a": 100, "b": 3, "c": 50}, 60)
    assert q["b"] == 3 and sum(q.values()) == 60 and abs(q["a"] - q["c"]) <= 1
    assert balanced_quotas({"a": 2, "b": 1}, 10) == {"a": 2, "b": 1}


def test_selection_is_stratified_deterministic_and_reports_counts(tmp_path: Path) -> None:
    root = _dataset(tmp_path, {"clean": 30, "cracks": 4, "other": 12})
    a = select_calibration_set(root, size=20, seed=3)
    b = select_calibration_set(root, size=20, seed=3)
    assert a.paths == b.paths and len(a) == 20
    assert a.per_class == {"clean": 8, "cracks": 4, "other": 8}
    assert all(p.parent.name == c for p, c in zip(a.paths, a.classes))
    assert "cracks=4/4" in a.summary()
    assert select_calibration_set(root, size=20, seed=4).paths != a.paths


def test_small_sets_warn_and_all_images_are_used(tmp_path: Path) -> None:
    root = _dataset(tmp_path, {"clean": 3, "other": 2})
    cset = select_calibration_set(root, size=512)
    assert len(cset) == 5
    assert any("only 5 images" in w for w in cset.warnings)
    assert any("small" in w for w in cset.warnings)


def test_flat_folder_and_errors(tmp_path: Path) -> None:
    (tmp_path / "flat").mkdir()
    for i in range(3):
        cv2.imwrite(str(tmp_path / "flat" / f"{i}.png"), np.full((16, 16), 10 * i, np.uint8))
    assert len(select_calibration_set(tmp_path / "flat", size=2)) == 2
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        select_calibration_set(tmp_path / "empty")
    with pytest.raises(FileNotFoundError):
        select_calibration_set(tmp_path / "missing")


def test_batches_match_runtime_preprocessing_and_skip_bad_files(tmp_path: Path) -> None:
    root = _dataset(tmp_path, {"clean": 5}, size=40)
    bad = root / "train" / "clean" / "zzz_bad.png"
    bad.write_bytes(b"not a png")
    meta = ModelMetadata(input_size=(32, 32))
    cset = select_calibration_set(root, size=10)
    skipped: list[str] = []
    batches = list(calibration_batches(cset, meta, batch_size=4, skipped=skipped))
    assert [len(b) for b in batches] == [4, 1]
    assert len(skipped) == 1 and "zzz_bad.png" in skipped[0]
    good = [p for p in cset.paths if p != bad]
    np.testing.assert_array_equal(batches[0][0], Preprocessor(meta)(good[0]))
    assert load_calibration_array(cset, meta).shape == (5, 3, 32, 32)
