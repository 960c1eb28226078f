"""Training stage on tiny models: routes, masking, checkpoints/resume (SIGKILL, Ctrl-C),
early stopping, layer-dropped students, vocabulary check."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mlx_lm import load

from distiller.errors import UserError
from distiller.spec import load_spec
from distiller.train import batches as B
from distiller.train import train
from distiller.train.students import kept_layers, layer_map_for, make_dropped_student

REPO = Path(__file__).resolve().parent.parent

QA = [(f"What is {a} plus {b}?", f"The answer is {a + b}.") for a in range(6) for b in range(4)]


def default_sigint() -> None:
    """Child-side: restore SIGINT's default so Python installs its KeyboardInterrupt handler.

    A shell running a job in the background (`cmd &`) starts it with SIGINT ignored, and an
    ignored signal stays ignored across exec: the Ctrl-C tests would then test nothing.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def write_dataset(d: Path, n_train: int = 16, n_valid: int = 4, pairs: bool = False) -> Path:
    d.mkdir(parents=True, exist_ok=True)

    def chat(q, a):
        return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}

    rows = [chat(q, a) for q, a in QA]
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:n_train]))
    (d / "valid.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows[n_train : n_train + n_valid])
    )
    if pairs:
        p = [{"prompt": q, "chosen": a, "rejected": "I do not know."} for q, a in QA]
        (d / "pairs_train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in p[:n_train]))
        (d / "pairs_valid.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in p[n_train : n_train + n_valid])
        )
    return d


def write_spec(path: Path, model: Path, teacher: Path | None = None, **student) -> Path:
    """A real YAML task spec for the tiny model; ``student`` entries are YAML flow snippets."""
    lines = [
        "name: tiny",
        "prompts:",
        *[f'  - {{id: q{i}, text: "{q}"}}' for i, (q, _) in enumerate(QA)],
        f"teacher: {{model: {teacher or model}}}",
        "student:",
        f"  model: {model}",
        *[f"  {k}: {v}" for k, v in student.items()],
        "split: {train: 0.6, valid: 0.2, test: 0.2}",
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_mask_covers_exactly_the_assistant_answer(tiny_model_dir):
    _, tok = load(str(tiny_model_dir))
    msgs = [
        {"role": "user", "content": "What is 2 plus 2?"},
        {"role": "assistant", "content": "The answer is 4."},
    ]
    ex = B.encode_chat(tok, msgs, 512)
    b = B.collate([ex], pad_to=32)
    assert b["inputs"].shape[1] % 32 == 0
    supervised = b["targets"][0][b["mask"][0] == 1]
    text = tok.decode(supervised.tolist())
    assert text.startswith("The answer is 4.")  # answer (+ end-of-turn tokens), no prompt text
    assert "What is" not in text
    n = int(b["lengths"][0])
    assert b["mask"][0, n:].sum() == 0  # padding is never supervised


@settings(max_examples=200, deadline=None)
@given(n=st.integers(0, 100_000))
def test_bucket_bounds_padding(n):
    b = B.bucket(n)
    assert b >= n and b % 32 == 0
    assert b - n <= max(32, n // 4)


def test_batches_sorted_and_order_deterministic():
    lengths = [5, 50, 7, 49, 6, 51, 8, 48]
    groups = B.make_batches(lengths, 2)
    assert sorted(i for g in groups for i in g) == list(range(8))
    assert all(abs(lengths[g[0]] - lengths[g[-1]]) <= 2 for g in groups)  # similar lengths together
    seq = [B.batch_for_step(groups, s, 3) for s in range(12)]
    assert seq == [B.batch_for_step(groups, s, 3) for s in range(12)]
    assert sorted(map(tuple, seq[:4])) == sorted(
        map(tuple, groups)
    )  # an epoch visits each batch once


def test_sft_trains_and_writes_adapter_metrics(tmp_path, tiny_model_dir):
    spec = load_spec(
        write_spec(
            tmp_path / "s.yaml",
            tiny_model_dir,
            route="sft",
            lora="{rank: 4, alpha: 8}",
            train="{iters: 30, batch_size: 4, learning_rate: 1.0e-3, steps_per_eval: 10, checkpoint_every: 10}",
        )
    )
    ds = write_dataset(tmp_path / "ds")
    r = train(spec, ds, tmp_path / "out", progress=False)
    assert r.steps == r.total_steps == 30
    rows = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert [row["step"] for row in rows] == [10, 20, 30]
    vals = [row["val_loss"] for row in rows]
    # It learns the pattern: every validation answer has the training answers' form ("The
    # answer is N."), so its loss falls far more than rounding differences between CPUs move it.
    assert vals[-1] < vals[0]
    assert all(row["tokens_per_s"] > 0 and row["peak_memory_gb"] > 0 for row in rows)
    assert (tmp_path / "out" / "metrics.csv").read_text().startswith("step,train_loss,val_loss,lr")
    # the adapter opens with plain mlx_lm and differs from the base
    model, _ = load(str(tiny_model_dir), adapter_path=str(tmp_path / "out"))
    base, _ = load(str(tiny_model_dir))
    x = mx.array([[1, 2, 3, 4]])
    assert not mx.allclose(model(x), base(x), atol=1e-4).item()


def _train_cmd(spec, ds, out):
    return [
        sys.executable,
        "-m",
        "distiller.cli",
        "train",
        str(spec),
        "--data",
        str(ds),
        "--out",
        str(out),
    ]


def _run_until_checkpoint(cmd, out: Path, min_step: int, sig: int) -> int:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    state = out / "checkpoint" / "state.json"
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            if state.exists() and json.loads(state.read_text())["step"] >= min_step:
                proc.send_signal(sig)
                break
            time.sleep(0.02)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path, tiny_model_dir):
    train_cfg = "{iters: 80, batch_size: 2, learning_rate: 1.0e-3, steps_per_eval: 20, checkpoint_every: 10}"
    spec_path = write_spec(
        tmp_path / "s.yaml",
        tiny_model_dir,
        route="sft",
        lora="{rank: 4, alpha: 8, dropout: 0.1}",
        train=train_cfg,
    )
    ds = write_dataset(tmp_path / "ds")
    out = tmp_path / "killed"
    rc = _run_until_checkpoint(_train_cmd(spec_path, ds, out), out, 10, signal.SIGKILL)
    assert rc == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = json.loads((out / "checkpoint" / "state.json").read_text())["step"]
    assert 10 <= killed_at < 80

    r = train(load_spec(spec_path), ds, out, progress=False)
    assert r.resumed_from == killed_at and r.steps == 80
    steps = [row["step"] for row in json.loads((out / "metrics.json").read_text())]
    assert steps == list(range(10, 81, 10))  # continuous: no gap, no repeat

    # a checkpoint is not silently reused by a run with other settings
    other = write_spec(
        tmp_path / "o.yaml",
        tiny_model_dir,
        route="sft",
        lora="{rank: 4, alpha: 8}",
        train=train_cfg.replace("1.0e-3", "2.0e-3"),
    )
    with pytest.raises(UserError, match="different run"):
        train(load_spec(other), ds, out, progress=False)

    ref = train(load_spec(spec_path), ds, tmp_path / "straight", progress=False)
    a = mx.load(str(out / "adapters.safetensors"))
    b = mx.load(str(tmp_path / "straight" / "adapters.safetensors"))
    assert a.keys() == b.keys()
    for k in a:  # same data order, same dropout RNG: the same weights
        np.testing.assert_allclose(np.array(a[k]), np.array(b[k]), atol=1e-5)
    assert r.best_val_loss == pytest.approx(ref.best_val_loss, rel=1e-5)


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tmp_path, tiny_model_dir):
    spec_path = write_spec(
        tmp_path / "s.yaml",
        tiny_model_dir,
        route="sft",
        lora="{rank: 4}",
        train="{iters: 3000, batch_size: 2, steps_per_eval: 1000, checkpoint_every: 1000}",
    )
    ds = write_dataset(tmp_path / "ds")
    out = tmp_path / "out"
    proc = subprocess.Popen(
        _train_cmd(spec_path, ds, out),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=default_sigint,  # as from a terminal, even if our parent ignores SIGINT
    )
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "metrics.json").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    step = json.loads((out / "checkpoint" / "state.json").read_text())["step"]
    assert 10 <= step < 3000  # saved where it stopped, not at a checkpoint_every boundary
    assert (out / "checkpoint" / f"step-{step}.weights.safetensors").exists()


def write_unscored_validation(ds: Path) -> None:
    """Replace the validation split with conversations whose prompt alone is longer than the
    ``max_seq_length: 64`` of the runs using it: truncation leaves no answer token to score, so
    the validation loss is exactly 0 at every evaluation (an all-masked batch scores 0). No
    evaluation then improves on the first one (only a strict improvement is a new best),
    whatever the weights are: which evaluation is best does not depend on the trajectory."""
    long_prompt = "Please think about this carefully. " * 20
    rows = [json.loads(line) for line in (ds / "valid.jsonl").read_text().splitlines()]
    for row in rows:
        row["messages"][0]["content"] = long_prompt + row["messages"][0]["content"]
    (ds / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def adapter_weights(out: Path) -> dict[str, mx.array]:
    return mx.load(str(out / "adapters.safetensors"))


def same_weights(a: dict[str, mx.array], b: dict[str, mx.array]) -> bool:
    assert a.keys() == b.keys()
    return all(mx.array_equal(a[k], b[k]).item() for k in a)


def test_early_stopping_keeps_best_adapter(tmp_path, tiny_model_dir):
    common = (
        "batch_size: 4, learning_rate: 1.0e-2, schedule: constant, max_seq_length: 64, "
        "steps_per_eval: 5, checkpoint_every: 100"
    )
    train_cfg = f"{{iters: 200, early_stopping_patience: 2, {common}}}"
    spec = load_spec(write_spec(tmp_path / "s.yaml", tiny_model_dir, route="sft", train=train_cfg))
    ds = write_dataset(tmp_path / "ds")
    write_unscored_validation(ds)
    r = train(spec, ds, tmp_path / "out", progress=False)
    rows = json.loads((tmp_path / "out" / "metrics.json").read_text())
    vals = [(row["step"], row["val_loss"]) for row in rows if row["val_loss"] is not None]
    # The evaluation at step 5 is the best; 10 and 15 do not improve on it: patience 2 is out.
    assert vals == [(5, 0.0), (10, 0.0), (15, 0.0)]
    assert r.stopped_early and r.steps == 15
    assert (r.best_step, r.best_val_loss) == (5, 0.0)
    # The adapter holds the weights of step 5: those a 5-step run (same seed, data order and
    # constant learning rate, so the same first 5 updates) ends with; not the step-15 weights.
    five = write_spec(
        tmp_path / "five.yaml", tiny_model_dir, route="sft", train=f"{{iters: 5, {common}}}"
    )
    train(load_spec(five), ds, tmp_path / "five", progress=False)
    kept = adapter_weights(tmp_path / "out")
    assert same_weights(kept, adapter_weights(tmp_path / "five"))
    last = mx.load(str(tmp_path / "out" / "checkpoint" / "step-15.weights.safetensors"))
    assert not same_weights(kept, last)
    # resuming a finished (early-stopped) run does nothing more
    again = train(spec, ds, tmp_path / "out", progress=False)
    assert again.steps == r.steps


def test_dpo_moves_policy_towards_chosen(tmp_path, tiny_model_dir):
    spec = load_spec(
        write_spec(
            tmp_path / "s.yaml",
            tiny_model_dir,
            route="dpo",
            dpo="{beta: 0.5}",
            lora="{rank: 4, alpha: 16}",
            train="{iters: 10, batch_size: 4, learning_rate: 2.0e-3, steps_per_eval: 5}",
        )
    )
    r = train(spec, write_dataset(tmp_path / "ds", pairs=True), tmp_path / "out", progress=False)
    rows = json.loads((tmp_path / "out" / "metrics.json").read_text())
    # DPO loss starts at ln 2 (policy == reference) and drops below it. Every pair, training or
    # validation, rejects the same answer: pushing it down lowers each validation pair's loss,
    # so the drop is large, not a matter of the trajectory's details.
    assert rows[0]["train_loss"] < math.log(2)
    assert r.best_val_loss < 0.5 * math.log(2)


def test_kept_layers_variants():
    assert kept_layers(6, "every_other") == [0, 2, 4, 5]
    assert kept_layers(7, 4) == [0, 2, 4, 6]
    assert kept_layers(5, [1, 3]) == [0, 2, 4]
    with pytest.raises(UserError):
        kept_layers(4, [0, 1, 2, 3])


def test_layer_map_from_the_spec():
    # kd.layer_map as the spec gives it: (student, teacher) pairs, used as they are
    assert layer_map_for(((0, 1), (2, 3)), 3, 4) == {0: 1, 2: 3}
    # "auto": a layer-dropped student maps to the blocks it kept, others spread evenly
    assert layer_map_for("auto", 3, 4, kept=[0, 2, 3]) == {0: 0, 1: 2, 2: 3}
    assert layer_map_for("auto", 2, 4) == {0: 1, 1: 3}
    with pytest.raises(UserError, match="out of range"):
        layer_map_for(((0, 9),), 3, 4)


def test_logit_kd_with_layer_dropped_student(tmp_path, tiny_model_factory):
    teacher = tiny_model_factory(seed=3, num_hidden_layers=4)
    spec = load_spec(
        write_spec(
            tmp_path / "s.yaml",
            teacher,
            route="logit-kd",
            lora="{rank: 4}",
            drop_layers="{keep_every: 2}",
            kd="{alpha: 0.5, beta: 0.5, gamma: 0.1, temperature: 2.0, divergence: jsd}",
            train="{iters: 10, batch_size: 4, learning_rate: 2.0e-3, steps_per_eval: 5}",
        )
    )
    out = tmp_path / "out"
    r = train(spec, write_dataset(tmp_path / "ds"), out, progress=False)
    student_dir = out / "student_base"
    cfg = json.loads((student_dir / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 3 and cfg["distiller_kept_layers"] == [0, 2, 3]
    tw, sw = (
        mx.load(str(Path(teacher) / "model.safetensors")),
        mx.load(str(student_dir / "model.safetensors")),
    )
    assert mx.array_equal(
        sw["model.layers.1.mlp.up_proj.weight"], tw["model.layers.2.mlp.up_proj.weight"]
    )
    assert r.base_model == str(student_dir) and r.steps == 10
    # Validation prompts and answers have the training ones' form, so the loss (answers and
    # the teacher's distributions) falls far more than rounding differences move it.
    vals = [
        row["val_loss"]
        for row in json.loads((out / "metrics.json").read_text())
        if row["val_loss"] is not None
    ]
    assert vals[-1] < vals[0]
    model, _ = load(str(student_dir), adapter_path=str(out))  # the adapter fits the cut student
    assert len(model.layers) == 3


def test_logit_kd_refuses_a_different_vocabulary(tmp_path, tiny_model_dir):
    sys.path.insert(0, str(Path(__file__).parent))
    from tiny_lm import build_tiny_model_dir as build_other_vocab

    other = build_other_vocab(tmp_path / "other")  # its own 384-token BPE vocabulary
    spec = load_spec(
        write_spec(
            tmp_path / "s.yaml",
            tiny_model_dir,
            teacher=other,
            route="logit-kd",
            lora="{rank: 4}",
            train="{iters: 2, batch_size: 2}",
        )
    )
    with pytest.raises(UserError, match="share a vocabulary"):
        train(spec, write_dataset(tmp_path / "ds"), tmp_path / "out", progress=False)


def test_make_dropped_student_roundtrip(tmp_path, tiny_model_factory):
    teacher = tiny_model_factory(seed=1, num_hidden_layers=4)
    keep = make_dropped_student(teacher, tmp_path / "s", [1])
    assert keep == [0, 2, 3]
    model, _ = load(str(tmp_path / "s"))
    assert len(model.layers) == 3 and os.path.exists(tmp_path / "s" / "tokenizer.json")


def test_keep_last_writes_the_final_weights(tmp_path, tiny_model_dir):
    train_cfg = (
        "{iters: 20, batch_size: 4, learning_rate: 1.0e-2, max_seq_length: 64, steps_per_eval: 5, "
        "checkpoint_every: 20, keep: KEEP}"
    )
    ds = write_dataset(tmp_path / "ds")
    # Every evaluation ties with the first, so the best adapter is the step-5 one by design.
    write_unscored_validation(ds)
    runs = {}
    for keep in ("last", "best"):
        path = write_spec(
            tmp_path / f"{keep}.yaml",
            tiny_model_dir,
            route="sft",
            train=train_cfg.replace("KEEP", keep),
        )
        r = train(load_spec(path), ds, tmp_path / keep, progress=False)
        assert r.steps == 20 and (r.best_step, r.best_val_loss) == (5, 0.0)
        runs[keep] = adapter_weights(tmp_path / keep)
    final = mx.load(str(tmp_path / "last" / "checkpoint" / "step-20.weights.safetensors"))
    assert same_weights(runs["last"], final)
    # ... and that is not what keep: best writes (the step-5 weights).
    assert not same_weights(runs["best"], final)


def test_spec_refuses_an_unknown_keep(tmp_path, tiny_model_dir):
    path = write_spec(tmp_path / "s.yaml", tiny_model_dir, train="{iters: 5, keep: worst}")
    with pytest.raises(UserError, match=r"s\.yaml.*student\.train\.keep.*best.*last"):
        load_spec(path)
