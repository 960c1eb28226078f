"""Hostile input to the train and fuse stages: every refusal is one clear line, never a
traceback or a hang; and an interrupted stage leaves its output whole or absent, never a mix.

Training data cases damage a copy of a good dataset dir in one way and run the real
``distiller train`` on it; the row checks are also driven with arbitrary JSON values and
arbitrary bytes per line (hypothesis). Kill tests SIGKILL a real ``distiller fuse`` process.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hostile import refused, run
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from procs import kill_when

from distiller.errors import UserError
from distiller.spec import LoraSpec
from distiller.train import batches as B

TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "fixtures" / "tokenizer"


def chat(question: str, answer: str) -> dict:
    return {
        "messages": [
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ]
    }


GOOD_CHAT = [chat(f"What is {a} plus 1?", f"The answer is {a + 1}.") for a in range(8)]
GOOD_PAIR = [
    {"prompt": f"What is {a} plus 1?", "chosen": f"It is {a + 1}.", "rejected": "No idea."}
    for a in range(8)
]


def jsonl(rows: list) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def write_spec(
    path: Path, model: Path, route: str = "sft", train: str = "iters: 2, batch_size: 2"
) -> Path:
    path.write_text(
        f"name: tiny\nprompts: [a, b, c, d, e]\nteacher: {{model: {model}}}\n"
        f"student: {{model: {model}, route: {route}, lora: {{rank: 2}}, "
        f"train: {{max_seq_length: 64, {train}}}}}\n"
    )
    return path


@pytest.fixture()
def dataset(tmp_path: Path) -> Path:
    d = tmp_path / "ds"
    d.mkdir()
    (d / "train.jsonl").write_text(jsonl(GOOD_CHAT[:6]))
    (d / "valid.jsonl").write_text(jsonl(GOOD_CHAT[6:]))
    (d / "pairs_train.jsonl").write_text(jsonl(GOOD_PAIR[:6]))
    (d / "pairs_valid.jsonl").write_text(jsonl(GOOD_PAIR[6:]))
    return d


def train_argv(spec: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", str(spec), "--data", str(data), "--out", str(out), *extra]


def with_line(rows: list, line: str, at: int = 3) -> bytes:
    """The rows as JSONL with ``line`` as file line ``at`` (1-based), after a blank line 2: the
    reported number must be the file's line, not the row's index."""
    lines = [json.dumps(r) for r in rows]
    lines.insert(1, "")
    lines.insert(at - 1, line)
    return ("\n".join(lines) + "\n").encode()


# (case, file, content of file line 3, fragments of the one-line message besides "FILE:3")
ROW_CASES = [
    ("a number", "train.jsonl", "7", ['expected {"messages"', "got the number 7"]),
    ("a list", "train.jsonl", "[1, 2]", ["got a list of 2"]),
    ("null", "valid.jsonl", "null", ["got null"]),
    (
        "no messages",
        "train.jsonl",
        '{"id": "q1"}',
        ['got an object with keys "id" (no "messages")'],
    ),
    ("messages a string", "train.jsonl", '{"messages": "hi"}', ['got messages: the string "hi"']),
    ("messages empty", "train.jsonl", '{"messages": []}', ["got messages: an empty list"]),
    ("message a number", "train.jsonl", '{"messages": [3]}', ["got messages[0]: the number 3"]),
    (
        "no content",
        "train.jsonl",
        '{"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}',
        ['got messages[0] without "content"'],
    ),
    (
        "no role",
        "train.jsonl",
        '{"messages": [{"content": "q"}, {"role": "assistant", "content": "x"}]}',
        ['got messages[0] without "role"'],
    ),
    (
        "content a number",
        "train.jsonl",
        '{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]}',
        ["got messages[0].content: the number 5"],
    ),
    (
        "content a list",
        "train.jsonl",
        '{"messages": [{"role": "user", "content": [{"type": "text"}]}, '
        '{"role": "assistant", "content": "x"}]}',
        ["got messages[0].content: a list of 1"],
    ),
    (
        "unknown role",
        "train.jsonl",
        '{"messages": [{"role": "wizard", "content": "q"}, {"role": "assistant", "content": "x"}]}',
        ['messages[0].role: the string "wizard"', "system, user, assistant"],
    ),
    (
        "role a number",
        "train.jsonl",
        '{"messages": [{"role": 1, "content": "q"}, {"role": "assistant", "content": "x"}]}',
        ["messages[0].role: the number 1"],
    ),
    (
        "no answer",
        "train.jsonl",
        '{"messages": [{"role": "user", "content": "q"}]}',
        ['a last message with role "user"'],
    ),
    (
        "an answer to nothing",
        "train.jsonl",
        '{"messages": [{"role": "assistant", "content": "x"}]}',
        ["an assistant message with nothing before it"],
    ),
    (
        "an unpaired surrogate",
        "train.jsonl",
        '{"messages": [{"role": "user", "content": "\\ud800"}, '
        '{"role": "assistant", "content": "x"}]}',
        ["messages[0].content: a string with an unpaired surrogate escape"],
    ),
    ("not json", "train.jsonl", '{"messages": [', ["not valid JSON"]),
    ("a huge integer", "train.jsonl", "1" * 5000, ["not a JSON value we can read"]),
    ("deep nesting", "valid.jsonl", "[" * 100_000 + "]" * 100_000, ["nested too deeply"]),
]


@pytest.mark.parametrize(
    ("case", "name", "line", "fragments"), ROW_CASES, ids=[c[0] for c in ROW_CASES]
)
def test_train_refuses_a_malformed_chat_row(
    tiny_model_dir, dataset, tmp_path, case, name, line, fragments
):
    good = GOOD_CHAT[:6] if name == "train.jsonl" else GOOD_CHAT[6:]
    (dataset / name).write_bytes(with_line(good, line))
    spec = write_spec(tmp_path / "s.yaml", tiny_model_dir)
    refused(train_argv(spec, dataset, tmp_path / "out"), f"{dataset / name}:3:", *fragments)
    # refused before anything was built: no adapter dir was even created
    assert not (tmp_path / "out").exists()


PAIR_CASES = [
    ("a string", '"hello"', ['expected {"prompt"', 'got the string "hello"']),
    ("no rejected", '{"prompt": "q", "chosen": "a"}', ['(no "rejected")']),
    (
        "chosen a number",
        '{"prompt": "q", "chosen": 1, "rejected": "b"}',
        ["got chosen: the number 1"],
    ),
    (
        "prompt a number",
        '{"prompt": 2, "chosen": "a", "rejected": "b"}',
        ["got prompt: the number 2"],
    ),
    (
        "prompt messages without role",
        '{"prompt": [{"content": "q"}], "chosen": "a", "rejected": "b"}',
        ['got prompt[0] without "role"'],
    ),
]


@pytest.mark.parametrize(("case", "line", "fragments"), PAIR_CASES, ids=[c[0] for c in PAIR_CASES])
def test_dpo_refuses_a_malformed_pair_row(tiny_model_dir, dataset, tmp_path, case, line, fragments):
    (dataset / "pairs_train.jsonl").write_bytes(with_line(GOOD_PAIR[:6], line))
    spec = write_spec(tmp_path / "s.yaml", tiny_model_dir, route="dpo")
    refused(
        train_argv(spec, dataset, tmp_path / "out"),
        f"{dataset / 'pairs_train.jsonl'}:3:",
        *fragments,
    )


def _not_utf8(d: Path) -> None:
    (d / "train.jsonl").write_bytes(with_line(GOOD_CHAT[:6], '{"id": "@"}').replace(b"@", b"\xff"))


def _a_directory(d: Path) -> None:
    (d / "train.jsonl").unlink()
    (d / "train.jsonl").mkdir()


def _empty(d: Path) -> None:
    (d / "train.jsonl").write_text("\n\n")


def _missing(name: str):
    def damage(d: Path) -> None:
        (d / name).unlink()

    return damage


FILE_CASES = [
    ("not utf-8", _not_utf8, ["train.jsonl:3:", "not UTF-8", "0xff at column 9"]),
    ("train.jsonl a directory", _a_directory, ["train.jsonl", "a directory", "JSONL file"]),
    ("empty train.jsonl", _empty, ["train.jsonl", "no rows to train on", '{"messages"']),
    ("no train.jsonl", _missing("train.jsonl"), ["train.jsonl", "not found", "prepare"]),
    ("no valid.jsonl", _missing("valid.jsonl"), ["valid.jsonl", "not found", "prepare"]),
]


@pytest.mark.parametrize(
    ("case", "damage", "fragments"), FILE_CASES, ids=[c[0] for c in FILE_CASES]
)
def test_train_refuses_a_damaged_data_file(
    tiny_model_dir, dataset, tmp_path, case, damage, fragments
):
    damage(dataset)
    spec = write_spec(tmp_path / "s.yaml", tiny_model_dir)
    refused(train_argv(spec, dataset, tmp_path / "out"), *fragments)


def test_train_refuses_a_data_dir_that_is_not_one(tiny_model_dir, tmp_path):
    spec = write_spec(tmp_path / "s.yaml", tiny_model_dir)
    refused(
        train_argv(spec, tmp_path / "nowhere", tmp_path / "out"), "nowhere", "no such dataset dir"
    )
    refused(train_argv(spec, spec, tmp_path / "out"), "s.yaml", "not a directory")


def test_a_valid_file_with_blank_lines_and_a_bom_trains(tiny_model_dir, dataset, tmp_path):
    text = "\ufeff" + jsonl(GOOD_CHAT[:3]) + "\n  \n" + jsonl(GOOD_CHAT[3:6])
    (dataset / "train.jsonl").write_text(text, encoding="utf-8")
    spec = write_spec(tmp_path / "s.yaml", tiny_model_dir)
    outcome = run(train_argv(spec, dataset, tmp_path / "out", "--no-compile"), timeout_s=120)
    assert outcome.code == 0, outcome.stderr
    assert (tmp_path / "out" / "train_result.json").exists()


def test_a_chat_template_that_refuses_a_role_is_one_line(tiny_model_dir, dataset, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = (
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}"
        "{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    )
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    row = {"messages": [{"role": "system", "content": "Be brief."}, *GOOD_CHAT[0]["messages"]]}
    (dataset / "train.jsonl").write_bytes(with_line(GOOD_CHAT[:6], json.dumps(row)))
    spec = write_spec(tmp_path / "s.yaml", model)
    refused(
        train_argv(spec, dataset, tmp_path / "out"),
        "train.jsonl:3:",
        "chat template refused",
        "System role not supported",
    )


OPTION_CASES = [
    (["--iters", "0"], ["--iters", ">= 1", "got 0"]),
    (["--iters", "-5"], ["--iters", ">= 1", "got -5"]),
    (["--iters", "ten"], ["--iters", "integer"]),
    (["--workers", "0"], ["--workers", ">= 1", "got 0"]),
    (["--workers", "-2"], ["--workers", ">= 1"]),
]


@pytest.mark.parametrize(
    ("extra", "fragments"), OPTION_CASES, ids=[" ".join(c[0]) for c in OPTION_CASES]
)
def test_train_refuses_an_option_out_of_range(tiny_model_dir, dataset, tmp_path, extra, fragments):
    spec = write_spec(tmp_path / "s.yaml", tiny_model_dir)
    refused(train_argv(spec, dataset, tmp_path / "out", *extra), *fragments)
    assert not (tmp_path / "out").exists()


def test_train_refuses_an_out_path_that_is_a_file(tiny_model_dir, dataset, tmp_path):
    spec = write_spec(tmp_path / "s.yaml", tiny_model_dir)
    taken = tmp_path / "taken"
    taken.write_text("mine")
    refused(train_argv(spec, dataset, taken), "taken", "file")
    assert taken.read_text() == "mine"


def test_a_damaged_checkpoint_is_named(tiny_model_dir, dataset, tmp_path):
    spec = write_spec(tmp_path / "s.yaml", tiny_model_dir)
    state = tmp_path / "out" / "checkpoint" / "state.json"
    state.parent.mkdir(parents=True)
    for damaged, fragment in (("{ nope", "state.json"), ('{"step": "x"}', "names no step")):
        state.write_text(damaged)
        refused(
            train_argv(spec, dataset, tmp_path / "out"),
            "damaged checkpoint",
            fragment,
            "--no-resume",
        )


# ---------------------------------------------------------------------------- any line at all


@pytest.fixture(scope="module")
def tokenizer():
    from mlx_lm.tokenizer_utils import load

    return load(TOKENIZER_DIR)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.sampled_from(["messages", "role", "content", "id", "x"]) | st.text(max_size=3),
            inner,
            max_size=3,
        )
    ),
    max_leaves=12,
)
roles = st.sampled_from(["system", "user", "assistant", "tool", ""]) | st.text(max_size=4)
messages = st.lists(
    st.fixed_dictionaries({"role": roles, "content": st.text(max_size=20)})
    | st.dictionaries(st.sampled_from(["role", "content"]), json_values, max_size=2),
    max_size=4,
)
# Near misses as well as anything: most arbitrary values fail at the first check.
chat_like = json_values | st.fixed_dictionaries({"messages": messages | json_values})
pair_like = json_values | st.fixed_dictionaries(
    {
        "prompt": st.text(max_size=10) | messages,
        "chosen": json_values | st.text(),
        "rejected": st.text(),
    }
)
# Rows that must load: any text in any role, ending with the assistant's answer.
good_messages = st.builds(
    lambda before, answer: [*before, {"role": "assistant", "content": answer}],
    st.lists(
        st.fixed_dictionaries({"role": st.sampled_from(B.ROLES), "content": st.text(max_size=20)}),
        min_size=1,
        max_size=3,
    ),
    st.text(max_size=20),
)
good_chat = st.builds(lambda m: {"messages": m}, good_messages)
good_pair = st.fixed_dictionaries(
    {
        "prompt": st.text(max_size=20) | good_messages.map(lambda m: m[:-1]),
        "chosen": st.text(max_size=20),
        "rejected": st.text(max_size=20),
    }
)
any_bytes = st.binary(max_size=30)  # may hold b"\n": then it is several lines


def _outcome(path: Path, load, tokenizer) -> list | str:
    try:
        loaded = load(path, tokenizer, 64)
    except UserError as exc:
        message = str(exc)
        assert "\n" not in message and message.startswith(f"{path}:"), message
        event("refused")
        return message
    event("loaded")
    return loaded


def _check_file_with_one_hostile_line(
    tokenizer, load, good_rows: list, hostile: str | bytes, at: int
) -> None:
    """Good rows with one arbitrary line among them: they load (one example per non-blank
    line), or the refusal names a line the arbitrary one occupies, never a good row's."""
    lines = [json.dumps(r).encode() for r in good_rows]
    at = min(at, len(lines))
    hostile = hostile if isinstance(hostile, bytes) else hostile.encode("utf-8", "surrogatepass")
    lines.insert(at, hostile)
    data = b"\n".join(lines)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rows.jsonl"
        path.write_bytes(data)
        result = _outcome(path, load, tokenizer)
    if isinstance(result, list):
        rows = data.removeprefix(b"\xef\xbb\xbf").split(b"\n")  # a BOM is not part of a row
        assert len(result) == sum(1 for line in rows if line.strip(b" \t\r"))
    else:
        first = at + 1
        hostile_lines = range(first, first + hostile.count(b"\n") + 1)
        assert any(result.startswith(f"{path}:{n}: ") for n in hostile_lines), result


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    good=st.lists(good_chat, max_size=4),
    hostile=chat_like.map(json.dumps) | any_bytes | st.text(max_size=30),
    at=st.integers(0, 4),
)
def test_any_chat_line_loads_or_is_refused_cleanly(tokenizer, good, hostile, at):
    _check_file_with_one_hostile_line(tokenizer, B.load_chat_examples, good, hostile, at)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    good=st.lists(good_pair, max_size=4),
    hostile=pair_like.map(json.dumps) | chat_like.map(json.dumps) | any_bytes,
    at=st.integers(0, 4),
)
def test_any_pair_line_loads_or_is_refused_cleanly(tokenizer, good, hostile, at):
    _check_file_with_one_hostile_line(tokenizer, B.load_pair_examples, good, hostile, at)


@settings(max_examples=100, deadline=None)
@given(chats=st.lists(good_chat, min_size=1, max_size=4), pairs=st.lists(good_pair, max_size=4))
def test_rows_of_the_format_always_load(tokenizer, chats, pairs):
    """No false refusals: any text in the format's places tokenizes, one example per row."""
    with tempfile.TemporaryDirectory() as tmp:
        chat_file, pair_file = Path(tmp) / "train.jsonl", Path(tmp) / "pairs_train.jsonl"
        chat_file.write_text(jsonl(chats), encoding="utf-8")
        pair_file.write_text(jsonl(pairs), encoding="utf-8")
        assert len(B.load_chat_examples(chat_file, tokenizer, 64)) == len(chats)
        assert len(B.load_pair_examples(pair_file, tokenizer, 64)) == len(pairs)


def test_line_numbers_are_the_files_own(tmp_path):
    path = tmp_path / "valid.jsonl"
    # blank lines, a line of spaces, and a U+2028 inside a JSON string (not a line break)
    path.write_text(
        json.dumps(GOOD_CHAT[0], ensure_ascii=False).replace("plus", "plus\u2028")
        + "\n\n   \n"
        + json.dumps(GOOD_CHAT[1])
        + "\n\n7\n",
        encoding="utf-8",
    )
    with pytest.raises(UserError, match=r"valid\.jsonl:6: expected"):
        B.read_chat_rows(path)


# ---------------------------------------------------------------------------- fuse


def _adapter(tmp_path: Path, base: Path) -> Path:
    from mlx_lm import load

    from distiller.train import lora as LR

    model, _ = load(str(base))
    cfg = LR.adapter_config(model, LoraSpec(rank=2), False, str(base))
    LR.prepare_trainable(model, cfg)  # the initial LoRA weights: a fuse needs no training
    return LR.save_adapter(tmp_path / "adapter", model, cfg)


def fuse_argv(adapter: Path, out: Path, *extra: str) -> list[str]:
    return ["fuse", "--adapter", str(adapter), "--out", str(out), *extra]


def test_fuse_refuses_options_and_outputs_it_cannot_use(tiny_model_dir, tmp_path):
    adapter = _adapter(tmp_path, tiny_model_dir)
    refused(fuse_argv(adapter, tmp_path / "f", "--bits", "7"), "--bits", "invalid choice")
    refused(fuse_argv(adapter, tmp_path / "f", "--bits", "4", "--group-size", "48"), "--group-size")
    refused(fuse_argv(adapter, tmp_path / "f", "--group-size", "32"), "--group-size", "--bits")
    taken = tmp_path / "taken"
    taken.write_text("mine")
    refused(fuse_argv(adapter, taken), "taken", "file")
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    refused(fuse_argv(adapter, notes), "notes", "not a model dir", "not replacing")
    assert taken.read_text() == "mine" and (notes / "todo.txt").read_text() == "mine"


def test_fuse_refuses_an_unfinished_training_run(tiny_model_dir, tmp_path):
    adapter = _adapter(tmp_path, tiny_model_dir)
    (adapter / "checkpoint").mkdir()  # what a killed `distiller train` leaves: no train_result
    refused(fuse_argv(adapter, tmp_path / "f"), "training has not finished", "train_result.json")
    assert not (tmp_path / "f").exists()


def test_fuse_refuses_an_adapter_for_another_model(tiny_model_dir, tiny_model_factory, tmp_path):
    adapter = _adapter(tmp_path, tiny_model_factory(num_hidden_layers=2, hidden_size=32))
    refused(
        fuse_argv(adapter, tmp_path / "f", "--base", str(tiny_model_dir)),
        "adapter",
        "does not fit",
    )


def test_fuse_refuses_a_damaged_adapter_config(tiny_model_dir, tmp_path):
    adapter = _adapter(tmp_path, tiny_model_dir)
    (adapter / "adapter_config.json").write_text("[1]")
    refused(fuse_argv(adapter, tmp_path / "f"), "adapter_config.json", "JSON object")
    (adapter / "adapter_config.json").write_text('{"model": 5}')
    refused(fuse_argv(adapter, tmp_path / "f"), "adapter_config.json", "model")


# The child runs the real CLI with one change: after its first file copy into the model dir
# being built it waits, so the kill lands mid-build on every machine, however fast it writes.
PAUSED_FUSE = """
import shutil, sys, time
from distiller.cli import main
copy = shutil.copy2
def copy_then_wait(*args, **kwargs):
    done = copy(*args, **kwargs)
    time.sleep(600)
    return done
shutil.copy2 = copy_then_wait
sys.exit(main(sys.argv[1:]))
"""


def _kill_mid_fuse(adapter: Path, out: Path) -> None:
    """Run ``distiller fuse`` in a child and SIGKILL it once its temporary sibling of ``out``
    holds files (the model is being written there)."""
    cmd = [sys.executable, "-c", PAUSED_FUSE, *fuse_argv(adapter, out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def building() -> bool:
        return any(any(p.iterdir()) for p in out.parent.glob(f".{out.name}.tmp-*"))

    kill_when(proc, building, poll_s=0.05)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode() if proc.stderr else ""


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_a_killed_fuse_leaves_the_old_model_or_none(tiny_model_dir, tmp_path):
    from mlx_lm import load

    adapter = _adapter(tmp_path, tiny_model_dir)
    out = tmp_path / "fused"
    # A first fuse killed while writing: no model dir at all.
    _kill_mid_fuse(adapter, out)
    assert not out.exists()
    assert list(tmp_path.glob(".fused.tmp-*")), "the premise: the kill left a partial build"
    assert run(fuse_argv(adapter, out), timeout_s=120).code == 0
    assert not list(tmp_path.glob(".fused.*")), "the killed run's temporary dir was not removed"
    before = _files(out)
    assert {"config.json", "model.safetensors", "distiller_provenance.json"} <= before.keys()
    # A second fuse over it, killed while writing: the first model, byte for byte.
    _kill_mid_fuse(adapter, out)
    assert _files(out) == before
    assert run(fuse_argv(adapter, out), timeout_s=120).code == 0
    assert _files(out).keys() == before.keys()
    assert not list(tmp_path.glob(".fused.*"))
    load(str(out))  # whole: plain mlx_lm opens it


def test_a_killed_train_is_not_a_finished_one(tiny_model_dir, dataset, tmp_path):
    """A run that starts over in a finished adapter dir withdraws its train_result.json first:
    killed, it is an unfinished run (fuse refuses it); run again, it resumes and finishes."""
    spec = write_spec(
        tmp_path / "s.yaml",
        tiny_model_dir,
        train="iters: 200, batch_size: 2, checkpoint_every: 5, steps_per_eval: 100",
    )
    out = tmp_path / "out"
    assert run(train_argv(spec, dataset, out, "--iters", "5"), timeout_s=120).code == 0
    first = json.loads((out / "checkpoint" / "state.json").read_text())["run_key"]
    assert (out / "train_result.json").exists()

    cmd = [sys.executable, "-m", "distiller.cli", *train_argv(spec, dataset, out, "--no-resume")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state = out / "checkpoint" / "state.json"

    def second_run_at_step_5() -> bool:
        try:
            current = json.loads(state.read_text())
        except (OSError, ValueError):
            return False
        return current.get("run_key") not in (None, first) and current["step"] >= 5

    kill_when(proc, second_run_at_step_5, poll_s=0.02)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (out / "train_result.json").exists()
    refused(fuse_argv(out, tmp_path / "fused"), "training has not finished")

    resumed = run(train_argv(spec, dataset, out), timeout_s=300)
    assert resumed.code == 0, resumed.stderr
    result = json.loads((out / "train_result.json").read_text())
    assert result["steps"] == 200 and result["resumed_from"] >= 5
    assert run(fuse_argv(out, tmp_path / "fused"), timeout_s=120).code == 0


def test_atomic_dir_keeps_the_old_dir_when_the_build_fails(tmp_path):
    from distiller.files import atomic_dir

    target = tmp_path / "d"
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "a").write_text("2")
        raise RuntimeError("cut short")
    assert _files(target) == {"a": b"1"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_atomic_dir_removes_what_a_dead_process_left(tmp_path):
    from distiller.files import atomic_dir

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    pid = int(dead.stdout)  # that process has exited
    for kind in ("tmp", "old"):
        (tmp_path / f".d.{kind}-{pid}").mkdir()
    mine = tmp_path / f".d.tmp-{os.getppid()}"  # a live process's build is left alone
    mine.mkdir()
    with atomic_dir(tmp_path / "d") as tmp:
        (tmp / "a").write_text("1")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["d", mine.name])


def test_a_layer_dropped_student_is_rebuilt_whole(tmp_path, tiny_model_factory):
    from distiller.train.students import cached_kept_layers, make_dropped_student

    teacher = tiny_model_factory(seed=1, num_hidden_layers=4)
    out = tmp_path / "student_base"
    assert make_dropped_student(teacher, out, [1]) == [0, 2, 3]
    assert cached_kept_layers(out) == [0, 2, 3]
    (out / "config.json").write_text("{ damaged")
    (out / "stray").write_text("left by someone")
    assert cached_kept_layers(out) is None  # not trusted: the train stage builds it again
    assert make_dropped_student(teacher, out, [0]) == [1, 2, 3]
    assert cached_kept_layers(out) == [1, 2, 3]
    assert not (out / "stray").exists()  # replaced as a whole, not written over
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student_base"]
