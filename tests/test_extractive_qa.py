"""The extractive-QA playbook: the data generator and its committed files, the ``span``
validator, the spec's gold-answer cross-check, and EM/F1 against lists of gold answers."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from distiller import report as R
from distiller.backends.gold import gold_answer
from distiller.datagen import qa
from distiller.dataset import split_prompts
from distiller.errors import SpecError
from distiller.evaluate import EvalResult, task_metrics
from distiller.metrics import normalize_answer, rate, wilson_interval
from distiller.spec import load_spec
from distiller.spec.schema import Prompt
from distiller.validators import build_validator, is_span

ROOT = Path(__file__).resolve().parent.parent
TASK = ROOT / "fixtures" / "tasks" / "extractive_qa.yaml"
DATA = ROOT / "fixtures" / "tasks" / "extractive_qa"


# -- the generator -----------------------------------------------------------------------------


def test_script_regenerates_the_committed_files_byte_for_byte(tmp_path):
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "make_qa_data.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    for name in ("passages.jsonl", "dev.jsonl"):
        assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes(), name


def test_rows_do_not_depend_on_how_many_are_generated():
    assert qa.generate(7, seed=3) == qa.generate(15, seed=3)[:7]
    assert qa.generate(5, seed=3) != qa.generate(5, seed=4)


@given(st.integers(0, 10_000), st.integers(0, 3))
def test_every_row_answers_from_its_passage_among_distractors(index, seed):
    row = qa.make_row(index, seed)
    assert is_span(row.answers[0], row.context), row
    assert row.text == qa.TEMPLATE.format(context=row.context, question=row.question)
    # Another entity of the answer's type is in the passage and is not an accepted answer.
    assert row.distractors
    accepted = {normalize_answer(a) for a in row.answers}
    for other in row.distractors:
        assert is_span(other, row.context) and normalize_answer(other) not in accepted
    assert len({normalize_answer(a) for a in row.answers}) == len(row.answers)  # real variants


def test_committed_set_varies_question_types_and_answer_positions():
    rows = [json.loads(line) for line in (DATA / "passages.jsonl").read_text().splitlines()]
    types = Counter(r["meta"]["question_type"] for r in rows)
    assert set(types) == set(qa.QUESTION_TYPES)
    assert min(types.values()) >= len(rows) // 12  # none of the six is a rarity
    # The answer is the first of its type in the passage for some rows and not for others.
    generated = qa.generate(len(rows), seed=0)

    def position(answer: str, context: str) -> int:
        return f" {normalize_answer(context)} ".index(f" {normalize_answer(answer)} ")

    first = [
        position(r.answers[0], r.context) < min(position(x, r.context) for x in r.distractors)
        for r in generated
    ]
    assert 0.2 < sum(first) / len(first) < 0.8
    assert [r.entry() for r in generated] == rows
    assert any(len(r["reference"]) > 1 for r in rows)  # gold variants ("7" / "seven")
    assert len({r["meta"]["context"] for r in rows}) == len(rows)  # one question per passage


# -- the span validator ------------------------------------------------------------------------

PASSAGE = "On March 4, Quenora, the billing service, went down in the Thalmere data center."


def test_span_validator_checks_the_answer_against_the_prompts_passage():
    check = build_validator([{"type": "span", "max_words": 3}])
    prompt = Prompt(id="q1", text="Context: ...\nQuestion: ...", meta={"context": PASSAGE})
    assert check("Thalmere", prompt).passed
    assert check("the billing service.", prompt).passed  # SQuAD normalization: case, articles
    assert check("march 4", prompt).passed
    verdict = check("Varholt", prompt)
    assert not verdict.passed and verdict.reasons == ["'Varholt' is not a span of the passage"]
    verdict = check("It went down in Thalmere", prompt)  # words of the passage, not one span
    assert [c.name for c in verdict.checks if not c.passed] == ["span:short", "span:in_context"]
    assert not check("Thal", prompt).passed  # whole words only
    assert not check("", prompt).passed
    # Without a prompt there is nothing to check against: a failure, never a silent pass.
    assert check("Thalmere").reasons == ["no passage to check the answer against"]
    # A prompt without the field (a few-shot example): its own text is the passage.
    assert check("Thalmere", Prompt(id="fs", text=PASSAGE)).passed


def test_span_validator_params():
    with pytest.raises(ValueError, match="max_words"):
        build_validator([{"type": "span", "max_words": 0}])
    with pytest.raises(ValueError, match="not a param of 'span'"):
        build_validator([{"type": "span", "words": 3}])


# -- the spec ----------------------------------------------------------------------------------


def test_shipped_spec_loads_with_gold_lists_and_contexts():
    spec = load_spec(TASK)
    assert [v.type for v in spec.validators] == ["span"]
    assert spec.student.route == "seq-kd"
    assert {"exact_match", "token_f1"} <= set(spec.eval.thresholds)
    for p in spec.prompts:
        assert isinstance(p.reference, list) and is_span(p.reference[0], p.meta["context"])
    assert spec.eval.dev


def test_gold_target_spec_measures_the_same_test_prompts_the_same_way():
    # CI gates extractive QA through extractive_qa_gold.yaml: its figures are comparable with
    # the teacher-distilled spec's only if everything but the training targets is the same.
    distilled, gold = load_spec(TASK), load_spec(TASK.with_name("extractive_qa_gold.yaml"))
    assert gold.teacher.gold and not distilled.teacher.gold
    assert [p.id for p in split_prompts(gold.prompts, gold.split).test] == [
        p.id for p in split_prompts(distilled.prompts, distilled.split).test
    ]
    assert gold.validators == distilled.validators
    assert (gold.eval.decoding, gold.eval.thresholds, gold.eval.dev) == (
        distilled.eval.decoding,
        distilled.eval.thresholds,
        distilled.eval.dev,
    )
    assert gold.student.prompt_style == distilled.student.prompt_style == "bare"
    assert (gold.student.lora, gold.student.train) == (
        distilled.student.lora,
        distilled.student.train,
    )
    # The gold teacher's answer is each passage's own span, which the span validator accepts.
    for p in gold.prompts:
        assert gold_answer(p) == p.reference[0] and is_span(gold_answer(p), p.meta["context"])


def _spec_with(tmp_path: Path, entry: dict) -> Path:
    (tmp_path / "qa.jsonl").write_text(json.dumps(entry) + "\n")
    path = tmp_path / "task.yaml"
    path.write_text(
        "name: qa\nprompts: {file: qa.jsonl}\nteacher: {model: smollm2-135m-instruct}\n"
        "validators: [{type: span}]\n"
    )
    return path


GOOD = {"id": "qa-7", "text": "Context: ...", "meta": {"context": PASSAGE}}


def test_spec_refuses_a_gold_answer_missing_from_its_passage(tmp_path):
    with pytest.raises(SpecError) as e:
        load_spec(_spec_with(tmp_path, {**GOOD, "reference": ["Varholt", "Thalmere"]}))
    message = str(e.value)
    assert "'qa-7'" in message and "'Varholt'" in message and "not in its context" in message
    load_spec(_spec_with(tmp_path, {**GOOD, "reference": ["Thalmere", "the Thalmere site"]}))


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ({**GOOD, "reference": "the"}, "words left after SQuAD normalization; 'qa-7' has 'the'"),
        ({**GOOD, "reference": []}, "a non-empty list of strings; 'qa-7'"),
        ({**GOOD, "reference": ["Thalmere", 3]}, "a non-empty list of strings; 'qa-7'"),
        ({"id": "qa-8", "text": "no passage", "reference": "x"}, "'context' field"),
    ],
)
def test_spec_refuses_other_bad_gold_answers(tmp_path, entry, expected):
    with pytest.raises(SpecError) as e:
        load_spec(_spec_with(tmp_path, entry))
    assert expected in str(e.value)


# -- metrics in the eval -----------------------------------------------------------------------


def test_task_metrics_score_against_lists_of_gold_answers():
    spec = load_spec(TASK)
    records = [
        {"output": "seven", "reference": ["7", "seven"]},  # a variant: EM 1
        {"output": "the Thalmere site", "reference": ["Thalmere"]},  # F1 2/3 (articles go)
        {"output": "Varholt", "reference": "Thalmere"},  # a plain string still works
    ]
    out = task_metrics(spec, records)
    assert out["exact_match"] == pytest.approx(1 / 3)
    assert out["token_f1"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    assert [r["exact_match"] for r in records] == [1.0, 0.0, 0.0]  # per prompt, for the report


# -- the report --------------------------------------------------------------------------------


def _qa_result(model: str, em: list[float], f1: list[float]) -> EvalResult:
    n = len(em)
    records = [
        {"id": f"q{i}", "prompt": f"Context: ... {i}", "output": f"answer {i}", "passed": True,
         "reasons": [], "sections": {}, "exact_match": e, "token_f1": f}
        for i, (e, f) in enumerate(zip(em, f1, strict=True))
    ]  # fmt: skip
    metrics = {
        "n": n,
        "format": rate(n, n).to_dict(),
        "sections": {},
        "task": {"exact_match": sum(em) / n, "token_f1": sum(f1) / n},
    }
    return EvalResult(model, "qa", "split:test", "bare", records, metrics, key=f"k-{model}")


def test_report_shows_exact_match_with_interval_and_f1_per_model():
    results = [
        _qa_result("vanilla", [0.0] * 8 + [1.0] * 2, [0.25] * 10),
        _qa_result("distilled", [1.0] * 6 + [0.0] * 4, [1.0] * 6 + [0.5] * 4),
    ]
    frame = R.comparison_frame([R.summarize(r) for r in results]).set_index("model")
    lo, hi = wilson_interval(6, 10)
    assert frame.loc["distilled", "exact match [95% CI]"] == f"0.60 [{lo:.2f}, {hi:.2f}]"
    assert frame.loc["vanilla", "exact match [95% CI]"].startswith("0.20 [")
    assert frame.loc["distilled", "token F1"] == pytest.approx(0.8)
    assert frame.loc["vanilla", "token F1"] == pytest.approx(0.25)
    md = R.samples_markdown(results, n=1)
    assert "**vanilla** (PASS; EM 0, F1 0.25)" in md and "**distilled** (PASS; EM 1, F1 1.00)" in md
