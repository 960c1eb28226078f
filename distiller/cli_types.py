"""Argparse ``type=`` functions for every subcommand: each numeric option and output path is
checked where it enters, when the command line is parsed.

A value out of range is refused as argparse refuses any bad option (usage, then one
``error: argument --limit: ...`` line, exit 2), before any model or file is touched::

    parser.add_argument("--limit", type=positive_int)
    parser.add_argument("--out", type=out_dir)
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

__all__ = [
    "fraction",
    "non_negative_int",
    "out_dir",
    "out_file",
    "positive_int",
]


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def positive_int(text: str) -> int:
    """An integer >= 1 (counts: --limit, --iters, --batch-size)."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """An integer >= 0 (0 meaning "none": --latency)."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def fraction(text: str) -> float:
    """A number in (0, 1] (a similarity threshold: 0 would call every pair a duplicate)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not (math.isfinite(value) and 0 < value <= 1):
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text}")
    return value


def _check_link(path: Path, text: str) -> None:
    if os.path.lexists(path) and not path.exists():
        raise argparse.ArgumentTypeError(
            f"{text}: a symlink that leads nowhere (dangling or a loop)"
        )


def _writable_parent(path: Path, text: str) -> None:
    """The nearest existing ancestor of ``path`` is a directory this process may write in."""
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise argparse.ArgumentTypeError(
            f"{text}: expected a path inside a directory, but {ancestor} is a file"
        )
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{text}: {ancestor} is not writable")


def out_dir(text: str) -> Path:
    """A directory to write: absent (it is created) or a directory, never a file."""
    path = Path(text).expanduser()
    try:
        _check_link(path, text)
        if path.exists() and not path.is_dir():
            raise argparse.ArgumentTypeError(f"{text}: expected a directory, but it is a file")
        _writable_parent(path.absolute(), text)
    except OSError as exc:  # a symlink loop, an unreadable parent
        raise argparse.ArgumentTypeError(f"{text}: not a usable directory ({exc})") from None
    return path


def out_file(text: str) -> Path:
    """A file to write: absent or a regular file, never a directory."""
    path = Path(text).expanduser()
    try:
        _check_link(path, text)
        if path.is_dir():
            raise argparse.ArgumentTypeError(f"{text}: expected a file, but it is a directory")
        if path.exists() and not path.is_file():
            raise argparse.ArgumentTypeError(f"{text}: expected a regular file")
        _writable_parent(path.absolute(), text)
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"{text}: not a usable file path ({exc})") from None
    return path
