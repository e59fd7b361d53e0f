"""Accuracy gate for reduced-precision artifacts (FP16, INT8): compare against FP32 on the validation split.

The variant's temperature is refitted (INT8 compresses confidences) and, when the model rejects, its threshold
re-chosen for the same known-class recall; both go into the variant's metadata. The gate compares the raw top-1
predictions (rejection off) — what the precision change does to the network — and fails when accuracy or
macro-F1 drops by more than ``max_drop`` percentage points. The with-rejection numbers are reported alongside.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from runtime.contract import ModelMetadata
from runtime.errors import InputError
from runtime.folders import scan_class_folders
from runtime.preprocess import Preprocessor

log = logging.getLogger(__name__)

DEFAULT_MAX_DROP = 1.0  # percentage points


def labelled_images(folder: str | os.PathLike[str], labels: Sequence[str]) -> tuple[list[Path], np.ndarray]:
    """``folder/<class>/*`` for the model's classes → (paths, label indices). Unknown folders are ignored."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: validation folder does not exist")
    found = scan_class_folders(root, labels, allow_empty=True)
    if not found:
        raise ValueError(f"{root}: no images in class folders named after the model's labels ({', '.join(labels)})")
    index = {c: i for i, c in enumerate(labels)}
    return [p for p, _ in found], np.asarray([index[c] for _, c in found], np.int64)


def load_inputs(paths: Sequence[Path], labels: np.ndarray, meta: ModelMetadata) -> tuple[np.ndarray, np.ndarray]:
    """Preprocess every image; bad images are skipped with a warning naming them (labels stay aligned)."""
    pre = Preprocessor(meta)
    xs, ys = [], []
    for p, y in zip(paths, labels):
        try:
            xs.append(pre(p))
            ys.append(y)
        except (InputError, OSError) as e:
            log.warning("skipping validation image: %s", e)
    if not xs:
        raise ValueError("no usable validation images")
    return np.stack(xs), np.asarray(ys, np.int64)


def onnx_logits(onnx_path: str | os.PathLike[str], inputs: np.ndarray, output_name: str, batch: int = 32,
                threads: int | None = None, optimize: bool = True) -> np.ndarray:
    """Logits with ONNX Runtime on the CPU. ``optimize=False`` runs a Q/DQ graph as written (float ops between exact
    quantise/dequantise steps: the arithmetic of an int32-accumulating engine), not this CPU's fused kernels."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run([output_name], {name: inputs[i:i + batch]})[0]
                           for i in range(0, len(inputs), batch)]).astype(np.float32)


@dataclass
class GateResult:
    precision: str
    rows: list[dict[str, Any]]
    top1_agreement: float
    accuracy_drop_pt: float
    macro_f1_drop_pt: float
    temperature: float
    threshold: float | None
    passed: bool
    max_drop_pt: float
    notes: list[str] = field(default_factory=list)
    #: The CPU that computed the variant's logits (INT8 kernels differ between instruction sets).
    machine: dict[str, Any] = field(default_factory=dict)

    def table(self) -> str:
        head = f"{'variant':<10} {'acc':>7} {'macro-F1':>9} {'acc(rej)':>9} {'F1(rej)':>8} {'T':>6} {'thr':>7}"
        lines = [head, "-" * len(head)]
        for r in self.rows:
            thr = "—" if r["threshold"] is None else f"{r['threshold']:.3f}"
            lines.append(f"{r['variant']:<10} {r['accuracy']:7.2%} {r['macro_f1']:9.4f} {r['accuracy_rej']:9.2%} "
                         f"{r['macro_f1_rej']:8.4f} {r['temperature']:6.3f} {thr:>7}")
        verdict = "PASS" if self.passed else "FAIL"
        lines.append(f"top-1 agreement {self.top1_agreement:.2%}; drop vs fp32: "
                     f"accuracy {self.accuracy_drop_pt:+.2f} pt, "
                     f"macro-F1 {self.macro_f1_drop_pt:+.2f} pt (limit {self.max_drop_pt:g} pt) → {verdict}")
        if self.machine:
            from runtime.check import isa_summary

            lines.append(f"measured on {isa_summary(self.machine)}")
        lines += self.notes
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"precision": self.precision, "rows": self.rows, "top1_agreement": self.top1_agreement,
                "accuracy_drop_pt": self.accuracy_drop_pt, "macro_f1_drop_pt": self.macro_f1_drop_pt,
                "temperature": self.temperature, "threshold": self.threshold, "passed": self.passed,
                "max_drop_pt": self.max_drop_pt, "machine": self.machine}


def _row(name: str, logits: np.ndarray, labels: np.ndarray, meta: ModelMetadata, t: float,
         thr: float | None) -> dict[str, Any]:
    from runtime.scores import softmax
    from train.confidence import reject_mask
    from train.evaluate import compute_metrics

    probs = softmax(logits, t)
    rej = reject_mask(logits, t, meta.score, thr) if meta.score_output is None else \
        np.zeros(len(logits), bool)
    m = compute_metrics(labels, probs, rej, meta.labels)
    return {"variant": name, "accuracy": m["rejection_off"]["accuracy"], "macro_f1": m["rejection_off"]["macro_f1"],
            "accuracy_rej": m["accuracy"], "macro_f1_rej": m["macro_f1"], "temperature": t, "threshold": thr}


def accuracy_gate(fp32_logits: np.ndarray, variant_logits: np.ndarray, labels: np.ndarray, meta: ModelMetadata,
                  precision: str, max_drop_pt: float = DEFAULT_MAX_DROP) -> GateResult:
    """Compare ``variant_logits`` with ``fp32_logits`` on ``labels``; refit temperature/threshold for the variant."""
    from train.confidence import DEFAULT_TARGET_RECALL, calibrate

    notes: list[str] = []
    target = float(meta.extra.get("target_recall", DEFAULT_TARGET_RECALL)) if isinstance(meta.extra, dict) else \
        DEFAULT_TARGET_RECALL
    try:
        fit = calibrate(variant_logits, labels, meta.score if meta.score_output is None else "msp", target,
                        tuple(meta.labels))
        t_new = float(fit["temperature"])
        thr_new = float(fit["threshold"]) if meta.threshold is not None and meta.score_output is None else \
            meta.threshold
    except ValueError as e:
        notes.append(f"note: temperature/threshold not refitted ({e}); keeping the FP32 values")
        t_new, thr_new = meta.temperature, meta.threshold
    if meta.score_output is not None:
        notes.append(f"note: rejection uses the graph output {meta.score_output!r}; its threshold is kept as is")
    base = _row("fp32", fp32_logits, labels, meta, meta.temperature, meta.threshold)
    var = _row(precision, variant_logits, labels, meta, t_new, thr_new)
    acc_drop = 100 * (base["accuracy"] - var["accuracy"])
    f1_drop = 100 * (base["macro_f1"] - var["macro_f1"])
    agree = float((fp32_logits.argmax(1) == variant_logits.argmax(1)).mean())
    passed = acc_drop <= max_drop_pt and f1_drop <= max_drop_pt
    if len(labels) < 100:
        notes.append(f"note: only {len(labels)} validation images; one image is {100 / len(labels):.1f} pt")
    from runtime.check import cpu_info

    return GateResult(precision, [base, var], agree, acc_drop, f1_drop, t_new, thr_new, passed, max_drop_pt, notes,
                      cpu_info())
