"""Write the credit-risk task's prompts files (fixtures/tasks/credit_risk/), byte for byte.

    .venv/bin/python scripts/make_credit_data.py            # rewrite the committed files
    .venv/bin/python scripts/make_credit_data.py --out DIR  # write them elsewhere (tests)

``applicants.jsonl``: the curriculum the spec splits (classes in their natural proportions;
the spec's per-class quotas make the test and valid splits balanced). ``dev.jsonl``: a
balanced set from another seed, for choosing settings (``eval.dev``), never trained on or
reported. The rule, the styles and the noise are documented in ``distiller.datagen.credit``.
"""

from __future__ import annotations

from pathlib import Path

import distiller  # noqa: F401  (the package's import-time setup)
from distiller.datagen import credit, jsonl, write_main

OUT = Path(__file__).resolve().parent.parent / "fixtures" / "tasks" / "credit_risk"
CURRICULUM_ROWS = 700
CURRICULUM_SEED = 0
DEV_PER_CLASS = 30
DEV_SEED = 1


def task_files() -> dict[str, str]:
    """File name -> content of every file this script writes."""
    curriculum = credit.generate(CURRICULUM_ROWS, CURRICULUM_SEED, prefix="credit")
    dev = credit.generate_balanced(
        DEV_PER_CLASS, DEV_SEED, prefix="credit-dev", exclude=[r.text for r in curriculum]
    )
    return {"applicants.jsonl": jsonl(curriculum), "dev.jsonl": jsonl(dev)}


def main() -> int:
    return write_main(__doc__, OUT, task_files)


if __name__ == "__main__":
    raise SystemExit(main())
