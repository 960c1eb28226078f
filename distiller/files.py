"""Writing files and directories so that a crash or Ctrl-C never leaves a half-written one."""

from __future__ import annotations

import glob
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_dir", "atomic_file", "atomic_write"]


def atomic_write(path: str | Path, data: str | bytes, *, durable: bool = True) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same directory and an atomic
    rename (``atomic_file``): readers see the old file or the new one, never a mix. ``durable``
    fsyncs first, so the new content also survives a power cut (what checkpoints need)."""
    path = Path(path)
    with atomic_file(path, durable=durable) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding="utf-8")
    return path


@contextmanager
def atomic_file(path: str | Path, *, durable: bool = True) -> Iterator[Path]:
    """``atomic_write`` for a writer that wants a path (a library writing a large file itself):
    yields a temporary sibling of ``path`` to write; when the block ends without an exception
    it is renamed onto ``path``, otherwise removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        if durable:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Build a directory whole or not at all: yields an empty temporary sibling of ``path`` to
    fill; when the block ends without an exception it takes ``path``'s place, otherwise it is
    removed. A kill at any moment leaves ``path`` old or new (or, between the two renames that
    swap them, absent), never a mix; what a killed build left beside it is removed next time.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_siblings(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    _remove(tmp)
    tmp.mkdir()
    try:
        yield tmp
        if os.path.lexists(path):
            os.replace(path, old)  # aside in one rename: deleting in place could be cut short
        os.replace(tmp, path)
    finally:
        _remove(tmp)
        _remove(old)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _remove_stale_siblings(path: Path) -> None:
    """Temporary and set-aside siblings of ``path`` whose process is gone."""
    for sibling in path.parent.glob(f".{glob.escape(path.name)}.*-*"):
        kind, _, pid = sibling.name[len(path.name) + 2 :].partition("-")
        if kind in ("tmp", "old") and pid.isdigit() and not _alive(int(pid)):
            _remove(sibling)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True
