"""Write the incident-extraction task's files (fixtures/tasks/incident_extraction/), byte for byte.

    .venv/bin/python scripts/make_extraction_data.py            # rewrite the committed files
    .venv/bin/python scripts/make_extraction_data.py --out DIR  # write them elsewhere (tests)

``tickets.jsonl``: the curriculum the spec splits. ``dev.jsonl``: tickets from another seed, for
choosing settings (``eval.dev``), never trained on or reported. ``schema.json``: the answer's
JSON Schema (the validator's and constrained decoding's). Styles, distractors and the gold
objects' null rules are documented in ``distiller.datagen.extraction``.
"""

from __future__ import annotations

from pathlib import Path

import distiller  # noqa: F401  (the package's import-time setup)
from distiller.datagen import extraction, jsonl, write_main

OUT = Path(__file__).resolve().parent.parent / "fixtures" / "tasks" / "incident_extraction"
CURRICULUM_ROWS = 300
CURRICULUM_SEED = 0
DEV_ROWS = 40
DEV_SEED = 1


def task_files() -> dict[str, str]:
    """File name -> content of every file this script writes."""
    curriculum = extraction.generate(CURRICULUM_ROWS, CURRICULUM_SEED, prefix="inc")
    dev = extraction.generate(
        DEV_ROWS, DEV_SEED, prefix="inc-dev", exclude=tuple(r.text for r in curriculum)
    )
    return {
        "tickets.jsonl": jsonl(curriculum),
        "dev.jsonl": jsonl(dev),
        "schema.json": extraction.schema_text(),
    }


def main() -> int:
    return write_main(__doc__, OUT, task_files)


if __name__ == "__main__":
    raise SystemExit(main())
