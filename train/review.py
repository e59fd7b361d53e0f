"""``python -m train.review --queue DIR --data DATASET``: move review-queue frames a person has sorted into class
folders (``DIR/<class>/``, see :mod:`runtime.review`) into the training set, and record what was added.

Each image goes to ``DATASET/<split>/<class>/review-<sha256[:16]>.<ext>`` (named by its content: importing the same
frame twice adds it once). Its ``.json`` from the queue goes to ``DIR/imported/<fingerprint>/<class>/``. The batch's
fingerprint (sha256 over the sorted ``class/sha256`` of its images) and its counts are appended to
``DATASET/review_imports.jsonl``; training copies that list into the next model's metadata
(``extra["review_imports"]``), and its ``data_fingerprint`` (over every file of DATASET) changes with the import,
so a model says which reviewed frames it learnt from. Frames still in ``DIR/pending/`` are not touched.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from runtime.contract import CLASSES
from runtime.files import atomic_copy, sha256_bytes, sha256_file
from runtime.folders import list_images, scan_class_folders
from runtime.review import PENDING

MANIFEST = "review_imports.jsonl"
IMPORTED = "imported"
#: Key in ModelMetadata.extra: the review batches in the training data (fingerprint, split, counts, time).
METADATA_KEY = "review_imports"


class ReviewImportError(ValueError):
    """The queue or the dataset cannot be used as given; the message names the folder."""


@dataclass
class ImportReport:
    fingerprint: str = ""
    counts: dict[str, int] = field(default_factory=dict)
    duplicates: int = 0  # already in the dataset (same content)
    files: list[dict[str, str]] = field(default_factory=list)
    left_pending: int = 0

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def sorted_images(queue: Path, classes: Sequence[str] = CLASSES) -> dict[str, list[Path]]:
    """Images a person sorted into ``queue/<class>/``; a folder that is not a class is an error naming it."""
    if not queue.is_dir():
        raise ReviewImportError(f"--queue {queue}: not a folder")
    found: dict[str, list[Path]] = {}
    for p, name in scan_class_folders(queue, allow_empty=True):
        if name not in (PENDING, IMPORTED):
            found.setdefault(name, []).append(p)
    unknown = [name for name in found if name not in classes]
    if unknown:
        raise ReviewImportError(f"--queue {queue}: folder(s) {', '.join(unknown)} are not classes of the model "
                                f"({', '.join(classes)}); a new defect type goes to 'other' until the class list "
                                "grows")
    return found


def batch_fingerprint(entries: Sequence[tuple[str, str]]) -> str:
    """sha256 over the sorted ``class/sha256`` lines of a batch (16 hex)."""
    return sha256_bytes("\n".join(sorted(f"{c}/{s}" for c, s in entries)).encode())[:16]


def import_queue(queue: str | os.PathLike[str], data: str | os.PathLike[str], split: str = "train",
                 dry_run: bool = False) -> ImportReport:
    """Move sorted images from ``queue`` into ``data/<split>/<class>/`` (see the module docstring)."""
    queue, data = Path(queue), Path(data)
    if not data.is_dir():
        raise ReviewImportError(f"--data {data}: dataset folder does not exist")
    images = sorted_images(queue)
    rep = ImportReport(left_pending=len(list_images(queue / PENDING)) if (queue / PENDING).is_dir() else 0)
    plan = []
    for cls, paths in images.items():
        for p in paths:
            digest = sha256_file(p)
            dest = data / split / cls / f"review-{digest[:16]}{p.suffix.lower()}"
            plan.append((cls, p, digest, dest))
    rep.fingerprint = batch_fingerprint([(c, d) for c, _, d, _ in plan]) if plan else ""
    for cls, p, digest, dest in plan:
        dup = dest.exists()
        rep.duplicates += dup
        if not dup:
            rep.counts[cls] = rep.counts.get(cls, 0) + 1
            rep.files.append({"class": cls, "file": dest.relative_to(data).as_posix(), "sha256": digest})
        if dry_run:
            continue
        if not dup:
            atomic_copy(p, dest)  # the dataset never holds half a file
        keep = queue / IMPORTED / rep.fingerprint / cls
        keep.mkdir(parents=True, exist_ok=True)
        side = p.with_suffix(".json")
        if side.is_file():
            os.replace(side, keep / side.name)
        p.unlink()
    if plan and not dry_run:
        line = {"fingerprint": rep.fingerprint, "imported_at": datetime.now(UTC).isoformat(timespec="seconds"),
                "split": split, "counts": rep.counts, "duplicates": rep.duplicates, "files": rep.files}
        with open(data / MANIFEST, "a", encoding="utf-8") as f:
            f.write(json.dumps(line, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
    return rep


def review_imports(data: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The review batches recorded in ``data`` (for the model's metadata): fingerprint, split, counts, time."""
    path = Path(data) / MANIFEST
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            d = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by a crash: that batch's files are still fingerprinted with the data
        out.append({k: d.get(k) for k in ("fingerprint", "split", "counts", "imported_at")})
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.review", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--queue", required=True, metavar="DIR", help="the review folder given to runtime.run --review")
    p.add_argument("--data", required=True, metavar="DATASET", help="dataset root with train/ and val/")
    p.add_argument("--split", default="train", choices=("train", "val", "test"),
                   help="where the sorted frames go (default train)")
    p.add_argument("--dry-run", action="store_true", help="say what would move, move nothing")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rep = import_queue(args.queue, args.data, args.split, args.dry_run)
    except (ReviewImportError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    verb = "would move" if args.dry_run else "moved"
    if not rep.files and not rep.duplicates:
        print(f"nothing sorted in {args.queue} (sort frames from {PENDING}/ into <class>/ folders first); "
              f"{rep.left_pending} still pending")
        return 0
    per = ", ".join(f"{c} {n}" for c, n in sorted(rep.counts.items())) or "none new"
    print(f"{verb} {rep.total} images into {Path(args.data) / args.split} ({per}); {rep.duplicates} already there; "
          f"batch fingerprint {rep.fingerprint}; {rep.left_pending} still pending")
    if not args.dry_run:
        print(f"recorded in {Path(args.data) / MANIFEST}; the next model trained on {args.data} lists it in its "
              f"metadata (extra.{METADATA_KEY})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
