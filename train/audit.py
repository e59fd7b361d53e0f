"""Dataset audit: near-identical images that carry different labels or sit in different splits.

Two kinds of pair quietly spoil a small dataset. *Conflicts* are near-identical images with different labels: a
defect image and its twin with the defect edited out, or a copy filed under two classes. Only a small region tells
them apart, or nothing does. *Leaks* are near-identical images with the same label in two splits, which make val and
test scores look better than they will be on new images.

Images are compared as 32×32 grey thumbnails (``runtime.preprocess.load_grey`` and ``resize_grey``), z-normalised, by
Pearson correlation. Flipped or rotated copies are not matched. On sem-hackathon, 38 different-label pairs reach 0.9.

    python -m train.audit --data data                     # train/ val/ [test/] or one folder of class folders
    python -m train.audit --data data --out runs/audit    # + audit.json and pairs.png
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from runtime.contract import CLASSES
from runtime.files import atomic_write_bytes, atomic_write_text
from runtime.preprocess import load_grey, resize_grey
from sem_extras import cli

log = logging.getLogger(__name__)

THUMB = 32
DEFAULT_THRESHOLD = 0.9
MAX_PAIRS = 100_000
_CHUNK = 2048


@dataclass(frozen=True)
class AuditImage:
    path: Path
    split: str
    label: str


def thumbnail(grey: np.ndarray, side: int = THUMB) -> np.ndarray | None:
    """Flattened, zero-mean, unit-variance ``side``×``side`` thumbnail; None for a flat image (nothing to match)."""
    t = resize_grey(np.ascontiguousarray(grey), (side, side)).astype(np.float64).ravel()
    sd = t.std()
    if sd < 1e-6 * max(1.0, float(np.abs(t).max())):
        return None
    return ((t - t.mean()) / sd).astype(np.float32)


Pair = tuple[int, int, float]


def near_pairs(thumbs: np.ndarray, threshold: float, limit: int = MAX_PAIRS) -> tuple[list[Pair], bool]:
    """``(i, j, correlation)`` for ``i < j`` with correlation ≥ ``threshold``, highest first, and whether the search
    stopped at ``limit`` pairs (a folder of video frames can hold millions; the first ``limit`` found are returned)."""
    n, d = thumbs.shape
    out: list[Pair] = []
    truncated = False
    for a in range(0, n, _CHUNK):
        c = thumbs[a:a + _CHUNK] @ thumbs.T / np.float32(d)
        ii, jj = np.nonzero(c >= threshold)
        keep = a + ii < jj
        ii, jj = ii[keep], jj[keep]
        if len(out) + len(ii) > limit:
            ii, jj = ii[:limit - len(out)], jj[:limit - len(out)]
            truncated = True
        out.extend((a + i, j, float(c[i, j])) for i, j in zip(ii.tolist(), jj.tolist()))
        if truncated:
            break
    out.sort(key=lambda p: -p[2])
    return out, truncated


def _collect(data: Path, classes: Sequence[str]) -> tuple[list[AuditImage], list[str]]:
    from train.data import SPLITS, DatasetError, scan_folder  # the train extra (torch): imported once it is needed

    splits = [s for s in SPLITS if (data / s).is_dir()]
    roots = [(s, data / s) for s in splits] if splits else [("all", data)]
    images: list[AuditImage] = []
    problems: list[str] = []
    for split, root in roots:
        try:
            rep = scan_folder(root, classes, verify=False)
        except DatasetError as e:
            problems.append(str(e))
            continue
        problems.extend(rep.problems)
        images.extend(AuditImage(p, split, classes[i]) for p, i in rep.samples)
    return images, problems


def audit_dataset(data: str | Path, threshold: float = DEFAULT_THRESHOLD, classes: Sequence[str] = CLASSES,
                  progress: bool = False) -> dict[str, Any]:
    """Scan ``data`` and report conflicting-label pairs, cross-split leaks and same-split duplicates.

    Unreadable images are listed under ``problems`` (naming the file) and left out; the audit goes on.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold {threshold}: need 0 < threshold <= 1 (a correlation)")
    from train.data import DatasetError

    data = Path(data)
    if not data.is_dir():
        raise DatasetError(f"{data}: dataset folder does not exist")
    images, problems = _collect(data, classes)
    thumbs: list[np.ndarray] = []
    kept: list[AuditImage] = []
    flat = 0
    it: Any = images
    if progress:
        from tqdm import tqdm

        it = tqdm(images, desc="thumbnails", unit="img")
    for im in it:
        try:
            t = thumbnail(load_grey(im.path))
        except Exception as e:  # noqa: BLE001 - one unreadable file must not stop the audit
            problems.append(f"{im.path}: unusable image ({e}); left out")
            continue
        if t is None:
            flat += 1
            continue
        thumbs.append(t)
        kept.append(im)
    pairs, truncated = near_pairs(np.stack(thumbs), threshold) if len(thumbs) > 1 else ([], False)
    if truncated:
        problems.append(f"more than {MAX_PAIRS} near-identical pairs at threshold {threshold}: only the first "
                        f"{MAX_PAIRS} found are reported (raise --threshold)")
    conflicts, leaks, duplicates = [], [], []
    for i, j, c in pairs:
        a, b = kept[i], kept[j]
        rec = {"correlation": round(c, 4), "a": {"path": str(a.path), "split": a.split, "label": a.label},
               "b": {"path": str(b.path), "split": b.split, "label": b.label}}
        if a.label != b.label:
            conflicts.append(rec)
        elif a.split != b.split:
            leaks.append(rec)
        else:
            duplicates.append(rec)
    in_conflict: dict[str, set[str]] = {}
    for r in conflicts:
        for side in ("a", "b"):
            in_conflict.setdefault(r[side]["split"], set()).add(r[side]["path"])
    return {"data": str(data), "threshold": threshold, "images": len(kept), "flat_images": flat,
            "splits": sorted({im.split for im in kept}), "problems": problems,
            "conflicts": conflicts, "leaks": leaks, "duplicates": duplicates,
            "images_in_conflicts": {s: len(v) for s, v in sorted(in_conflict.items())},
            "conflict_label_pairs": _label_pair_counts(conflicts)}


def _label_pair_counts(conflicts: list[dict[str, Any]]) -> dict[str, int]:
    return dict(Counter(" / ".join(sorted((r["a"]["label"], r["b"]["label"]))) for r in conflicts).most_common())


def pairs_sheet(records: list[dict[str, Any]], side: int = 160, limit: int = 24) -> np.ndarray | None:
    """Contact sheet (BGR uint8) of A | B | |A − B| triplets with split/label captions; None without records."""
    rows = []
    for r in records[:limit]:
        try:
            a = resize_grey(load_grey(r["a"]["path"]), (side, side)).astype(np.float32)
            b = resize_grey(load_grey(r["b"]["path"]), (side, side)).astype(np.float32)
        except Exception:  # noqa: BLE001 - a file that vanished since the audit is skipped in the picture only
            continue
        scale = 255.0 / max(float(a.max()), float(b.max()), 1.0)
        a, b = a * scale, b * scale
        d = np.abs(a - b)
        d = d * (255.0 / max(float(d.max()), 1e-6))
        row = cv2.cvtColor(np.concatenate([a, b, d], 1).clip(0, 255).astype(np.uint8), cv2.COLOR_GRAY2BGR)
        for k, s in enumerate(("a", "b")):
            cv2.putText(row, f"{r[s]['split']}/{r[s]['label']}", (3 + k * side, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.42,
                        (0, 0, 255), 1, cv2.LINE_AA)
        cv2.putText(row, f"r={r['correlation']:.3f}", (3 + 2 * side, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.42,
                    (0, 200, 255), 1, cv2.LINE_AA)
        rows.append(row)
    if not rows:
        return None
    per_col = 8  # A | B | diff triplets in columns of 8 rows: a sheet, not a strip
    while len(rows) % per_col and len(rows) > per_col:
        rows.append(np.zeros_like(rows[0]))
    cols = [np.concatenate(rows[k:k + per_col], 0) for k in range(0, len(rows), per_col)]
    return np.concatenate(cols, 1)


def write_audit(report: dict[str, Any], out: str | Path) -> dict[str, Path]:
    """``audit.json`` and (when there are conflicts or leaks) ``pairs.png`` in ``out``, each written atomically."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = {"json": atomic_write_text(out / "audit.json", json.dumps(report, indent=2) + "\n")}
    sheet = pairs_sheet(report["conflicts"] + report["leaks"])
    if sheet is not None:
        ok, buf = cv2.imencode(".png", sheet)
        if ok:
            written["png"] = atomic_write_bytes(out / "pairs.png", buf.tobytes())
    return written


def format_audit(report: dict[str, Any], show: int = 10) -> str:
    lines = [f"{report['images']} images in {', '.join(report['splits']) or 'no split'}; pairs with thumbnail "
             f"correlation >= {report['threshold']}: {len(report['conflicts'])} with different labels, "
             f"{len(report['leaks'])} same-label across splits, {len(report['duplicates'])} same-label in one split"]
    if report["conflicts"]:
        lines.append("images in a different-label pair, per split: "
                     + ", ".join(f"{s} {n}" for s, n in report["images_in_conflicts"].items()))
        lines.append("label pairs: " + ", ".join(f"{k} {v}" for k, v in report["conflict_label_pairs"].items()))
    for kind in ("conflicts", "leaks"):
        for r in report[kind][:show]:
            lines.append(f"  {kind[:-1]:8} r={r['correlation']:.3f}  {r['a']['path']} ({r['a']['split']}/"
                         f"{r['a']['label']})  {r['b']['path']} ({r['b']['split']}/{r['b']['label']})")
    if report["flat_images"]:
        lines.append(f"{report['flat_images']} flat image(s) (one grey level) not compared")
    for p in report["problems"]:
        lines.append(f"problem: {p}")
    return "\n".join(lines)


@cli("python -m train.audit")
def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m train.audit",
        description="Find near-identical images with different labels (conflicts) or in different splits (leaks).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  python -m train.audit --data data\n"
               "  python -m train.audit --data ../shared/datasets/sem-hackathon --out runs/audit --threshold 0.95")
    ap.add_argument("--data", required=True, help="DIR with train/ val/ [test/] class folders, or one class-folder DIR")
    ap.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                    help=f"thumbnail correlation that counts as near-identical (default {DEFAULT_THRESHOLD})")
    ap.add_argument("--out", help="folder for audit.json and pairs.png (A | B | difference per row)")
    ap.add_argument("--show", type=int, default=10, help="pairs of each kind to print")
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        report = audit_dataset(args.data, args.threshold, progress=args.progress)
    except ValueError as e:  # train.data.DatasetError included
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_audit(report, args.show))
    if args.out:
        for path in write_audit(report, args.out).values():
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
