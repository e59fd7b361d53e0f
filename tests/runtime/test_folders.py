"""The one class-folder scanner: sorted, hidden names skipped, image suffixes from runtime.sources, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from runtime.folders import is_image_file, list_images, scan_class_folders, visible_files
from runtime.sources import IMAGE_SUFFIXES


def _touch(root: Path, *names: str) -> None:
    for name in names:
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")


def test_scan_lists_images_class_by_class_sorted_and_skips_hidden_and_non_images(tmp_path):
    _touch(tmp_path, "gaps/b.png", "gaps/a.TIF", "gaps/.hidden.png", "gaps/notes.txt", "gaps/a.json",
           "clean/z.jpg", "clean/sub/deep.png", ".trash/x.png", "stray.png")
    assert scan_class_folders(tmp_path) == [(tmp_path / "clean/z.jpg", "clean"), (tmp_path / "gaps/a.TIF", "gaps"),
                                            (tmp_path / "gaps/b.png", "gaps")]


def test_scan_follows_the_given_class_order_and_passes_over_missing_folders(tmp_path):
    _touch(tmp_path, "gaps/a.png", "clean/b.png", "unknown/c.png")
    assert [c for _, c in scan_class_folders(tmp_path, ["gaps", "cracks", "clean"])] == ["gaps", "clean"]


def test_recursive_scan_includes_subfolders_but_not_hidden_ones(tmp_path):
    _touch(tmp_path, "clean/a.png", "clean/day2/b.png", "clean/.cache/c.png", "clean/day2/.d.png")
    assert scan_class_folders(tmp_path, recursive=True) == [(tmp_path / "clean/a.png", "clean"),
                                                            (tmp_path / "clean/day2/b.png", "clean")]


def test_missing_root_and_no_images_are_errors_naming_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope: folder does not exist"):
        scan_class_folders(tmp_path / "nope")
    _touch(tmp_path, "data/clean/readme.txt")
    with pytest.raises(ValueError, match=r"data: no images in its class folders \(folders: clean;"):
        scan_class_folders(tmp_path / "data")
    with pytest.raises(ValueError, match="folders: gaps"):
        scan_class_folders(tmp_path / "data", ["gaps"])
    assert scan_class_folders(tmp_path / "data", allow_empty=True) == []


def test_image_files_use_the_runtime_suffix_list(tmp_path):
    for suffix in IMAGE_SUFFIXES:
        assert is_image_file(f"x{suffix.upper()}")
    assert not is_image_file("x.json") and not is_image_file(".x.png") and not is_image_file("png")
    _touch(tmp_path, "a.png", "b.txt", ".c.png", "d/e.png")
    assert visible_files(tmp_path) == [tmp_path / "a.png", tmp_path / "b.txt"]
    assert list_images(tmp_path) == [tmp_path / "a.png"]
    assert list_images(tmp_path, recursive=True) == [tmp_path / "a.png", tmp_path / "d/e.png"]
