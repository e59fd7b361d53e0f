"""Frame-quality benchmark: content-free frames never become a class; real frames are not refused; dim, flat,
gamma-changed and 10- to 14-bit frames are classified as well as the originals.

``python -m benchmarks.quality --models MODEL [MODEL ...]`` runs each model through ``runtime.Classifier`` (the
deployed path, gate included) on four things (the fourth only when asked for):

1. ``corpus`` — content-free frames (:mod:`train.contentfree`: blank, noise, gradient, saturated, defocus) at every
   size in ``--sizes`` and in 8- and 16-bit, drawn from ``--corpus-seed`` (kept away from the tests' seeds).
   Counted per kind and size: refused (``invalid``, per reason), ``other`` (rejected or top class), ``clean``, a
   named defect. The goal is no ``clean`` and no named defect.
2. ``false_invalid`` — the share of real frames the gate refuses: every image under ``--real`` (default
   ``../shared/datasets/sem-hackathon``, skipped with a message when absent) and under ``--synthetic``.
3. ``robustness`` — accuracy on the ``--synthetic`` test images (``DIR/<class>/``) after brightness, contrast and
   gamma changes and as 10/12/14-bit data in uint16, against the unmodified images; plus how the ``clean`` images
   come out (the false alarms an inspection station sees, listed with their scores for the unmodified images).
4. ``defocus`` (not in the default parts) — synthetic scenes of every class (drawn from ``--corpus-seed``) blurred by
   a growing share of the frame side at several sizes: how many the network still gets right, calls a wrong class
   (and a defect ``clean``), rejects to ``other``, or the gate refuses. It shows where a blurred frame stops carrying
   its class and whether the gate takes over there; plotted in ``defocus.png``.

Output: Markdown tables on stdout and ``quality.json`` + ``quality.md`` under ``--out``; corpus frames that came
out ``clean`` or a defect are listed (kind, size, bit depth, index: the same seed draws them again) and pictured in
``corpus_leaks.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from runtime.contract import CLASSES, INVALID_LABEL, REJECT_LABEL
from runtime.files import atomic_write_bytes, atomic_write_text
from runtime.folders import list_images

SCHEMA = "sem-bench-quality/1"
DEFAULT_REAL = Path("../shared/datasets/sem-hackathon")
DEFAULT_SYNTHETIC = Path("data/synth2_test/test")
SYNTHETIC_HINT = ("generate it: python -m train.synthetic --out data/synth2_test --per-class 150 --size 128 --seed 2 "
                  "--split 0,0,1")
#: Far from the tests' seeds (0-99) so the gate is never tuned on this corpus.
DEFAULT_CORPUS_SEED = 20261207
DEFAULT_SIZES = (64, 256, 1024, 4096)
PARTS = ("corpus", "false_invalid", "robustness", "defocus")
DEFAULT_PARTS = ("corpus", "false_invalid", "robustness")
#: ``defocus`` part: Gaussian blur σ as a share of the frame side, frame sides, and scenes per class by default.
DEFOCUS_BLURS = (0.0, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.08)
DEFOCUS_SIZES = (64, 128, 1024)
DEFOCUS_PER_CLASS = 25

#: name → (kind, parameter); applied to 8-bit images as floats in [0, 1].
TRANSFORMS: dict[str, tuple[str, float]] = {
    "original": ("none", 1.0),
    "brightness 0.1x": ("brightness", 0.1), "brightness 0.2x": ("brightness", 0.2),
    "brightness 0.3x": ("brightness", 0.3), "brightness 0.5x": ("brightness", 0.5),
    "contrast 0.2x": ("contrast", 0.2), "contrast 0.3x": ("contrast", 0.3), "contrast 0.5x": ("contrast", 0.5),
    "gamma 0.5": ("gamma", 0.5), "gamma 0.7": ("gamma", 0.7), "gamma 1.4": ("gamma", 1.4), "gamma 2": ("gamma", 2.0),
    "10-bit": ("bits", 10), "12-bit": ("bits", 12), "14-bit": ("bits", 14),
}


def transform(img8: np.ndarray, kind: str, p: float) -> np.ndarray:
    """One acquisition change of an 8-bit frame; 8-bit out, except ``bits`` (uint16 holding ``p``-bit data)."""
    x = img8.astype(np.float32) / 255.0
    if kind == "bits":
        return np.round(x * float((1 << int(p)) - 1)).astype(np.uint16)
    if kind == "brightness":
        x = x * p
    elif kind == "contrast":
        m = float(x.mean())
        x = (x - m) * p + m
    elif kind == "gamma":
        x = np.clip(x, 0, 1) ** p
    elif kind != "none":
        raise ValueError(f"unknown transform {kind!r}")
    return np.round(np.clip(x, 0, 1) * 255).astype(np.uint8)


def outcome(p: Any) -> str:
    """``invalid:<reason>``, ``other``, ``clean`` or ``defect`` for one prediction."""
    if p.label == INVALID_LABEL:
        return f"invalid:{p.reason}"
    if p.label == REJECT_LABEL:
        return "other"
    return "clean" if p.label == "clean" else "defect"


# ------------------------------------------------------------------------------------------------ 1. corpus
def _scene_source(seed: int) -> Callable[[np.random.Generator, tuple[int, int]], np.ndarray]:
    """Scenes for defocus/saturated frames: the synthetic SEM generator (any class), drawn at 256 px."""
    from train.synthetic import render_sample

    def scene(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
        cls = CLASSES[int(rng.integers(0, len(CLASSES)))]
        img, _ = render_sample(cls, np.random.default_rng((seed, int(rng.integers(1 << 31)))), 256,
                               min_visibility=0)
        return cv2.resize(img, (size[1], size[0]), interpolation=cv2.INTER_AREA if size[0] < 256 else
                          cv2.INTER_LINEAR).astype(np.float32) / 255.0

    return scene


def corpus(per_cell: int, sizes: Sequence[int], seed: int) -> Iterable[tuple[str, int, int, np.ndarray]]:
    """(kind, size, bits, frame) for every kind × size × {8, 16} bits, ``per_cell`` frames each, reproducibly."""
    from train import contentfree

    scene = _scene_source(seed)
    for kind in contentfree.KINDS:
        for size in sizes:
            for bits in (8, 16):
                for i in range(per_cell):
                    rng = np.random.default_rng((seed, contentfree.KINDS.index(kind), size, bits, i))
                    yield kind, size, bits, contentfree.quantise(contentfree.frame(kind, rng, (size, size), scene),
                                                                 bits)


def run_corpus(clf: Any, per_cell: int, sizes: Sequence[int], seed: int, progress: bool = True,
               leaked: list[np.ndarray] | None = None) -> dict[str, Any]:
    """Counts per kind/size and outcome; every frame that came out ``clean`` or a defect is listed under ``leaks``
    (kind, size, bits, index within its cell: :func:`corpus` with the same seed draws it again) and, when
    ``leaked`` is given, appended to it for a picture."""
    cells: dict[str, Counter] = {}
    total: Counter = Counter()
    leaks: list[dict[str, Any]] = []
    n = len(sizes) * 2 * 5 * per_cell
    t0 = time.perf_counter()
    for k, (kind, size, bits, img) in enumerate(corpus(per_cell, sizes, seed)):
        p = clf.predict(img)
        o = outcome(p)
        cells.setdefault(f"{kind}/{size}", Counter())[o] += 1
        total[o] += 1
        if o in ("clean", "defect"):
            leaks.append({"kind": kind, "size": size, "bits": bits, "index": k % per_cell, "label": p.label,
                          "confidence": round(float(p.confidence), 4), "score": round(float(p.score), 4)})
            if leaked is not None:
                leaked.append(img)
        if progress and (k + 1) % 50 == 0:
            print(f"  corpus {k + 1}/{n} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    return {"per_cell": per_cell, "sizes": list(sizes), "seed": seed, "bits": [8, 16], "frames": sum(total.values()),
            "total": dict(total), "cells": {k: dict(v) for k, v in cells.items()},
            "classified": total["clean"] + total["defect"], "leaks": leaks}


def leak_picture(frames: Sequence[np.ndarray], leaks: Sequence[dict[str, Any]], side: int = 160) -> np.ndarray:
    """One row of tiles (8-bit, ``side`` px, stretched to their own range) of the corpus frames that came out
    ``clean`` or a defect, each captioned with its kind, size, bit depth and label."""
    tiles = []
    for img, leak in zip(frames, leaks):
        t = cv2.resize(img.astype(np.float32), (side, side), interpolation=cv2.INTER_AREA if img.shape[0] > side
                       else cv2.INTER_LINEAR)
        lo, hi = float(t.min()), float(t.max())
        t = np.round((t - lo) / max(hi - lo, 1e-9) * 255).astype(np.uint8)
        t = cv2.copyMakeBorder(t, 0, 28, 0, 2, cv2.BORDER_CONSTANT, value=255)
        for row, text in enumerate((f"{leak['kind']} {leak['size']}px {leak['bits']}-bit #{leak['index']}",
                                    f"-> {leak['label']} {leak['confidence']:.2f}")):
            cv2.putText(t, text, (3, side + 11 + 13 * row), cv2.FONT_HERSHEY_PLAIN, 0.8, 0, 1, cv2.LINE_AA)
        tiles.append(t)
    return np.hstack(tiles)


# ------------------------------------------------------------------------------------------ 2. false invalid
def images_under(folder: Path) -> list[Path]:
    return list_images(folder, recursive=True)


def run_false_invalid(clf: Any, folder: Path, batch: int = 32) -> dict[str, Any]:
    files = images_under(folder)
    reasons: Counter = Counter()
    refused: list[str] = []
    errors = 0
    for i in range(0, len(files), batch):
        chunk = files[i:i + batch]
        for f, p in zip(chunk, clf.predict_batch(chunk, on_error="keep")):
            if isinstance(p, Exception):
                errors += 1
            elif p.label == INVALID_LABEL:
                reasons[p.reason] += 1
                refused.append(f"{f.relative_to(folder)} ({p.reason})")
    n = len(files) - errors
    return {"folder": str(folder), "images": n, "unreadable": errors, "invalid": len(refused),
            "rate": len(refused) / n if n else None, "reasons": dict(reasons), "refused": refused}


# ------------------------------------------------------------------------------------------ 3. robustness
def labelled(folder: Path, per_class: int | None) -> list[tuple[Path, int]]:
    out = []
    for idx, cls in enumerate(CLASSES):
        files = images_under(folder / cls) if (folder / cls).is_dir() else []
        out += [(f, idx) for f in files[:per_class]]
    return out


def run_robustness(clf: Any, samples: Sequence[tuple[Path, int]], names: Sequence[str], batch: int = 32,
                   progress: bool = True) -> dict[str, Any]:
    imgs = [cv2.imread(str(f), cv2.IMREAD_GRAYSCALE) for f, _ in samples]
    y = np.array([lbl for _, lbl in samples])
    clean = y == CLASSES.index("clean")
    rows: dict[str, Any] = {}
    for name in names:
        kind, p = TRANSFORMS[name]
        top, final, outs, labels, scores = [], [], [], [], []
        for i in range(0, len(imgs), batch):
            preds = clf.predict_batch([transform(im, kind, p) for im in imgs[i:i + batch]])
            for pr in preds:
                top.append(pr.top_index)  # -1 for an invalid frame: never right
                final.append(pr.index)
                outs.append(outcome(pr))
                labels.append(pr.label)
                scores.append(None if pr.score is None or math.isnan(pr.score) else round(float(pr.score), 4))
        top_a, final_a = np.array(top), np.array(final)
        c_out = Counter(o for o, c in zip(outs, clean) if c)
        rows[name] = {"top1": float((top_a == y).mean()), "final": float((final_a == y).mean()),
                      "invalid": sum(o.startswith("invalid") for o in outs) / len(outs),
                      "clean_images": {"n": int(clean.sum()), **dict(c_out)}}
        if kind == "none":
            rows[name]["clean_false_alarms"] = [
                {"file": str(samples[i][0]), "label": labels[i], "score": scores[i]}
                for i in range(len(samples)) if clean[i] and outs[i] == "defect"]
        if progress:
            print(f"  {name}: top-1 {rows[name]['top1']:.3f}", file=sys.stderr)
    base = rows.get("original", {}).get("top1")
    if base is not None:
        for r in rows.values():
            r["delta_top1_pt"] = 100 * (r["top1"] - base)
    return {"images": len(samples), "rows": rows}


# ------------------------------------------------------------------------------------------------ 4. defocus
def defocus_frames(per_class: int, sizes: Sequence[int], blurs: Sequence[float],
                   seed: int) -> Iterable[tuple[int, float, str, np.ndarray]]:
    """(size, blur, class, 8-bit frame): ``per_class`` synthetic scenes of every class but ``other`` (rendered at
    256 px), resized to each size and blurred by σ = blur × size."""
    from train.contentfree import quantise
    from train.synthetic import render_sample

    scenes = [(cls, render_sample(cls, np.random.default_rng((seed, ci, i)), 256, min_visibility=0)[0])
              for ci, cls in enumerate(CLASSES) if cls != "other" for i in range(per_class)]
    for size in sizes:
        for blur in blurs:
            for cls, img in scenes:
                x = cv2.resize(img.astype(np.float32) / 255.0, (size, size),
                               interpolation=cv2.INTER_AREA if size < 256 else cv2.INTER_LINEAR)
                if blur > 0:
                    x = cv2.GaussianBlur(x, (0, 0), blur * size)
                yield size, blur, cls, quantise(np.clip(x, 0.0, 1.0), 8)


def run_defocus(clf: Any, per_class: int, sizes: Sequence[int], blurs: Sequence[float], seed: int,
                progress: bool = True) -> dict[str, Any]:
    """Per size and blur: frames classified right, as a wrong class (of them, defects called ``clean``), rejected
    to ``other``, refused by the gate."""
    rows: dict[tuple[int, float], Counter] = {}
    t0 = time.perf_counter()
    for k, (size, blur, cls, img) in enumerate(defocus_frames(per_class, sizes, blurs, seed)):
        o = outcome(p := clf.predict(img))
        c = rows.setdefault((size, blur), Counter())
        c["n"] += 1
        if o.startswith("invalid"):
            c["invalid"] += 1
        elif o == "other":
            c["other"] += 1
        elif p.label == cls:
            c["right"] += 1
        else:
            c["wrong"] += 1
            c["defect_to_clean"] += int(p.label == "clean")
        if progress and (k + 1) % 200 == 0:
            print(f"  defocus {k + 1} frames ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    keys = ("n", "right", "wrong", "defect_to_clean", "other", "invalid")
    return {"per_class": per_class, "seed": seed, "sizes": list(sizes), "blurs": list(blurs),
            "rows": [{"size": size, "blur": blur, **{k: c[k] for k in keys}} for (size, blur), c in rows.items()]}


def defocus_plot(res: dict[str, Any], path: Path, title: str = "") -> None:
    """Share of frames right / wrong class / ``other`` / refused against the blur, one panel per size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = res["sizes"]
    fig, axes = plt.subplots(1, len(sizes), figsize=(4 * len(sizes), 3.4), sharey=True, squeeze=False)
    for ax, size in zip(axes[0], sizes):
        rows = [r for r in res["rows"] if r["size"] == size]
        x = [100 * r["blur"] for r in rows]
        for key, style in (("right", "g-o"), ("wrong", "r-o"), ("other", "b-s"), ("invalid", "k-^")):
            ax.plot(x, [r[key] / max(1, r["n"]) for r in rows], style, label=key, ms=4)
        ax.set_title(f"{size}×{size}")
        ax.set_xlabel("blur σ, % of the side")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("share of frames")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title or "Blurred synthetic scenes: what the classifier reports")
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(path)


# ------------------------------------------------------------------------------------------------ report
def _pct(x: float | None, digits: int = 1) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.{digits}f}%"


def format_report(doc: dict[str, Any]) -> str:
    lines: list[str] = []
    for m in doc["models"]:
        lines.append(f"## {m['model']}{'' if m.get('gate', True) else ' (gate off)'}\n")
        c = m.get("corpus")
        if c:
            lines.append(f"Content-free corpus: {c['frames']} frames ({c['per_cell']} per kind × size × bit depth, "
                         f"8 and 16 bit, seed {c['seed']}); **{c['classified']} classified as clean or a defect**.\n")
            if c.get("leaks"):
                lines.append("Classified: " + "; ".join(
                    f"{x['kind']} {x['size']}px {x['bits']}-bit #{x['index']} → {x['label']} {x['confidence']:.2f}"
                    for x in c["leaks"]) + (f" (picture: `{c['leak_picture']}`)" if c.get("leak_picture") else "")
                    + "\n")
            reasons = sorted({k for cell in c["cells"].values() for k in cell})
            lines.append("| kind/size | " + " | ".join(reasons) + " |")
            lines.append("|---|" + "---:|" * len(reasons))
            for key, cell in c["cells"].items():
                lines.append(f"| {key} | " + " | ".join(str(cell.get(r, 0)) for r in reasons) + " |")
            lines.append("")
        for fi in m.get("false_invalid", []):
            if "skipped" in fi:
                lines.append(f"False-invalid, {fi['folder']}: skipped ({fi['skipped']})\n")
            else:
                lines.append(f"False-invalid, {fi['folder']}: {fi['invalid']} of {fi['images']} "
                             f"({_pct(fi['rate'], 2)}) {fi['reasons'] or ''}\n")
        r = m.get("robustness")
        if r:
            lines.append(f"Robustness on {r['images']} synthetic test images (gate on; invalid counts as wrong):\n")
            lines.append("| input | top-1 | Δ top-1 (pt) | with rejection | invalid | clean images → defect / other "
                         "/ invalid |")
            lines.append("|---|---:|---:|---:|---:|---|")
            for name, row in r["rows"].items():
                ci = row["clean_images"]
                inv = sum(v for k, v in ci.items() if k.startswith("invalid"))
                lines.append(f"| {name} | {_pct(row['top1'])} | {row.get('delta_top1_pt', 0):+.1f} | "
                             f"{_pct(row['final'])} | {_pct(row['invalid'])} | {ci.get('defect', 0)} / "
                             f"{ci.get('other', 0)} / {inv} of {ci['n']} |")
            lines.append("")
            alarms = r["rows"].get("original", {}).get("clean_false_alarms") or []
            if alarms:
                lines.append("Clean images called a defect (unmodified): " + ", ".join(
                    f"{Path(a['file']).name} → {a['label']} (score {a['score']})" for a in alarms) + "\n")
        dfc = m.get("defocus")
        if dfc:
            lines.append(f"Blurred synthetic scenes ({dfc['per_class']} per class, seed {dfc['seed']}; blur σ as a "
                         "share of the side):\n")
            lines.append("| size | blur | right | wrong class (defect → clean) | other | invalid |")
            lines.append("|---|---:|---:|---:|---:|---:|")
            for row in dfc["rows"]:
                lines.append(f"| {row['size']}² | {100 * row['blur']:.0f}% | {row['right']} | {row['wrong']} "
                             f"({row['defect_to_clean']}) | {row['other']} | {row['invalid']} |")
            lines.append("")
    return "\n".join(lines)


def run(models: Sequence[Path], parts: Sequence[str], *, synthetic: Path, real: Path, per_cell: int,
        sizes: Sequence[int], seed: int, per_class: int | None, transforms: Sequence[str], threads: int | None,
        progress: bool = True, gate: bool = True, pictures: dict[int, np.ndarray] | None = None) -> dict[str, Any]:
    """Every part for every model; ``pictures`` (when given) gets, per model index, the :func:`leak_picture` of
    its corpus frames that came out ``clean`` or a defect."""
    from runtime.classifier import Classifier

    doc: dict[str, Any] = {"schema": SCHEMA, "parts": list(parts), "models": []}
    for path in models:
        clf = Classifier(path, backend="ort", threads=threads, quality_gate=gate)
        rec: dict[str, Any] = {"model": str(path), "intensity": clf.meta.intensity, "gate": gate,
                               "quality_fitted": clf.meta.quality is not None}
        if "corpus" in parts:
            frames: list[np.ndarray] = []
            rec["corpus"] = run_corpus(clf, per_cell, sizes, seed, progress, leaked=frames)
            if frames and pictures is not None:
                pictures[len(doc["models"])] = leak_picture(frames, rec["corpus"]["leaks"])
        if "false_invalid" in parts:
            rec["false_invalid"] = []
            real_splits = [real / s for s in ("train", "val", "test")] if real.is_dir() else [real]
            for folder in [*real_splits, synthetic]:
                if not folder.is_dir():
                    hint = SYNTHETIC_HINT if folder == synthetic else "the sem-hackathon set is not on this machine"
                    rec["false_invalid"].append({"folder": str(folder), "skipped": hint})
                    continue
                rec["false_invalid"].append(run_false_invalid(clf, folder))
        if "defocus" in parts:
            rec["defocus"] = run_defocus(clf, per_class or DEFOCUS_PER_CLASS, DEFOCUS_SIZES, DEFOCUS_BLURS, seed,
                                         progress)
        if "robustness" in parts:
            if synthetic.is_dir():
                rec["robustness"] = run_robustness(clf, labelled(synthetic, per_class), transforms,
                                                   progress=progress)
            else:
                rec["robustness"] = None
                print(f"{synthetic}: missing; {SYNTHETIC_HINT}", file=sys.stderr)
        clf.close()
        doc["models"].append(rec)
    return doc


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", type=Path, help="ONNX models (default: the bundled FP32 model)")
    ap.add_argument("--parts", default=",".join(DEFAULT_PARTS),
                    help=f"comma-separated, of: {', '.join(PARTS)} (default {','.join(DEFAULT_PARTS)})")
    ap.add_argument("--synthetic", type=Path, default=DEFAULT_SYNTHETIC,
                    help=f"synthetic test images DIR/<class>/ (default {DEFAULT_SYNTHETIC})")
    ap.add_argument("--real", type=Path, default=DEFAULT_REAL,
                    help=f"real images; its train/val/test splits are used when present (default {DEFAULT_REAL})")
    ap.add_argument("--per-cell", type=int, default=10, help="corpus frames per kind × size × bit depth")
    ap.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)), help="corpus frame sides")
    ap.add_argument("--corpus-seed", type=int, default=DEFAULT_CORPUS_SEED,
                    help="seed of the corpus and of the defocus part's scenes")
    ap.add_argument("--per-class", type=int, default=None,
                    help=f"robustness: at most this many images per class; defocus: scenes per class "
                         f"(default {DEFOCUS_PER_CLASS})")
    ap.add_argument("--transforms", default=",".join(TRANSFORMS),
                    help="robustness rows, comma-separated names (default all)")
    ap.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads")
    ap.add_argument("--no-gate", action="store_true", help="classify every frame (the runtime before the gate)")
    ap.add_argument("--out", type=Path, default=Path("runs/bench_quality"))
    ap.add_argument("--quiet", action="store_true")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from runtime.classifier import bundled_model_path

    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    bad = [p for p in parts if p not in PARTS]
    names = [t.strip() for t in args.transforms.split(",") if t.strip()]
    unknown = [t for t in names if t not in TRANSFORMS]
    if bad or unknown:
        print(f"error: unknown part(s) {bad} or transform(s) {unknown}; transforms: {', '.join(TRANSFORMS)}",
              file=sys.stderr)
        return 2
    if "original" not in names:
        names.insert(0, "original")
    models = args.models or [bundled_model_path()]
    missing = [m for m in models if not Path(m).is_file()]
    if missing:
        print(f"error: model file(s) not found: {', '.join(map(str, missing))}", file=sys.stderr)
        return 2
    doc = run(models, parts, synthetic=args.synthetic, real=args.real, per_cell=args.per_cell,
              sizes=[int(s) for s in args.sizes.split(",")], seed=args.corpus_seed, per_class=args.per_class,
              transforms=names, threads=args.threads, progress=not args.quiet, gate=not args.no_gate,
              pictures=(pictures := {}))
    args.out.mkdir(parents=True, exist_ok=True)
    for i, picture in pictures.items():
        name = f"corpus_leaks_{i}.png" if len(doc["models"]) > 1 else "corpus_leaks.png"
        atomic_write_bytes(args.out / name, cv2.imencode(".png", picture)[1].tobytes())
        doc["models"][i]["corpus"]["leak_picture"] = name
    for i, rec in enumerate(doc["models"]):
        if rec.get("defocus"):
            name = f"defocus_{i}.png" if len(doc["models"]) > 1 else "defocus.png"
            defocus_plot(rec["defocus"], args.out / name, title=Path(rec["model"]).name)
            rec["defocus"]["picture"] = name
    text = format_report(doc)
    print(text)
    atomic_write_text(args.out / "quality.json", json.dumps(doc, indent=2) + "\n")
    atomic_write_text(args.out / "quality.md", text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
