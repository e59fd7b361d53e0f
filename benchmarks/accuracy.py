"""Accuracy benchmark: the same test images through every deployed artifact (FP32, INT8, engines), side by side.

``python -m benchmarks.accuracy --data DIR --models a.onnx a.int8.onnx`` runs each model through
``runtime.Classifier`` — the deployed path, so what is measured is what ships — on ``DIR/<class>/`` images and
reports, per artifact: accuracy and macro-F1 of the final labels (rejected → ``other``), top-1 agreement with the
FP32 reference (the model whose metadata says precision fp32, else the first), ECE, and coverage / selective
accuracy at the threshold stored in the model. Metrics come from :func:`train.evaluate.compute_metrics`.

Default data: the synthetic test split ``data/synth/test``. Real images:
``--data ../shared/datasets/sem-hackathon/test`` (relative to the repository root); a missing dataset folder is
skipped with a message saying how to get it.
Output: a Markdown table on stdout and ``accuracy.json`` + ``accuracy.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import envinfo
from runtime.classifier import bundled_model_path
from runtime.files import atomic_write_text
from sem_extras import cli

SCHEMA = "sem-bench-accuracy/1"
REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = Path("data/synth/test")
GENERATE_HINT = ("generate it: python -m train.synthetic --out data/synth --per-class 300 --size 256 --seed 0 "
                 "(writes data/synth/{train,val,test}/<class>/)")


class Skipped(Exception):
    """The benchmark cannot run on this machine for a reason that is not an error (e.g. an optional dataset)."""


def missing_data_message(data: Path) -> str:
    """Why ``data`` cannot be used and what to do about it."""
    if data.resolve() == (REPO / DEFAULT_DATA).resolve() or data == DEFAULT_DATA:
        return f"{data}: the synthetic test set does not exist; {GENERATE_HINT}"
    if "sem-hackathon" in str(data):
        return (f"{data}: the sem-hackathon real-image set is not on this machine (it lives outside the repository, "
                "under ../shared/datasets/sem-hackathon/ relative to the repo root); skipping the real-data table")
    return f"{data}: dataset folder does not exist (expected {data}/<class>/ with one folder per class)"


def _predict_folder(clf: Any, samples: Sequence[tuple[Path, int]], batch_size: int, progress: bool,
                    desc: str) -> tuple[list[int], list[np.ndarray], list[bool], list[int], list[str]]:
    """Run ``clf`` over ``samples``; returns indices of classified samples, probs, rejected, top-1 and problems."""
    kept: list[int] = []
    probs: list[np.ndarray] = []
    rejected: list[bool] = []
    top: list[int] = []
    problems: list[str] = []
    bar = None
    if progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=len(samples), desc=desc, unit="img", file=sys.stderr, leave=False)
        except ImportError:
            bar = None
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        preds = clf.predict_batch([str(p) for p, _ in chunk], batch_size=batch_size, on_error="keep")
        for k, ((path, _), pred) in enumerate(zip(chunk, preds)):
            if isinstance(pred, Exception):
                problems.append(f"{path}: not classified ({pred}); skipped")
                continue
            kept.append(start + k)
            probs.append(np.asarray(pred.probs, np.float64))
            rejected.append(bool(pred.rejected))
            top.append(int(pred.top_index))
        if bar:
            bar.update(len(chunk))
    if bar:
        bar.close()
    return kept, probs, rejected, top, problems


def evaluate_artifact(path: Path, samples: Sequence[tuple[Path, int]], class_names: Sequence[str],
                      backend: str = "auto", batch_size: int = 32, threads: int | None = None,
                      progress: bool = True) -> dict[str, Any]:
    """Metrics of one artifact on ``samples`` (paths with class indices into ``class_names``)."""
    from runtime import Classifier
    from train.evaluate import compute_metrics

    clf = Classifier(path, backend=backend, threads=threads, batch_size=batch_size)
    meta = clf.meta
    if tuple(meta.labels) != tuple(class_names):
        raise ValueError(f"{path}: model labels {list(meta.labels)} differ from the dataset's classes "
                         f"{list(class_names)}; these models cannot be compared on one table")
    kept, probs, rejected, top, problems = _predict_folder(clf, samples, batch_size, progress, path.name)
    if not kept:
        raise ValueError(f"{path}: no image could be classified ({'; '.join(problems[:3])})")
    labels = np.asarray([samples[i][1] for i in kept])
    m = compute_metrics(labels, np.stack(probs), np.asarray(rejected), class_names)
    rec = {
        "model": str(path), "precision": meta.precision, "arch": meta.arch, "backend": clf.backend.describe(),
        "status": "ok", "num_samples": m["num_samples"], "accuracy": m["accuracy"], "macro_f1": m["macro_f1"],
        "accuracy_no_rejection": m["rejection_off"]["accuracy"],
        "macro_f1_no_rejection": m["rejection_off"]["macro_f1"],
        "ece": m["ece"], "nll": m["nll"], "score": meta.score, "threshold": clf.threshold,
        "temperature": meta.temperature, "coverage": m["rejection_on"]["coverage"],
        "selective_accuracy": m["rejection_on"]["selective_accuracy"], "per_class_f1": {
            c: m["per_class"][c]["f1-score"] for c in class_names if c in m["per_class"]},
        "confusion_matrix": m["confusion_matrix"], "skipped_files": problems,
        "_kept": kept, "_top": top,
    }
    clf.close()
    return rec


def add_agreement(records: list[dict[str, Any]]) -> str | None:
    """Top-1 agreement of every record with the FP32 reference, on the images both classified. Returns its path."""
    ok = [r for r in records if r["status"] == "ok"]
    if not ok:
        return None
    ref = next((r for r in ok if r["precision"] == "fp32"), ok[0])
    ref_top = dict(zip(ref["_kept"], ref["_top"]))
    for r in ok:
        pairs = [(t, ref_top[i]) for i, t in zip(r["_kept"], r["_top"]) if i in ref_top]
        r["reference"] = ref["model"]
        r["top1_agreement"] = float(np.mean([a == b for a, b in pairs])) if pairs else None
        r["agreement_n"] = len(pairs)
    return ref["model"]


def run_accuracy(data: Path, models: Sequence[Path], backend: str = "auto", batch_size: int = 32,
                 threads: int | None = None, progress: bool = True) -> dict[str, Any]:
    """The JSON document for ``models`` on ``data``; raises :class:`Skipped` when ``data`` is absent."""
    from train.data import scan_folder

    if not data.is_dir():
        raise Skipped(missing_data_message(data))
    missing = [str(m) for m in models if not Path(m).is_file()]
    if missing:
        raise FileNotFoundError(2, "model file(s) not found", ", ".join(missing))
    from runtime.classifier import Classifier  # noqa: F401 - fail early with the import error, before scanning

    first_meta = _labels_of(models[0], backend, threads)
    report = scan_folder(data, first_meta, verify=False)  # it already passes over per-image .json descriptions
    samples = list(report.samples)
    records = []
    for m in models:
        try:
            records.append(evaluate_artifact(Path(m), samples, first_meta, backend, batch_size, threads, progress))
        except Exception as e:  # noqa: BLE001 - one unusable artifact must not cost the others' rows
            records.append({"model": str(m), "status": "error", "reason": f"{type(e).__name__}: {e}"})
    reference = add_agreement(records)
    for r in records:
        r.pop("_kept", None)
        r.pop("_top", None)
    return {"schema": SCHEMA, "command": " ".join(["python -m benchmarks.accuracy", *sys.argv[1:]]),
            "machine": envinfo.machine_info(threads), "data": str(data), "num_images": len(samples),
            "class_counts": report.counts, "reference": reference,
            "dataset_problems": list(report.problems),
            "records": records}


def _labels_of(model: Path, backend: str, threads: int | None) -> tuple[str, ...]:
    from runtime import Classifier

    clf = Classifier(model, backend=backend, threads=threads, warmup=False)
    labels = tuple(clf.meta.labels)
    clf.close()
    return labels


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def format_table(doc: dict[str, Any]) -> str:
    lines = [f"### Accuracy on `{doc['data']}` ({doc['num_images']} images)", "",
             envinfo.format_header(doc["machine"]), "",
             "| model | prec | accuracy % | macro-F1 | top-1 agreement vs fp32 % | ECE % | score < threshold | "
             "coverage % | selective acc % | acc, no rejection % |",
             "|---|---|---:|---:|---:|---:|---|---:|---:|---:|"]
    for r in doc["records"]:
        name = Path(r["model"]).name
        if r["status"] != "ok":
            lines.append(f"| {name} | - | error: {r['reason']} |||||||| ")
            continue
        thr = "off" if r["threshold"] is None else f"{r['score']} < {r['threshold']:.4g}"
        lines.append(f"| {name} | {r['precision']} | {_pct(r['accuracy'])} | {r['macro_f1']:.3f} | "
                     f"{_pct(r.get('top1_agreement'))} | {_pct(r['ece'])} | {thr} | {_pct(r['coverage'])} | "
                     f"{_pct(r['selective_accuracy'])} | {_pct(r['accuracy_no_rejection'])} |")
    lines += ["", f"Reference for agreement: `{doc['reference']}`. Accuracy/macro-F1 are of the final labels "
              "(rejected → other); selective accuracy is on the accepted images; ECE over top-1 confidence, 15 bins."]
    problems = sum(len(r.get("skipped_files", [])) for r in doc["records"]) + len(doc["dataset_problems"])
    if problems:
        lines.append(f"{problems} file problem(s) (unreadable images, stray files): see accuracy.json.")
    return "\n".join(lines)


EPILOG = """\
examples:
  python -m benchmarks.accuracy                                  # bundled models on data/synth/test
  python -m benchmarks.accuracy --data data/synth/test --models runs/synth/model.onnx runs/synth/model.int8.onnx
  python -m benchmarks.accuracy --data ../shared/datasets/sem-hackathon/test --models m.onnx m.int8.onnx
  python -m benchmarks.accuracy --models m.onnx m.engine --backend auto --out results/

A missing dataset folder is skipped with a message (exit code 0) so scripts can run the real-data table where the
data exists; a missing model file is an error (exit code 2).
"""


def bundled_models() -> list[Path]:
    """The bundled FP32 and INT8 models that exist, found by the runtime's resolver (installed or checkout)."""
    found = []
    for int8 in (False, True):
        try:
            found.append(bundled_model_path(int8=int8))
        except FileNotFoundError:
            pass
    return found


@cli("python -m benchmarks.accuracy")
def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.accuracy", description=__doc__.split("\n\n")[0],
                                 epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help=f"DIR/<class>/ images (default {DEFAULT_DATA})")
    ap.add_argument("--models", type=Path, nargs="+", default=None,
                    help="ONNX files / TensorRT engines "
                         "(default: the bundled sem_classifier.onnx and sem_classifier.int8.onnx)")
    ap.add_argument("--backend", default="auto", help="runtime.Classifier backend (auto, ort, cpu, cuda, trt)")
    ap.add_argument("--batch-size", type=int, default=32, help="images per inference call (32)")
    ap.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (physical cores)")
    ap.add_argument("--out", type=Path, default=Path("results"), help="folder for accuracy.json/.md (results/)")
    ap.add_argument("--name", default="accuracy", help="output file stem (accuracy → accuracy.json, accuracy.md)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    models = args.models
    if models is None:
        models = bundled_models()
        if not models:
            try:
                bundled_model_path()
            except FileNotFoundError as e:
                print(f"benchmarks.accuracy: {e.strerror}", file=sys.stderr)
            return 2
    try:
        doc = run_accuracy(args.data, models, args.backend, max(1, args.batch_size), args.threads,
                           not args.no_progress)
    except Skipped as e:
        print(f"benchmarks.accuracy: SKIPPED: {e}")
        return 0
    except FileNotFoundError as e:
        print(f"benchmarks.accuracy: {e.filename}: {e.strerror}", file=sys.stderr)
        return 2
    md = format_table(doc)
    print(md)
    j = atomic_write_text(args.out / f"{args.name}.json", json.dumps(doc, indent=2) + "\n")
    m = atomic_write_text(args.out / f"{args.name}.md", md + "\n")
    print(f"\nwrote {j} and {m}", file=sys.stderr)
    return 1 if any(r["status"] != "ok" for r in doc["records"]) else 0


if __name__ == "__main__":
    sys.exit(main())
