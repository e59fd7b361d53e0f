"""Class folders of images (``root/<class>/*.png``): the one scanner behind training, calibration and the gates.

What counts as an image is :data:`runtime.sources.IMAGE_SUFFIXES` (the suffixes the runtime reads), compared in
lower case. Hidden files and folders (a leading ``.``, e.g. ``.DS_Store`` or an editor's temp file) are never
images. Every listing is sorted, so the same folder always gives the same order.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from runtime.sources import IMAGE_SUFFIXES


def is_image_file(path: str | os.PathLike[str]) -> bool:
    """True for a name with an image suffix that is not hidden (the file itself is not opened)."""
    p = Path(path)
    return not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES


def visible_files(folder: str | os.PathLike[str], *, recursive: bool = False) -> list[Path]:
    """Sorted files in ``folder`` (and, with ``recursive``, below it), skipping anything under a hidden name."""
    folder = Path(folder)
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in found
                  if not any(part.startswith(".") for part in p.relative_to(folder).parts) and p.is_file())


def list_images(folder: str | os.PathLike[str], *, recursive: bool = False) -> list[Path]:
    """Sorted image files in ``folder`` (see :func:`visible_files`)."""
    return [p for p in visible_files(folder, recursive=recursive) if is_image_file(p)]


def class_folder_names(root: str | os.PathLike[str]) -> list[str]:
    """The visible subfolders of ``root``, sorted by name."""
    return sorted(p.name for p in Path(root).iterdir() if p.is_dir() and not p.name.startswith("."))


def scan_class_folders(root: str | os.PathLike[str], classes: Sequence[str] | None = None, *,
                       recursive: bool = False, allow_empty: bool = False) -> list[tuple[Path, str]]:
    """``(image path, class name)`` for every image in ``root/<class>/``, class by class, sorted within each.

    ``classes=None`` takes every visible subfolder as a class (sorted by name); given, only those folders are read,
    in that order, and a missing one contributes no images (callers report it as they see fit). ``recursive``
    includes images in subfolders of a class folder. Raises ``FileNotFoundError`` naming ``root`` when it is not a
    folder, and ``ValueError`` naming it when no image is found (unless ``allow_empty``).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: folder does not exist (expected {root}/<class>/ with the images of each "
                                "class)")
    names = class_folder_names(root) if classes is None else list(classes)
    found = [(p, name) for name in names if (root / name).is_dir()
             for p in list_images(root / name, recursive=recursive)]
    if not found and not allow_empty:
        wanted = ", ".join(names) if names else "none found"
        raise ValueError(f"{root}: no images in its class folders (folders: {wanted}; image suffixes: "
                         f"{', '.join(sorted(IMAGE_SUFFIXES))})")
    return found
