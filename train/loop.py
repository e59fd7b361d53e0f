"""The training run: transfer learning on ``DIR/{train,val[,test]}/<class>/``, resumable, then calibration.

Laid out like torchvision's classification reference: set-up functions (:func:`build_datasets`,
:func:`build_loaders`, :func:`build_criterion`, :func:`build_optimizer`, :func:`build_scheduler`), the per-epoch
steps in :mod:`train.engine` (``train_one_epoch``, ``evaluate``), a short :func:`train` that runs the epochs and
checkpoints, and :func:`finalise` that calibrates the best weights.

Recipe (defaults in :class:`TrainConfig`): a head-only warm-up (backbone learning rate 0), then the full network
with AdamW, a short linear warm-up and per-step cosine decay, optional layer-wise learning-rate decay; label
smoothing with class-weighted cross-entropy (or a class-balanced sampler); SEM augmentation on grey images
(:mod:`train.data`); early stopping on val macro-F1. channels_last throughout, AMP on CUDA.

Reproducible and resumable: data order is ``randperm`` seeded with (seed, epoch), augmentation is seeded per
(seed, epoch, sample), and ``last.pt`` (written atomically at each epoch end) carries model, optimizer, scheduler,
RNG state and history. ``resume=True`` after a kill (even mid-epoch) restarts the interrupted epoch from ``last.pt``
and finishes the same schedule with the same data order. After training, ``best.pt`` (best val macro-F1) gets a
temperature and rejection threshold fitted on val (:mod:`train.confidence`) and its final :class:`ModelMetadata`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler, Subset

from runtime.contract import CLASSES, INTENSITY_MODES, ModelMetadata
from runtime.files import atomic_write_bytes, atomic_write_text
from runtime.preprocess import Intensity
from runtime.quality import QualityGate, default_limits
from runtime.scores import is_rejected, softmax
from train import distributed
from train.checkpoint import cpu_state_dict, get_rng_state, load_checkpoint, save_checkpoint, set_rng_state
from train.confidence import calibrate, reject_mask
from train.data import (
    AugmentConfig,
    DatasetError,
    ImageFolderDataset,
    fingerprint_dataset,
    fit_quality,
    scan_folder,
    split_dirs,
)
from train.ema import WeightEMA
from train.engine import EpochStats, evaluate, train_one_epoch
from train.evaluate import compute_metrics, write_report
from train.models import ARCHS, build_model, default_normalisation
from train.openset import CHECKPOINT_KEY as OPENSET_KEY
from train.openset import (
    DEFAULT_SCORE,
    Outputs,
    calibrate_threshold,
    collect_outputs,
    fit_openset_from_loader,
    metadata_updates,
    needs_score_output,
    score_outputs,
)

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Every option of a run; the defaults are the recipe chosen on real SEM images (docs/training.md)."""

    data: str = ""
    out: str = ""
    arch: str = "efficientnet_lite0"
    weights: str = "lite0"
    epochs: int = 30  # longer than the early-stopping patience, so late bests are reached (docs/training.md)
    img_size: int = 224  # small sources are upsampled to it (docs/training.md)
    batch_size: int = 32
    lr: float = 3e-4  # backbone peak learning rate
    head_lr: float = 1e-3
    layer_decay: float = 1.0  # lr multiplier per feature stage going down from the top (1 = same for all)
    weight_decay: float = 0.02
    head_warmup_epochs: int = 1  # backbone frozen (lr 0)
    warmup_epochs: float = 1.0  # linear warm-up of the backbone after the head warm-up
    label_smoothing: float = 0.1
    balance: str = "loss"  # loss | sampler | none
    augment: str = "default"  # none | light | default | strong
    crop_scale: tuple[float, float] | None = None  # random-crop area fraction (min, max); None = the preset's
    anomaly_p: float = 0.0  # outlier exposure: share of clean training images given a pasted anomaly, labelled other
    # How pixel values become 0-1 (runtime.contract.INTENSITY_MODES): percentile makes bit depth, brightness and
    # contrast drop out (docs/frame-quality.md); full_scale is how models were made before.
    intensity: str = "percentile"
    acquisition_p: float = 0.3  # share of training images dimmed/flattened/gamma'd and requantised (train.data)
    content_free: float = 0.05  # generated content-free frames added to `other`, as a share of the training images
    # Share of those drawn until the model's own frame-quality gate lets them through (mildly blurred scenes): fewer
    # content-free frames reach a class, at a cost in smooth-class recall (docs/frame-quality.md).
    content_free_hard: float = 0.0
    # Early stopping on val macro-F1 (epochs without improvement; 0 = never stop early), long enough to keep a late
    # best epoch while cutting plateaued runs (docs/training.md).
    patience: int = 12
    # Exponential moving average of the weights, per optimizer step (0 = off). With it on, the average is what is
    # validated, early-stopped on and saved as best.pt; the raw weights' val macro-F1 is logged beside it.
    ema: float = 0.0
    seed: int = 0
    workers: int = 0
    threads: int = 0  # torch intra-op threads (0 = torch's default, one per core)
    cache: bool = True
    score: str = DEFAULT_SCORE  # the rejection score; why this default: docs/openset.md
    target_recall: float = 0.95
    device: str = "auto"
    progress: bool = True

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def augment_config(cfg: TrainConfig) -> AugmentConfig | None:
    """The ``--augment`` preset with ``--crop-scale`` applied; None for ``--augment none``."""
    if cfg.crop_scale is not None and not 0.0 < cfg.crop_scale[0] <= cfg.crop_scale[1] <= 1.0:
        raise ValueError(f"--crop-scale {cfg.crop_scale[0]} {cfg.crop_scale[1]}: need 0 < MIN <= MAX <= 1 "
                         "(area fractions of the image)")
    if not 0.0 <= cfg.anomaly_p <= 1.0:
        raise ValueError(f"--anomaly-p {cfg.anomaly_p}: need a share between 0 and 1")
    aug = AugmentConfig.strength(cfg.augment)
    if aug is None and cfg.anomaly_p:
        raise ValueError(f"--anomaly-p {cfg.anomaly_p} needs an --augment preset (anomalies are pasted while "
                         "augmenting); --augment none turns augmentation off")
    if aug is not None and cfg.crop_scale is not None:
        aug = replace(aug, crop_scale=(float(cfg.crop_scale[0]), float(cfg.crop_scale[1])))
    if aug is not None and cfg.anomaly_p:
        aug = replace(aug, anomaly_p=float(cfg.anomaly_p))
    if aug is not None and cfg.acquisition_p:
        aug = replace(aug, acquisition_p=float(cfg.acquisition_p))
    return aug


class EpochSampler(Sampler):
    """Yields ``(index, epoch)`` so dataset copies inside persistent workers seed augmentation by epoch too."""

    def __init__(self) -> None:
        self.indices: list[int] = []
        self.epoch = 0

    def set(self, indices: list[int], epoch: int) -> None:
        self.indices, self.epoch = list(indices), epoch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter([(i, self.epoch) for i in self.indices])

    def __len__(self) -> int:
        return len(self.indices)


class _EpochDataset(torch.utils.data.Dataset):
    def __init__(self, ds: ImageFolderDataset) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        i, epoch = key
        self.ds.set_epoch(epoch)
        return self.ds[i]


class _BatchSampler(Sampler):
    """Consecutive batches of the epoch order; a trailing batch of one is dropped (BatchNorm needs two)."""

    def __init__(self, sampler: EpochSampler, batch_size: int) -> None:
        self.sampler, self.batch_size = sampler, batch_size

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        items = list(self.sampler)
        for s in range(0, len(items), self.batch_size):
            chunk = items[s:s + self.batch_size]
            if len(chunk) >= 2:
                yield chunk

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size + (1 if n % self.batch_size >= 2 else 0)


def epoch_order(n: int, epoch: int, seed: int, weights: np.ndarray | None = None) -> list[int]:
    """The data order of one epoch: a pure function of (seed, epoch), so a resumed run repeats it."""
    g = torch.Generator().manual_seed(int(seed) * 100_003 + int(epoch))
    if weights is None:
        return torch.randperm(n, generator=g).tolist()
    return torch.multinomial(torch.as_tensor(weights, dtype=torch.float64), n, replacement=True, generator=g).tolist()


def order_digest(order: list[int]) -> str:
    return hashlib.sha256(np.asarray(order, np.int64).tobytes()).hexdigest()[:16]


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """Head at ``head_lr``; feature stages at ``lr × layer_decay^(stages below the top)``; no decay on BN/bias."""
    n_stages = len(model.features)
    groups: list[dict[str, Any]] = []
    for i, stage in enumerate(model.features):
        mult = cfg.layer_decay ** (n_stages - 1 - i)
        decay = [p for n, p in stage.named_parameters() if p.ndim > 1]
        no_decay = [p for n, p in stage.named_parameters() if p.ndim <= 1]
        groups.append({"params": decay, "lr": cfg.lr * mult, "weight_decay": cfg.weight_decay, "role": "backbone"})
        groups.append({"params": no_decay, "lr": cfg.lr * mult, "weight_decay": 0.0, "role": "backbone"})
    head = list(model.classifier.parameters())
    groups.append({"params": head, "lr": cfg.head_lr, "weight_decay": cfg.weight_decay, "role": "head"})
    return [g for g in groups if g["params"]]


def lr_lambdas(groups: list[dict[str, Any]], cfg: TrainConfig, steps_per_epoch: int) -> list[Any]:
    total = cfg.epochs * steps_per_epoch
    frozen = cfg.head_warmup_epochs * steps_per_epoch
    warm = max(1, int(cfg.warmup_epochs * steps_per_epoch))

    def cosine(step: int, start: int) -> float:
        span = max(1, total - start)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - start) / span)))

    def backbone(step: int) -> float:
        if step < frozen:
            return 0.0
        if step < frozen + warm:
            return (step - frozen + 1) / warm
        return cosine(step, frozen + warm)

    def head(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return cosine(step, warm)

    return [head if g["role"] == "head" else backbone for g in groups]


def class_weights(counts: np.ndarray) -> np.ndarray:
    """Inverse-frequency weights over the classes present, mean 1 over samples' classes; 0 for absent classes."""
    counts = counts.astype(np.float64)
    present = counts > 0
    w = np.zeros_like(counts)
    w[present] = counts.sum() / (present.sum() * counts[present])
    return w


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


# ------------------------------------------------------------------ logs and plots
def write_history(out: Path, history: list[dict[str, Any]]) -> None:
    atomic_write_text(out / "history.json", json.dumps(history, indent=2) + "\n")
    if history:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(history[0]))
        w.writeheader()
        w.writerows(history)
        atomic_write_text(out / "history.csv", buf.getvalue())
        plot_history(history, out / "curves.png")


def plot_history(history: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    a1.plot(ep, [h["train_loss"] for h in history], "o-", label="train loss")
    a1.plot(ep, [h["val_loss"] for h in history], "o-", label="val loss")
    a1.set_xlabel("epoch")
    a1.legend()
    a2.plot(ep, [h["train_acc"] for h in history], "o-", label="train accuracy")
    a2.plot(ep, [h["val_acc"] for h in history], "o-", label="val accuracy")
    a2.plot(ep, [h["val_macro_f1"] for h in history], "o-", label="val macro-F1")
    a2.set_ylim(0, 1)
    a2.set_xlabel("epoch")
    a2.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _should_stop(history: list[dict[str, Any]], patience: int) -> bool:
    if patience <= 0 or not history:
        return False
    best = max(range(len(history)), key=lambda i: history[i]["val_macro_f1"])  # first best wins ties
    return len(history) - 1 - best >= patience


#: Test hook: "N:PATH" makes a run write PATH ("epoch step") and wait to be killed right after its N-th optimizer
#: step, so tests kill it at a known step instead of after a guessed sleep (tests/train/test_training.py).
PAUSE_ENV = "SEM_TRAIN_PAUSE_AFTER_STEP"


def _pause_point() -> tuple[int, Path] | None:
    step, _, path = os.environ.get(PAUSE_ENV, "").partition(":")
    return (int(step), Path(path)) if step and path else None


def _pause(epoch: int, step: int, flag: Path) -> None:
    flag.write_text(f"{epoch} {step}\n")
    while True:  # until the test's SIGKILL
        time.sleep(0.2)


# ------------------------------------------------------------------ set-up: loss, optimizer, scheduler
def build_criterion(counts: np.ndarray, cfg: TrainConfig, device: str) -> nn.Module:
    """Cross-entropy with label smoothing, weighted by inverse class frequency under ``--balance loss``."""
    weight = (torch.as_tensor(class_weights(counts), dtype=torch.float32, device=device) if cfg.balance == "loss"
              else None)
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)


def build_optimizer(groups: list[dict[str, Any]], cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over ``groups`` (:func:`param_groups`: each group carries its own learning rate and weight decay)."""
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The per-step schedule of :func:`lr_lambdas` for each of the optimizer's groups (by its ``role``)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambdas(optimizer.param_groups, cfg, steps_per_epoch))


def build_datasets(cfg: TrainConfig, ckpt: dict[str, Any] | None) -> tuple[ImageFolderDataset, ImageFolderDataset,
                                                                             ModelMetadata]:
    """The augmented training set, the plain val set and the run's metadata (a resumed run keeps the saved
    normalisation and data fingerprint)."""
    splits = split_dirs(cfg.data)
    size = (cfg.img_size, cfg.img_size)
    if ckpt is not None:
        mean, std = tuple(ckpt["metadata"]["mean"]), tuple(ckpt["metadata"]["std"])
    else:
        mean, std = default_normalisation(cfg.arch, cfg.weights)
    aug = augment_config(cfg)
    if cfg.intensity not in INTENSITY_MODES:
        raise ValueError(f"unknown --intensity {cfg.intensity!r}; choose one of {', '.join(INTENSITY_MODES)}")
    if not 0.0 <= cfg.content_free <= 1.0:
        raise ValueError(f"--content-free {cfg.content_free}: need a share between 0 and 1")
    if not 0.0 <= cfg.content_free_hard <= 1.0:
        raise ValueError(f"--content-free-hard {cfg.content_free_hard}: need a share between 0 and 1")
    intensity = Intensity(cfg.intensity)
    n_free = int(round(cfg.content_free * len(scan_folder(splits["train"], CLASSES, verify=False).samples)))
    fingerprint = ckpt["metadata"]["data_fingerprint"] if ckpt is not None else fingerprint_dataset(cfg.data)
    meta = ModelMetadata(labels=CLASSES, input_size=size, mean=mean, std=std, arch=cfg.arch,
                         data_fingerprint=fingerprint, intensity=cfg.intensity, extra={"train_args": asdict(cfg)})
    train_ds = ImageFolderDataset(splits["train"], size, mean, std, augment=aug, cache=cfg.cache, seed=cfg.seed,
                                  intensity=intensity, content_free=n_free,
                                  gate=content_free_gate(splits["train"], meta).judge
                                  if n_free and cfg.content_free_hard else None, hard_share=cfg.content_free_hard)
    val_ds = ImageFolderDataset.for_model(splits["val"], meta, cache=cfg.cache)
    counts = train_ds.class_counts(len(CLASSES))
    log.info("train %d images %s; val %d images; %d file(s) skipped", len(train_ds),
             dict(zip(CLASSES, counts.tolist())), len(val_ds), len(train_ds.problems) + len(val_ds.problems))
    return train_ds, val_ds, meta


def content_free_gate(train_dir: Path, meta: ModelMetadata) -> QualityGate:
    """The frame-quality gate the trained model will ship with (fitted on the training split as :func:`finalise`
    fits it; the default limits where too few images): the content-free frames it lets through are the ones the
    network has to send to ``other`` itself."""
    q = fit_quality(train_dir, meta)
    if q is None:
        return QualityGate(default_limits(meta.intensity), fitted=False, input_size=tuple(meta.input_size))
    return QualityGate.for_model(meta.with_updates(quality=q), str(train_dir))


def build_loaders(cfg: TrainConfig, train_ds: ImageFolderDataset, val_ds: ImageFolderDataset, device: str,
                  ddp: distributed.DistContext) -> tuple[DataLoader, EpochSampler, DataLoader, Callable | None]:
    """Training loader (its order set per epoch through the returned sampler), val loader and, under torchrun, the
    function that gathers every rank's val rows."""
    sampler = EpochSampler()
    # Its own generator: the loader's per-iterator seed draw must not consume the global RNG (dropout, stochastic
    # depth), or results would depend on worker settings and on where a run was resumed.
    loader = DataLoader(_EpochDataset(train_ds), batch_sampler=_BatchSampler(sampler, cfg.batch_size),
                        num_workers=cfg.workers, persistent_workers=cfg.workers > 0,
                        pin_memory=device.startswith("cuda"), generator=torch.Generator().manual_seed(cfg.seed))
    # DDP: each rank validates its shard; the logits are gathered, so every rank computes the same metrics.
    val_idx = ddp.val_indices(len(val_ds)) if ddp.enabled else None
    val_loader = DataLoader(val_ds if val_idx is None else Subset(val_ds, val_idx), batch_size=max(cfg.batch_size, 64),
                            num_workers=0)
    sampler.set(ddp.shard(list(range(len(train_ds))), 0, cfg.seed, shuffle=True), 0)
    return loader, sampler, val_loader, (partial(ddp.gather_rows, val_idx) if ddp.enabled else None)


# ------------------------------------------------------------------ the run
@dataclass
class _Run:
    """What one training process holds from epoch to epoch."""

    cfg: TrainConfig
    out: Path
    device: str
    ddp: distributed.DistContext
    meta: ModelMetadata
    model: nn.Module  # what is saved
    train_model: nn.Module  # what is called: ``model``, or DDP around it under torchrun
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    loader: DataLoader
    sampler: EpochSampler
    val_loader: DataLoader
    gather: Callable | None
    n_train: int
    sample_w: np.ndarray | None
    ema: WeightEMA | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    start_epoch: int = 0

    @property
    def selected(self) -> nn.Module:
        """The weights validated, early-stopped on and saved as best.pt: the average under ``--ema``."""
        return self.ema.model if self.ema is not None else self.model


def train(cfg: TrainConfig, resume: bool = False) -> dict[str, Any]:
    """Train (or resume) a run into ``cfg.out``; returns the summary also written to ``summary.json``."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    # DDP (torchrun, train.distributed): join the group; a single process gets a no-op context.
    ddp = distributed.setup(resolve_device(cfg.device), cfg.threads)
    cfg, ckpt = _resume_point(cfg, out, resume, ddp)
    run = _build_run(cfg, out, ddp, ckpt)
    del ckpt
    _fit(run)
    device, history = run.device, run.history
    del run  # stops persistent loader workers before the (single-process) finalisation
    # DDP: rank 0 alone calibrates and writes the final model; the others are done.
    if ddp.enabled:
        ddp.close()
        if not ddp.is_main:
            return {}
    return finalise(cfg, out, device, history)


def _resume_point(cfg: TrainConfig, out: Path, resume: bool,
                  ddp: distributed.DistContext) -> tuple[TrainConfig, dict[str, Any] | None]:
    """The config and checkpoint to start from: on ``resume`` (or a torchrun restart after a rank died, on every
    rank) ``last.pt`` and its saved schedule, where only where the data lives and how it is loaded may change."""
    last_path = out / "last.pt"
    if ddp.restart and not resume and last_path.is_file():
        log.warning("torchrun restart %d: resuming from %s", ddp.restart, last_path)
        resume = True
    if not resume:
        return cfg, None
    ckpt = load_checkpoint(last_path)
    saved = TrainConfig.from_dict(ckpt["args"])
    saved.data, saved.out, saved.workers, saved.progress = cfg.data or saved.data, cfg.out, cfg.workers, cfg.progress
    saved.device, saved.threads = cfg.device, cfg.threads
    log.info("resuming %s from %s (epoch %d of %d done)", out, last_path, ckpt["epoch"], saved.epochs)
    return saved, ckpt


def _build_run(cfg: TrainConfig, out: Path, ddp: distributed.DistContext, ckpt: dict[str, Any] | None) -> _Run:
    """Seeds, data, model, loss, optimizer and scheduler, in the order that makes a seed repeat; then the saved
    state of a resumed run."""
    if cfg.arch not in ARCHS:
        raise ValueError(f"unknown --arch {cfg.arch!r}; choose one of {', '.join(ARCHS)}")
    device = ddp.device if ddp.enabled else resolve_device(cfg.device)
    if cfg.threads > 0:
        # On a shared CPU, fewer threads than cores avoids OpenMP oversubscription (docs/training.md).
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    train_ds, val_ds, meta = build_datasets(cfg, ckpt)
    model = build_model(cfg.arch, len(CLASSES), "none" if ckpt is not None else cfg.weights)
    model = model.to(device).to(memory_format=torch.channels_last)
    counts = train_ds.class_counts(len(CLASSES))
    criterion = build_criterion(counts, cfg, device)
    sample_w = class_weights(counts)[train_ds.labels] if cfg.balance == "sampler" else None
    loader, sampler, val_loader, gather = build_loaders(cfg, train_ds, val_ds, device, ddp)
    if ddp.enabled:
        log.info("DDP: %d processes (%s on %s), effective batch %d (%d per process), %d steps per epoch; lr %g "
                 "(backbone) and %g (head) apply to the effective batch as given (not scaled by the process count)",
                 ddp.world, ddp.backend, device, cfg.batch_size * ddp.world, cfg.batch_size, len(loader), cfg.lr,
                 cfg.head_lr)
    optimizer = build_optimizer(param_groups(model, cfg), cfg)
    run = _Run(cfg=cfg, out=out, device=device, ddp=ddp, meta=meta, model=model,
               train_model=distributed.wrap(model, ddp), criterion=criterion, optimizer=optimizer,
               scheduler=build_scheduler(optimizer, cfg, len(loader)),
               scaler=torch.amp.GradScaler("cuda", enabled=device.startswith("cuda")), loader=loader,
               sampler=sampler, val_loader=val_loader, gather=gather, n_train=len(train_ds), sample_w=sample_w)
    _restore(run, ckpt)
    return run


def _restore(run: _Run, ckpt: dict[str, Any] | None) -> None:
    """Load a resumed run's weights, optimizer, scheduler, RNG state and history; start the weight average."""
    if ckpt is not None:
        run.model.load_state_dict(ckpt["model"])
        run.optimizer.load_state_dict(ckpt["optimizer"])
        run.scheduler.load_state_dict(ckpt["scheduler"])
        set_rng_state(ckpt["rng"])
        run.history = list(ckpt["history"])
        run.start_epoch = int(ckpt["epoch"])
    run.ema = WeightEMA(run.model, run.cfg.ema) if run.cfg.ema else None
    if ckpt is not None and run.ema is not None:
        if "ema" not in ckpt:
            raise ValueError(f"{run.out / 'last.pt'}: saved without --ema state; cannot resume an EMA run from it")
        run.ema.load_state_dict(ckpt["ema"])


def _fit(run: _Run) -> None:
    """The epochs from ``run.start_epoch`` on: train, validate, checkpoint; stop early on a val macro-F1 plateau."""
    cfg = run.cfg
    after_step = _step_hook(run)
    for epoch in range(run.start_epoch, cfg.epochs):
        if _should_stop(run.history, cfg.patience):
            log.info("early stop: val macro-F1 has not improved for %d epochs", cfg.patience)
            break
        log.info("epoch %d/%d started", epoch + 1, cfg.epochs)
        order = epoch_order(run.n_train, epoch, cfg.seed, run.sample_w)
        if run.ddp.enabled:  # this rank's shard: DistributedSampler reseeded by the epoch (train.distributed)
            order = run.ddp.shard(order, epoch, cfg.seed, shuffle=run.sample_w is None)
        run.sampler.set(order, epoch)
        t_epoch = time.perf_counter()
        stats = train_one_epoch(run.train_model, run.criterion, run.optimizer, run.scheduler, run.loader, run.device,
                                scaler=run.scaler, after_step=partial(after_step, epoch + 1),
                                desc=f"epoch {epoch + 1}/{cfg.epochs}", progress=cfg.progress)
        rec = _epoch_record(run, epoch, order, stats, t_epoch)
        run.history.append(rec)
        log.info("epoch %d/%d: train loss %.3f acc %.3f | val loss %.3f acc %.3f macro-F1 %.3f | %.1f s "
                 "(data loading %.1f%% of step time)", epoch + 1, cfg.epochs, rec["train_loss"], rec["train_acc"],
                 rec["val_loss"], rec["val_acc"], rec["val_macro_f1"], rec["epoch_s"], 100 * rec["data_frac"])
        if run.ddp.is_main:  # DDP: only rank 0 writes
            _save_epoch(run, epoch)


def _step_hook(run: _Run) -> Callable[[int, int], None]:
    """Called after each optimizer step with (epoch, step): the weight average, and the test hook's pause."""
    pause = _pause_point()

    def after_step(epoch: int, step: int) -> None:
        if pause is not None and step == pause[0] and run.ddp.pauses_here(pause[1]):
            _pause(epoch, step, pause[1])
        if run.ema is not None:
            run.ema.update(run.model)

    return after_step


def _epoch_record(run: _Run, epoch: int, order: list[int], stats: EpochStats, t_epoch: float) -> dict[str, Any]:
    """One row of history.{json,csv}: train metrics summed over ranks, val metrics of the selected weights, timing."""
    loss_sum, correct, seen = stats.loss_sum, stats.correct, stats.seen
    if run.ddp.enabled:  # train metrics over all ranks
        loss_sum, correct, seen = run.ddp.sum(loss_sum, correct, seen)
    train_time = time.perf_counter() - t_epoch
    val = evaluate(run.selected, run.val_loader, run.device, run.gather)
    t_data, t_step = stats.data_s, stats.step_s
    rec = {"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1), "train_acc": correct / max(seen, 1),
           "val_loss": val.loss, "val_acc": val.accuracy, "val_macro_f1": val.macro_f1,
           "lr": run.optimizer.param_groups[-1]["lr"], "backbone_lr": run.optimizer.param_groups[0]["lr"],
           "steps": len(run.loader), "train_s": train_time, "epoch_s": time.perf_counter() - t_epoch,
           "data_s": t_data, "step_s": t_step, "data_frac": t_data / max(t_data + t_step, 1e-9),
           "order_digest": order_digest(order), "threads": torch.get_num_threads()}
    if run.ema is not None:
        rec["val_macro_f1_raw"] = evaluate(run.model, run.val_loader, run.device, run.gather).macro_f1
    return rec


def _save_epoch(run: _Run, epoch: int) -> None:
    """best.pt on a new best val macro-F1, then last.pt (atomic; a resume never loses a best), history and plots."""
    rec = run.history[-1]
    state = {"epoch": epoch + 1, "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
             "rng": get_rng_state(), "history": run.history, "args": asdict(run.cfg)}
    if rec["val_macro_f1"] > max((h["val_macro_f1"] for h in run.history[:-1]), default=-1.0):
        save_checkpoint(run.out / "best.pt", run.selected, run.meta, **state)
        log.info("new best val macro-F1 %.3f → %s", rec["val_macro_f1"], run.out / "best.pt")
    # The average goes to last.pt only: a resume needs it, and best.pt's weights already are the average.
    resume_ema = {"ema": run.ema.state_dict()} if run.ema is not None else {}
    save_checkpoint(run.out / "last.pt", run.model, run.meta, **state, **resume_ema)
    write_history(run.out, run.history)


def _fit_openset(model: torch.nn.Module, train_dir: Path, meta: ModelMetadata, cfg: TrainConfig, device: str,
                 required: bool) -> dict[str, torch.Tensor] | None:
    """Feature statistics for the open-set scores, fitted on the (unaugmented) training split and stored with the
    model, so a feature score can be chosen at export time without retraining. Only fatal if the run's score needs
    them."""
    try:
        loader = DataLoader(ImageFolderDataset.for_model(train_dir, meta, cache=cfg.cache), batch_size=64)
        return fit_openset_from_loader(model, loader, labels=meta.labels, device=device, progress=False)
    except (ValueError, RuntimeError) as e:
        if required:
            raise
        log.warning("open-set feature statistics not fitted (%s); feature scores will need a retrain", e)
        return None


def recompute_batchnorm(model: nn.Module, ds: Any, device: str, seed: int = 0, batches: int = 16,
                        batch_size: int = 64) -> int:
    """Re-estimate every BatchNorm's running mean/variance as the plain average over ``batches`` shuffled
    (seeded) batches of ``ds``, the rest of the network in eval mode (no dropout); returns the number of images."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return 0
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.eval()
    for m in bns:
        m.train()
    seen = 0
    loader = DataLoader(ds, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for k, (x, _) in enumerate(loader):
            if k >= batches:
                break
            model(x.to(device).contiguous(memory_format=torch.channels_last))
            seen += len(x)
    for m, mom in zip(bns, momenta):
        m.momentum = mom
    model.eval()
    log.info("BatchNorm statistics re-estimated on %d training images (no augmentation, no content-free frames)", seen)
    return seen


def finalise(cfg: TrainConfig, out: Path, device: str, history: list[dict[str, Any]]) -> dict[str, Any]:
    """Calibrate best.pt on val (temperature, rejection threshold), write its final metadata, test if present."""
    best_path = out / "best.pt"
    splits = split_dirs(cfg.data)
    ckpt, model, meta = _load_best(cfg, best_path, splits["train"], device)
    val_ds = ImageFolderDataset.for_model(splits["val"], meta, cache=cfg.cache)
    val_outs = collect_outputs(model, DataLoader(val_ds, batch_size=64), device)
    cal, stats = calibrate_on_val(model, val_outs, val_ds, splits["train"], meta, cfg, device)
    if stats is not None:
        ckpt[OPENSET_KEY] = stats
    meta = meta.with_updates(temperature=cal["temperature"], **metadata_updates(cfg.score, cal["threshold"]))
    # The frame-quality gate's statistics and limits, from the training split as the runtime will see it.
    meta = meta.with_updates(quality=fit_quality(splits["train"], meta))
    val_metrics = final_metrics(val_outs, meta, stats)
    slim = {k: val_metrics[k] for k in ("accuracy", "macro_f1", "weighted_f1", "ece", "nll")}
    slim["rejection_off"] = {k: val_metrics["rejection_off"][k] for k in ("accuracy", "macro_f1")}
    slim["rejection_on"] = val_metrics["rejection_on"]
    best_epoch = int(ckpt["epoch"])
    meta = _final_metadata(meta, cfg, val_metrics, slim, cal, best_epoch).validate(str(best_path))
    ckpt["metadata"] = meta.to_dict()
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    atomic_write_bytes(best_path, buf.getvalue())
    write_report(val_metrics, out / "eval_val")
    summary: dict[str, Any] = {"best_epoch": best_epoch, "epochs_run": len(history), "calibration": cal,
                               "val": slim, "metadata": meta.to_dict()}
    if history:
        eps = history[-min(len(history), 5):]
        summary["timing"] = {"epoch_s_mean_last5": float(np.mean([h["epoch_s"] for h in eps])),
                             "data_frac_mean": float(np.mean([h["data_frac"] for h in history]))}
    if "test" in splits:
        summary.update(_test_summary(model, splits["test"], meta, stats, cfg, out, device))
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    log.info("best epoch %d: val macro-F1 %.3f → %s", best_epoch, slim["rejection_off"]["macro_f1"], best_path)
    return summary


def _load_best(cfg: TrainConfig, best_path: Path, train_dir: Path,
               device: str) -> tuple[dict[str, Any], nn.Module, ModelMetadata]:
    """best.pt's checkpoint, model (eval mode, on ``device``) and metadata; BatchNorm statistics re-estimated on
    real training images when content-free frames were trained on."""
    ckpt = load_checkpoint(best_path)
    meta = ModelMetadata.from_dict(ckpt["metadata"], str(best_path))
    model = build_model(cfg.arch, meta.num_classes, "none")
    model.load_state_dict(ckpt["model"])
    model = model.to(device).to(memory_format=torch.channels_last)
    if cfg.content_free:
        # Content-free frames in training batches skew the BatchNorm running statistics (a blank frame's activations
        # are nothing like an SEM image's; docs/training.md). Re-estimate them on real images.
        recompute_batchnorm(model, ImageFolderDataset.for_model(train_dir, meta, cache=cfg.cache), device, cfg.seed)
        ckpt["model"] = cpu_state_dict(model)
    return ckpt, model, meta


def calibrate_on_val(model: nn.Module, val_outs: Outputs, val_ds: ImageFolderDataset, train_dir: Path,
                     meta: ModelMetadata, cfg: TrainConfig,
                     device: str) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
    """Temperature and rejection threshold for ``cfg.score`` at ``cfg.target_recall`` on val, and the open-set
    feature statistics (None where they could not be fitted and the score does not need them)."""
    feature_score = needs_score_output(cfg.score)
    # Temperature is always fitted on logits; a feature-space score gets its threshold from the in-graph score head.
    cal = calibrate(val_outs.logits, val_outs.labels, "msp" if feature_score else cfg.score, cfg.target_recall,
                    meta.labels)
    stats = _fit_openset(model, train_dir, meta, cfg, device, required=feature_score)
    if feature_score:
        thr, rep = calibrate_threshold(model, stats, DataLoader(val_ds, batch_size=64), cfg.score,
                                       target_recall=cfg.target_recall, temperature=cal["temperature"],
                                       labels=meta.labels, device=device)
        cal.update({"score": cfg.score, "threshold": thr, "known_recall": rep["val_named_recall"]})
    log.info("calibration on val: temperature %.3f (NLL %.3f → %.3f), %s threshold %.4f keeps %.1f%% of known-class "
             "images", cal["temperature"], cal["nll_before"], cal["nll_after"], cfg.score, cal["threshold"],
             100 * cal["known_recall"])
    return cal, stats


def final_metrics(outs: Outputs, meta: ModelMetadata, stats: dict[str, torch.Tensor] | None) -> dict[str, Any]:
    """Metrics of the final model on one split, with its temperature, score and rejection rule."""
    if needs_score_output(meta.score):
        rej = is_rejected(score_outputs(outs, stats, meta.score, meta.temperature), meta.threshold)
    else:
        rej = reject_mask(outs.logits, meta.temperature, meta.score, meta.threshold)
    return compute_metrics(outs.labels, softmax(outs.logits, meta.temperature), rej, meta.labels)


def _final_metadata(meta: ModelMetadata, cfg: TrainConfig, val_metrics: dict[str, Any], slim: dict[str, Any],
                    cal: dict[str, Any], best_epoch: int) -> ModelMetadata:
    """The model's own record of how it was made: arguments, best epoch, val metrics and calibration, the drift
    alarm's reference (runtime.drift) and the review-queue batches in the data (train.review)."""
    from runtime.drift import VAL_STATS_KEY, val_stats_from_confusion
    from train.review import METADATA_KEY as REVIEW_KEY
    from train.review import review_imports

    # The thread count actually used (train_args keeps 0 for "torch's default"): it changes the numerics, so two runs
    # of one seed repeat exactly only with the same count.
    return meta.with_updates(extra={"train_args": asdict(cfg), "best_epoch": best_epoch, "val_metrics": slim,
                                    "calibration": cal, "torch_threads": torch.get_num_threads(),
                                    VAL_STATS_KEY: val_stats_from_confusion(
                                        val_metrics["confusion_matrix"], val_metrics["rejection_on"]["rejected"],
                                        meta.labels),
                                    REVIEW_KEY: review_imports(cfg.data)})


def _test_summary(model: nn.Module, test_dir: Path, meta: ModelMetadata, stats: dict[str, torch.Tensor] | None,
                  cfg: TrainConfig, out: Path, device: str) -> dict[str, Any]:
    """Test metrics (reported only, never used for selection) into ``out/eval_test``; an empty test/ is skipped."""
    try:
        test_ds = ImageFolderDataset.for_model(test_dir, meta, cache=cfg.cache)
    except DatasetError as e:
        # An empty test/ (e.g. a generator split of 0.9,0.1,0) must not cost the finished run its summary.
        log.warning("test evaluation skipped: %s", e)
        return {"test_skipped": str(e)}
    test_metrics = final_metrics(collect_outputs(model, DataLoader(test_ds, batch_size=64), device), meta, stats)
    write_report(test_metrics, out / "eval_test")
    log.info("test (reported only, not used for selection): macro-F1 %.3f with rejection, %.3f without",
             test_metrics["macro_f1"], test_metrics["rejection_off"]["macro_f1"])
    return {"test": {"macro_f1": test_metrics["macro_f1"], "accuracy": test_metrics["accuracy"],
                     "macro_f1_rejection_off": test_metrics["rejection_off"]["macro_f1"],
                     "coverage": test_metrics["rejection_on"]["coverage"], "ece": test_metrics["ece"]}}
