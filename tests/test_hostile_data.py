"""Hostile task data: labels the data does not have, JSON schemas that constrained decoding
cannot compile, gold answers that are not in their passage. Each is refused the way
``hostile.refused`` requires: one line naming the file, the key or entry and its line, and
what was expected; never a traceback and never the CLI's last line of defence.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hostile import refused, run

TICKETS = [
    {"id": f"t{i}", "text": f"customer {i} cannot log in after the update", "label": label}
    for i, label in enumerate(["low", "high"] * 4)
]
CLASSIFY = """\
name: tickets
prompts: {file: tickets.jsonl, template: "Priority of this ticket (low or high)? {text}"}
teacher: {gold: true}
validators: [{type: label}]
student: {model: ./no-such-student}
"""


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture()
def tickets(tmp_path: Path) -> Path:
    write_jsonl(tmp_path / "tickets.jsonl", TICKETS)
    spec = tmp_path / "tickets.yaml"
    spec.write_text(CLASSIFY, encoding="utf-8")
    return spec


def test_the_base_tasks_are_valid(tickets, qa):
    """Each case below damages one thing: undamaged, both tasks load."""
    for spec in (tickets, qa):
        assert run(["spec", str(spec)]).code == 0, run(["spec", str(spec)]).stderr


# -- labels ----------------------------------------------------------------------------------


def test_a_validator_label_that_no_prompt_has(tickets):
    tickets.write_text(
        CLASSIFY.replace("{type: label}", "{type: label, labels: [low, high, urgent]}")
    )
    refused(
        ["spec", str(tickets)],
        "tickets.yaml:4", "validators[0].labels", "'urgent' labels none of the 8 prompts",
    )  # fmt: skip


def test_a_prompt_label_that_the_validator_lacks_names_its_line(tickets):
    tickets.write_text(CLASSIFY.replace("{type: label}", "{type: label, labels: [low, urgent]}"))
    # t1 is the file's second line: its label 'high' is not one the validator accepts (a gold
    # answer that fails its own check, a prompt no model can get right)
    refused(
        ["spec", str(tickets)],
        "tickets.jsonl:2", "[1].label", "validators[0].labels (low, urgent)", "'high'",
    )  # fmt: skip


def test_an_eval_set_label_the_validator_lacks(tickets, tmp_path):
    write_jsonl(tmp_path / "more.jsonl", [{"id": "m0", "text": "refund twice", "label": "urgent"}])
    tickets.write_text(CLASSIFY + "eval: {prompt_sets: {more: more.jsonl}}\n")
    refused(["spec", str(tickets)], "tickets.yaml:6", "eval.prompt_sets.more", "'urgent'")


def test_default_labels_need_a_label_on_every_prompt(tickets, tmp_path):
    rows = [dict(r) for r in TICKETS]
    del rows[2]["label"]
    write_jsonl(tmp_path / "tickets.jsonl", rows)
    tickets.write_text(CLASSIFY.replace("{gold: true}", "{model: smollm2-135m-instruct}"))
    refused(
        ["spec", str(tickets)],
        "tickets.yaml:4", "validators[0].labels", "1 of 8 have none", "'t2'",
    )  # fmt: skip


def test_classification_needs_a_label_on_every_prompt(tickets, tmp_path):
    rows = [dict(r) for r in TICKETS]
    del rows[5]["label"]
    write_jsonl(tmp_path / "tickets.jsonl", rows)
    text = CLASSIFY.replace("{gold: true}", "{model: smollm2-135m-instruct}")
    text = text.replace("{type: label}", "{type: label, labels: [low, high]}")
    tickets.write_text(text + "eval: {classify: {decoder: ranking}}\n")
    refused(["spec", str(tickets)], "tickets.yaml:2", "prompts", "a label on every prompt", "'t5'")


def test_a_gold_teacher_needs_an_answer_on_every_prompt(tickets, tmp_path):
    rows = [dict(r) for r in TICKETS]
    del rows[3]["label"]
    write_jsonl(tmp_path / "tickets.jsonl", rows)
    tickets.write_text(CLASSIFY.replace("[{type: label}]", "[]"))
    refused(["spec", str(tickets)], "tickets.yaml:3", "teacher.gold", "'t3'")


# -- schemas constrained decoding cannot compile ---------------------------------------------


@pytest.mark.parametrize(
    ("key", "schema", "says"),
    [
        ("eval.json_schema", "{type: object, not: {required: [a]}}", 'Unimplemented keys: ["not"]'),
        ("eval.json_schema", "{type: string, format: nope}", "Unknown format: nope"),
        ("eval.json_schema", "{type: string, pattern: '(?=a)b'}", "regex parse error"),
        ("eval.json_schema", "{type: objekt}", "not a valid JSON schema"),
    ],
)
def test_an_eval_schema_that_does_not_compile(tickets, key, schema, says):
    tickets.write_text(CLASSIFY + f"eval: {{json_schema: {schema}}}\n")
    refused(["spec", str(tickets)], "tickets.yaml:6", key, says)


def test_a_teacher_schema_that_does_not_compile(tickets):
    text = CLASSIFY.replace(
        "{gold: true}",
        "{model: smollm2-135m-instruct, decoding: {json_schema: {type: string, pattern: '(?<=a)b'}}}",
    ).replace("[{type: label}]", "[{type: label, labels: [low, high]}]")
    tickets.write_text(text)
    refused(["spec", str(tickets)], "tickets.yaml:3", "teacher.decoding.json_schema", "regex")


def test_a_schema_file_that_does_not_compile_on_the_command_line(tmp_path, tiny_model_dir):
    schema = tmp_path / "contact.json"
    schema.write_text(json.dumps({"type": "object", "not": {"required": ["name"]}}))
    refused(
        ["generate", "--model", str(tiny_model_dir), "--prompt", "hi", "--json-schema", str(schema)],
        "--json-schema", 'Unimplemented keys: ["not"]',
    )  # fmt: skip


# -- gold answers not in their context -------------------------------------------------------

CONTEXT = "Hugo Brannet rolled out the fix on May 5 in Kimbury, after Nadia Orlund reported it."
QA = """\
name: qa
prompts: {file: qa.jsonl, template: "Context: {context}\\nQuestion: {question}"}
teacher: {model: smollm2-135m-instruct}
validators: [{type: span, max_words: 4}]
student: {model: ./no-such-student}
"""


def qa_rows() -> list[dict]:
    questions = [("Who fixed it?", ["Hugo Brannet"]), ("When?", ["May 5", "5 May"]),
                 ("Where?", "Kimbury"), ("Who reported it?", ["Nadia Orlund"])]  # fmt: skip
    return [
        {"id": f"q{i}", "context": f"{CONTEXT} Ticket {i}.", "question": q, "reference": ref}
        for i, (q, ref) in enumerate(questions)
    ]


@pytest.fixture()
def qa(tmp_path: Path) -> Path:
    write_jsonl(tmp_path / "qa.jsonl", qa_rows())
    spec = tmp_path / "qa.yaml"
    spec.write_text(QA, encoding="utf-8")
    return spec


@pytest.mark.parametrize(
    ("index", "reference", "fragments"),
    [
        (2, "Ashvale", ("qa.jsonl:3", "[2].reference", "'Ashvale' is not in its context")),
        # the first gold answer is the span as written; later ones are accepted variants
        (1, ["5th of May", "May 5"], ("qa.jsonl:2", "[1].reference", "'5th of May'")),
        (0, ["the"], ("qa.jsonl:1", "[0].reference", "words left after SQuAD normalization")),
        (3, [], ("qa.jsonl:4", "[3].reference", "a non-empty list of strings")),
    ],
)
def test_a_gold_answer_not_in_its_context_names_its_line(qa, tmp_path, index, reference, fragments):
    rows = qa_rows()
    rows[index]["reference"] = reference
    write_jsonl(tmp_path / "qa.jsonl", rows)
    refused(["spec", str(qa)], *fragments)


def test_a_prompt_without_the_passage_field(qa, tmp_path):
    rows = qa_rows()
    for r in rows:  # the prompt written out, the passage also as its own field ...
        r["text"] = f"Context: {r['context']}\nQuestion: {r.pop('question')}"
    del rows[1]["context"]  # ... except on the second entry
    write_jsonl(tmp_path / "qa.jsonl", rows)
    qa.write_text(QA.replace(', template: "Context: {context}\\nQuestion: {question}"', ""))
    refused(["spec", str(qa)], "qa.jsonl:2", "[1]", "a 'context' field on every prompt")


def test_a_dev_gold_answer_not_in_its_context(qa, tmp_path):
    dev = [{"id": "d0", "context": "Ada Lovelace fixed the parser.", "question": "Who?",
            "reference": "Hugo Brannet"}]  # fmt: skip
    write_jsonl(tmp_path / "dev.jsonl", dev)
    qa.write_text(QA + "eval: {dev: dev.jsonl}\n")
    refused(
        ["spec", str(qa)], "qa.yaml:6", "eval.dev", "'d0'", "'Hugo Brannet' is not in its context"
    )
