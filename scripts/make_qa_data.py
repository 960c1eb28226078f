"""Write the extractive-QA task's prompts files (fixtures/tasks/extractive_qa/), byte for byte.

    .venv/bin/python scripts/make_qa_data.py            # rewrite the committed files
    .venv/bin/python scripts/make_qa_data.py --out DIR  # write them elsewhere (tests)

``passages.jsonl``: the curriculum the spec splits (one question per passage, so no passage
is both trained on and tested). ``dev.jsonl``: passages from another seed, for choosing settings
(``eval.dev``), never trained on or reported. The passages, questions and gold variants are
documented in ``distiller.datagen.qa``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import distiller  # noqa: F401  (the package's import-time setup)
from distiller.datagen import qa
from distiller.files import atomic_write

OUT = Path(__file__).resolve().parent.parent / "fixtures" / "tasks" / "extractive_qa"
CURRICULUM_ROWS = 300
CURRICULUM_SEED = 0
DEV_ROWS = 30
DEV_SEED = 1


def jsonl(rows: list[qa.Row]) -> str:
    return "".join(json.dumps(r.entry(), ensure_ascii=False) + "\n" for r in rows)


def task_files() -> dict[str, str]:
    """File name -> content of every file this script writes."""
    curriculum = qa.generate(CURRICULUM_ROWS, CURRICULUM_SEED, prefix="qa")
    dev = qa.generate(
        DEV_ROWS, DEV_SEED, prefix="qa-dev", exclude=tuple(r.context for r in curriculum)
    )
    return {"passages.jsonl": jsonl(curriculum), "dev.jsonl": jsonl(dev)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help=f"directory (default {OUT})")
    args = parser.parse_args()
    for name, text in task_files().items():
        atomic_write(args.out / name, text)
        print(f"wrote {args.out / name} ({text.count(chr(10))} rows)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
