"""Class-folder datasets: bad folders/files reported and skipped, train/serve parity, reproducible augmentation."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from runtime.contract import CLASSES, ModelMetadata
from runtime.preprocess import Preprocessor
from train.data import (
    AugmentConfig,
    DatasetError,
    ImageFolderDataset,
    augment_grey,
    fingerprint_dataset,
    paste_anomaly,
    scan_folder,
    split_dirs,
)

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _messy(root: Path, make: Callable[..., Path]) -> Path:
    make(root, per_class=2, size=32, splits=())
    for f in (root / "gaps").iterdir():
        f.unlink()  # empty class folder
    for f in (root / "ler").iterdir():
        f.unlink()
    (root / "ler").rmdir()  # missing class folder
    (root / "clean" / "notes.txt").write_text("not an image")
    (root / "cracks" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    (root / "cmp" / "empty.png").write_bytes(b"")
    (root / "scratches").mkdir()  # not one of the classes
    (root / "README.md").write_text("stray")
    first = sorted((root / "bridges").glob("*.png"))[0]
    first.with_suffix(".json").write_text("{}")  # a per-image description, as train.synthetic writes: not a problem
    (root / "bridges" / "orphan.json").write_text("{}")  # a JSON with no image is stray
    return root


def test_scan_reports_and_skips_every_problem(tmp_path: Path, make_class_dataset: Callable[..., Path],
                                              caplog: pytest.LogCaptureFixture) -> None:
    root = _messy(tmp_path / "messy", make_class_dataset)
    with caplog.at_level(logging.WARNING):
        report = scan_folder(root)
    text = "\n".join(report.problems)
    for needle in ("gaps: class folder has no usable images", "ler: class folder is missing", "notes.txt",
                   "broken.png", "empty.png", "scratches: unknown class folder", "README.md", "orphan.json"):
        assert needle in text, needle
    assert f"{sorted((root / 'bridges').glob('*.png'))[0].stem}.json" not in text
    assert "broken.png" in caplog.text
    assert report.counts["gaps"] == 0 and report.counts["ler"] == 0 and report.counts["clean"] == 2
    assert report.counts["cracks"] == 2 and report.counts["cmp"] == 2
    assert len(report.samples) == 2 * 6
    # The dataset built over it yields every usable sample without raising.
    ds = ImageFolderDataset(root, (32, 32), MEAN, STD, augment=AugmentConfig())
    assert len(ds) == 12 and all(ds[i][0].shape == (3, 32, 32) for i in range(len(ds)))


def test_uncached_dataset_also_skips_corrupt_files(tmp_path: Path, make_class_dataset: Callable[..., Path]) -> None:
    root = _messy(tmp_path / "messy", make_class_dataset)
    ds = ImageFolderDataset(root, (32, 32), MEAN, STD, cache=False)
    assert len(ds) == 12
    # A file that breaks after the scan is substituted, not raised mid-epoch.
    ds.samples[0][0].write_bytes(b"corrupted later")
    x, _ = ds[0]
    assert x.shape == (3, 32, 32)


def test_unusable_folders_raise_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        scan_folder(tmp_path / "nope")
    (tmp_path / "empty" / "clean").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no usable images"):
        scan_folder(tmp_path / "empty")
    with pytest.raises(DatasetError, match="missing train and val"):
        split_dirs(tmp_path / "empty")


def test_eval_samples_match_the_runtime_preprocessor(tmp_path: Path) -> None:
    (tmp_path / "clean").mkdir()
    rng = np.random.default_rng(0)
    colour = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)  # colour input, non-square, needs resizing
    cv2.imwrite(str(tmp_path / "clean" / "a.png"), colour)
    ds = ImageFolderDataset(tmp_path, (32, 32), MEAN, STD, augment=None)
    meta = ModelMetadata(input_size=(32, 32), mean=MEAN, std=STD)
    want = Preprocessor(meta)(tmp_path / "clean" / "a.png")
    x, label = ds[0]
    assert label == CLASSES.index("clean")
    np.testing.assert_array_equal(x.numpy(), want)


def test_augmentation_is_reproducible_per_epoch_and_sample(tmp_path: Path,
                                                           make_class_dataset: Callable[..., Path]) -> None:
    root = make_class_dataset(tmp_path / "d", per_class=1, size=40, splits=())
    a = ImageFolderDataset(root, (32, 32), MEAN, STD, augment=AugmentConfig(), seed=3)
    b = ImageFolderDataset(root, (32, 32), MEAN, STD, augment=AugmentConfig(), seed=3)
    a.set_epoch(1)
    b.set_epoch(1)
    assert torch.equal(a[2][0], b[2][0])
    b.set_epoch(2)
    assert not torch.equal(a[2][0], b[2][0])


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_augment_grey_output_range_and_size(dtype: type) -> None:
    rng = np.random.default_rng(0)
    grey = rng.random((60, 45)).astype(np.float32)
    if dtype is not np.float32:
        grey = (grey * np.iinfo(dtype).max).astype(dtype)
    for strength in ("light", "default", "strong"):
        out = augment_grey(grey, (32, 32), AugmentConfig.strength(strength), rng)
        assert out.shape == (32, 32) and out.dtype == np.float32
        assert 0.0 <= out.min() and out.max() <= 1.0


def test_fingerprint_tracks_content_and_names(tmp_path: Path, make_class_dataset: Callable[..., Path]) -> None:
    root = make_class_dataset(tmp_path / "d", per_class=2, size=16, splits=("train",))
    fp = fingerprint_dataset(root)
    assert fp == fingerprint_dataset(root) and len(fp) == 64
    f = next((root / "train" / "clean").iterdir())
    f.write_bytes(f.read_bytes() + b"\0")
    fp2 = fingerprint_dataset(root)
    assert fp2 != fp
    f.rename(f.with_name("renamed.png"))
    assert fingerprint_dataset(root) != fp2


def test_paste_anomaly_changes_one_patch_sized_rectangle_and_leaves_the_input_alone() -> None:
    rng = np.random.default_rng(0)
    img = np.tile(np.linspace(0.2, 0.8, 40, dtype=np.float32), (40, 1))  # a gradient: any moved patch shows
    for seed in range(20):
        before = img.copy()
        out = paste_anomaly(img, np.random.default_rng(seed))
        assert np.array_equal(img, before) and out.shape == img.shape and out.dtype == np.float32
        assert 0.0 <= out.min() and out.max() <= 1.0
        ys, xs = np.nonzero(np.abs(out - img) > 1e-6)
        assert len(ys), f"seed {seed}: nothing pasted"
        # Everything changed lies in one rectangle no larger than the patch (30% of each side, rounded).
        assert ys.max() - ys.min() + 1 <= 12 and xs.max() - xs.min() + 1 <= 12
        assert np.array_equal(out, paste_anomaly(img, np.random.default_rng(seed)))  # reproducible
    assert not np.array_equal(paste_anomaly(img, rng), paste_anomaly(img, rng))


def test_anomaly_p_relabels_only_clean_training_images_as_other(tmp_path: Path,
                                                               make_class_dataset: Callable[..., Path]) -> None:
    root = make_class_dataset(tmp_path / "data", per_class=4, size=32, splits=())
    clean, other = CLASSES.index("clean"), CLASSES.index("other")
    plain = ImageFolderDataset(root, (32, 32), MEAN, STD, augment=AugmentConfig(noise_p=0.0))
    always = ImageFolderDataset(root, (32, 32), MEAN, STD, augment=AugmentConfig(noise_p=0.0, anomaly_p=1.0))
    evaluation = ImageFolderDataset(root, (32, 32), MEAN, STD, augment=None)
    for i, label in enumerate(plain.labels):
        x0, y0 = plain[i]
        x1, y1 = always[i]
        assert y0 == label and evaluation[i][1] == label
        if label == clean:
            # Same augmentation draw, plus the pasted patch; trained as `other`.
            assert y1 == other and not torch.equal(x0, x1)
        else:
            assert y1 == label and torch.equal(x0, x1)
    half = ImageFolderDataset(root, (32, 32), MEAN, STD, augment=AugmentConfig(anomaly_p=0.5))
    relabelled = []
    for epoch in range(8):
        half.set_epoch(epoch)
        relabelled += [half[i][1] == other for i in np.flatnonzero(half.labels == clean)]
    assert 0 < sum(relabelled) < len(relabelled)  # some, not all: the share is drawn per image and epoch


@pytest.mark.parametrize("intensity", ["percentile", "bit_depth", "full_scale"])
def test_a_models_dataset_is_exactly_what_the_runtime_feeds_it(tmp_path: Path, intensity: str,
                                                                make_class_dataset: Callable[..., Path]):
    """Evaluating a checkpoint must see what the runtime sees: a dim folder under a percentile model differs
    from its full_scale reading, so a dataset that dropped the model's intensity mode is caught."""
    root = make_class_dataset(tmp_path / "d", per_class=1, size=40, splits=())
    for f in root.rglob("*.png"):  # dim them: the intensity modes disagree on these
        cv2.imwrite(str(f), (cv2.imread(str(f), cv2.IMREAD_GRAYSCALE) * 0.3).astype(np.uint8))
    meta = ModelMetadata(input_size=(32, 32), intensity=intensity, mean=MEAN, std=STD)
    ds = ImageFolderDataset.for_model(root, meta)
    pre = Preprocessor(meta)
    for i, (path, _) in enumerate(ds.samples):
        np.testing.assert_allclose(ds[i][0].numpy(), pre(str(path)), atol=1e-6, err_msg=str(path))
