"""Leave-one-class-out open-set benchmark: how well does each rejection score send never-seen defects to ``other``?

For every held-out named class ``c`` (default: all 7 named classes; ``other`` always stays a trained class):

1. train a model that never saw ``c``. Two ways (``--mode``):

   * ``partial`` (default, what fits a small CPU): the ImageNet (Lite0) stem..stage 5 stay frozen — they
     were never trained on our data, so they cannot leak ``c`` — and their activations are computed once for all
     images (``--views`` augmented copies of each train image, via train.data's augmentation) and cached in
     ``OUT/frozen_cache.pt``. Per fold, the top two MBConv stages, the 1280-d conv and a fresh head are
     fine-tuned on those activations with the trainer's own loss, optimizer, schedule and epoch step
     (:func:`train.engine.train_one_epoch`; AdamW, warm-up + cosine, label smoothing 0.1, class-weighted loss).
   * ``full``: a fold dataset of symlinks to ``DATA/{train,val}`` without ``c``, trained by the project's own
     training run (:func:`train.loop.train`) end to end — the deployed recipe, at many times the CPU time.

2. extract logits and 1280-d features of the fold's train set (un-augmented), val set and the full test set;
4. fit the open-set statistics (:func:`train.openset.fit_openset_stats`) on the training features, once on the
   named classes only (the default, ``<score>``) and once including ``other`` (``<score>+other``);
5. score val and test with every score (numpy references of :mod:`runtime.scores`; the in-graph torch head is
   tested to match them) and measure, with known = test images of the other named classes and unknown = test
   images of ``c`` (``other`` images are left out: rejecting them is correct either way):

   * ``auroc`` (sklearn ``roc_auc_score``, known = positive) and ``fpr95`` (fraction of unknowns accepted at the
     threshold that keeps 95% of known test images) of the score alone;
   * ``auroc_system`` / ``fpr95_system``: the same for what the deployed rule does. ``runtime.Classifier`` labels
     a top prediction of ``other`` as ``other`` whatever its score, so such images rank below every image the
     rule could accept. The score alone counts an unknown predicted ``other`` with high confidence as
     "accepted"; the system sends it where it belongs. The default score is chosen on this view.
     ``fpr95_system`` is NaN ("n/a" in the table) where over 5% of the known images are predicted ``other``:
     then no threshold keeps 95% of them;
   * with the threshold chosen on val for ``--target-recall`` of the named known classes: known recall on test,
     known accuracy without rejection / with rejection (a rejected known image counts as wrong: it becomes
     ``other``) / selective (on accepted images), the share of unknowns that end up as ``other`` (rejected
     or predicted ``other``), and the share that end up ``clean`` (accepted with a top-1 ``clean``: a new defect
     passed as defect-free, the costliest error; NaN when ``clean`` itself is held out).

Writes ``results.json`` (config, per-fold per-score metrics, means, timings), ``table.md``, ``auroc.png``
(held-out class × score) and ``coverage_accuracy.png`` (accuracy on accepted images vs coverage, unknowns
counted as errors when accepted, mean over folds). ``--mode full`` keeps fold runs under ``OUT/folds/<class>/``
(``--reuse`` re-scores them without retraining). ``--cost`` instead measures what the in-graph score head costs
(ONNX Runtime CPU latency with vs without it, file size).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from importlib import import_module
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from runtime.contract import CLASSES, REJECT_LABEL
from runtime.files import atomic_write_bytes, atomic_write_text
from runtime.scores import FEATURE_SCORES, feature_score
from sem_extras import cli, help_note, import_for_help

if TYPE_CHECKING:
    from train.loop import TrainConfig

log = logging.getLogger("benchmarks.openset")

NAMED_CLASSES = tuple(c for c in CLASSES if c != REJECT_LABEL)
SPLITS_TRAINED = ("train", "val")
COVERAGE_GRID = np.linspace(0.05, 1.0, 96)


@dataclass
class OpensetConfig:
    """Every option of a benchmark run (``python -m benchmarks.openset``; ``--help`` says what each means)."""

    data: str | None = None
    test: str | None = None  # test images instead of DATA/test
    cost: bool = False  # measure the in-graph score head's cost instead
    cost_sizes: list[int] = field(default_factory=lambda: [128, 224])
    cost_iters: int = 60
    threads: int | None = None
    out: str = ""
    heldout: list[str] | None = None  # None = every named class
    scores: list[str] = field(default_factory=lambda: list(import_module("train.openset").ALL_SCORES))
    mode: str = "partial"  # partial | full
    freeze_stages: int = 6
    views: int = 2
    lr: float = 1e-3
    epochs: int = 4
    img_size: int = 96
    batch_size: int = 32
    arch: str = "efficientnet_lite0"
    weights: str = "lite0"
    augment: str = "light"
    head_warmup_epochs: int = 1
    anomaly_p: float = 0.0
    max_train_per_class: int | None = None
    target_recall: float = 0.95
    knn_k: int = 10
    seed: int = 0
    reuse: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.out:
            raise ValueError("OpensetConfig.out: an output folder is required")

    def fold_train_config(self, fold_dir: Path) -> TrainConfig:
        """``--mode full``: the trainer's config for one fold (its data and run folders under ``fold_dir``)."""
        from train.loop import TrainConfig

        return TrainConfig(data=str(fold_dir / "data"), out=str(fold_dir / "run"), arch=self.arch, weights=self.weights,
                           epochs=self.epochs, img_size=self.img_size, batch_size=self.batch_size, seed=self.seed,
                           augment=self.augment, patience=0, head_warmup_epochs=self.head_warmup_epochs,
                           anomaly_p=self.anomaly_p, warmup_epochs=min(1.0, float(self.epochs)),
                           progress=self.progress, workers=0)

    def partial_train_config(self) -> TrainConfig:
        """``--mode partial``: the trainer's config for the top stages and head on cached activations: ``lr`` for
        the top stages and 3x for the head, half an epoch of linear warm-up, then cosine; no head-only epoch."""
        from train.loop import TrainConfig

        return TrainConfig(epochs=self.epochs, lr=self.lr, head_lr=3 * self.lr, weight_decay=0.02,
                           label_smoothing=0.1, balance="loss", head_warmup_epochs=0, warmup_epochs=0.5,
                           batch_size=self.batch_size, seed=self.seed, progress=self.progress)


# ------------------------------------------------------------------ metrics (plain functions, tested)
def auroc(known: np.ndarray, unknown: np.ndarray) -> float:
    """AUROC of telling known (positive, higher score) from unknown images."""
    from sklearn.metrics import roc_auc_score

    y = np.r_[np.ones(len(known)), np.zeros(len(unknown))]
    return float(roc_auc_score(y, np.r_[known, unknown]))


def fpr_at_tpr(known: np.ndarray, unknown: np.ndarray, tpr: float = 0.95) -> float:
    """Fraction of unknowns accepted at the threshold that keeps ``tpr`` of the known images."""
    from train.confidence import choose_threshold

    t = choose_threshold(known, None, tpr)
    return float((np.asarray(unknown) >= t).mean())


def coverage_accuracy_curve(scores: np.ndarray, correct: np.ndarray,
                            grid: np.ndarray = COVERAGE_GRID) -> np.ndarray:
    """Accuracy of the ``coverage`` highest-scoring images, for each coverage in ``grid``."""
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    cum = np.cumsum(np.asarray(correct, np.float64)[order])
    n = np.maximum(1, np.round(grid * len(order)).astype(int))
    return cum[n - 1] / n


def system_scores(scores: np.ndarray, pred: np.ndarray, reject_index: int) -> np.ndarray:
    """The score as the deployed rule sees it: a top prediction of ``other`` comes out as ``other`` whatever its
    score (``runtime.Classifier``), so it ranks below every image the rule could accept."""
    s = np.asarray(scores, np.float64)
    routed = np.asarray(pred) == reject_index
    if not routed.any():
        return s
    floor = (s[~routed].min() if (~routed).any() else 0.0) - 1.0
    return np.where(routed, floor, s)


def unknown_destinations(logits: np.ndarray, labels: np.ndarray, heldout_index: int,
                         names: Sequence[str] = CLASSES) -> dict[str, float]:
    """Where the held-out class's images go: share of them per top-1 predicted class (before any rejection), largest
    first. A never-seen defect absorbed by one look-alike class is what no score can undo."""
    pred = np.asarray(logits).argmax(1)[np.asarray(labels) == heldout_index]
    if not len(pred):
        return {}
    counts = np.bincount(pred, minlength=len(names))
    return {names[i]: float(counts[i] / len(pred)) for i in np.argsort(-counts, kind="stable") if counts[i]}


def score_metrics(s_val: np.ndarray, val_named: np.ndarray, s_test: np.ndarray, test_known: np.ndarray,
                  test_unknown: np.ndarray, pred_test: np.ndarray, labels_test: np.ndarray, reject_index: int,
                  target_recall: float) -> dict[str, Any]:
    """Every per-score number of one fold (see the module docstring)."""
    from train.confidence import choose_threshold

    known, unknown = s_test[test_known], s_test[test_unknown]
    t = choose_threshold(s_val, val_named, target_recall)
    accepted = s_test >= t
    right = pred_test == labels_test
    k_acc = accepted[test_known]
    unknown_to_other = (~accepted | (pred_test == reject_index))[test_unknown]
    clean = CLASSES.index("clean")
    missed = (accepted & (pred_test == clean))[test_unknown]
    clean_held_out = bool((labels_test[test_unknown] == clean).any())
    # Mixed-set view: known right when accepted and correct; unknown right when it comes out as `other`.
    mixed = test_known | test_unknown
    sys_correct = np.where(test_known, right & accepted, ~accepted | (pred_test == reject_index))[mixed]
    s_sys = system_scores(s_test, pred_test, reject_index)
    return {
        "auroc": auroc(known, unknown),
        "fpr95": fpr_at_tpr(known, unknown, 0.95),
        "auroc_system": auroc(s_sys[test_known], s_sys[test_unknown]),
        # NaN when more than 5% of the known images are predicted `other`: the rule cannot keep 95% of them.
        "fpr95_system": (fpr_at_tpr(s_sys[test_known], s_sys[test_unknown], 0.95)
                         if (pred_test[test_known] != reject_index).mean() >= 0.95 else float("nan")),
        "threshold": t,
        "known_recall": float(k_acc.mean()),
        "known_acc_no_reject": float(right[test_known].mean()),
        "known_acc_with_reject": float((right & accepted)[test_known].mean()),
        "known_selective_acc": float(right[test_known][k_acc].mean()) if k_acc.any() else float("nan"),
        "unknown_to_other": float(unknown_to_other.mean()),
        "unknown_to_clean": float("nan") if clean_held_out else float(missed.mean()),
        "mixed_acc": float(sys_correct.mean()),
        "curve": coverage_accuracy_curve(s_sys[mixed], np.where(test_known, right, False)[mixed]).tolist(),
    }


# ------------------------------------------------------------------ folds
def make_fold_data(data: Path, heldout: str, dest: Path, max_per_class: int | None = None, seed: int = 0) -> Path:
    """``dest/{train,val}/<class>/`` as per-file symlinks into ``data``, without ``heldout``."""
    from runtime.sources import IMAGE_SUFFIXES as IMAGE_EXTENSIONS

    rng = np.random.default_rng(seed)
    for split in SPLITS_TRAINED:
        for name in CLASSES:
            if name == heldout:
                continue
            src = data / split / name
            if not src.is_dir():
                continue
            files = sorted(f for f in src.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file())
            if max_per_class and split == "train" and len(files) > max_per_class:
                files = sorted(rng.choice(files, max_per_class, replace=False).tolist())
            out = dest / split / name
            out.mkdir(parents=True, exist_ok=True)
            for f in files:
                link = out / f.name
                if not link.exists():
                    link.symlink_to(f.resolve())
    return dest


def train_fold(fold_dir: Path, cfg: OpensetConfig) -> Path:
    """Train one fold with the project's training run (:func:`train.loop.train`); returns its best.pt."""
    from train.loop import train

    best = fold_dir / "run" / "best.pt"
    if cfg.reuse and best.is_file() and (fold_dir / "run" / "summary.json").is_file():
        log.info("%s: reusing %s", fold_dir.name, best)
        return best
    train(cfg.fold_train_config(fold_dir))
    return best


def extract_fold(best: Path, data_dirs: dict[str, Path], batch_size: int) -> dict[str, Any]:
    """Logits, features and labels of the fold model on each split, plus the classifier's weight and bias."""
    from torch.utils.data import DataLoader

    from train.checkpoint import model_from_checkpoint
    from train.data import ImageFolderDataset
    from train.openset import collect_outputs, final_linear

    model, meta = model_from_checkpoint(best)
    out: dict[str, Any] = {}
    for split, d in data_dirs.items():
        ds = ImageFolderDataset.for_model(d, meta)
        o = collect_outputs(model, DataLoader(ds, batch_size=batch_size), desc=split)
        out[split] = {"logits": o.logits, "features": o.features, "labels": o.labels}
    lin = final_linear(model)
    out["weight"] = lin.weight.detach().numpy().copy()
    out["bias"] = lin.bias.detach().numpy().copy()
    return out


def score_fold(ex: dict[str, Any], heldout: str, scores: Sequence[str], target_recall: float,
               knn_k: int) -> dict[str, dict[str, Any]]:
    """Fit statistics on the fold's training features and measure every score (and its ``+other`` variant)."""
    from train.openset import fit_classes_for, fit_openset_stats, stats_to_numpy

    reject = CLASSES.index(REJECT_LABEL)
    h = CLASSES.index(heldout)
    tr, va, te = ex["train"], ex["val"], ex["test"]
    val_named = va["labels"] != reject
    test_known = (te["labels"] != reject) & (te["labels"] != h)
    test_unknown = te["labels"] == h
    if not test_unknown.any() or not test_known.any():
        raise ValueError(f"fold {heldout}: the test split needs images of {heldout!r} and of other named classes")
    pred = te["logits"].argmax(1)
    variants: dict[str, dict[str, np.ndarray] | None] = {"": None}
    if any(s in FEATURE_SCORES for s in scores):
        fit_named = [c for c in fit_classes_for(CLASSES, False) if c != h]
        fit_all = [c for c in fit_classes_for(CLASSES, True) if c != h]
        for tag, fit in (("", fit_named), ("+other", fit_all)):
            st = fit_openset_stats(tr["features"], tr["labels"], ex["weight"], ex["bias"], fit_classes=fit,
                                   knn_k=knn_k)
            variants[tag] = stats_to_numpy(st)
    res: dict[str, dict[str, Any]] = {}
    for name in scores:
        tags = ("", "+other") if name in FEATURE_SCORES else ("",)
        for tag in tags:
            st = variants[tag] if name in FEATURE_SCORES else None
            sv = feature_score(name, va["logits"], va["features"], st or {})
            stt = feature_score(name, te["logits"], te["features"], st or {})
            res[name + tag] = score_metrics(sv, val_named, stt, test_known, test_unknown, pred, te["labels"],
                                            reject, target_recall)
    return res


def fold_test_dir(cfg: OpensetConfig) -> Path:
    """Where the test images come from (absolute): ``--test`` or, by default, ``DATA/test``."""
    return (Path(cfg.test) if cfg.test else Path(cfg.data) / "test").resolve()


def run_fold_full(data: Path, heldout: str, out: Path, cfg: OpensetConfig) -> dict[str, Any]:
    """``--mode full``: the whole network fine-tuned by :func:`train.loop.train` on the fold's data."""
    fold_dir = out / "folds" / heldout
    saved = fold_dir / "outputs.npz"
    if (cfg.reuse and saved.is_file() and (fold_dir / "run" / "summary.json").is_file()
            and saved_test_dir(saved, data) == fold_test_dir(cfg)):
        # Re-scoring only: the fold's model and its outputs (on the same test folder) are already there; with
        # another --test the saved model is reused (train_fold) but the outputs are extracted again.
        log.info("%s: re-scoring the saved outputs %s", heldout, saved)
        return _finish_fold(load_fold_outputs(saved), heldout, cfg, {}, {}, save=False)
    t0 = time.perf_counter()
    make_fold_data(data, heldout, fold_dir / "data", cfg.max_train_per_class, cfg.seed)
    best = train_fold(fold_dir, cfg)
    t_train = time.perf_counter() - t0
    dirs = {"train": fold_dir / "data" / "train", "val": fold_dir / "data" / "val", "test": fold_test_dir(cfg)}
    ex = extract_fold(best, dirs, 64)
    t_extract = time.perf_counter() - t0 - t_train
    return _finish_fold(ex, heldout, cfg, {"train": t_train, "extract": t_extract}, {})


def saved_test_dir(path: Path, data: Path) -> Path:
    """The test folder a fold's ``outputs.npz`` was extracted from (files written before ``--test``: DATA/test)."""
    with np.load(path) as z:
        return Path(str(z["test_dir"])) if "test_dir" in z.files else (data / "test").resolve()


def load_fold_outputs(path: Path) -> dict[str, Any]:
    """The ``outputs.npz`` a fold saved, back in :func:`extract_fold`'s layout."""
    with np.load(path) as z:
        ex: dict[str, Any] = {split: {k: z[f"{split}_{k}"] for k in ("logits", "features", "labels")}
                              for split in ("train", "val", "test")}
        ex["weight"], ex["bias"] = z["weight"], z["bias"]
    return ex


def _finish_fold(ex: dict[str, Any], heldout: str, cfg: OpensetConfig, seconds: dict[str, float],
                 info: dict[str, Any], save: bool = True) -> dict[str, Any]:
    # Keep the fold's outputs so other scores or statistics can be tried later without retraining.
    fold_dir = Path(cfg.out) / "folds" / heldout
    fold_dir.mkdir(parents=True, exist_ok=True)
    if save:
        buf = io.BytesIO()
        np.savez_compressed(buf, weight=ex["weight"], bias=ex["bias"], test_dir=str(fold_test_dir(cfg)),
                            **{f"{split}_{k}": v for split in ("train", "val", "test") for k, v in ex[split].items()})
        atomic_write_bytes(fold_dir / "outputs.npz", buf.getvalue())
    t0 = time.perf_counter()
    res = score_fold(ex, heldout, cfg.scores, cfg.target_recall, cfg.knn_k)
    seconds["score"] = time.perf_counter() - t0
    reject, h = CLASSES.index(REJECT_LABEL), CLASSES.index(heldout)
    te, va = ex["test"], ex["val"]
    known = (te["labels"] != reject) & (te["labels"] != h)
    return {"heldout": heldout, "scores": res, "train_images": int(len(ex["train"]["labels"])),
            "test_known": int(known.sum()), "test_unknown": int((te["labels"] == h).sum()),
            "val_acc": float((va["logits"].argmax(1) == va["labels"]).mean()),
            "test_known_acc": float((te["logits"].argmax(1) == te["labels"])[known].mean()),
            "unknown_top1": unknown_destinations(te["logits"], te["labels"], h),
            "seconds": seconds, **info}


# ------------------------------------------------------------------ partially frozen folds (the cheap default)
class PartialCache:
    """Activations of the frozen lower stages (ImageNet weights, never trained on our data, so no fold can leak
    the held-out class through them), computed once for every image and reused by all folds.

    Train images are cached in ``views`` augmented versions (train.data's augmentation, epoch ``v`` seeds view
    ``v``) plus the un-augmented version that the statistics are fitted on.
    """

    def __init__(self, data: Path, cfg: OpensetConfig, cache_file: Path | None = None) -> None:
        import torch

        from train.models import build_model, default_normalisation

        torch.manual_seed(cfg.seed)
        self.base = build_model(cfg.arch, len(CLASSES), cfg.weights).eval()
        self.split_at = cfg.freeze_stages
        self.mean, self.std = default_normalisation(cfg.arch, cfg.weights)
        key = {k: str(getattr(cfg, k)) for k in ("data", "arch", "weights", "img_size", "freeze_stages", "views",
                                                   "augment", "seed")}
        key["test"] = str(fold_test_dir(cfg))
        if cache_file is not None and self._load(cache_file, key):
            return
        self._compute(data, cfg)
        if cache_file is not None:
            self._save(cache_file, key)

    def _lower(self, ds: Any, desc: str, progress: bool) -> tuple[Any, np.ndarray]:
        """The frozen stages' activations of every image of ``ds``, and its labels."""
        import torch
        from torch.utils.data import DataLoader

        lower = self.base.features[: self.split_at]
        outs = []
        with torch.inference_mode():
            for x, _ in tqdm_(DataLoader(ds, batch_size=64), desc, progress):
                outs.append(lower(x))
        return torch.cat(outs), ds.labels.copy()

    def _compute(self, data: Path, cfg: OpensetConfig) -> None:
        from train.data import AugmentConfig, ImageFolderDataset

        size = (cfg.img_size, cfg.img_size)
        self.acts: dict[str, Any] = {}
        self.labels: dict[str, np.ndarray] = {}
        dirs = {"train": data / "train", "val": data / "val", "test": fold_test_dir(cfg)}
        for split, d in dirs.items():
            ds = ImageFolderDataset(d, size, self.mean, self.std, augment=None)
            self.acts[split], self.labels[split] = self._lower(ds, f"frozen stages: {split}", cfg.progress)
        aug = AugmentConfig.strength(cfg.augment)
        self.views: list[Any] = []
        if aug is not None:
            ds = ImageFolderDataset(data / "train", size, self.mean, self.std, augment=aug, seed=cfg.seed)
            for v in range(cfg.views):
                ds.set_epoch(v)
                self.views.append(self._lower(ds, f"frozen stages: train view {v + 1}/{cfg.views}", cfg.progress)[0])
        if not self.views:
            self.views = [self.acts["train"]]

    def _load(self, cache_file: Path, key: dict[str, str]) -> bool:
        """Activations saved by an earlier run with the same key (data, model, size, views, test folder)."""
        import torch

        if not cache_file.is_file():
            return False
        saved = torch.load(cache_file, weights_only=True)
        if saved.get("key") != key:
            return False
        log.info("frozen-stage activations from %s", cache_file)
        self.acts, self.views = saved["acts"], saved["views"]
        self.labels = {k: v.numpy() for k, v in saved["labels"].items()}
        return True

    def _save(self, cache_file: Path, key: dict[str, str]) -> None:
        import torch

        buf = io.BytesIO()
        torch.save({"key": key, "acts": self.acts, "views": self.views,
                    "labels": {k: torch.from_numpy(v) for k, v in self.labels.items()}}, buf)
        atomic_write_bytes(cache_file, buf.getvalue())


def tqdm_(it: Any, desc: str, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(it, desc=desc, leave=False, disable=not enabled)


def train_partial_fold(cache: PartialCache, heldout: str, cfg: OpensetConfig) -> Any:
    """Fine-tune the unfrozen top stages + a fresh head on cached activations of every class but ``heldout``, with
    the trainer's loss, optimizer, schedule and epoch step (:mod:`train.loop`, :func:`train.engine.train_one_epoch`)."""
    import copy

    import torch
    from torch import nn

    from train.engine import train_one_epoch
    from train.loop import build_criterion, build_optimizer, build_scheduler

    tc = cfg.partial_train_config()
    h = CLASSES.index(heldout)
    model = copy.deepcopy(cache.base)
    torch.manual_seed(cfg.seed * 1000 + h)
    lin = model.classifier[-1]
    nn.init.uniform_(lin.weight, -1 / lin.in_features ** 0.5, 1 / lin.in_features ** 0.5)
    nn.init.zeros_(lin.bias)
    top = model.features[cache.split_at:]
    head = nn.Sequential(top, model.avgpool, nn.Flatten(1), model.classifier)  # cached activations → logits
    keep = np.flatnonzero(cache.labels["train"] != h)
    y_all = torch.as_tensor(cache.labels["train"])
    crit = build_criterion(np.bincount(cache.labels["train"][keep], minlength=len(CLASSES)), tc, "cpu")
    opt = build_optimizer([{"params": top.parameters(), "lr": tc.lr, "role": "backbone"},
                           {"params": model.classifier.parameters(), "lr": tc.head_lr, "role": "head"}], tc)
    sched = build_scheduler(opt, tc, (len(keep) + tc.batch_size - 1) // tc.batch_size)
    g = torch.Generator().manual_seed(cfg.seed * 1000 + h)

    def batches(view: torch.Tensor, order: np.ndarray) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(0, len(order), tc.batch_size):  # a last batch of one too: BatchNorm sees its spatial cells
            idx = torch.as_tensor(order[i:i + tc.batch_size])
            yield view[idx], y_all[idx]

    for epoch in tqdm_(range(tc.epochs), f"train without {heldout}", cfg.progress):
        order = keep[torch.randperm(len(keep), generator=g).numpy()]
        stats = train_one_epoch(head, crit, opt, sched, batches(cache.views[epoch % len(cache.views)], order), "cpu",
                                clip_norm=None, memory_format=torch.contiguous_format)
        log.info("fold %s epoch %d/%d: last batch loss %.3f", heldout, epoch + 1, tc.epochs, stats.last_loss)
    return model.eval()


def run_fold_partial(cache: PartialCache, heldout: str, cfg: OpensetConfig) -> dict[str, Any]:
    import torch

    t0 = time.perf_counter()
    model = train_partial_fold(cache, heldout, cfg)
    t_train = time.perf_counter() - t0
    h = CLASSES.index(heldout)
    top = model.features[cache.split_at:]
    ex: dict[str, Any] = {}
    with torch.inference_mode():
        for split in ("train", "val", "test"):
            keep = np.flatnonzero(cache.labels[split] != h) if split != "test" else np.arange(len(cache.labels[split]))
            feats = torch.flatten(model.avgpool(top(cache.acts[split][torch.as_tensor(keep)])), 1)
            ex[split] = {"logits": model.classifier(feats).numpy(), "features": feats.numpy(),
                         "labels": cache.labels[split][keep]}
    lin = model.classifier[-1]
    ex["weight"], ex["bias"] = lin.weight.detach().numpy().copy(), lin.bias.detach().numpy().copy()
    return _finish_fold(ex, heldout, cfg, {"train": t_train, "extract": time.perf_counter() - t0 - t_train}, {})


# ------------------------------------------------------------------ summary, table, plots
def summarise(folds: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    names = list(folds[0]["scores"])
    keys = [k for k, v in folds[0]["scores"][names[0]].items() if isinstance(v, float)]
    with warnings.catch_warnings():  # a metric that is NaN in every fold (fpr95_system) stays NaN, quietly
        warnings.simplefilter("ignore", RuntimeWarning)
        return {n: {k: float(np.nanmean([f["scores"][n][k] for f in folds])) for k in keys} for n in names}


def choose_default(summary: dict[str, dict[str, float]]) -> str:
    """Highest mean system AUROC (what the deployed rule achieves); ties broken by lower system FPR@95."""
    return max(summary, key=lambda n: (round(summary[n]["auroc_system"], 3),
                                       -np.nan_to_num(summary[n]["fpr95_system"], nan=1.0)))


def _rate(x: float, digits: int = 2) -> str:
    return "n/a" if not np.isfinite(x) else f"{x:.{digits}f}"


def format_table(folds: list[dict[str, Any]], summary: dict[str, dict[str, float]]) -> str:
    names = list(summary)
    lines = ["AUROC / FPR@95TPR per held-out class (known = other named classes, unknown = held-out class)", "",
             "| held out | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for f in folds:
        cells = [f"{f['scores'][n]['auroc']:.3f} / {f['scores'][n]['fpr95']:.2f}" for n in names]
        lines.append(f"| {f['heldout']} | " + " | ".join(cells) + " |")
    lines.append("| **mean** | " + " | ".join(f"**{summary[n]['auroc']:.3f} / {summary[n]['fpr95']:.2f}**"
                                             for n in names) + " |")
    lines += ["", "System view: the same, with top-1 `other` predictions counted as rejected (as runtime.Classifier "
              "labels them)", "", "| held out | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for f in folds:
        cells = [f"{f['scores'][n]['auroc_system']:.3f} / {_rate(f['scores'][n]['fpr95_system'])}" for n in names]
        lines.append(f"| {f['heldout']} | " + " | ".join(cells) + " |")
    lines.append("| **mean** | " + " | ".join(
        f"**{summary[n]['auroc_system']:.3f} / {_rate(summary[n]['fpr95_system'])}**" for n in names) + " |")
    lines += ["", "n/a: over 5% of the known images were predicted `other`, so no threshold keeps 95% of them; "
              "the mean FPR is over the folds where it exists."]
    lines += ["", "At the val threshold (mean over folds): known recall, known accuracy no rejection → with rejection "
              "(rejected = wrong) / selective, unknowns sent to `other`, unknowns passed as `clean` (accepted, top-1 "
              "`clean`; folds holding out a defect class), accuracy on known+unknown test images", "",
              "| score | known recall | acc no-reject | acc with reject | selective acc | unknown→other "
              "| unknown→clean | mixed acc |",
              "|---|---|---|---|---|---|---|---|"]
    for n in names:
        s = summary[n]
        lines.append(f"| {n} | {s['known_recall']:.3f} | {s['known_acc_no_reject']:.3f} | "
                     f"{s['known_acc_with_reject']:.3f} | {s['known_selective_acc']:.3f} | "
                     f"{s['unknown_to_other']:.3f} | {_rate(s.get('unknown_to_clean', float('nan')), 3)} | "
                     f"{s['mixed_acc']:.3f} |")
    if all("unknown_top1" in f for f in folds):
        lines += ["", "Where the unknowns go: top-1 prediction of the held-out class's test images, before rejection "
                  "(the classes that absorb a never-seen defect)", "",
                  "| held out | known acc | top-1 predictions of the held-out images |", "|---|---|---|"]
        for f in folds:
            dest = ", ".join(f"{c} {100 * v:.0f}%" for c, v in f["unknown_top1"].items())
            lines.append(f"| {f['heldout']} | {f['test_known_acc']:.3f} | {dest} |")
    return "\n".join(lines) + "\n"


def plot_results(folds: list[dict[str, Any]], summary: dict[str, dict[str, float]], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    held = [f["heldout"] for f in folds]
    grid = np.array([[f["scores"][n]["auroc_system"] for n in names] for f in folds]
                    + [[summary[n]["auroc_system"] for n in names]])
    fig, ax = plt.subplots(figsize=(1.1 * len(names) + 3, 0.5 * len(held) + 2.5))
    im = ax.imshow(grid, vmin=0.5, vmax=1.0, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(names)), names, rotation=40, ha="right")
    ax.set_yticks(range(len(held) + 1), held + ["mean"])
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", color="w" if grid[i, j] < 0.8 else "k",
                    fontsize=8)
    ax.set_title("System AUROC (top-1 `other` = rejected): held-out class vs known named classes")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    p1 = out / "auroc.png"
    fig.savefig(p1, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 5))
    for n in names:
        curve = np.mean([f["scores"][n]["curve"] for f in folds], axis=0)
        ax.plot(COVERAGE_GRID, curve, label=f"{n} (system AUROC {summary[n]['auroc_system']:.3f})",
                ls="-" if "+other" not in n else "--")
    ax.set_xlabel("coverage (fraction of known + unknown test images accepted)")
    ax.set_ylabel("accuracy on accepted (accepted unknowns are errors)")
    ax.set_title("Coverage / accuracy, mean over held-out classes")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    p2 = out / "coverage_accuracy.png"
    fig.savefig(p2, dpi=110)
    plt.close(fig)
    return [p1, p2]


# ------------------------------------------------------------------ cost of the in-graph score
def export_score_models(out: Path, arch: str, img_size: int, scores: Sequence[str],
                        bank_size: int) -> dict[str, Path]:
    """ONNX models without (``plain``) and with each score head, random weights and statistics (the KNN bank has
    ``bank_size`` rows): cost does not depend on their values."""
    import torch

    from export.onnx_export import export_onnx
    from runtime.contract import ModelMetadata
    from train.models import build_model
    from train.openset import fit_openset_stats, metadata_updates, scored_model

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = build_model(arch, len(CLASSES), "none").eval()
    rng = np.random.default_rng(0)
    feats = np.abs(rng.normal(size=(bank_size, 1280))).astype(np.float32)
    labels = np.arange(bank_size) % 7
    lin = model.classifier[-1]
    stats = fit_openset_stats(feats, labels, lin.weight, lin.bias, knn_bank_size=bank_size)
    meta = ModelMetadata(input_size=(img_size, img_size), arch=arch)
    paths = {"plain": export_onnx(model, meta, out / f"plain_{img_size}.onnx")}
    for name in scores:
        m = meta.with_updates(**metadata_updates(name, 0.0))
        paths[name] = export_onnx(scored_model(model, stats, name), m, out / f"{name}_{img_size}.onnx")
    return paths


class _OrtRunner:
    """One ONNX Runtime CPU session timed per call on a fixed input (a :func:`benchmarks.timing.run_interleaved`
    runner)."""

    def __init__(self, path: Path, x: np.ndarray, threads: int | None) -> None:
        import onnxruntime as ort

        from runtime.ort_backend import session_options

        self.sess = ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])
        self.name, self.x = self.sess.get_inputs()[0].name, x

    def step(self) -> dict[str, float]:
        t = time.perf_counter()
        self.sess.run(None, {self.name: self.x})
        return {"total": (time.perf_counter() - t) * 1e3}


def measure_score_cost(out: Path, arch: str = "efficientnet_lite0", img_size: int = 224,
                       scores: Sequence[str] = FEATURE_SCORES, bank_size: int = 2048, iters: int = 60,
                       rounds: int = 6, threads: int | None = None, progress: bool = True) -> dict[str, Any]:
    """ONNX Runtime CPU latency (batch 1) and file size of the exported model with vs without each score head.

    Configurations run interleaved and are compared per round (:mod:`benchmarks.timing`), so a noisy neighbour
    slows both sides of a ratio.
    """
    from benchmarks.timing import paired_ratio, run_interleaved, summarize

    paths = export_score_models(out, arch, img_size, scores, bank_size)
    x = np.random.default_rng(1).normal(size=(1, 3, img_size, img_size)).astype(np.float32)
    names = list(paths)
    samples = run_interleaved([_OrtRunner(paths[n], x, threads) for n in names], iters=iters, warmup=3,
                              rounds=rounds)
    base = samples[0]
    res: dict[str, Any] = {"img_size": img_size, "arch": arch, "bank_size": bank_size, "threads": threads,
                           "models": {}}
    for n, smp in zip(names, samples):
        entry = {**summarize(smp.stages["total"]), "file_mb": paths[n].stat().st_size / 2**20}
        if n != "plain":
            entry["ratio_vs_plain"] = paired_ratio(smp, base)
            entry["extra_mb"] = entry["file_mb"] - res["models"]["plain"]["file_mb"]
        res["models"][n] = entry
    return res


def format_cost(results: list[dict[str, Any]]) -> str:
    lines = ["| input | score head | median ms (batch 1) | ratio vs plain [per-round range] | file MB (+extra) |",
             "|---|---|---|---|---|"]
    for r in results:
        for n, e in r["models"].items():
            ratio = e.get("ratio_vs_plain")
            rtxt = f"{ratio['ratio']:.3f} [{ratio['lo']:.3f}–{ratio['hi']:.3f}]" if ratio else "1"
            extra = f" (+{e['extra_mb']:.1f})" if "extra_mb" in e else ""
            lines.append(f"| {r['img_size']} px | {n} | {e['median_ms']:.2f} | {rtxt} | {e['file_mb']:.1f}{extra} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ driver
def run_cost(cfg: OpensetConfig) -> list[dict[str, Any]]:
    out = Path(cfg.out)
    results = [measure_score_cost(out / "cost_models", cfg.arch, size, [s for s in cfg.scores if s in FEATURE_SCORES],
                                  iters=cfg.cost_iters, threads=cfg.threads, progress=cfg.progress)
               for size in cfg.cost_sizes]
    atomic_write_text(out / "cost.json", json.dumps(results, indent=2) + "\n")
    table = format_cost(results)
    atomic_write_text(out / "cost.md", table)
    print(table)
    return results


def run_benchmark(cfg: OpensetConfig) -> dict[str, Any]:
    if cfg.data is None:
        raise SystemExit("--data is required (unless --cost)")
    data, out = Path(cfg.data), Path(cfg.out)
    for split in ("train", "val"):
        if not (data / split).is_dir():
            raise SystemExit(f"{data}: missing {split}/ (expected {data}/{{train,val,test}}/<class>/)")
    test = fold_test_dir(cfg)
    if not test.is_dir():
        raise SystemExit(f"{test}: no such test folder (expected <class>/ folders; --test or DATA/test/)")
    out.mkdir(parents=True, exist_ok=True)
    heldout = cfg.heldout or list(NAMED_CLASSES)
    unknown = [c for c in heldout if c not in NAMED_CLASSES]
    if unknown:
        raise SystemExit(f"--heldout {unknown}: only named classes can be held out ({', '.join(NAMED_CLASSES)})")
    folds: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    cache = PartialCache(data, cfg, out / "frozen_cache.pt") if cfg.mode == "partial" else None
    t_cache = time.perf_counter() - t0
    for c in tqdm_(heldout, "held-out classes", cfg.progress):
        log.info("fold: hold out %s", c)
        fold = run_fold_partial(cache, c, cfg) if cache is not None else run_fold_full(data, c, out, cfg)
        folds.append(fold)
        s = {n: round(v["auroc"], 3) for n, v in fold["scores"].items()}
        log.info("fold %s: AUROC %s (%.0f s)", c, s, sum(fold["seconds"].values()))
        partial = {"config": _config(cfg), "folds": folds}
        atomic_write_text(out / "results.json", json.dumps(partial, indent=2, default=float) + "\n")
    summary = summarise(folds)
    default = choose_default(summary)
    result = {"config": _config(cfg), "folds": folds, "mean": summary, "default_score": default,
              "seconds_total": time.perf_counter() - t0, "seconds_frozen_cache": t_cache}
    atomic_write_text(out / "results.json", json.dumps(result, indent=2, default=float) + "\n")
    table = format_table(folds, summary)
    atomic_write_text(out / "table.md", table + f"\nDefault score (highest mean system AUROC): {default}\n")
    plot_results(folds, summary, out)
    print(table)
    print(f"default score: {default}; results in {out}")
    return result


def _config(cfg: OpensetConfig) -> dict[str, Any]:
    d = asdict(cfg)
    d["threads"] = os.environ.get("OMP_NUM_THREADS")
    return d


def build_parser() -> argparse.ArgumentParser:
    openset = import_for_help("train.openset")  # a stand-in without the train extra, so --help still works
    scores = openset.ALL_SCORES
    d = OpensetConfig(out="-", scores=list(scores))  # the defaults, in one place

    p = argparse.ArgumentParser(
        prog="python -m benchmarks.openset",
        description="Leave-one-class-out open-set benchmark: train without each named class, then measure how well "
                    "every rejection score rejects it (AUROC, FPR@95TPR, accuracy at the val threshold).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""examples:
  python -m train.synthetic --out data/synth --per-class 300 --size 64 --seed 0
  python -m benchmarks.openset --data data/synth --out runs/openset_synth --epochs 4 --img-size 64
  python -m benchmarks.openset --data data/synth --out runs/openset_synth --reuse      # re-score, no retraining
  python -m benchmarks.openset --data /work/shared/datasets/sem-hackathon --out runs/openset_real --img-size 128
  # docs/openset.md's synthetic table: full fine-tuned folds at 128 px, scored on a separate 150-per-class test set
  python -m train.synthetic --out data/synth2 --per-class 300 --size 128 --seed 0
  python -m train.synthetic --out data/synth2_test --per-class 150 --size 128 --seed 2 --split 0,0,1
  python -m benchmarks.openset --data data/synth2 --test data/synth2_test/test --out runs/os --mode full \\
      --epochs 20 --img-size 128
  python -m benchmarks.openset --data data/synth --out /tmp/os --heldout cracks ler --epochs 1 --img-size 32
  python -m benchmarks.openset --cost --out runs/openset_cost        # in-graph score head: latency and size
""" + help_note(openset))
    p.add_argument("--data", help="dataset root with train/, val/, test/ class folders")
    p.add_argument("--test", default=d.test,
                   help="test images (<class>/ folders) to score instead of DATA/test; use a large one, a fold's "
                        "AUROC on a few dozen held-out images is noisy (docs/openset.md)")
    p.add_argument("--out", required=True, help="output folder (results.json, table.md, plots, fold runs)")
    p.add_argument("--heldout", nargs="+", default=d.heldout, help="named classes to hold out (default: all 7)")
    p.add_argument("--scores", nargs="+", default=d.scores, choices=scores, help="scores to measure (at least one)")
    p.add_argument("--target-recall", type=float, default=d.target_recall,
                   help="known-class recall the val threshold keeps")
    p.add_argument("--knn-k", type=int, default=d.knn_k)
    p.add_argument("--threads", type=int, default=d.threads,
                   help="torch threads for training/extraction and ONNX Runtime threads for --cost (default: torch's "
                        "and ORT's own); on a CPU shared with other jobs, fewer threads avoid oversubscription")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    _fold_args(p.add_argument_group("training each fold"), d)
    cost = p.add_argument_group("cost of the in-graph score head (instead of the benchmark)")
    cost.add_argument("--cost", action="store_true",
                      help="ORT CPU latency and file size with vs without each score head")
    cost.add_argument("--cost-sizes", type=int, nargs="+", default=d.cost_sizes, help="input sizes")
    cost.add_argument("--cost-iters", type=int, default=d.cost_iters, help="timed runs per model")
    return p


def _fold_args(g: argparse._ArgumentGroup, d: OpensetConfig) -> None:
    g.add_argument("--mode", choices=("partial", "full"), default=d.mode,
                   help="partial (default): ImageNet lower stages frozen and cached once, top stages + head "
                        "fine-tuned per fold; full: the whole network trained per fold with train.loop")
    g.add_argument("--freeze-stages", type=int, default=d.freeze_stages,
                   help="partial mode: number of leading model.features blocks kept frozen (6 = stem..stage 5, "
                        "the top 2 MBConv stages, the 1280-d conv and the head are trained)")
    g.add_argument("--views", type=int, default=d.views, help="partial mode: augmented versions of each train image")
    g.add_argument("--lr", type=float, default=d.lr, help="partial mode: top-stage learning rate (head: 3x)")
    g.add_argument("--epochs", type=int, default=d.epochs)
    g.add_argument("--img-size", type=int, default=d.img_size)
    g.add_argument("--batch-size", type=int, default=d.batch_size)
    g.add_argument("--arch", default=d.arch)
    g.add_argument("--weights", default=d.weights, help="starting weights: none, imagenet, lite0 or a path")
    g.add_argument("--augment", default=d.augment, help="none, light, default or strong")
    g.add_argument("--head-warmup-epochs", type=int, default=d.head_warmup_epochs,
                   help="full mode: epochs with the backbone frozen")
    g.add_argument("--anomaly-p", type=float, default=d.anomaly_p,
                   help="full mode: train folds with outlier exposure (python -m train --anomaly-p)")
    g.add_argument("--max-train-per-class", type=int, default=d.max_train_per_class,
                   help="full mode: cap training images per class")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--reuse", action="store_true",
                   help="full mode: reuse fold models (and their saved outputs.npz) already under --out: re-scores "
                        "without training or feature extraction (test outputs are extracted again if --test changed)")


@cli("python -m benchmarks.openset")
def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = OpensetConfig(**vars(build_parser().parse_args(argv)))
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    # Fold folders lack the held-out class on purpose; train.data would warn about it for every dataset. The levels
    # are restored afterwards so a caller (or a test run) keeps its own logging.
    levels = {"train.data": logging.ERROR, "train.loop": logging.INFO}
    saved = {name: logging.getLogger(name).level for name in levels}
    try:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        if cfg.cost:
            run_cost(cfg)
        else:
            run_benchmark(cfg)
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
