"""Datasets over ``DIR/<class>/`` image folders, built on the runtime's preprocessing stages.

Every sample goes ``runtime.preprocess.load_grey`` → (training only) augmentation on the grey image →
``resize_grey`` → ``Normalizer``, the same stages the deployed runtime runs, so train and serve cannot drift apart.

Folders are scanned up front and every image is decoded once: a missing or empty class folder, an unknown folder,
a stray non-image file or a corrupt image is reported (logged, naming the file) and skipped there, so nothing can
fail mid-epoch. Decoded grey images are cached in memory (the datasets are small; at most ``2 × img_size`` per side
is kept for training), which keeps data loading a small fraction of a training step.

Augmentation randomness is drawn from ``numpy.random.default_rng((seed, epoch, index))``: a sample's augmentation
depends only on the run's seed, the epoch and the sample, never on worker processes or on where a run was resumed.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from runtime.contract import CLASSES
from runtime.errors import InputError
from runtime.folders import class_folder_names, is_image_file, scan_class_folders, visible_files
from runtime.preprocess import Intensity, Normalizer, load_grey, resize_grey
from train import contentfree

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
#: Non-image files named one by one per class folder before the rest are summarised in one line.
MAX_LISTED = 3


class DatasetError(ValueError):
    """A dataset folder that cannot be used at all (missing, or no usable image in it)."""


@dataclass(frozen=True)
class ScanReport:
    """What a scan found: usable samples and every problem, each naming the file or folder."""

    samples: tuple[tuple[Path, int], ...]
    problems: tuple[str, ...]
    counts: dict[str, int]


def _description(f: Path) -> bool:
    """A JSON beside an image of the same name describes it (train.synthetic writes one per image): not stray."""
    return f.suffix.lower() == ".json" and any(f.with_suffix(e).exists() for e in (".png", ".tif"))


def scan_folder(root: str | os.PathLike[str], classes: Sequence[str] = CLASSES,
                verify: bool = True) -> ScanReport:
    """List ``(path, class index)`` under ``root/<class>/`` (and its subfolders); report and skip anything unusable.

    Images are found by :func:`runtime.folders.scan_class_folders`. With ``verify`` every image is decoded once
    (corrupt files are found here, not mid-epoch).
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset folder does not exist (expected {root}/<class>/ with one folder per "
                           f"class: {', '.join(classes)})")
    problems: list[str] = []
    samples: list[tuple[Path, int]] = []
    counts: dict[str, int] = {}

    def problem(msg: str) -> None:
        problems.append(msg)
        log.warning(msg)

    for name in class_folder_names(root):
        if name not in classes:
            problem(f"{root / name}: unknown class folder (classes are {', '.join(classes)}); skipped")
    for f in visible_files(root):
        problem(f"{f}: stray file outside the class folders; skipped")
    images: dict[str, list[Path]] = {}
    for f, name in scan_class_folders(root, classes, recursive=True, allow_empty=True):
        images.setdefault(name, []).append(f)
    for idx, name in enumerate(classes):
        folder = root / name
        if not folder.is_dir():
            problem(f"{folder}: class folder is missing; class {name!r} has no samples here")
            counts[name] = 0
            continue
        n = 0
        non_images = [f for f in visible_files(folder, recursive=True) if not is_image_file(f) and not _description(f)]
        for f in images.get(name, []):
            if verify:
                try:
                    load_grey(f)
                except (InputError, OSError) as e:
                    problem(f"{f}: unusable image ({e}); skipped")
                    continue
            samples.append((f, idx))
            n += 1
        for f in non_images[:MAX_LISTED]:
            problem(f"{f}: not an image file (extension {f.suffix or 'none'}); skipped")
        if len(non_images) > MAX_LISTED:
            # e.g. per-image JSON sidecars of a generated dataset: one line, not thousands.
            exts = sorted({f.suffix or "none" for f in non_images})
            problem(f"{folder}: {len(non_images) - MAX_LISTED} more non-image files ({', '.join(exts)}); skipped")
        if n == 0:
            problem(f"{folder}: class folder has no usable images; class {name!r} has no samples here")
        counts[name] = n
    if not samples:
        raise DatasetError(f"{root}: no usable images in any class folder ({len(problems)} problem(s): "
                           f"{'; '.join(problems[:3])})")
    return ScanReport(tuple(samples), tuple(problems), counts)


def fingerprint_dataset(root: str | os.PathLike[str]) -> str:
    """sha256 over the sorted relative paths and content hashes of every file under ``root``."""
    root = Path(root)
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = f.relative_to(root).as_posix()
        if any(part.startswith(".") for part in rel.split("/")):
            continue
        h.update(rel.encode("utf-8") + b"\0" + hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


# ------------------------------------------------------------------ augmentation (on grey images)
@dataclass(frozen=True)
class AugmentConfig:
    """SEM-appropriate augmentation; every range is on the 0–1 intensity scale.

    No colour jitter: images are grey by contract (colour inputs are converted to luma before this runs).
    """

    flips: bool = True
    rot90: bool = True
    crop_scale: tuple[float, float] = (0.6, 1.0)  # area fraction of the random crop
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    brightness: float = 0.12  # additive, ± this
    contrast: float = 0.3  # multiplicative, 1 ± this
    gamma: tuple[float, float] = (0.7, 1.4)
    noise_p: float = 0.5
    noise_sigma: tuple[float, float] = (0.0, 0.05)
    blur_p: float = 0.3
    blur_sigma: tuple[float, float] = (0.3, 1.3)
    invert_p: float = 0.0
    # Outlier exposure: share of `clean` training images that get a pasted anomaly and are relabelled `other`.
    anomaly_p: float = 0.0
    # Share of images given an acquisition change (:func:`acquisition`: dimmed, low contrast, gamma, requantised):
    # what a percentile-stretch model must see to stay right on such frames.
    acquisition_p: float = 0.0

    @classmethod
    def strength(cls, name: str) -> AugmentConfig | None:
        if name == "none":
            return None
        if name == "light":
            return cls(crop_scale=(0.8, 1.0), brightness=0.08, contrast=0.15, gamma=(0.85, 1.2), noise_p=0.2,
                       blur_p=0.1)
        if name == "strong":
            return cls(crop_scale=(0.35, 1.0), brightness=0.2, contrast=0.45, gamma=(0.6, 1.6), noise_p=0.6,
                       noise_sigma=(0.0, 0.08), blur_p=0.4, blur_sigma=(0.3, 2.0), invert_p=0.1)
        if name == "default":
            return cls()
        raise ValueError(f"unknown augmentation strength {name!r}; use none, light, default or strong")


def _to_unit_float(grey: np.ndarray) -> np.ndarray:
    if grey.dtype == np.uint8:
        return grey.astype(np.float32) * np.float32(1 / 255)
    if grey.dtype == np.uint16:
        return grey.astype(np.float32) * np.float32(1 / 65535)
    return grey.astype(np.float32, copy=False)


def augment_grey(grey: np.ndarray, size: tuple[int, int], cfg: AugmentConfig, rng: np.random.Generator,
                 resize: str = "area") -> np.ndarray:
    """Random crop → ``resize_grey`` to ``size`` → flips/rot90 → intensity changes; float32 in [0, 1]."""
    h, w = grey.shape[:2]
    area = h * w
    crop = grey
    for _ in range(10):  # torchvision's RandomResizedCrop sampling, falling back to the whole image
        target = area * rng.uniform(*cfg.crop_scale)
        ratio = math.exp(rng.uniform(math.log(cfg.crop_ratio[0]), math.log(cfg.crop_ratio[1])))
        cw, ch = int(round(math.sqrt(target * ratio))), int(round(math.sqrt(target / ratio)))
        if 4 <= cw <= w and 4 <= ch <= h:
            y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            crop = grey[y:y + ch, x:x + cw]
            break
    img = _to_unit_float(resize_grey(np.ascontiguousarray(crop), size, resize))
    if cfg.flips and rng.random() < 0.5:
        img = img[:, ::-1]
    if cfg.rot90 and size[0] == size[1]:
        img = np.rot90(img, int(rng.integers(0, 4)))
    elif cfg.flips and rng.random() < 0.5:
        img = img[::-1, :]
    img = np.ascontiguousarray(img)
    if cfg.blur_p and rng.random() < cfg.blur_p:
        s = float(rng.uniform(*cfg.blur_sigma))
        img = cv2.GaussianBlur(img, (0, 0), s)
    c = 1.0 + rng.uniform(-cfg.contrast, cfg.contrast)
    b = rng.uniform(-cfg.brightness, cfg.brightness)
    m = float(img.mean())
    img = (img - m) * np.float32(c) + np.float32(m + b)
    np.clip(img, 0.0, 1.0, out=img)
    g = rng.uniform(*cfg.gamma)
    if abs(g - 1.0) > 1e-3:
        np.power(img, np.float32(g), out=img)
    if cfg.noise_p and rng.random() < cfg.noise_p:
        s = float(rng.uniform(*cfg.noise_sigma))
        if s > 0:
            img += rng.normal(0.0, s, img.shape).astype(np.float32)
            np.clip(img, 0.0, 1.0, out=img)
    if cfg.invert_p and rng.random() < cfg.invert_p:
        img = 1.0 - img
    if cfg.acquisition_p and rng.random() < cfg.acquisition_p:
        img = acquisition(img, rng)
    return img.astype(np.float32, copy=False)


def acquisition(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The frame as a differently set-up tool would deliver it: some of brightness ×0.1–1, contrast ×0.2–1 around
    the mean, gamma 0.5–2, then requantised to 8 bits (a dim 8-bit frame keeps few grey levels)."""
    out = img.astype(np.float32, copy=True)
    which = rng.random(3) < 0.5
    if not which.any():
        which[int(rng.integers(0, 3))] = True
    if which[0]:
        out *= np.float32(math.exp(rng.uniform(math.log(0.1), 0.0)))
    if which[1]:
        m = float(out.mean())
        out = (out - m) * np.float32(math.exp(rng.uniform(math.log(0.2), 0.0))) + np.float32(m)
    np.clip(out, 0.0, 1.0, out=out)
    if which[2]:
        np.power(out, np.float32(math.exp(rng.uniform(math.log(0.5), math.log(2.0)))), out=out)
    return np.round(out * 255.0).astype(np.float32) * np.float32(1 / 255)


def paste_anomaly(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A copy of ``img`` (float, 0–1) with one CutPaste-style anomaly (Li et al. 2021): a patch of 10–30% of each
    side, cut from the image itself, rotated by 90/180/270°, maybe mirrored, its contrast and brightness changed,
    pasted elsewhere. It breaks the local pattern without drawing any known defect's shape (no dark line, no round
    particle), so an image with it stands for "something is wrong here that we have no class for"."""
    h, w = img.shape[:2]
    ph = max(2, int(round(h * rng.uniform(0.1, 0.3))))
    pw = max(2, int(round(w * rng.uniform(0.1, 0.3))))
    y0, x0 = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
    patch = np.rot90(img[y0:y0 + ph, x0:x0 + pw], int(rng.integers(1, 4)))
    if rng.random() < 0.5:
        patch = patch[:, ::-1]
    m = float(patch.mean())
    patch = (patch - m) * np.float32(rng.uniform(0.7, 1.5)) + np.float32(m + rng.uniform(-0.15, 0.15))
    # Turned 90°, a patch of a very wide or tall image may not fit: clip it to the image.
    qh, qw = min(patch.shape[0], h), min(patch.shape[1], w)
    y1, x1 = int(rng.integers(0, h - qh + 1)), int(rng.integers(0, w - qw + 1))
    out = img.copy()
    out[y1:y1 + qh, x1:x1 + qw] = np.clip(patch[:qh, :qw], 0.0, 1.0)
    return out


# ------------------------------------------------------------------ datasets
#: Classes whose scenes are smooth by nature: a mildly blurred one still looks like its class.
SMOOTH_CLASSES = ("cmp",)


class ImageFolderDataset(Dataset):
    """``root/<class>/*`` → ``(float32 (C,H,W) tensor, class index)`` through the runtime's preprocessing stages.

    ``augment=None`` is evaluation: exactly ``Preprocessor``'s path (load_grey → resize_grey → Intensity →
    Normalizer). ``intensity`` is the model's :class:`~runtime.preprocess.Intensity` (default ``full_scale``).
    ``content_free`` appends that many generated content-free frames (:mod:`train.contentfree`, drawn afresh
    each epoch, at the sizes and bit depths a station sends, resized as the runtime resizes) labelled ``other``;
    with ``gate`` (``gate(native, resized) -> reason``, e.g. the model's ``QualityGate.judge``) a ``hard_share`` of
    them are frames that gate lets through, the ones the network has to refuse itself. Call :meth:`set_epoch` each
    epoch so augmentations differ between epochs but are reproducible.
    """

    def __init__(self, root: str | os.PathLike[str], size: tuple[int, int], mean: Sequence[float],
                 std: Sequence[float], augment: AugmentConfig | None = None, classes: Sequence[str] = CLASSES,
                 resize: str = "area", cache: bool = True, seed: int = 0, intensity: Intensity | None = None,
                 content_free: int = 0, gate: Callable[[np.ndarray, np.ndarray], str] | None = None,
                 hard_share: float = 0.5) -> None:
        self.root = Path(root)
        self.size = (int(size[0]), int(size[1]))
        self.classes = tuple(classes)
        self.augment = augment
        self.resize = resize
        self.intensity = intensity or Intensity()
        self.normalize = Normalizer(tuple(mean), tuple(std))
        self.seed = int(seed)
        self.gate = gate
        self.hard_share = float(hard_share)
        self.epoch = 0
        report = scan_folder(self.root, self.classes, verify=not cache)
        self.problems = list(report.problems)
        self.samples: list[tuple[Path, int]] = []
        self._cache: list[np.ndarray] | None = [] if cache else None
        for path, label in report.samples:
            if self._cache is not None:
                try:
                    grey = self._cached_form(load_grey(path))
                except (InputError, OSError) as e:
                    msg = f"{path}: unusable image ({e}); skipped"
                    log.warning(msg)
                    self.problems.append(msg)
                    continue
                self._cache.append(grey)
            self.samples.append((path, label))
        if not self.samples:
            raise DatasetError(f"{self.root}: no usable images ({len(self.problems)} problem(s))")
        self.n_images = len(self.samples)
        # Outlier exposure needs both classes; without them (a custom label set) anomalies are never pasted.
        both = "clean" in self.classes and "other" in self.classes
        self._clean = self.classes.index("clean") if both else -1
        self._other = self.classes.index("other") if both else -1
        if content_free:
            if self._other < 0:
                raise DatasetError(f"{self.root}: content-free frames go to 'other', which this label set lacks")
            self.samples += [(Path(f"<content-free {k}>"), self._other) for k in range(int(content_free))]
        self.labels = np.array([lbl for _, lbl in self.samples], np.int64)
        # Scenes for the gate-passing content-free frames: not the smooth classes, whose blurred frames look like
        # the class itself rather than like nothing.
        smooth = [self.classes.index(c) for c in SMOOTH_CLASSES if c in self.classes]
        self._patterned = np.nonzero(~np.isin(self.labels[: self.n_images], smooth))[0]

    @classmethod
    def for_model(cls, root: str | os.PathLike[str], meta: Any, cache: bool = True) -> ImageFolderDataset:
        """``root`` as the runtime shows it to ``meta``'s model: its input size, labels, resize method, intensity
        mode and normalisation, no augmentation. Evaluation, calibration and BatchNorm statistics of a trained
        model use this, so none can drift from the runtime's preprocessing (e.g. by missing the intensity mode)."""
        return cls(root, meta.input_size, meta.mean, meta.std, augment=None, classes=meta.labels, resize=meta.resize,
                   cache=cache, intensity=Intensity.of(meta))

    def _cached_form(self, grey: np.ndarray) -> np.ndarray:
        if self.augment is None:
            # Evaluation: resize straight from the source, as the runtime does.
            return resize_grey(grey, self.size, self.resize)
        # Training crops first, so keep detail, but no more than twice the input size per side.
        h, w = grey.shape[:2]
        cap = (2 * self.size[0], 2 * self.size[1])
        if h > cap[0] and w > cap[1]:
            return resize_grey(grey, cap, self.resize)
        return grey

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def class_counts(self, num_classes: int | None = None) -> np.ndarray:
        return np.bincount(self.labels, minlength=num_classes or len(self.classes))

    def __len__(self) -> int:
        return len(self.samples)

    def grey(self, i: int) -> np.ndarray:
        if i >= self.n_images:
            raise IndexError(f"sample {i} is a generated content-free frame, not an image")
        if self._cache is not None:
            return self._cache[i]
        return self._cached_form(load_grey(self.samples[i][0]))

    def content_free_frame(self, i: int) -> np.ndarray:
        """Generated content-free frame number ``i - n_images`` of this epoch at the input size (uint8, or uint16
        holding 10- to 16-bit data)."""
        rng = np.random.default_rng((self.seed, self.epoch, i, 7))
        hard = self.gate is not None and rng.random() < self.hard_share
        pool = self._patterned if hard and self._patterned.size else None

        def scene(r: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
            k = int(pool[r.integers(0, pool.size)]) if pool is not None else int(r.integers(0, self.n_images))
            return _to_unit_float(resize_grey(self.grey(k), size, self.resize))

        return contentfree.station_frame(rng, self.size, scene, self.gate if hard else None, resize=self.resize)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        label = self.samples[i][1]
        if i >= self.n_images:
            return torch.from_numpy(self.normalize(self.intensity(self.content_free_frame(i)))), label
        try:
            grey = self.grey(i)
        except (InputError, OSError) as e:
            # Only without the cache, if a file changed after the scan: never crash the epoch over one file.
            log.warning("%s: unusable image (%s); substituting another sample", self.samples[i][0], e)
            return self[(i + 1) % self.n_images]
        if self.augment is None:
            img = resize_grey(grey, self.size, self.resize)
        else:
            rng = np.random.default_rng((self.seed, self.epoch, i))
            img = augment_grey(grey, self.size, self.augment, rng, self.resize)
            if self.augment.anomaly_p and label == self._clean and rng.random() < self.augment.anomaly_p:
                img, label = paste_anomaly(img, rng), self._other
        return torch.from_numpy(self.normalize(self.intensity(img))), label


def split_dirs(data: str | os.PathLike[str]) -> dict[str, Path]:
    """``DIR/{train,val,test}`` that exist; train and val are required."""
    data = Path(data)
    found = {s: data / s for s in SPLITS if (data / s).is_dir()}
    missing = [s for s in ("train", "val") if s not in found]
    if missing:
        raise DatasetError(f"{data}: missing {' and '.join(missing)} folder(s); expected {data}/train/<class>/, "
                           f"{data}/val/<class>/ and optionally {data}/test/<class>/")
    return found


def fit_quality(train_dir: str | os.PathLike[str], meta: Any, max_images: int = 2000) -> dict[str, Any] | None:
    """The frame-quality gate's statistics and limits (:func:`runtime.quality.fit_limits`) on the training split,
    each image resized as the runtime resizes it (at most ``max_images``, evenly spaced, per fit)."""
    from runtime import quality

    samples = scan_folder(train_dir, meta.labels, verify=False).samples
    step = max(1, math.ceil(len(samples) / max_images))
    feats = []
    for path, _ in samples[::step]:
        try:
            native = load_grey(path)
        except (InputError, OSError) as e:
            log.warning("%s: unusable image (%s); left out of the frame-quality fit", path, e)
            continue
        # As the runtime measures it (runtime.classifier.Classifier.prepare).
        feats.append(quality.frame_stats(*quality.measured_view(native, resize_grey(native, meta.input_size,
                                                                                     meta.resize))))
    try:
        return quality.fit_limits(feats, intensity=meta.intensity, source=str(train_dir))
    except ValueError as e:
        log.warning("frame-quality gate not fitted (%s); the model will run with the default limits", e)
        return None
