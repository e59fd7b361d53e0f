"""Artifacts are written whole or not at all, with the permissions a normal new file gets."""

from __future__ import annotations

import os

import pytest

from runtime._atomic import atomic_write_bytes


def test_atomic_write_replaces_whole_and_honours_umask(tmp_path):
    target = tmp_path / "sub" / "model.onnx"
    atomic_write_bytes(target, b"v1")
    atomic_write_bytes(target, b"v2")
    assert target.read_bytes() == b"v2"
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask
    assert [p.name for p in target.parent.iterdir()] == ["model.onnx"]


def test_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "metrics.json"
    atomic_write_bytes(target, b"old")
    with pytest.raises(TypeError):
        atomic_write_bytes(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
