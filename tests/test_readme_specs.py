"""The README's "Your own classification or extraction task" is enough to write a working spec.

Two checks: every code block of that section (and every YAML block of the sections a spec
writer reads) parses, and its specs load with their data; and two specs written from that
section alone, for a domain of their own (``tests/data/readme_specs/``: support-ticket priority,
contact-record extraction), load, validate good and bad answers as intended, and run: the gold
teacher's samples, the dataset, and an evaluation of a tiny model (label ranking; decoding
constrained by the schema, so every answer validates even from random weights).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from hostile import run

from distiller.backends.gold import gold_answer
from distiller.dataset import split_prompts
from distiller.evaluate import evaluate
from distiller.models import load_model
from distiller.spec import load_spec
from distiller.validators import build_validator

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DATA = Path(__file__).resolve().parent / "data" / "readme_specs"
OWN_TASK = "### Your own classification or extraction task"
# The sections a spec writer reads: their YAML blocks must parse.
SPEC_SECTIONS = ("## Task specs", OWN_TASK, "### Constrained decoding",
                 "### Extractive QA (the SQuAD measurements)", "### Classification (credit risk)")  # fmt: skip
FENCE = re.compile(r"^```(\w+)(?: title=\"([^\"]+)\")?\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def section(title: str) -> str:
    """The README text under ``title``, up to the next heading of its level or above."""
    text = README.read_text(encoding="utf-8")
    level = title.split()[0]
    start = text.index(title + "\n") + len(title) + 1
    ends = [m.start() for m in re.finditer(rf"^#{{1,{len(level)}}} ", text[start:], re.M)]
    return text[start : start + ends[0]] if ends else text[start:]


def blocks(text: str) -> list[tuple[str, str | None, str]]:
    """(language, title, body) of every fenced code block in ``text``."""
    return [(m.group(1), m.group(2), m.group(3)) for m in FENCE.finditer(text)]


# -- the README's own blocks -----------------------------------------------------------------


def test_the_section_shows_both_kinds_of_task():
    titles = {title for _, title, _ in blocks(section(OWN_TASK))}
    assert {"reviews.yaml", "reviews.jsonl", "invoices.yaml", "invoices.jsonl",
            "invoice.schema.json"} <= titles  # fmt: skip


@pytest.mark.parametrize("title", SPEC_SECTIONS)
def test_yaml_and_json_blocks_parse(title):
    for lang, name, body in blocks(section(title)):
        if lang == "yaml":
            assert isinstance(yaml.safe_load(body), dict), name
        elif lang == "json":
            json.loads(body)
        elif lang == "jsonl":
            assert all(isinstance(json.loads(line), dict) for line in body.splitlines()), name


@pytest.fixture()
def readme_task(tmp_path: Path) -> Path:
    """The section's titled blocks written out as files, as a reader would save them."""
    for _, name, body in blocks(section(OWN_TASK)):
        if name:
            (tmp_path / name).write_text(body, encoding="utf-8")
    return tmp_path


def test_the_readme_classification_spec_loads(readme_task):
    spec = load_spec(readme_task / "reviews.yaml")
    assert spec.labels == ["mixed", "negative", "positive"]
    (label,) = spec.validators
    assert label.params["labels"] == spec.labels  # defaulted to the data's, as it says
    assert spec.eval.classify is not None and spec.eval.classify.labels == tuple(spec.labels)
    assert spec.teacher.gold and spec.split.stratify_by == "label"
    check = build_validator(spec.validators)
    assert all(check(gold_answer(p), p).passed for p in spec.prompts)
    assert not check("It is quite good", spec.prompts[0]).passed


def test_the_readme_extraction_spec_loads(readme_task):
    spec = load_spec(readme_task / "invoices.yaml")
    schema = json.loads((readme_task / "invoice.schema.json").read_text())
    assert spec.validators[0].params["schema"] == schema
    assert json.loads(spec.eval.decoding.json_schema) == schema
    check = build_validator(spec.validators)
    for p in spec.prompts:  # the gold teacher writes each reference as JSON, which validates
        assert json.loads(gold_answer(p)) == p.reference and check(gold_answer(p), p).passed
    bad = dict(spec.prompts[0].reference, currency="CHF")
    assert not check(json.dumps(bad), spec.prompts[0]).passed


# -- specs written from the README -----------------------------------------------------------


@pytest.fixture()
def own(tmp_path: Path) -> Path:
    """tests/data/readme_specs copied, so that runs write nothing into the repository."""
    return Path(shutil.copytree(DATA, tmp_path / "readme_specs"))


def test_the_ticket_spec_validates_labels(own):
    spec = load_spec(own / "tickets.yaml")
    assert spec.labels == ["low", "normal", "urgent"] and len(spec.prompts) == 18
    check = build_validator(spec.validators)
    for text in ("urgent", "Urgent.", ' "low" ', "normal"):
        assert check(text).passed, text
    for text in ("very urgent", "high", "low priority", ""):
        assert not check(text).passed, text
    assert spec.eval.classify.bias == {"urgent": -0.1}
    parts = split_prompts(spec.prompts, spec.split)
    for part, per_class in ((parts.test, 2), (parts.valid, 1)):
        assert sorted(p.label for p in part) == sorted(spec.labels * per_class)


def test_the_contact_spec_validates_records(own):
    spec = load_spec(own / "contacts.yaml")
    check = build_validator(spec.validators)
    good = {"name": "Sam Price", "email": "sam@deltaprint.co", "phone": "0161 555 0133",
            "company": "Delta Print"}  # fmt: skip
    assert check(json.dumps(good)).passed
    assert check("```json\n" + json.dumps(good) + "\n```").passed
    for bad in ({k: v for k, v in good.items() if k != "phone"}, {**good, "fax": "0161"},
                {**good, "email": "not an email"}):  # fmt: skip
        assert not check(json.dumps(bad)).passed, bad
    assert not check("Name: Sam Price").passed


@pytest.mark.parametrize(("spec_name", "samples"), [("tickets.yaml", 18), ("contacts.yaml", 8)])
def test_gold_samples_and_the_dataset(own, tmp_path, spec_name, samples):
    """`distiller teach` (the gold teacher) accepts every prompt's own answer, and `distiller
    prepare` turns them into a dataset, as in `distiller run`."""
    spec = own / spec_name
    teach = run(["teach", str(spec), "--out", str(tmp_path / "teacher"), "--no-progress"], 120)
    assert teach.code == 0, teach.stderr
    rows = [json.loads(line) for line in (tmp_path / "teacher" / "samples.jsonl").open()]
    kept = [r for r in rows if r["accepted"]]
    assert len(kept) == samples, rows[:2]
    prep = run(["prepare", str(spec), "--samples", str(tmp_path / "teacher"),
                "--out", str(tmp_path / "data")], 120)  # fmt: skip
    assert prep.code == 0, prep.stderr
    assert (tmp_path / "data" / "train.jsonl").stat().st_size > 0


def test_a_tiny_model_is_measured_on_the_ticket_spec(own, tiny_model_dir):
    spec = load_spec(own / "tickets.yaml")
    test = split_prompts(spec.prompts, spec.split).test
    result = evaluate(tiny_model_dir, spec, test, loaded=load_model(tiny_model_dir), progress=False)
    task = result.metrics["task"]
    # label ranking always answers a label: the format holds even for random weights
    assert result.format_rate.k == result.format_rate.n == len(test) == 6
    assert {r["prediction"] for r in result.records} <= set(spec.labels)
    assert 0.0 <= task["accuracy"] <= 1.0 and "macro_f1" in task
    assert sum(map(sum, task["confusion"]["matrix"])) == 6


def test_constrained_decoding_makes_a_tiny_model_valid_on_the_contact_spec(own, tiny_model_dir):
    spec = load_spec(own / "contacts.yaml")
    result = evaluate(
        tiny_model_dir, spec, spec.prompts[:3], loaded=load_model(tiny_model_dir), progress=False
    )
    task = result.metrics["task"]
    # random weights, every answer a record the schema accepts: the constraint, not the model
    assert result.format_rate.k == result.format_rate.n == 3, result.records[0]["output"]
    assert task["json_valid"]["k"] == task["json_valid"]["n"] == 3  # parse and validate
    for r in result.records:
        assert set(json.loads(r["output"])) == {"name", "email", "phone", "company"}
    assert 0.0 <= task["field_accuracy"] <= 1.0
