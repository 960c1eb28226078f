"""Deterministic generators of task data whose labels follow a documented rule.

``credit``: loan applicants (age, occupation, income, debt, credit utilization, payment
behaviour) rendered as text in several styles, labelled Good / Standard / Bad.
``qa``: incident reports with who / what / when / where / how many / which questions and their
gold answer spans.
``extraction``: incident tickets in four styles, with distracting values and unstated fields,
and their gold JSON objects under a bounded JSON Schema.

``jsonl`` and ``write_main`` are what the ``scripts/make_*_data.py`` writers share: each script
names its files and rows, these write them the same way (so regenerating stays byte for byte).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol


class Entry(Protocol):
    def entry(self) -> dict[str, Any]: ...


def jsonl(rows: Iterable[Entry]) -> str:
    """One prompts-file entry per line (UTF-8 kept as is, so the files read as written)."""
    return "".join(json.dumps(r.entry(), ensure_ascii=False) + "\n" for r in rows)


def write_main(
    doc: str,
    out: Path,
    task_files: Callable[[], dict[str, str]],
    argv: Sequence[str] | None = None,
) -> int:
    """A data script's ``main``: write ``task_files()`` (file name -> content) into ``--out``
    (default ``out``, the committed fixtures), each file whole (``files.atomic_write``)."""
    from distiller.files import atomic_write

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--out", type=Path, default=out, help=f"directory (default {out})")
    args = parser.parse_args(argv)
    for name, text in task_files().items():
        atomic_write(args.out / name, text)
        print(f"wrote {args.out / name} ({text.count(chr(10))} rows)")
    return 0
