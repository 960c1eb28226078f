"""Write the extractive-QA task's prompts files (fixtures/tasks/extractive_qa/), byte for byte.

    .venv/bin/python scripts/make_qa_data.py            # rewrite the committed files
    .venv/bin/python scripts/make_qa_data.py --out DIR  # write them elsewhere (tests)

``passages.jsonl``: the curriculum the spec splits (one question per passage, so no passage
is both trained on and tested). ``dev.jsonl``: passages from another seed, for choosing settings
(``eval.dev``), never trained on or reported. The passages, questions and gold variants are
documented in ``distiller.datagen.qa``.
"""

from __future__ import annotations

from pathlib import Path

import distiller  # noqa: F401  (the package's import-time setup)
from distiller.datagen import jsonl, qa, write_main

OUT = Path(__file__).resolve().parent.parent / "fixtures" / "tasks" / "extractive_qa"
CURRICULUM_ROWS = 300
CURRICULUM_SEED = 0
DEV_ROWS = 30
DEV_SEED = 1


def task_files() -> dict[str, str]:
    """File name -> content of every file this script writes."""
    curriculum = qa.generate(CURRICULUM_ROWS, CURRICULUM_SEED, prefix="qa")
    dev = qa.generate(
        DEV_ROWS, DEV_SEED, prefix="qa-dev", exclude=tuple(r.context for r in curriculum)
    )
    return {"passages.jsonl": jsonl(curriculum), "dev.jsonl": jsonl(dev)}


def main() -> int:
    return write_main(__doc__, OUT, task_files)


if __name__ == "__main__":
    raise SystemExit(main())
