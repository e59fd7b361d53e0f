"""Artifacts are written whole or not at all, with the permissions a normal new file gets, and hashed one way."""

from __future__ import annotations

import hashlib
import os

import pytest

import runtime.files as files
from runtime.files import atomic_copy, atomic_write_bytes, atomic_write_text, sha256_bytes, sha256_file


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


def test_atomic_write_text_is_utf8(tmp_path):
    target = atomic_write_text(tmp_path / "labels.txt", "clean\ncmp µm\n")
    assert target == tmp_path / "labels.txt"
    assert target.read_bytes() == "clean\ncmp µm\n".encode()


def test_atomic_write_flushes_the_file_and_its_folder(tmp_path, monkeypatch):
    synced: list[str] = []
    real_fsync = os.fsync

    def spy(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}") if os.path.exists("/proc/self/fd") else str(fd))
        return real_fsync(fd)

    monkeypatch.setattr(files.os, "fsync", spy)
    atomic_write_bytes(tmp_path / "engine.json", b"{}")
    assert len(synced) == 2
    if os.path.exists("/proc/self/fd"):
        assert synced[0].startswith(str(tmp_path / ".engine.json.")) and synced[1] == str(tmp_path)


def test_sha256_of_file_and_bytes_agree_across_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "_BLOCK", 7)  # many blocks, one short last one
    data = bytes(range(256)) * 3
    path = tmp_path / "m.onnx"
    path.write_bytes(data)
    want = hashlib.sha256(data).hexdigest()
    assert sha256_file(path) == sha256_bytes(data) == want
    (tmp_path / "empty").write_bytes(b"")
    assert sha256_file(tmp_path / "empty") == hashlib.sha256(b"").hexdigest()


def test_sha256_file_names_a_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.engine"):
        sha256_file(tmp_path / "missing.engine")


def test_atomic_copy_streams_the_whole_file_and_leaves_no_temp(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "_BLOCK", 5)
    src = tmp_path / "model.plan"
    src.write_bytes(bytes(range(256)) * 4)
    dst = atomic_copy(src, tmp_path / "repo" / "1" / "model.plan")
    assert dst.read_bytes() == src.read_bytes()
    assert [p.name for p in dst.parent.iterdir()] == ["model.plan"]


def test_atomic_copy_of_a_missing_file_names_it_and_keeps_the_old_copy(tmp_path):
    dst = atomic_write_bytes(tmp_path / "out" / "model.onnx", b"old")
    with pytest.raises(FileNotFoundError, match="gone.onnx"):
        atomic_copy(tmp_path / "gone.onnx", dst)
    assert dst.read_bytes() == b"old" and [p.name for p in dst.parent.iterdir()] == ["model.onnx"]
