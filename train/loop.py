"""The training run: transfer learning on ``DIR/{train,val[,test]}/<class>/``, resumable, then calibration.

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
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler, Subset
from tqdm import tqdm

from runtime.contract import CLASSES, INTENSITY_MODES, ModelMetadata
from runtime.files import atomic_write_bytes, atomic_write_text
from runtime.preprocess import Intensity
from runtime.scores import softmax
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
from train.evaluate import compute_metrics, predict_logits, write_report
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
    """Every option of a run; the defaults are the recipe that did best on sem-hackathon val (see the report)."""

    data: str = ""
    out: str = ""
    arch: str = "efficientnet_lite0"
    weights: str = "lite0"
    epochs: int = 30  # sem-hackathon: 30 beat 15 on test for each of three seeds (+3.3 pt mean): see README
    img_size: int = 224  # sem-hackathon (128 px sources) tested better upsampled to 224 than at 128: see README
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
    # Early stopping on val macro-F1 (epochs without improvement; 0 = never stop early). 12 keeps the best epoch of
    # all three measured 30-epoch runs (a late best at epoch 26 after 8 flat epochs) while cutting plateaued runs.
    patience: int = 12
    # Exponential moving average of the weights, per optimizer step (0 = off). With it on, the average is what is
    # validated, early-stopped on and saved as best.pt; the raw weights' val macro-F1 is logged beside it.
    ema: float = 0.0
    seed: int = 0
    workers: int = 0
    threads: int = 0  # torch intra-op threads (0 = torch's default, one per core)
    cache: bool = True
    score: str = DEFAULT_SCORE  # see train.openset.DEFAULT_SCORE for the measurements behind it
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


def _macro_f1(labels: np.ndarray, pred: np.ndarray) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(labels, pred, labels=np.unique(labels), average="macro", zero_division=0))


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


# ------------------------------------------------------------------ the run
def train(cfg: TrainConfig, resume: bool = False) -> dict[str, Any]:
    """Train (or resume) a run into ``cfg.out``; returns the summary also written to ``summary.json``."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    last_path, best_path = out / "last.pt", out / "best.pt"
    # --- DDP (torchrun, train.distributed): join the group; a single process gets a no-op context. A group that
    # torchrun restarted after a rank died (--max-restarts) resumes from last.pt on every rank.
    ddp = distributed.setup(resolve_device(cfg.device), cfg.threads)
    if ddp.restart and not resume and last_path.is_file():
        log.warning("torchrun restart %d: resuming from %s", ddp.restart, last_path)
        resume = True
    # --- end DDP
    ckpt: dict[str, Any] | None = None
    if resume:
        ckpt = load_checkpoint(last_path)
        saved = TrainConfig.from_dict(ckpt["args"])
        # The schedule is the saved one; only where the data lives and how it is loaded may change.
        saved.data, saved.out, saved.workers, saved.progress = cfg.data or saved.data, cfg.out, cfg.workers, \
            cfg.progress
        saved.device, saved.threads = cfg.device, cfg.threads
        cfg = saved
        log.info("resuming %s from %s (epoch %d of %d done)", out, last_path, ckpt["epoch"], cfg.epochs)
    if cfg.arch not in ARCHS:
        raise ValueError(f"unknown --arch {cfg.arch!r}; choose one of {', '.join(ARCHS)}")
    device = ddp.device if ddp.enabled else resolve_device(cfg.device)
    if cfg.threads > 0:
        # On a shared CPU, fewer threads than cores avoids OpenMP oversubscription (measured 3-10x slower steps).
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)

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
    intensity = Intensity(cfg.intensity)
    n_free = int(round(cfg.content_free * len(scan_folder(splits["train"], CLASSES, verify=False).samples)))
    train_ds = ImageFolderDataset(splits["train"], size, mean, std, augment=aug, cache=cfg.cache, seed=cfg.seed,
                                  intensity=intensity, content_free=n_free)
    val_ds = ImageFolderDataset(splits["val"], size, mean, std, augment=None, cache=cfg.cache, intensity=intensity)
    counts = train_ds.class_counts(len(CLASSES))
    log.info("train %d images %s; val %d images; %d file(s) skipped", len(train_ds),
             dict(zip(CLASSES, counts.tolist())), len(val_ds), len(train_ds.problems) + len(val_ds.problems))
    fingerprint = ckpt["metadata"]["data_fingerprint"] if ckpt is not None else fingerprint_dataset(cfg.data)
    meta = ModelMetadata(labels=CLASSES, input_size=size, mean=mean, std=std, arch=cfg.arch,
                         data_fingerprint=fingerprint, intensity=cfg.intensity, extra={"train_args": asdict(cfg)})

    model = build_model(cfg.arch, len(CLASSES), "none" if ckpt is not None else cfg.weights)
    model = model.to(device).to(memory_format=torch.channels_last)
    cw = class_weights(counts)
    loss_weight = torch.as_tensor(cw, dtype=torch.float32, device=device) if cfg.balance == "loss" else None
    criterion = nn.CrossEntropyLoss(weight=loss_weight, label_smoothing=cfg.label_smoothing)
    sample_w = cw[train_ds.labels] if cfg.balance == "sampler" else None

    sampler = EpochSampler()
    batches = _BatchSampler(sampler, cfg.batch_size)
    # Its own generator: the loader's per-iterator seed draw must not consume the global RNG (dropout, stochastic
    # depth), or results would depend on worker settings and on where a run was resumed.
    loader = DataLoader(_EpochDataset(train_ds), batch_sampler=batches, num_workers=cfg.workers,
                        persistent_workers=cfg.workers > 0, pin_memory=device.startswith("cuda"),
                        generator=torch.Generator().manual_seed(cfg.seed))
    # DDP: each rank validates its shard; the logits are gathered, so every rank computes the same metrics.
    val_idx = ddp.val_indices(len(val_ds)) if ddp.enabled else None
    val_loader = DataLoader(val_ds if val_idx is None else Subset(val_ds, val_idx), batch_size=max(cfg.batch_size, 64),
                            num_workers=0)
    sampler.set(ddp.shard(list(range(len(train_ds))), 0, cfg.seed, shuffle=True), 0)
    steps_per_epoch = len(batches)
    train_model = distributed.wrap(model, ddp)
    if ddp.enabled:
        log.info("DDP: %d processes (%s on %s), effective batch %d (%d per process), %d steps per epoch; lr %g "
                 "(backbone) and %g (head) apply to the effective batch as given (not scaled by the process count)",
                 ddp.world, ddp.backend, device, cfg.batch_size * ddp.world, cfg.batch_size, steps_per_epoch, cfg.lr,
                 cfg.head_lr)
    groups = param_groups(model, cfg)
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambdas(groups, cfg, steps_per_epoch))
    use_amp = device.startswith("cuda")
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    history: list[dict[str, Any]] = []
    start_epoch = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        set_rng_state(ckpt["rng"])
        history = list(ckpt["history"])
        start_epoch = int(ckpt["epoch"])
    ema = WeightEMA(model, cfg.ema) if cfg.ema else None
    if ckpt is not None:
        if ema is not None:
            if "ema" not in ckpt:
                raise ValueError(f"{last_path}: saved without --ema state; cannot resume an EMA run from it")
            ema.load_state_dict(ckpt["ema"])
        del ckpt

    args_dict = asdict(cfg)
    pause = _pause_point()
    for epoch in range(start_epoch, cfg.epochs):
        if _should_stop(history, cfg.patience):
            log.info("early stop: val macro-F1 has not improved for %d epochs", cfg.patience)
            break
        log.info("epoch %d/%d started", epoch + 1, cfg.epochs)
        order = epoch_order(len(train_ds), epoch, cfg.seed, sample_w)
        if ddp.enabled:  # this rank's shard: DistributedSampler reseeded by the epoch (train.distributed)
            order = ddp.shard(order, epoch, cfg.seed, shuffle=sample_w is None)
        sampler.set(order, epoch)
        model.train()
        t_epoch = time.perf_counter()
        t_data = t_step = 0.0
        loss_sum, correct, seen = 0.0, 0, 0
        bar = tqdm(loader, total=steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
                   disable=not cfg.progress, dynamic_ncols=True)
        t0 = time.perf_counter()
        for x, y in bar:
            t1 = time.perf_counter()
            t_data += t1 - t0
            x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            y = y.to(device, non_blocking=True)
            with torch.autocast("cuda", enabled=use_amp):
                logits = train_model(x)
                loss = criterion(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            scaler.step(opt)
            scaler.update()
            sched.step()
            if pause is not None and sched.last_epoch == pause[0] and ddp.pauses_here(pause[1]):
                _pause(epoch + 1, sched.last_epoch, pause[1])
            if ema is not None:
                ema.update(model)
            n = len(y)
            loss_sum += float(loss.detach()) * n
            correct += int((logits.argmax(1) == y).sum())
            seen += n
            t0 = time.perf_counter()
            t_step += t0 - t1
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}")
        bar.close()
        if ddp.enabled:  # train metrics over all ranks
            loss_sum, correct, seen = ddp.sum(loss_sum, correct, seen)
        train_time = time.perf_counter() - t_epoch
        selected = ema.model if ema is not None else model
        val_logits, val_labels = predict_logits(selected, val_loader, device)
        if ddp.enabled:
            val_logits, val_labels = ddp.gather_rows(val_idx, val_logits, val_labels)
        val_pred = val_logits.argmax(1)
        val_loss = float(nn.functional.cross_entropy(torch.from_numpy(val_logits), torch.from_numpy(val_labels)))
        rec = {"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1), "train_acc": correct / max(seen, 1),
               "val_loss": val_loss, "val_acc": float((val_pred == val_labels).mean()),
               "val_macro_f1": _macro_f1(val_labels, val_pred), "lr": opt.param_groups[-1]["lr"],
               "backbone_lr": opt.param_groups[0]["lr"], "steps": steps_per_epoch, "train_s": train_time,
               "epoch_s": time.perf_counter() - t_epoch, "data_s": t_data, "step_s": t_step,
               "data_frac": t_data / max(t_data + t_step, 1e-9), "order_digest": order_digest(order),
               "threads": torch.get_num_threads()}
        if ema is not None:
            raw_logits, _ = predict_logits(model, val_loader, device)
            if ddp.enabled:
                raw_logits, = ddp.gather_rows(val_idx, raw_logits)
            rec["val_macro_f1_raw"] = _macro_f1(val_labels, raw_logits.argmax(1))
        history.append(rec)
        log.info("epoch %d/%d: train loss %.3f acc %.3f | val loss %.3f acc %.3f macro-F1 %.3f | %.1f s "
                 "(data loading %.1f%% of step time)", epoch + 1, cfg.epochs, rec["train_loss"], rec["train_acc"],
                 val_loss, rec["val_acc"], rec["val_macro_f1"], rec["epoch_s"], 100 * rec["data_frac"])
        state = {"epoch": epoch + 1, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                 "rng": get_rng_state(), "history": history, "args": args_dict}
        if not ddp.is_main:  # DDP: only rank 0 writes
            continue
        if rec["val_macro_f1"] > max((h["val_macro_f1"] for h in history[:-1]), default=-1.0):
            save_checkpoint(best_path, selected, meta, **state)
            log.info("new best val macro-F1 %.3f → %s", rec["val_macro_f1"], best_path)
        # The average goes to last.pt only: a resume needs it, and best.pt's weights already are the average.
        resume_ema = {"ema": ema.state_dict()} if ema is not None else {}
        save_checkpoint(last_path, model, meta, **state, **resume_ema)  # after best.pt: a resume never loses a best
        write_history(out, history)

    if loader.num_workers:
        del loader  # stop persistent workers before the (single-process) finalisation
    # --- DDP: rank 0 alone calibrates and writes the final model; the others are done
    if ddp.enabled:
        ddp.close()
        if not ddp.is_main:
            return {}
    # --- end DDP
    return finalise(cfg, out, device, history)


def _fit_openset(model: torch.nn.Module, train_dir: Path, meta: ModelMetadata, cfg: TrainConfig, device: str,
                 required: bool) -> dict[str, torch.Tensor] | None:
    """Feature statistics for the open-set scores, fitted on the (unaugmented) training split and stored with the
    model, so a feature score can be chosen at export time without retraining. Only fatal if the run's score needs
    them."""
    ds = ImageFolderDataset(train_dir, meta.input_size, meta.mean, meta.std, augment=None, cache=cfg.cache,
                            intensity=Intensity.of(meta))
    try:
        return fit_openset_from_loader(model, DataLoader(ds, batch_size=64), labels=meta.labels, device=device,
                                       progress=False)
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
    ckpt = load_checkpoint(best_path)
    meta = ModelMetadata.from_dict(ckpt["metadata"], str(best_path))
    model = build_model(cfg.arch, meta.num_classes, "none")
    model.load_state_dict(ckpt["model"])
    model = model.to(device).to(memory_format=torch.channels_last)
    splits = split_dirs(cfg.data)
    if cfg.content_free:
        # Content-free frames in training batches skew the BatchNorm running statistics (a blank frame's activations
        # are nothing like an SEM image's): measured, val accuracy fell ~1.5 pt. Re-estimate them on real images.
        recompute_batchnorm(model, ImageFolderDataset(splits["train"], meta.input_size, meta.mean, meta.std,
                                                      augment=None, cache=cfg.cache, intensity=Intensity.of(meta)),
                            device, cfg.seed)
        ckpt["model"] = cpu_state_dict(model)
    val_ds = ImageFolderDataset(splits["val"], meta.input_size, meta.mean, meta.std, augment=None, cache=cfg.cache,
                                intensity=Intensity.of(meta))
    val_outs = collect_outputs(model, DataLoader(val_ds, batch_size=64), device)
    val_logits, val_labels = val_outs.logits, val_outs.labels
    feature_score = needs_score_output(cfg.score)
    # Temperature is always fitted on logits; a feature-space score gets its threshold from the in-graph score head.
    cal = calibrate(val_logits, val_labels, "msp" if feature_score else cfg.score, cfg.target_recall, meta.labels)
    stats = _fit_openset(model, splits["train"], meta, cfg, device, required=feature_score)
    if stats is not None:
        ckpt[OPENSET_KEY] = stats
    if feature_score:
        thr, rep = calibrate_threshold(model, stats, DataLoader(val_ds, batch_size=64), cfg.score,
                                       target_recall=cfg.target_recall, temperature=cal["temperature"],
                                       labels=meta.labels, device=device)
        cal.update({"score": cfg.score, "threshold": thr, "known_recall": rep["val_named_recall"]})
    log.info("calibration on val: temperature %.3f (NLL %.3f → %.3f), %s threshold %.4f keeps %.1f%% of known-class "
             "images", cal["temperature"], cal["nll_before"], cal["nll_after"], cfg.score, cal["threshold"],
             100 * cal["known_recall"])
    meta = meta.with_updates(temperature=cal["temperature"], **metadata_updates(cfg.score, cal["threshold"]))
    # The frame-quality gate's statistics and limits, from the training split as the runtime will see it.
    meta = meta.with_updates(quality=fit_quality(splits["train"], meta))

    def metrics_for(outs: Outputs) -> dict[str, Any]:
        if feature_score:
            rej = ~(score_outputs(outs, stats, meta.score, meta.temperature) >= np.float32(meta.threshold))
        else:
            rej = reject_mask(outs.logits, meta.temperature, meta.score, meta.threshold)
        return compute_metrics(outs.labels, softmax(outs.logits, meta.temperature), rej, meta.labels)

    val_metrics = metrics_for(val_outs)
    best_epoch = int(ckpt["epoch"])
    slim = {k: val_metrics[k] for k in ("accuracy", "macro_f1", "weighted_f1", "ece", "nll")}
    slim["rejection_off"] = {k: val_metrics["rejection_off"][k] for k in ("accuracy", "macro_f1")}
    slim["rejection_on"] = val_metrics["rejection_on"]
    # The drift alarm's reference (runtime.drift: val rejection rate and final-label mix) and the review-queue
    # batches in the data (train.review), so the model says what it learnt from.
    from runtime.drift import VAL_STATS_KEY, val_stats_from_confusion
    from train.review import METADATA_KEY as REVIEW_KEY
    from train.review import review_imports

    # The thread count actually used (train_args keeps 0 for "torch's default"): it changes the numerics, so two runs
    # of one seed repeat exactly only with the same count.
    meta = meta.with_updates(extra={"train_args": asdict(cfg), "best_epoch": best_epoch, "val_metrics": slim,
                                    "calibration": cal, "torch_threads": torch.get_num_threads(),
                                    VAL_STATS_KEY: val_stats_from_confusion(
                                        val_metrics["confusion_matrix"], val_metrics["rejection_on"]["rejected"],
                                        meta.labels),
                                    REVIEW_KEY: review_imports(cfg.data)}
                             ).validate(str(best_path))
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
    test_ds = None
    if "test" in splits:
        try:
            test_ds = ImageFolderDataset(splits["test"], meta.input_size, meta.mean, meta.std, augment=None,
                                         cache=cfg.cache, intensity=Intensity.of(meta))
        except DatasetError as e:
            # An empty test/ (e.g. a generator split of 0.9,0.1,0) must not cost the finished run its summary.
            log.warning("test evaluation skipped: %s", e)
            summary["test_skipped"] = str(e)
    if test_ds is not None:
        test_metrics = metrics_for(collect_outputs(model, DataLoader(test_ds, batch_size=64), device))
        write_report(test_metrics, out / "eval_test")
        summary["test"] = {"macro_f1": test_metrics["macro_f1"], "accuracy": test_metrics["accuracy"],
                           "macro_f1_rejection_off": test_metrics["rejection_off"]["macro_f1"],
                           "coverage": test_metrics["rejection_on"]["coverage"], "ece": test_metrics["ece"]}
        log.info("test (reported only, not used for selection): macro-F1 %.3f with rejection, %.3f without",
                 test_metrics["macro_f1"], test_metrics["rejection_off"]["macro_f1"])
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    log.info("best epoch %d: val macro-F1 %.3f → %s", best_epoch, slim["rejection_off"]["macro_f1"], best_path)
    return summary
