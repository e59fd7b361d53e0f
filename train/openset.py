"""Open-set recognition: fit feature statistics on the training set and compute rejection scores in the graph.

A fab keeps meeting defect types the model never saw; a confident wrong label on one is the costliest error. Besides
the logit scores of :mod:`runtime.scores` (MSP, max-logit, energy) this module provides scores on the 1280-d
penultimate features, all from the same single forward pass:

* ``mahalanobis`` — minus the squared Mahalanobis distance to the nearest class mean (shared class covariance,
  Ledoit-Wolf shrunk because 1280 dimensions outnumber the training images), divided by the dimension.
* ``rel_mahalanobis`` — the same minus the distance under one Gaussian over all training features (Ren et al. 2021).
* ``knn`` — minus the distance from the L2-normalised feature to its k-th nearest normalised training feature.
* ``vim`` — energy minus a scaled norm of the feature outside the training features' principal subspace.

Higher = more like the known classes; the rule everywhere is *reject when score < threshold*.

How it is used:

1. End of training: :func:`fit_openset_from_loader` → a ``dict[str, Tensor]`` stored in the checkpoint under
   ``"openset"`` (plain tensors, so ``torch.load(..., weights_only=True)`` reads it).
2. Threshold on validation data: :func:`calibrate_threshold` picks the threshold that keeps ``target_recall`` of the
   *named* known classes (``other`` excluded, see below).
3. Export: :func:`scored_model` wraps the classifier so the graph has a second output ``"score"``
   (:data:`SCORE_OUTPUT`); metadata gets ``score``, ``threshold`` and ``score_output`` from :func:`metadata_updates`.
   Every backend (ONNX Runtime, TensorRT) then reads the score without any Python-side feature handling.

The ``other`` class. ``other`` is a trained class (real miscellaneous defects). Rejection and ``other`` meet in one
place: a rejected prediction and a predicted ``other`` are both reported as ``other``. So the threshold's
known-class recall is computed over the 7 named classes only (rejecting an ``other`` image is not an error), and by
default the feature statistics are fitted on the named classes only (``include_reject_class=False``): an image
that looks like the heterogeneous ``other`` class gets a low feature score and is rejected — to ``other``, the
answer it should get anyway — while the named-class statistics stay tight. ``benchmarks.openset`` measures both
choices (``<score>`` vs ``<score>+other``); including ``other`` lowered mean AUROC for every feature score
(docs/openset.md).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from runtime.contract import CLASSES, LOGIT_SCORES, REJECT_LABEL
from runtime.scores import FEATURE_SCORES
from train.confidence import choose_threshold
from train.models import forward_features

log = logging.getLogger(__name__)

#: Every score this module can put in the graph; logit scores need no statistics.
ALL_SCORES: tuple[str, ...] = LOGIT_SCORES + FEATURE_SCORES
#: Name of the extra ONNX output that carries the per-image rejection score.
SCORE_OUTPUT = "score"
#: Checkpoint key under which the fitted statistics are stored.
CHECKPOINT_KEY = "openset"
#: Default score (``python -m train --score``), from the leave-one-class-out benchmark (benchmarks/openset.py, system
#: view): energy led on real-image folds, where classifiers are as weak as real-data models are; on more accurate
#: synthetic folds KNN and ViM led, so models that accurate may prefer ``--score knn`` (docs/openset.md).
DEFAULT_SCORE = "energy"

#: Statistics each score needs inside the graph (everything else stays out of the exported file).
REQUIRED_STATS: dict[str, tuple[str, ...]] = {
    "msp": (),
    "max_logit": (),
    "energy": (),
    "mahalanobis": ("class_means", "maha_whiten"),
    "rel_mahalanobis": ("class_means", "maha_whiten", "bg_mean", "bg_whiten"),
    "knn": ("knn_bank", "knn_k"),
    "vim": ("vim_origin", "vim_residual", "vim_alpha"),
}


# ------------------------------------------------------------------ feature extraction
@dataclass
class Outputs:
    """Network outputs over a dataset: ``logits`` (N, C), ``features`` (N, D), ``labels`` (N,)."""

    logits: np.ndarray
    features: np.ndarray
    labels: np.ndarray


@torch.no_grad()
def collect_outputs(model: nn.Module, batches: Iterable[Sequence[torch.Tensor]], device: str | torch.device = "cpu",
                    progress: bool = False, desc: str = "features") -> Outputs:
    """Run ``model`` in eval mode over ``(images, labels, ...)`` batches and keep logits, features and labels."""
    was_training = model.training
    model.eval()
    logits, feats, labels = [], [], []
    it: Iterable[Sequence[torch.Tensor]] = batches
    if progress:
        from tqdm import tqdm

        it = tqdm(batches, desc=desc, leave=False)
    try:
        for batch in it:
            x, y = batch[0], batch[1]
            lo, fe = forward_features(model, x.to(device))
            logits.append(lo.float().cpu().numpy())
            feats.append(fe.float().cpu().numpy())
            labels.append(np.asarray(y.cpu() if isinstance(y, torch.Tensor) else y, np.int64))
    finally:
        model.train(was_training)
    if not logits:
        raise ValueError("collect_outputs: the data yielded no batches (empty dataset?)")
    return Outputs(np.concatenate(logits), np.concatenate(feats), np.concatenate(labels))


# ------------------------------------------------------------------ fitting
def _shrunk_whitener(centred: np.ndarray, shrinkage: float) -> np.ndarray:
    """``W`` with ``W Wᵀ = Σ⁻¹`` for ``Σ = (1-a) S + a tr(S)/D I``, the shrunk sample covariance of already-centred
    rows (``a`` = ``shrinkage``).

    Shrinkage matters: with a few thousand images in 1280 dimensions the sample covariance is singular, and its
    pseudo-inverse makes directions the training set never varied along dominate every distance.
    """
    from sklearn.covariance import empirical_covariance, shrunk_covariance

    cov = shrunk_covariance(empirical_covariance(centred, assume_centered=True), shrinkage)
    vals, vecs = np.linalg.eigh(cov)
    # Floor tiny or negative eigenvalues (rank-deficient or constant features) so the whitener stays finite.
    vals = np.maximum(vals, max(float(vals.max()) * 1e-9, 1e-12))
    return vecs / np.sqrt(vals)[None, :]


def _stratified_subset(labels: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """Indices of at most ``limit`` rows, taking about the same share from every class."""
    n = len(labels)
    if n <= limit:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        take = max(1, int(round(limit * len(idx) / n)))
        keep.append(rng.choice(idx, size=min(take, len(idx)), replace=False))
    return np.sort(np.concatenate(keep))[:limit]


def fit_openset_stats(features: np.ndarray, labels: np.ndarray, weight: np.ndarray | torch.Tensor,
                      bias: np.ndarray | torch.Tensor, *, fit_classes: Sequence[int] | None = None,
                      knn_k: int = 10, knn_bank_size: int = 2048, vim_dim: int | None = None,
                      seed: int = 0) -> dict[str, torch.Tensor]:
    """Fit every feature score's statistics on training ``features`` (N, D) with integer ``labels`` (N,).

    ``weight`` (C, D) and ``bias`` (C,) are the final linear layer (ViM needs them). ``fit_classes`` are the class
    indices whose images define "known" (default: every class present). Returns float32/int64 tensors only, so
    the dict can go into a checkpoint that loads with ``weights_only=True``.
    """
    from sklearn.covariance import ledoit_wolf_shrinkage

    x = np.asarray(features, np.float64)
    y = np.asarray(labels, np.int64)
    if x.ndim != 2 or len(x) != len(y):
        raise ValueError(f"fit_openset_stats: features must be (N, D) with one label each, got {x.shape} and "
                         f"{y.shape}")
    if not np.isfinite(x).all():
        raise ValueError("fit_openset_stats: features contain NaN or infinity (diverged model?)")
    classes = sorted(set(np.unique(y).tolist()) if fit_classes is None else {int(c) for c in fit_classes})
    mask = np.isin(y, classes)
    x, y = x[mask], y[mask]
    counts = {c: int((y == c).sum()) for c in classes}
    if len(classes) < 1 or min(counts.values()) < 2:
        raise ValueError(f"fit_openset_stats: need at least 2 training images of every fitted class, got {counts}")
    n, d = x.shape

    means = np.stack([x[y == c].mean(0) for c in classes])
    centred = x - means[np.searchsorted(classes, y)]
    shrinkage = float(ledoit_wolf_shrinkage(centred, assume_centered=True))
    whiten = _shrunk_whitener(centred, shrinkage)
    bg_mean = x.mean(0)
    # The background Gaussian takes the class Gaussian's shrinkage, not its own Ledoit-Wolf estimate. Its between-class
    # spread makes Ledoit-Wolf shrink it much less, so off the training manifold d0 grew faster than the class
    # distance and d0 - d2 ranked unknown images *above* known ones. With one intensity the two distances cancel as
    # Ren et al. intend (docs/openset.md).
    bg_whiten = _shrunk_whitener(x - bg_mean, shrinkage)

    # KNN bank: normalised training features, stratified if there are more than we want to carry in the model.
    bank_idx = _stratified_subset(y, knn_bank_size, seed)
    bank = x[bank_idx] / np.maximum(np.linalg.norm(x[bank_idx], axis=1, keepdims=True), 1e-12)
    k = int(min(max(knn_k, 1), len(bank)))

    # ViM: principal subspace of features relative to the origin o = -W⁺b where all logits are zero.
    w = np.asarray(weight.detach().cpu() if isinstance(weight, torch.Tensor) else weight, np.float64)
    b = np.asarray(bias.detach().cpu() if isinstance(bias, torch.Tensor) else bias, np.float64)
    origin = -np.linalg.pinv(w) @ b
    xo = x - origin
    vals, vecs = np.linalg.eigh(xo.T @ xo / n)
    order = np.argsort(vals)[::-1]
    if vim_dim is None:
        # Principal dims: enough to hold 99% of the (uncentred) energy, but never more than the data can support.
        frac = np.cumsum(vals[order]) / vals.sum()
        vim_dim = int(np.searchsorted(frac, 0.99) + 1)
    vim_dim = int(min(max(vim_dim, 1), d - 1, n - 1))
    residual = vecs[:, order[vim_dim:]]
    res_norm = np.linalg.norm(xo @ residual, axis=1)
    logits = x @ w.T + b
    alpha = float(logits.max(1).mean() / max(res_norm.mean(), 1e-12))

    f32 = lambda a: torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float32)  # noqa: E731
    return {
        "class_ids": torch.as_tensor(classes, dtype=torch.int64),
        "class_means": f32(means),
        "maha_whiten": f32(whiten),
        "bg_mean": f32(bg_mean),
        "bg_whiten": f32(bg_whiten),
        "knn_bank": f32(bank),
        "knn_k": torch.tensor(k, dtype=torch.int64),
        "vim_origin": f32(origin),
        "vim_residual": f32(residual),
        "vim_alpha": torch.tensor(alpha, dtype=torch.float32),
        "train_count": torch.tensor(n, dtype=torch.int64),
    }


def fit_classes_for(labels: Sequence[str] = CLASSES, include_reject_class: bool = False) -> list[int]:
    """Class indices whose training images define "known" for the feature statistics (see module docstring)."""
    return [i for i, name in enumerate(labels) if include_reject_class or name != REJECT_LABEL]


def final_linear(model: nn.Module) -> nn.Linear:
    """The last ``nn.Linear`` of ``model.classifier`` (torchvision layout)."""
    head = model.classifier
    layers = [m for m in head.modules() if isinstance(m, nn.Linear)] if isinstance(head, nn.Module) else []
    if not layers:
        raise TypeError("model.classifier has no nn.Linear; expected the torchvision EfficientNet layout")
    return layers[-1]


def fit_openset_from_loader(model: nn.Module, batches: Iterable[Sequence[torch.Tensor]], *,
                            labels: Sequence[str] = CLASSES, include_reject_class: bool = False,
                            device: str | torch.device = "cpu", progress: bool = True,
                            **fit_kwargs: object) -> dict[str, torch.Tensor]:
    """End-of-training hook: features of the training set (un-augmented!) → statistics for the checkpoint."""
    out = collect_outputs(model, batches, device, progress=progress, desc="open-set statistics")
    lin = final_linear(model)
    # A dataset may lack a class (a fab without cracks, a leave-one-class-out fold): "known" is then what was seen.
    counts = np.bincount(np.asarray(out.labels, np.int64), minlength=len(labels))
    wanted = fit_classes_for(labels, include_reject_class)
    fit = [c for c in wanted if counts[c] >= 2]
    if fit and len(fit) < len(wanted):
        missing = ", ".join(f"{labels[c]} ({counts[c]})" for c in wanted if c not in fit)
        log.warning("open-set statistics fitted without %s: fewer than 2 training images", missing)
    return fit_openset_stats(out.features, out.labels, lin.weight, lin.bias,
                             fit_classes=fit or wanted, **fit_kwargs)  # type: ignore[arg-type]


def stats_to_numpy(stats: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: (v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)) for k, v in stats.items()}


def check_stats(stats: Mapping[str, object] | None, score: str, feature_dim: int | None = None,
                source: str = "checkpoint") -> None:
    """Raise ``ValueError`` naming ``source`` if ``stats`` cannot compute ``score``."""
    if score not in ALL_SCORES:
        raise ValueError(f"unknown rejection score {score!r}; choose one of {', '.join(ALL_SCORES)}")
    need = REQUIRED_STATS[score]
    if not need:
        return
    if stats is None:
        raise ValueError(f"{source}: score {score!r} needs open-set statistics (checkpoint key {CHECKPOINT_KEY!r}), "
                         "but there are none; retrain, or refit them with train.openset.fit_openset_from_loader")
    missing = [k for k in need if k not in stats]
    if missing:
        raise ValueError(f"{source}: open-set statistics lack {missing} needed by score {score!r}")
    for k in need:
        v = stats[k]
        if not isinstance(v, torch.Tensor) or (v.is_floating_point() and not torch.isfinite(v).all()):
            raise ValueError(f"{source}: open-set statistic {k!r} is not a finite tensor")
    if feature_dim is not None:
        dims = {"class_means": -1, "maha_whiten": 0, "bg_mean": 0, "knn_bank": -1, "vim_origin": 0,
                "vim_residual": 0}
        for k in need:
            if k in dims and stats[k].shape[dims[k]] != feature_dim:  # type: ignore[union-attr]
                raise ValueError(f"{source}: open-set statistic {k!r} has shape {tuple(stats[k].shape)}, "  # type: ignore[union-attr]
                                 f"which does not fit {feature_dim}-d features")


# ------------------------------------------------------------------ in-graph scoring
class ScoreHead(nn.Module):
    """``(logits, features) → score (N,)`` for one named score; carries only the statistics that score needs.

    Written with ops that export to ONNX opset 17 and that TensorRT supports (MatMul, ReduceSum, ReduceMin, TopK,
    Sqrt, Softmax, ReduceLogSumExp). Distances are computed as per-class differences of whitened features rather
    than ``‖z‖² - 2 z·m + ‖m‖²``, which would cancel catastrophically in low precision. In the FP16 and INT8
    artifacts the head stays float32 (``export.onnx_export.convert_to_fp16`` keeps the nodes only ``score``
    depends on in FP32 and casts the features up): an image far from every class gives distances beyond FP16's
    65504, and relative Mahalanobis subtracts two similar distances.
    """

    def __init__(self, score: str, stats: Mapping[str, torch.Tensor] | None = None, temperature: float = 1.0) -> None:
        super().__init__()
        check_stats(stats, score)
        self.score = score
        self.temperature = float(temperature)
        st = {k: v.detach().to(torch.float32) for k, v in (stats or {}).items() if k in REQUIRED_STATS[score]}
        self.knn_k = int(st.pop("knn_k").item()) if "knn_k" in st else 0
        self.vim_alpha = float(st.pop("vim_alpha").item()) if "vim_alpha" in st else 0.0
        if score in ("mahalanobis", "rel_mahalanobis"):
            # Whiteners pre-scaled by 1/√D: the squared distances come out already divided by D, so every
            # summand stays O(1/D) and FP16 engines cannot overflow while summing 1280 of them.
            scale = 1.0 / math.sqrt(st["maha_whiten"].shape[0])
            whiten = st["maha_whiten"] * scale
            self.register_buffer("whiten", whiten)
            self.register_buffer("means_white", st["class_means"] @ whiten)
        if score == "rel_mahalanobis":
            bg_whiten = st["bg_whiten"] * scale
            self.register_buffer("bg_whiten", bg_whiten)
            self.register_buffer("bg_mean_white", (st["bg_mean"] @ bg_whiten)[None, :])
        if score == "knn":
            self.register_buffer("bank_t", st["knn_bank"].t().contiguous())
        if score == "vim":
            self.register_buffer("origin", st["vim_origin"].clone())
            self.register_buffer("residual", st["vim_residual"].clone())

    def _sq_dist(self, feats: torch.Tensor) -> torch.Tensor:
        z = feats @ self.whiten  # (N, D)
        return ((z[:, None, :] - self.means_white[None, :, :]) ** 2).sum(-1)  # (N, K)

    def forward(self, logits: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        s = self.score
        if s == "msp":
            return torch.softmax(logits / self.temperature, dim=1).max(dim=1).values
        if s == "max_logit":
            return logits.max(dim=1).values
        if s == "energy":
            return self.temperature * torch.logsumexp(logits / self.temperature, dim=1)
        if s == "mahalanobis":
            return -self._sq_dist(feats).min(dim=1).values
        if s == "rel_mahalanobis":
            d0 = ((feats @ self.bg_whiten - self.bg_mean_white) ** 2).sum(-1)
            return d0 - self._sq_dist(feats).min(dim=1).values
        if s == "knn":
            x = feats / feats.norm(dim=1, keepdim=True).clamp_min(1e-12)
            sim = torch.topk(x @ self.bank_t, self.knn_k, dim=1).values[:, self.knn_k - 1]
            return -torch.sqrt((2.0 - 2.0 * sim).clamp_min(0.0))
        if s == "vim":
            res = ((feats - self.origin) @ self.residual).norm(dim=1)
            return torch.logsumexp(logits, dim=1) - self.vim_alpha * res
        raise AssertionError(s)  # unreachable: checked in __init__


class ScoredModel(nn.Module):
    """A classifier plus its score head: ``images → (logits, score)``; export with output names
    ``[meta.output_name, SCORE_OUTPUT]``."""

    def __init__(self, model: nn.Module, head: ScoreHead) -> None:
        super().__init__()
        self.model = model
        self.head = head

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, feats = forward_features(self.model, x)
        return logits, self.head(logits, feats)


def scored_model(model: nn.Module, stats: Mapping[str, torch.Tensor] | None, score: str = DEFAULT_SCORE,
                 temperature: float = 1.0) -> ScoredModel:
    """Wrap ``model`` so its graph also outputs ``score``; checks the statistics fit the model."""
    check_stats(stats, score, final_linear(model).in_features)
    return ScoredModel(model, ScoreHead(score, stats, temperature)).eval()


def needs_score_output(score: str) -> bool:
    """Feature scores must be computed in the graph; logit scores the runtime computes from the logits itself."""
    return score in FEATURE_SCORES


# ------------------------------------------------------------------ thresholds
def score_outputs(out: Outputs, stats: Mapping[str, torch.Tensor] | None, score: str,
                  temperature: float = 1.0) -> np.ndarray:
    """Scores (N,) for already collected outputs, computed by the same head that goes into the graph."""
    with torch.no_grad():
        return ScoreHead(score, stats, temperature)(torch.from_numpy(out.logits),
                                                    torch.from_numpy(out.features)).numpy()


def stats_from_checkpoint(ckpt: Mapping[str, object], score: str | None = None,
                          source: str = "checkpoint") -> dict[str, torch.Tensor] | None:
    """The open-set statistics stored in a loaded checkpoint (None if absent), checked for ``score`` if given."""
    stats = ckpt.get(CHECKPOINT_KEY)
    if stats is not None and not (isinstance(stats, Mapping) and all(isinstance(v, torch.Tensor)
                                                                      for v in stats.values())):
        raise ValueError(f"{source}: {CHECKPOINT_KEY!r} is not a dict of tensors")
    if score is not None:
        check_stats(stats, score, source=source)  # type: ignore[arg-type]
    return dict(stats) if stats is not None else None  # type: ignore[arg-type]


def named_class_mask(labels: np.ndarray, class_names: Sequence[str] = CLASSES) -> np.ndarray:
    """True for images of the named classes (not ``other``): the ones whose recall the threshold protects."""
    if REJECT_LABEL not in class_names:
        return np.ones(len(labels), bool)
    return np.asarray(labels) != list(class_names).index(REJECT_LABEL)


def calibrate_threshold(model: nn.Module, stats: Mapping[str, torch.Tensor] | None,
                        val_batches: Iterable[Sequence[torch.Tensor]], score: str = DEFAULT_SCORE, *,
                        target_recall: float = 0.95, temperature: float = 1.0, labels: Sequence[str] = CLASSES,
                        device: str | torch.device = "cpu") -> tuple[float, dict[str, float]]:
    """Threshold on validation data keeping ``target_recall`` of the named known classes → (threshold, report).

    The score is computed by the same :class:`ScoreHead` that goes into the exported graph.
    """
    out = collect_outputs(model, val_batches, device, desc="threshold")
    s = score_outputs(out, stats, score, temperature)
    named = named_class_mask(out.labels, labels)
    t = choose_threshold(s, named, target_recall)
    pred = out.logits.argmax(1)
    accepted = s >= t
    report = {
        "threshold": t,
        "target_recall": float(target_recall),
        "val_named_recall": float(accepted[named].mean()),
        "val_named_accuracy": float((pred[named] == out.labels[named]).mean()),
        "val_named_accuracy_with_rejection": float(((pred == out.labels) & accepted)[named].mean()),
        "val_images": float(len(s)),
    }
    return t, report


def metadata_updates(score: str, threshold: float | None) -> dict[str, object]:
    """Fields to set on ``ModelMetadata`` (``meta.with_updates(**...)``) for a model exported with this score."""
    return {"score": score, "threshold": None if threshold is None else float(threshold),
            "score_output": SCORE_OUTPUT if needs_score_output(score) else None}
