"""Writing and fingerprinting artifact files: the one place files are written atomically and hashed.

An atomic write goes to a temp file in the destination folder, is flushed to disk, renamed over the destination
with ``os.replace`` and the folder entry is flushed too, so a reader (or a restart after power loss) sees the old file
or the new one, never half of one. Hashes are SHA-256 hex digests, read in blocks so large engines stay cheap.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

_BLOCK = 1 << 20


def _fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (the rename) to disk; a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a folder; the file itself is already on disk
    finally:
        os.close(fd)


def _atomic_write(path: str | os.PathLike[str], fill: Callable[[BinaryIO], object]) -> Path:
    """``fill`` a temp file beside ``path``, flush it to disk, rename it over ``path`` and flush the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes the file 0600; an artifact should get the permissions any new file would (umask).
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` whole or not at all (temp file, fsync, ``os.replace``, folder fsync)."""
    return _atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """:func:`atomic_write_bytes` of ``text`` encoded as UTF-8."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_copy(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Path:
    """Copy the file ``src`` to ``dst`` whole or not at all, streamed (engines can be hundreds of MB)."""
    with open(src, "rb") as f:
        return _atomic_write(dst, lambda out: shutil.copyfileobj(f, out, _BLOCK))


def sha256_bytes(data: bytes) -> str:
    """SHA-256 of ``data`` as a hex string."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file's bytes as a hex string, read in blocks (engines can be hundreds of MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            h.update(block)
    return h.hexdigest()
