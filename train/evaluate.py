"""Evaluate a model on a folder of class folders: metrics, confusion matrix, reliability diagram.

``python -m train.evaluate --model PATH --data DIR [--out DIR]``. ``PATH`` is a training checkpoint (run in PyTorch
here), or an ONNX file / TensorRT engine (run through ``runtime.Classifier``, exactly as deployed). Metrics come from
scikit-learn; only ECE (not in sklearn) is computed here. :func:`compute_metrics` is a plain function other
packages (benchmarks) call with labels, calibrated probabilities and the rejection mask.

Rejection "on" means the deployed rule: a rejected prediction becomes ``other``. "Off" is the raw arg-max.
Coverage is the fraction of images not rejected; ``selective_accuracy`` is the accuracy on those.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from runtime.contract import REJECT_LABEL, ModelMetadata
from runtime.files import atomic_write_bytes, atomic_write_text
from sem_extras import cli, missing_extra

log = logging.getLogger(__name__)

ECE_BINS = 15


# ------------------------------------------------------------------ metrics
def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS
                               ) -> tuple[float, list[dict[str, float]]]:
    """ECE with equal-width confidence bins → (ece, per-bin {lo, hi, count, confidence, accuracy})."""
    confidence = np.asarray(confidence, np.float64)
    correct = np.asarray(correct, np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    ece, table = 0.0, []
    for b in range(bins):
        m = idx == b
        n = int(m.sum())
        conf = float(confidence[m].mean()) if n else 0.0
        acc = float(correct[m].mean()) if n else 0.0
        ece += n / max(len(confidence), 1) * abs(acc - conf)
        table.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "count": n, "confidence": conf,
                      "accuracy": acc})
    return float(ece), table


def _summary(labels: np.ndarray, pred: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    idx = list(range(len(class_names)))
    present = sorted(set(labels.tolist()))  # macro over classes that occur in the ground truth
    out: dict[str, Any] = {"accuracy": float(accuracy_score(labels, pred))}
    for avg in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(labels, pred, labels=present if avg == "macro" else idx,
                                                     average=avg, zero_division=0)
        out[f"{avg}_precision"], out[f"{avg}_recall"], out[f"{avg}_f1"] = float(p), float(r), float(f)
    return out


def compute_metrics(labels: Sequence[int] | np.ndarray, probs: np.ndarray, rejected: Sequence[bool] | np.ndarray,
                    class_names: Sequence[str]) -> dict[str, Any]:
    """All evaluation metrics from true labels (N,), calibrated probabilities (N, C) and the rejection mask (N,).

    Top-level accuracy/precision/recall/F1 and the per-class report are for the final predictions (rejection on:
    rejected → ``other``); ``rejection_off`` holds the same summary for the raw arg-max.
    """
    from sklearn.metrics import classification_report, confusion_matrix

    labels = np.asarray(labels, np.int64)
    probs = np.asarray(probs, np.float64)
    rejected = np.asarray(rejected, bool)
    names = list(class_names)
    if probs.ndim != 2 or probs.shape != (len(labels), len(names)) or rejected.shape != labels.shape:
        raise ValueError(f"need labels (N,), probs (N, {len(names)}) and rejected (N,); got {labels.shape}, "
                         f"{probs.shape}, {rejected.shape}")
    if len(labels) == 0:
        raise ValueError("no samples to evaluate")
    top = probs.argmax(axis=1)
    reject_index = names.index(REJECT_LABEL) if REJECT_LABEL in names else None
    final = np.where(rejected, reject_index, top) if reject_index is not None else top
    idx = list(range(len(names)))
    metrics: dict[str, Any] = {"num_samples": int(len(labels)), "class_names": names}
    metrics.update(_summary(labels, final, names))
    metrics["per_class"] = classification_report(labels, final, labels=idx, target_names=names, output_dict=True,
                                                 zero_division=0)
    metrics["confusion_matrix"] = confusion_matrix(labels, final, labels=idx).tolist()
    off = _summary(labels, top, names)
    off["confusion_matrix"] = confusion_matrix(labels, top, labels=idx).tolist()
    metrics["rejection_off"] = off
    accepted = ~rejected
    metrics["rejection_on"] = {
        "accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"],
        "coverage": float(accepted.mean()), "rejected": int(rejected.sum()),
        "selective_accuracy": float((top[accepted] == labels[accepted]).mean()) if accepted.any() else 0.0,
    }
    conf = probs.max(axis=1)
    ece, bins = expected_calibration_error(conf, top == labels)
    metrics["ece"] = ece
    metrics["reliability"] = bins
    p_true = np.clip(probs[np.arange(len(labels)), labels], 1e-12, 1.0)
    metrics["nll"] = float(-np.log(p_true).mean())
    return metrics


# ------------------------------------------------------------------ plots
def _save_fig(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def plot_confusion(cm: Sequence[Sequence[int]], class_names: Sequence[str], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(cm)
    fig, ax = plt.subplots(figsize=(7, 6))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    hi = cm.max() if cm.size else 0
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", color="white" if cm[i, j] > hi / 2 else "black")
    return _save_fig(fig, path)


def plot_reliability(bins: list[dict[str, float]], ece: float, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    centers = [(b["lo"] + b["hi"]) / 2 for b in bins]
    width = bins[0]["hi"] - bins[0]["lo"]
    ax.bar(centers, [b["accuracy"] if b["count"] else 0 for b in bins], width=width * 0.95, edgecolor="k",
           label="accuracy")
    ax.plot([0, 1], [0, 1], "r--", label="perfect calibration")
    ax.set_xlabel("confidence (max calibrated probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"reliability diagram (ECE {ece:.3f})")
    ax.legend(loc="upper left")
    return _save_fig(fig, path)


def write_report(metrics: dict[str, Any], out: str | Path) -> dict[str, Path]:
    """metrics.json, confusion_matrix.{png,csv} (rejection on) and reliability.png into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = metrics["class_names"]
    files = {"metrics": atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")}
    rows = ["true\\predicted," + ",".join(names)]
    rows += [f"{n}," + ",".join(str(v) for v in row) for n, row in zip(names, metrics["confusion_matrix"])]
    files["confusion_csv"] = atomic_write_text(out / "confusion_matrix.csv", "\n".join(rows) + "\n")
    files["confusion_png"] = plot_confusion(metrics["confusion_matrix"], names, out / "confusion_matrix.png",
                                            f"confusion (rejection on), macro-F1 {metrics['macro_f1']:.3f}")
    files["reliability_png"] = plot_reliability(metrics["reliability"], metrics["ece"], out / "reliability.png")
    return files


def format_metrics(m: dict[str, Any]) -> str:
    off, on = m["rejection_off"], m["rejection_on"]
    lines = [f"samples {m['num_samples']}",
             f"rejection off: accuracy {off['accuracy']:.3f}  macro-F1 {off['macro_f1']:.3f}  "
             f"weighted-F1 {off['weighted_f1']:.3f}",
             f"rejection on:  accuracy {on['accuracy']:.3f}  macro-F1 {on['macro_f1']:.3f}  coverage "
             f"{on['coverage']:.3f}  selective accuracy {on['selective_accuracy']:.3f}",
             f"macro P/R/F1 {m['macro_precision']:.3f}/{m['macro_recall']:.3f}/{m['macro_f1']:.3f}  weighted "
             f"P/R/F1 {m['weighted_precision']:.3f}/{m['weighted_recall']:.3f}/{m['weighted_f1']:.3f}  "
             f"ECE {m['ece']:.3f}  NLL {m['nll']:.3f}",
             f"{'class':<18} {'precision':>9} {'recall':>7} {'f1':>6} {'support':>7}"]
    for n in m["class_names"]:
        r = m["per_class"][n]
        lines.append(f"{n:<18} {r['precision']:9.3f} {r['recall']:7.3f} {r['f1-score']:6.3f} {int(r['support']):7d}")
    return "\n".join(lines)


# ------------------------------------------------------------------ running models
#: Test-time augmentation views: ``k`` in :func:`_dihedral` → name. 90° turns change a non-square input's shape, so
#: such inputs get the four views that keep it (:func:`tta_views`).
TTA_VIEWS = {0: "identity", 1: "rot90", 2: "rot180", 3: "rot270", 4: "hflip", 5: "rot90+hflip", 6: "vflip",
             7: "rot270+hflip"}


def tta_views(height: int, width: int) -> tuple[int, ...]:
    """The :data:`TTA_VIEWS` applied to an input of ``height`` × ``width``: all 8 when square, else the 4 that keep
    the shape (identity, 180° turn, horizontal and vertical flip)."""
    return tuple(range(8)) if height == width else (0, 2, 4, 6)


def _dihedral(x: Any, k: int) -> Any:
    import torch

    y = torch.rot90(x, k % 4, dims=(2, 3))
    return torch.flip(y, dims=(3,)) if k >= 4 else y


def predict_logits(model: Any, loader: Any, device: str = "cpu", tta: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Run ``model`` over a loader of (images, labels) → (logits (N, C) float32, labels (N,)).

    ``tta`` averages logits over the :func:`tta_views` of the input's shape (8 flips/90° turns when square, else 4).
    """
    import torch

    model.eval()
    outs, ys = [], []
    use_amp = device.startswith("cuda")
    with torch.inference_mode(), torch.autocast("cuda", enabled=use_amp):
        for x, y in loader:
            x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            if tta:
                z = torch.stack([model(_dihedral(x, k)).float() for k in tta_views(x.shape[2], x.shape[3])]).mean(0)
            else:
                z = model(x).float()
            outs.append(z.cpu())
            ys.append(torch.as_tensor(y))
    return torch.cat(outs).numpy().astype(np.float32), torch.cat(ys).numpy().astype(np.int64)


def evaluate_checkpoint(path: str | Path, data: str | Path, batch_size: int = 32, tta: bool = False,
                        device: str = "cpu", threshold: float | None = None) -> tuple[dict[str, Any], ModelMetadata]:
    """Checkpoint + class-folder dir → (metrics, metadata), with the checkpoint's temperature and rejection rule."""
    from torch.utils.data import DataLoader

    from runtime.scores import softmax
    from train.checkpoint import model_from_checkpoint
    from train.confidence import reject_mask
    from train.data import ImageFolderDataset

    model, meta = model_from_checkpoint(path)
    model = model.to(device).to(memory_format=__import__("torch").channels_last)
    ds = ImageFolderDataset.for_model(data, meta)
    logits, labels = predict_logits(model, DataLoader(ds, batch_size=batch_size), device, tta)
    thr = meta.threshold if threshold is None else threshold
    rejected = reject_mask(logits, meta.temperature, meta.score, thr)
    metrics = compute_metrics(labels, softmax(logits, meta.temperature), rejected, meta.labels)
    # What was averaged, exactly (the dataset resizes every image to the model's input size).
    views = [TTA_VIEWS[k] for k in tta_views(*meta.input_size)] if tta else []
    metrics["model"] = {"path": str(path), "format": "checkpoint", "tta": bool(tta), "tta_views": views,
                        "temperature": meta.temperature,
                        "score": meta.score, "threshold": thr, "skipped_files": ds.problems}
    return metrics, meta


def evaluate_runtime(path: str | Path, data: str | Path, batch_size: int = 32, backend: str = "auto",
                     threshold: float | None = None) -> tuple[dict[str, Any], ModelMetadata]:
    """ONNX file or TensorRT engine through ``runtime.Classifier``, i.e. exactly the deployed path."""
    from runtime import Classifier
    from train.data import scan_folder

    clf = Classifier(str(path), backend=backend, threshold=threshold, batch_size=batch_size)
    meta = clf.meta
    report = scan_folder(data, meta.labels, verify=False)
    items = list(report.samples)
    preds = clf.predict_batch([str(p) for p, _ in items], on_error="keep")
    labels, probs, rejected, problems = [], [], [], list(report.problems)
    for (p, y), pred in zip(items, preds):
        if isinstance(pred, Exception):
            msg = f"{p}: not classified ({pred}); skipped"
            log.warning(msg)
            problems.append(msg)
            continue
        labels.append(y)
        probs.append(np.asarray(pred.probs, np.float64))
        rejected.append(bool(pred.rejected))
    if not labels:
        raise ValueError(f"{data}: no image could be classified")
    metrics = compute_metrics(np.array(labels), np.stack(probs), np.array(rejected), meta.labels)
    metrics["model"] = {"path": str(path), "format": Path(path).suffix.lstrip("."), "backend": backend,
                        "temperature": meta.temperature, "score": meta.score, "threshold": clf.threshold,
                        "tta": False, "tta_views": [], "skipped_files": problems}
    return metrics, meta


def evaluate_model(path: str | Path, data: str | Path, batch_size: int = 32, tta: bool = False,
                   backend: str = "auto", threshold: float | None = None) -> tuple[dict[str, Any], ModelMetadata]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(2, "no such model file", str(p))
    if p.suffix in (".pt", ".pth"):
        return evaluate_checkpoint(p, data, batch_size, tta, threshold=threshold)
    if tta:
        raise ValueError("--tta is only available for PyTorch checkpoints")
    return evaluate_runtime(p, data, batch_size, backend, threshold)


@cli("python -m train.evaluate")
def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m train.evaluate", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Evaluate a model on DIR/<class>/ images: accuracy, macro/weighted P/R/F1, per-class report, "
                    "confusion matrix, ECE + reliability diagram, accuracy/coverage with rejection on and off.",
        epilog="examples:\n"
               "  python -m train.evaluate --model runs/b0/best.pt --data data/test --out runs/b0/eval_test\n"
               "  python -m train.evaluate --model runs/b0/best.pt --data data/test --tta\n"
               "  python -m train.evaluate --model models/b0.onnx --data data/test --out results/onnx\n")
    ap.add_argument("--model", required=True, help="checkpoint (.pt), ONNX file (.onnx) or TensorRT engine")
    ap.add_argument("--data", required=True, help="folder with one sub-folder per class")
    ap.add_argument("--out", help="folder for metrics.json, confusion_matrix.{png,csv}, reliability.png")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--tta", action="store_true",
                    help="average logits over flips and 90° turns (checkpoints only; non-square inputs: the four "
                         "views that keep the shape; metrics.json lists them)")
    ap.add_argument("--backend", default="auto", help="runtime backend for ONNX/engines (default auto)")
    ap.add_argument("--threshold", type=float, default=None, help="override the model's rejection threshold")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        metrics, _ = evaluate_model(args.model, args.data, args.batch_size, args.tta, args.backend, args.threshold)
    except (OSError, ValueError, ImportError) as e:
        if missing_extra(e):
            raise  # @cli: one line naming the extra to install
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_metrics(metrics))
    if args.out:
        files = write_report(metrics, args.out)
        print("wrote " + ", ".join(str(p) for p in files.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
