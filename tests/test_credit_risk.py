"""The credit-risk task spec: balanced held-out sets by per-class quota (and the quotas
themselves), and the gold teacher whose samples the student is fine-tuned on."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from distiller.backends.gold import gold_answer
from distiller.dataset import find_leaks, prepare_dataset, split_prompts
from distiller.errors import SpecError, UserError
from distiller.spec import Prompt, SplitSpec, load_spec

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "fixtures" / "tasks" / "credit_risk.yaml"
LABELS = ("Bad", "Good", "Standard")


def test_the_spec_splits_into_balanced_held_out_sets_with_no_leaks():
    spec = load_spec(SPEC)
    splits = split_prompts(spec.prompts, spec.split)
    assert Counter(p.label for p in splits.test) == {y: 60 for y in LABELS}
    assert Counter(p.label for p in splits.valid) == {y: 10 for y in LABELS}
    assert len(splits.train) == len(spec.prompts) - 210
    assert Counter(p.label for p in spec.eval.dev) == {y: 30 for y in LABELS}
    # Templated texts are alike: the dataset stage would move near-duplicates of test prompts
    # out of train; none are, so train keeps every prompt the split gives it.
    assert find_leaks(splits) == []
    assert spec.teacher.gold and spec.eval.classify.labels == ("Bad", "Good", "Standard")


def test_the_quick_spec_differs_from_the_spec_only_in_its_training_steps():
    # CI gates the classification playbook through credit_risk_quick.yaml; its figures stand for
    # credit_risk.yaml's only if the data, split, decoder, thresholds and route are the same.
    full, quick = load_spec(SPEC), load_spec(SPEC.with_name("credit_risk_quick.yaml"))
    assert (quick.name, full.name) == ("credit_risk_quick", "credit_risk")
    assert quick.prompts == full.prompts and quick.eval.dev == full.eval.dev
    assert (quick.split, quick.validators, quick.teacher) == (
        full.split,
        full.validators,
        full.teacher,
    )
    assert (quick.eval.classify, quick.eval.thresholds, quick.eval.decoding) == (
        full.eval.classify,
        full.eval.thresholds,
        full.eval.decoding,
    )
    q, f = quick.student, full.student
    assert (q.model, q.route, q.full_finetune, q.lora) == (
        f.model,
        f.route,
        f.full_finetune,
        f.lora,
    )
    assert (q.train.learning_rate, q.train.max_seq_length) == (
        f.train.learning_rate,
        f.train.max_seq_length,
    )
    # Half the training prompts (steps x batch) of the full spec.
    assert q.train.iters * q.train.batch_size * 2 <= f.train.iters * f.train.batch_size


# ---------------------------------------------------------------------------------------------
# Per-class split quotas


def prompts_per_label(counts: dict[str, int], prefix: str = "p") -> list[Prompt]:
    return [
        Prompt(f"{prefix}-{label}-{i}", f"{label} {i}", label)
        for label, n in counts.items()
        for i in range(n)
    ]


@given(
    st.dictionaries(st.sampled_from("ABCD"), st.integers(6, 30), min_size=1),
    st.integers(1, 3),
    st.integers(0, 3),
    st.integers(0, 5),
)
def test_quotas_give_each_label_exactly_its_share(counts, test_q, valid_q, seed):
    prompts = prompts_per_label(counts)
    s = SplitSpec(seed=seed, stratify_by="label", test_per_class=test_q, valid_per_class=valid_q)
    sp = split_prompts(prompts, s)
    for label, n in counts.items():
        assert sum(p.label == label for p in sp.test) == test_q
        assert sum(p.label == label for p in sp.valid) == valid_q
        assert sum(p.label == label for p in sp.train) == n - test_q - valid_q
    ids = [p.id for part in (sp.train, sp.valid, sp.test) for p in part]
    assert sorted(ids) == sorted(p.id for p in prompts)
    assert split_prompts(list(reversed(prompts)), s) == sp  # the input order does not matter


@given(st.integers(8, 30), st.integers(1, 6), st.integers(0, 5))
def test_appending_k_prompts_moves_at_most_2k_existing_ones(n, k, seed):
    s = SplitSpec(seed=seed, stratify_by="label", test_per_class=3, valid_per_class=2)
    before = prompts_per_label({"A": n})
    after = before + [Prompt(f"new-{i}", f"new {i}", "A") for i in range(k)]

    def where(sp):
        return {p.id: name for name in ("train", "valid", "test") for p in getattr(sp, name)}

    old, new = where(split_prompts(before, s)), where(split_prompts(after, s))
    assert sum(old[i] != new[i] for i in old) <= 2 * k


def test_a_quota_larger_than_a_label_fails_in_the_split_and_in_the_spec(tmp_path):
    s = SplitSpec(stratify_by="label", test_per_class=5, valid_per_class=2)
    with pytest.raises(UserError, match=r"label 'B' has 6 prompts, fewer than .* = 7"):
        split_prompts(prompts_per_label({"A": 9, "B": 6}), s)
    with pytest.raises(
        SpecError, match=r"split\.test_per_class: a quota each label can fill: label 'Bad' has 2"
    ):
        load_spec(
            tiny_spec(tmp_path, split="{test_per_class: 2, valid_per_class: 1, stratify_by: label}")
        )


@pytest.mark.parametrize(
    ("split", "key", "expected"),
    [
        (
            "{test_per_class: 1, test: 0.3, stratify_by: label}",
            "split.test",
            "absent with test_per_class",
        ),
        ("{test_per_class: 1}", "split.stratify_by", "'label' with per-class quotas"),
        ("{valid_per_class: 1, stratify_by: label}", "split.test_per_class", "required"),
        ("{test_per_class: 0, stratify_by: label}", "split.test_per_class", ">= 1"),
    ],
)
def test_bad_quotas_fail_naming_the_key(tmp_path, split, key, expected):
    with pytest.raises(SpecError) as e:
        load_spec(tiny_spec(tmp_path, split=split))
    assert key in str(e.value) and expected in str(e.value)


# ---------------------------------------------------------------------------------------------
# The gold teacher

TINY = """\
name: tiny_gold
prompts:
  items:
    - {{id: a, text: "pays on time", label: Good}}
    - {{id: b, text: "misses payments", label: Bad}}
    - {{id: c, text: "sometimes late", label: Standard, reference: "Standard."}}
    - {{id: d, text: "always on time, low debt", label: Good}}
    - {{id: e, text: "defaulted twice", label: Bad}}
    - {{id: f, text: "late once", label: Standard}}
teacher: {teacher}
validators: [{{type: label}}]
student: {{model: smollm2-135m-instruct}}
split: {split}
"""


def tiny_spec(
    tmp_path: Path,
    teacher: str = "{gold: true}",
    split: str = "{test_per_class: 1, stratify_by: label}",
    prompts: str | None = None,
) -> Path:
    text = TINY.format(teacher=teacher, split=split)
    if prompts is not None:
        text = text.replace(text[text.index("prompts:") : text.index("teacher:")], prompts)
    path = tmp_path / "tiny.yaml"
    path.write_text(text)
    return path


def test_the_gold_teacher_answers_with_references_then_labels(tmp_path):
    from distiller.teacher import run_teacher

    spec = load_spec(tiny_spec(tmp_path))
    summary = run_teacher(spec, tmp_path / "samples.jsonl", progress=False)
    assert summary.accepted == summary.samples == len(spec.prompts)
    records = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    by_id = {r["prompt_id"]: r for r in records}
    assert by_id["c"]["completion"] == "Standard."  # the reference wins over the label
    assert {by_id[p].get("completion") for p in "ad"} == {"Good"}
    assert all(r["teacher"]["backend"] == "gold" for r in records)

    info = prepare_dataset(spec, tmp_path / "samples.jsonl", tmp_path / "data")
    rows = [json.loads(x) for x in (tmp_path / "data" / "train.jsonl").read_text().splitlines()]
    gold = {p.id: gold_answer(p) for p in spec.prompts}
    assert len(rows) == info.counts["train"] == 3
    for row in rows:
        assert row["messages"][-1] == {"role": "assistant", "content": gold[row["id"]]}


@pytest.mark.parametrize(
    ("teacher", "expected"),
    [
        ("{gold: true, model: smollm2-135m-instruct}", "exactly one of 'model'"),
        ("{gold: false}", "exactly one of 'model'"),
        ("{gold: yes please}", "teacher.gold: true or false"),
    ],
)
def test_bad_gold_teachers_fail(tmp_path, teacher, expected):
    with pytest.raises(SpecError, match=expected):
        load_spec(tiny_spec(tmp_path, teacher=teacher))


def test_the_gold_teacher_needs_an_answer_on_every_prompt(tmp_path):
    prompts = 'prompts: ["no label here", "nor here"]\n'
    path = tiny_spec(tmp_path, split="{train: 0.5, valid: 0.0, test: 0.5}", prompts=prompts)
    path.write_text(path.read_text().replace("[{type: label}]", "[]"))
    with pytest.raises(SpecError, match=r"teacher\.gold: a reference or a label on every prompt"):
        load_spec(path)


def test_distiller_spec_summarizes_a_gold_teacher_and_quotas(capsys):
    from distiller.cli import main

    assert main(["spec", str(SPEC), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["teacher"] == "gold (the prompts' own answers)"
    assert summary["split"] == "60 test / 10 valid per class seed 0"
