"""Hostile specs, prompt files, templates, schema files, option values and teacher sample files:
every case is one line naming the file, the key or line, and what was expected; never a
traceback, a hang or the CLI's last line of defence.

Cases run the real command line in-process (``hostile.refused``); the property tests mutate
valid inputs at random and require that each one loads or is refused that way. The kill test
runs a real ``distiller prepare`` in a child process and SIGKILLs it mid-write.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from hostile import UNEXPECTED, refused, run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distiller.spec import load_spec
from distiller.spec.yamldoc import MAX_ALIAS_NODES, MAX_DEPTH

# A complete small task: a prompts file, a template, a JSON schema file. The student is a path
# that does not exist, so `prepare` skips token statistics instead of loading a tokenizer.
SPEC = """\
name: tiny
prompts:
  file: prompts.yaml
  template: "Question: {text}"
teacher: {model: smollm2-135m-instruct}
validators:
  - type: json_schema
    schema_file: schema.json
student: {model: ./no-such-student}
split: {train: 0.5, valid: 0.25, test: 0.25, seed: 0}
"""
PROMPTS = [f"which replica of shard {i} answers read number {i * 37}?" for i in range(12)]
SCHEMA = {"type": "object", "properties": {"answer": {"type": "string"}}}


def make_task(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "task.yaml").write_text(SPEC)
    (root / "prompts.yaml").write_text("".join(f"- {json.dumps(p)}\n" for p in PROMPTS))
    (root / "schema.json").write_text(json.dumps(SCHEMA, indent=1) + "\n")
    return root / "task.yaml"


@pytest.fixture()
def task(tmp_path: Path) -> Path:
    return make_task(tmp_path / "task")


def put(path: Path, text: str | bytes) -> Path:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(textwrap.dedent(text))
    return path


def test_the_base_task_is_valid(task):
    """The cases below damage one thing each: undamaged, everything passes."""
    spec = load_spec(task)
    assert len(spec.prompts) == len(PROMPTS)
    assert run(["spec", str(task)]).code == 0


# ---------------------------------------------------------------------------------------------
# YAML structure


def alias_bomb(levels: int = 9, width: int = 9) -> str:
    """The "billion laughs": each anchor repeats the previous one ``width`` times."""
    lines = ["name: tiny", "l0: &l0 [" + ", ".join(['"lol"'] * width) + "]"]
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


def test_an_alias_bomb_is_refused_within_a_second(task):
    put(task, alias_bomb())
    start = time.perf_counter()
    line = refused(["spec", str(task)], f"{task}:", "(yaml)", "aliases", str(MAX_ALIAS_NODES))
    assert time.perf_counter() - start < 1.0, line


def test_aliases_within_the_budget_still_work(task):
    """Aliases are allowed (sharing a value is legitimate YAML), only bounded."""
    text = SPEC.replace('template: "Question: {text}"', 'template: &tpl "Question: {text}"')
    text += "eval:\n  prompt_sets:\n    extra: {items: [when is a quorum lost], template: *tpl}\n"
    put(task, text)
    extra = load_spec(task).eval.prompt_sets["extra"]
    assert [p.text for p in extra] == ["Question: when is a quorum lost"]


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("name: tiny\nloop: &a [1, *a]\n", [":2:", "*a", "contains itself"]),
        ("name: tiny\nloop: &a {x: {y: *a}}\n", [":2:", "contains itself"]),
        ("name: " + "[" * 500 + "]" * 500 + "\n", [":1:", f"at most {MAX_DEPTH} levels"]),
        (
            "name: tiny\nd: " + "{a: " * (MAX_DEPTH + 5) + "1" + "}" * (MAX_DEPTH + 5) + "\n",
            [":2:", "levels of nesting"],
        ),
        (  # each level fits, but aliases stack them past the limit
            "a: &a " + "[" * 40 + "]" * 40 + "\nb: &b " + "[" * 30 + "*a" + "]" * 30 + "\n",
            [":2:", "levels of nesting"],
        ),
        ("name: tiny\nx: *nowhere\n", [":2:", "undefined alias"]),
        ("name: tiny\ndescription: 2021-13-40\n", [":2:", "month must be in 1..12", "quote"]),
        ("name: tiny\nseed: " + "9" * 5000 + "\n", [":2:", "4300 digits"]),
        ("name: [tiny\n", ["valid YAML"]),
        ("name: tiny\n\tteacher: x\n", [":2:", "valid YAML"]),
        ("? [a, b]\n: 1\n", [":1:", "unhashable key"]),
        ("--- a\n--- b\n", ["single document"]),
    ],
    ids=[
        "self alias",
        "self alias in a mapping",
        "deep flow nesting",
        "deep mapping nesting",
        "deep through aliases",
        "undefined alias",
        "impossible date",
        "huge integer",
        "unclosed bracket",
        "tab indent",
        "unhashable key",
        "two documents",
    ],
)
def test_yaml_structure_is_refused_with_its_line(task, text, fragments):
    put(task, text)
    line = refused(["spec", str(task)], str(task), *fragments)
    assert "RecursionError" not in line


def test_a_duplicate_key_names_both_lines(task):
    put(task, SPEC + "name: other\n")
    refused(["spec", str(task)], f"{task}:11: name: given twice (first at line 1)")


def test_a_duplicate_nested_key_names_its_dotted_key(task):
    put(
        task,
        SPEC.replace("teacher: {model: smollm2-135m-instruct}", "teacher:\n  model: a\n  model: b"),
    )
    refused(["spec", str(task)], f"{task}:7: teacher.model: given twice (first at line 6)")


def test_a_duplicate_key_in_a_prompts_file_names_that_file(task):
    put(task.parent / "prompts.yaml", "- text: one\n  label: a\n  text: two\n")
    refused(["spec", str(task)], f"{task.parent / 'prompts.yaml'}:3: [0].text: given twice")


def test_a_duplicate_key_in_a_jsonl_prompts_file_names_its_line(task):
    put(task, SPEC.replace("prompts.yaml", "prompts.jsonl"))
    put(task.parent / "prompts.jsonl", '{"text": "one"}\n\n{"text": "two", "text": "three"}\n')
    refused(["spec", str(task)], f"{task.parent / 'prompts.jsonl'}:3:", "given twice")


def test_merge_keys_do_not_count_as_duplicates(task):
    text = SPEC.replace(
        "teacher: {model: smollm2-135m-instruct}",
        "base: &base {model: smollm2-135m-instruct, batch_size: 2}\nteacher: {<<: *base, batch_size: 4}",
    )
    put(task, text)
    # `base` is not a spec key: the merge itself passed, the unknown key is what is refused
    refused(["spec", str(task)], f"{task}:5: base: unknown key")


# ---------------------------------------------------------------------------------------------
# Templates


@pytest.mark.parametrize(
    "placeholder",
    ["{text.upper}", "{text[0]}", "{text!r}", "{text:>40}", "{}", "{0}", "{text.__class__}"],
)
def test_templates_take_plain_fields_only(task, placeholder):
    put(task, SPEC.replace("Question: {text}", f"Question: {placeholder}"))
    refused(["spec", str(task)], f"{task}:4: prompts.template", "plain {field}", placeholder)


@pytest.mark.parametrize("template", ["Question: {text", "Question: text}", "Q {text!}"])
def test_unbalanced_braces_name_the_template(task, template):
    put(task, SPEC.replace("Question: {text}", template))
    refused(["spec", str(task)], f"{task}:4: prompts.template", "{{")


def test_escaped_braces_and_plain_fields_are_accepted(task):
    put(task, SPEC.replace("Question: {text}", "Answer as {{json}}: {text}"))
    spec = load_spec(task)
    assert spec.prompts[0].text.startswith("Answer as {json}: which replica")


def test_an_eval_set_template_is_checked_under_its_own_key(task):
    text = (
        SPEC
        + "eval:\n  prompt_sets:\n    extra: {items: [a new one], template: 'X {text.lower}'}\n"
    )
    put(task, text)
    refused(["spec", str(task)], "eval.prompt_sets.extra.template", "{text.lower}")


def test_a_field_that_is_not_text_is_refused(task):
    put(task.parent / "prompts.yaml", "- text: [a, list]\n- text: fine\n- text: also fine\n")
    refused(["spec", str(task)], "prompts.yaml:1: [0].text", "a string or number", "a list")


def test_prompts_without_ids_keep_their_ids_across_runs(task):
    """What ``{text.upper}`` broke: the repr of a bound method holds its address."""
    first = [p.id for p in load_spec(task).prompts]
    code = "from distiller.spec import load_spec; import sys; print([p.id for p in load_spec(sys.argv[1]).prompts])"
    again = subprocess.run(
        [sys.executable, "-c", code, str(task)], capture_output=True, text=True, check=True
    )
    assert again.stdout.strip() == str(first)


# ---------------------------------------------------------------------------------------------
# Files named by the command line


def test_spec_check_text_file_missing_not_utf8_or_a_directory(task, tmp_path):
    refused(["spec", str(task), "--check", str(tmp_path / "none.txt")], "none.txt", "an existing")
    bad = put(tmp_path / "bad.txt", b'{"answer": "ok"}\n\xff\xfe\n')
    refused(["spec", str(task), "--check", str(bad)], f"{bad}:2:", "UTF-8", "0xff")
    refused(["spec", str(task), "--check", str(tmp_path)], str(tmp_path), "a regular file")
    good = put(tmp_path / "good.txt", '{"answer": "ok"}')
    assert run(["spec", str(task), "--check", str(good)]).code == 0


@pytest.mark.parametrize("which", ["task.yaml", "prompts.yaml", "schema.json"])
def test_files_that_are_not_utf8_name_file_and_line(task, which):
    target = task.parent / which
    target.write_bytes(target.read_bytes().replace(b"\n", b"\n\xc3\x28", 1))  # on line 2
    line = refused(["spec", str(task)], f"{target}:2:", "UTF-8", "0xc3")
    assert "codec" not in line


def test_an_invalid_schema_names_the_schema_file_and_its_json_path(task):
    schema = {"type": "object", "properties": {"age": {"type": "integr"}}}
    (task.parent / "schema.json").write_text(json.dumps(schema, indent=1))
    refused(
        ["spec", str(task)],
        f"{task.parent / 'schema.json'}:5: properties.age.type: 'integr' is not valid",
    )


@pytest.mark.parametrize(
    ("schema", "fragments"),
    [
        ('{"$schema": 5}', ["$schema", "JSON Schema draft"]),
        ('{"$schema": "http://example.com/nope"}', ["$schema", "JSON Schema draft"]),
        ("[1, 2]", ["a JSON schema object", "a list"]),
        ('{"type": "object",\n "type": "array"}', [":2: type: given twice"]),
        ('{"type": ', ["valid YAML"]),
    ],
)
def test_schema_files_are_checked_where_they_are(task, schema, fragments):
    (task.parent / "schema.json").write_text(schema)
    refused(["spec", str(task)], "schema.json", *fragments)


def test_a_missing_schema_file_names_the_spec_line(task):
    (task.parent / "schema.json").unlink()
    refused(["spec", str(task)], f"{task}:8: validators[0].schema_file", "an existing")


def test_symlink_loops_are_refused(task):
    loop_a, loop_b = task.parent / "a.yaml", task.parent / "b.yaml"
    loop_a.symlink_to(loop_b)
    loop_b.symlink_to(loop_a)
    refused(["spec", str(loop_a)], str(loop_a), "leads nowhere")
    put(task, SPEC.replace("file: prompts.yaml", "file: a.yaml"))
    refused(["spec", str(task)], str(loop_a), "prompts file", "leads nowhere")


def test_a_directory_or_a_fifo_as_the_spec_is_refused_without_hanging(task):
    refused(["spec", str(task.parent)], str(task.parent), "a regular file")
    fifo = task.parent / "fifo.yaml"
    os.mkfifo(fifo)
    refused(["spec", str(fifo)], str(fifo), "a regular file", timeout_s=5)
    put(task, SPEC.replace("file: prompts.yaml", "file: fifo.yaml"))
    refused(["spec", str(task)], str(fifo), "a regular file", timeout_s=5)


def test_out_pointing_at_a_file_is_refused_by_every_stage(task, tmp_path):
    a_file = put(tmp_path / "a_file", "x")
    samples = tmp_path / "samples.jsonl"
    samples.write_text("")
    for argv in (
        ["teach", str(task), "--out", str(a_file)],
        ["prepare", str(task), "--samples", str(samples), "--out", str(a_file)],
        ["run", str(task), "--out", str(a_file)],
        ["teach", str(task), "--out", str(a_file / "below")],
    ):
        refused(argv, "argument --out", str(a_file), "a file")
    # eval's --out is a file: a directory there is refused, as is a file for a parent
    for out in (tmp_path, a_file / "x.jsonl"):
        refused(["eval", "--model", "m", "--task", str(task), "--out", str(out)], "argument --out")


def test_prepare_refuses_to_replace_a_directory_it_did_not_write(task, tmp_path):
    samples = write_samples(task, tmp_path / "samples.jsonl")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    refused(
        ["prepare", str(task), "--samples", str(samples), "--out", str(mine)],
        str(mine),
        "notes.txt",
        "another --out",
    )
    assert (mine / "notes.txt").read_text() == "keep me"


# ---------------------------------------------------------------------------------------------
# Option ranges and names


@pytest.mark.parametrize(
    ("argv", "fragments"),
    [
        (
            ["prepare", "{task}", "--samples", "s", "--out", "o", "--threshold", "-1"],
            ["(0, 1]", "-1"],
        ),
        (["prepare", "{task}", "--samples", "s", "--out", "o", "--threshold", "0"], ["(0, 1]"]),
        (["prepare", "{task}", "--samples", "s", "--out", "o", "--threshold", "1.5"], ["(0, 1]"]),
        (["prepare", "{task}", "--samples", "s", "--out", "o", "--threshold", "nan"], ["(0, 1]"]),
        (["prepare", "{task}", "--samples", "s", "--out", "o", "--threshold", "x"], ["(0, 1]"]),
        (["run", "{task}", "--limit", "-5"], ["--limit", ">= 1", "-5"]),
        (["run", "{task}", "--limit", "0"], ["--limit", ">= 1"]),
        (["teach", "{task}", "--limit", "0"], ["--limit", ">= 1"]),
        (["teach", "{task}", "--limit", "two"], ["--limit", "an integer"]),
        (["eval", "--model", "m", "--task", "{task}", "--limit", "-1"], ["--limit", ">= 1"]),
        (["eval", "--model", "m", "--task", "{task}", "--batch-size", "0"], ["--batch-size"]),
        (["eval", "--model", "m", "--task", "{task}", "--latency", "-2"], ["--latency", ">= 0"]),
    ],
)
def test_numeric_options_out_of_range_are_refused(task, argv, fragments):
    refused([a.replace("{task}", str(task)) for a in argv], *fragments)


@pytest.mark.parametrize(
    ("name", "fragment"),
    [("a" * 300, "(300 characters)"), ("../up", "'../up'"), ("-dash", "'-dash'")],
)
def test_task_names_that_cannot_be_directory_names(task, name, fragment):
    put(task, SPEC.replace("name: tiny", f"name: {json.dumps(name)}"))
    refused(["spec", str(task)], f"{task}:1: name", "at most 64 characters", fragment)


def test_a_64_character_name_is_fine(task):
    put(task, SPEC.replace("name: tiny", "name: " + "n" * 64))
    assert load_spec(task).name == "n" * 64


# ---------------------------------------------------------------------------------------------
# Teacher sample records read by `prepare`


def sample_records(task: Path) -> list[dict]:
    spec = load_spec(task)
    return [
        {
            "id": f"s{i}",
            "prompt_id": p.id,
            "prompt": p.text,
            "sample_index": 0,
            "messages": [{"role": "user", "content": p.text}],
            "completion": json.dumps({"answer": f"replica {i}"}),
            "accepted": True,
            "reasons": [],
            "score": 1.0,
        }
        for i, p in enumerate(spec.prompts)
    ]


def write_samples(task: Path, path: Path, records: list[dict] | None = None) -> Path:
    records = sample_records(task) if records is None else records
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def prepare(task: Path, samples: Path, out: Path) -> list[str]:
    return ["prepare", str(task), "--samples", str(samples), "--out", str(out)]


def _without(field):
    return lambda r: {k: v for k, v in r.items() if k != field}


def _with(**changes):
    return lambda r: {**r, **changes}


@pytest.mark.parametrize(
    ("damage", "fragments"),
    [
        (_without("completion"), ["completion: expected a string, it is missing"]),
        (_with(completion=7), ["completion: expected a string, got 7"]),
        (_with(completion=None), ["completion: expected a string, got None"]),
        (_without("prompt_id"), ["prompt_id: expected a non-empty string"]),
        (_with(sample_index=True), ["sample_index: expected an integer >= 0, got True"]),
        (_with(sample_index=-1), ["sample_index: expected an integer >= 0"]),
        (_with(accepted="yes"), ["accepted: expected true or false, got 'yes'"]),
        (_with(score="high"), ["score: expected a finite number"]),
        (_with(reasons="too long"), ["reasons: expected a list"]),
        (_with(messages=[{"role": "user"}]), ["messages: expected a list of {role, content}"]),
    ],
    ids=[
        "no completion",
        "completion a number",
        "completion null",
        "no prompt_id",
        "sample_index a bool",
        "negative sample_index",
        "accepted a string",
        "score a string",
        "reasons a string",
        "message without content",
    ],
)
def test_a_bad_sample_record_names_its_file_line(task, tmp_path, damage, fragments):
    records = sample_records(task)
    lines = [json.dumps(r) for r in records]
    lines[2] = json.dumps(damage(records[2]))
    samples = tmp_path / "samples.jsonl"
    # blank lines count: record 2 is on line 5 of the file
    samples.write_text(lines[0] + "\n\n" + lines[1] + "\n\n" + "\n".join(lines[2:]) + "\n")
    refused(prepare(task, samples, tmp_path / "ds"), f"{samples}:5:", *fragments)
    assert not (tmp_path / "ds").exists()


@pytest.mark.parametrize(
    ("line", "fragments"),
    [
        (b'{"id": "x", "completion": "\xff"}', ["UTF-8", "0xff"]),
        (b"{not json", ["one JSON record per line"]),
        (b"[" * 100_000 + b"]" * 100_000, ["one JSON record per line"]),
        (b"[1, 2]", ["a JSON object with an 'id'"]),
    ],
    ids=["not utf-8", "not json", "nested too deeply", "not an object"],
)
def test_an_unreadable_sample_line_names_its_file_line(task, tmp_path, line, fragments):
    samples = write_samples(task, tmp_path / "samples.jsonl")
    body = samples.read_bytes().split(b"\n")
    body.insert(3, line)
    samples.write_bytes(b"\n".join(body))
    out = refused(prepare(task, samples, tmp_path / "ds"), f"{samples}:4:", *fragments)
    assert "RecursionError" not in out


def test_samples_that_are_a_directory_without_a_store_or_a_fifo(task, tmp_path):
    refused(prepare(task, tmp_path, tmp_path / "ds"), "samples.jsonl", "distiller teach")
    fifo = tmp_path / "fifo.jsonl"
    os.mkfifo(fifo)
    refused(prepare(task, fifo, tmp_path / "ds"), str(fifo), "a samples.jsonl file", timeout_s=5)


# ---------------------------------------------------------------------------------------------
# A killed `prepare` leaves the old dataset or the new one, never a mix

# The child runs the real CLI; each JSONL file written into the stage's directory is announced,
# and after the HOLD_AFTER-th one it waits, so the parent kills it at a known point.
CHILD = """\
import os, sys, time
import distiller.dataset as dataset
real_write, written = dataset._write_jsonl, []
def announced_write(path, rows):
    real_write(path, rows)
    written.append(path.name)
    print("wrote", path.name, flush=True)
    if len(written) == int(os.environ["HOLD_AFTER"]):
        time.sleep(60)
dataset._write_jsonl = announced_write
from distiller.cli import main
sys.exit(main(sys.argv[1:]))
"""


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.mark.parametrize("kill_after", [1, 3])
def test_a_killed_prepare_leaves_the_old_dataset_whole(task, tmp_path, kill_after):
    out = tmp_path / "ds"
    old_samples = write_samples(task, tmp_path / "old.jsonl")
    assert run(prepare(task, old_samples, out)).code == 0
    old = snapshot(out)
    new_records = [
        {**r, "completion": json.dumps({"answer": "changed"})} for r in sample_records(task)
    ]
    new_samples = write_samples(task, tmp_path / "new.jsonl", new_records)
    assert run(prepare(task, new_samples, tmp_path / "expected")).code == 0
    new = snapshot(tmp_path / "expected")
    assert set(old) == set(new) and all(old[n] != new[n] for n in old if n.endswith(".jsonl"))

    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, *prepare(task, new_samples, out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HOLD_AFTER": str(kill_after)},
    )
    try:
        for _ in range(kill_after):
            announced = child.stdout.readline()
            assert announced.startswith("wrote "), (announced, child.stderr.read())
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
        child.stdout.close()
        child.stderr.close()
    assert child.returncode == -signal.SIGKILL
    assert snapshot(out) == old  # not one new file beside the old data card

    # The next run replaces it whole and clears what the killed one left beside it.
    assert run(prepare(task, new_samples, out)).code == 0
    assert snapshot(out) == new
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


# ---------------------------------------------------------------------------------------------
# Properties: randomly broken inputs load or are refused, never anything else

FIXTURE_SPECS = ["structured_cot.yaml", "json_extraction.yaml", "label_ranking.yaml"]
YAML_NOISE = st.sampled_from([*":-[]{},&*!|>#'\"?%@ \n\t", "\n  ", ": ", "- ", "x", "0"])
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
)
VALUES = st.one_of(
    SCALARS,
    st.lists(SCALARS, max_size=3),
    st.dictionaries(st.text(max_size=4), SCALARS, max_size=2),
)


@pytest.fixture(scope="module")
def fixture_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped task fixtures in a temporary directory: mutants are written beside them there
    (so their relative prompt and schema paths resolve), never into the checkout."""
    import shutil

    dest = tmp_path_factory.mktemp("tasks")
    shutil.copytree(Path(__file__).resolve().parent.parent / "fixtures" / "tasks", dest / "tasks")
    return dest / "tasks"


@st.composite
def mutated_text(draw: st.DrawFn, text: str) -> str:
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(text)))
        j = draw(st.integers(i, min(len(text), i + 40)))
        kind = draw(st.sampled_from(["delete", "duplicate", "insert", "value"]))
        if kind == "delete":
            text = text[:i] + text[j:]
        elif kind == "duplicate":
            text = text[:j] + text[i:j] + text[j:]
        elif kind == "insert":
            text = text[:i] + "".join(draw(st.lists(YAML_NOISE, min_size=1, max_size=6))) + text[i:]
        else:  # the value after a key becomes a random scalar, list or mapping
            colon = text.find(": ", i)
            if colon != -1:
                end = text.find("\n", colon)
                end = len(text) if end == -1 else end
                text = text[: colon + 2] + json.dumps(draw(VALUES)) + text[end:]
    return text


def assert_loads_or_is_refused(argv: list[str]) -> None:
    outcome = run(argv, timeout_s=10)
    assert "Traceback" not in outcome.stderr, outcome.stderr
    assert UNEXPECTED not in outcome.stderr, outcome.stderr
    assert outcome.code in (0, 2), outcome
    if outcome.code == 2:
        assert len(outcome.error_lines) == 1 or "usage:" in outcome.stderr, outcome.stderr


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data(), which=st.sampled_from(FIXTURE_SPECS))
def test_broken_specs_load_or_are_refused(fixture_copy, data, which):
    mutant = fixture_copy / ".mutant.yaml"
    mutant.write_text(data.draw(mutated_text((fixture_copy / which).read_text())))
    assert_loads_or_is_refused(["spec", str(mutant)])


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    data=st.data(),
    which=st.sampled_from(
        [
            "json_extraction/alerts.yaml",
            "json_extraction/schema.json",
            "label_ranking/incidents.yaml",
        ]
    ),
)
def test_broken_prompt_and_schema_files_load_or_are_refused(fixture_copy, data, which):
    target = fixture_copy / which
    original = target.read_text()
    try:
        target.write_text(data.draw(mutated_text(original)))
        spec = "json_extraction.yaml" if which.startswith("json") else "label_ranking.yaml"
        assert_loads_or_is_refused(["spec", str(fixture_copy / spec)])
    finally:
        target.write_text(original)


JSON_VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3), max_leaves=6)


@st.composite
def broken_samples(draw: st.DrawFn, records: list[dict]) -> bytes:
    lines: list[dict | bytes] = [dict(r) for r in records]  # records, or raw lines once broken
    for _ in range(draw(st.integers(1, 4))):
        n = draw(st.integers(0, len(lines) - 1))
        kind = draw(st.sampled_from(["drop field", "retype field", "blank", "garbage", "cut"]))
        if kind in ("drop field", "retype field") and isinstance(lines[n], dict) and lines[n]:
            name = draw(st.sampled_from(sorted(lines[n])))
            if kind == "drop field":
                del lines[n][name]
            else:
                lines[n][name] = draw(JSON_VALUES)
        elif kind == "blank":
            lines.insert(n, b"")
        elif kind == "garbage":
            lines.insert(n, draw(st.binary(max_size=12)).replace(b"\n", b""))
        elif kind == "cut":
            raw = _raw(lines[n])
            lines[n] = raw[: draw(st.integers(0, len(raw)))]
    return b"\n".join(_raw(line) for line in lines) + draw(st.sampled_from([b"\n", b""]))


def _raw(line: dict | bytes) -> bytes:
    return json.dumps(line).encode() if isinstance(line, dict) else line


@pytest.fixture(scope="module")
def sample_task(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_task(tmp_path_factory.mktemp("sample_task"))


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_broken_sample_files_prepare_or_are_refused(sample_task, data):
    samples = sample_task.parent / "samples.jsonl"
    samples.write_bytes(data.draw(broken_samples(sample_records(sample_task))))
    out = sample_task.parent / "ds"
    assert_loads_or_is_refused(prepare(sample_task, samples, out))
