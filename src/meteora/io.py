"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Every file that a later run reads (gates, manifests, training checkpoints, adapter folders, report JSON)
is written through :func:`atomic_write`: the bytes go to a temporary file in the target's directory,
are flushed to disk, and the temporary file is moved over the target with ``os.replace`` (atomic on
POSIX and Windows within one file system). A write that dies half-way leaves the old file untouched.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block exits cleanly, move it over ``path``.

    On an exception the temporary file is removed and ``path`` keeps its old content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write(path: str | os.PathLike, writer: Callable[[Path], Any]) -> Path:
    """Call ``writer(tmp_path)`` to write the file, then move it into place atomically."""
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON (trailing newline) to ``path`` atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def _old_of(path: Path) -> Path:
    return path.parent / f".{path.name}.old"


def complete_interrupted_swap(path: str | os.PathLike) -> bool:
    """Put back the previous directory of an :func:`atomic_directory` swap that was killed between its
    two renames (``path`` missing, its ``.old`` copy complete beside it). Readers call this before
    reading a directory; returns whether anything was restored."""
    path = Path(path)
    old = _old_of(path)
    if not path.exists() and old.is_dir():
        os.replace(old, path)
        return True
    return False


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``path``; on a clean exit it replaces ``path``.

    For a directory of several files (an adapter folder, a gate folder): the caller writes every file
    (its manifest last) into the yielded directory; the old ``path`` is swapped out only once all of
    them exist, so a reader never sees a mix of old and new files. On an exception ``path`` is untouched
    (if the final rename fails, the old directory is moved back); a process killed between the two
    renames leaves the old directory as ``.<name>.old``, which :func:`complete_interrupted_swap` (called
    by the readers and by the next write) puts back.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    complete_interrupted_swap(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    old = _old_of(path)
    try:
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file():
                with open(file, "rb") as fh:
                    os.fsync(fh.fileno())
        if old.exists():
            shutil.rmtree(old)
        moved = path.exists()
        if moved:
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            if moved:  # put the old directory back: the reader keeps seeing it
                os.replace(old, path)
            raise
        if old.exists():
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
