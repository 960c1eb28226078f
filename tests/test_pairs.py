"""On-policy DPO pairs (``distiller.pairs``) and DPO's logged rewards, on tiny models: the spec
keys, pairs from the policy's own failing answers, resume after SIGKILL, and the reward margin
and preference accuracy in metrics.csv/json checked against an independent computation."""

from __future__ import annotations

import csv
import json
import math
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from procs import kill_when

from distiller.dataset import prepare_dataset, split_prompts
from distiller.errors import SpecError, UserError
from distiller.generate import chat_prompt, generate_batch
from distiller.models import load_model
from distiller.pairs import STORE_FILE, build_pairs, gold_check, policy_of
from distiller.samples import SampleStore
from distiller.spec import load_spec
from distiller.teacher import run_teacher
from distiller.train import train
from distiller.train.losses import preference_stats
from distiller.validators import build_validator

QUESTIONS = [f"What is {a} plus {b}?" for a in range(6) for b in range(4)]
DPO = "{beta: 0.5, pairs: on_policy, policy: sft}"


def write_spec(path: Path, model: Path, refs: dict[str, str], dpo: str = DPO) -> Path:
    """A gold task (the references are the answers) whose student trains DPO on-policy."""
    lines = [
        "name: tiny_pairs",
        "prompts:",
        *[
            f"  - {{id: q{i:02d}, text: {json.dumps(q)}, reference: {json.dumps(refs[f'q{i:02d}'])}}}"
            for i, q in enumerate(QUESTIONS)
        ],
        "teacher: {gold: true}",
        # Every answer passes the validators: only the gold answer decides.
        "validators: [{type: regex, must_not_match: ['ZZZ-never']}]",
        "student:",
        f"  model: {model}",
        "  route: dpo",
        f"  dpo: {dpo}",
        "  lora: {rank: 4, alpha: 16}",
        "  train: {iters: 4, batch_size: 2, learning_rate: 1.0e-3, steps_per_eval: 2}",
        "split: {train: 0.6, valid: 0.2, test: 0.2}",
        "eval: {max_tokens: 6}",
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def dataset_for(spec, tmp_path: Path) -> Path:
    """The gold teacher's samples, prepared into a dataset (as ``distiller run`` does)."""
    store = tmp_path / "teacher" / "samples.jsonl"
    run_teacher(spec, store, progress=False)
    prepare_dataset(spec, store, tmp_path / "dataset")
    return tmp_path / "dataset"


def own_answers(model_dir: Path, spec) -> dict[str, str]:
    """The policy's greedy answers to the train/valid prompts, decoded as the pairs stage does
    (same messages, decoding, order and batch size): the same computation, the same text."""
    model, tok = load_model(str(model_dir))
    s = split_prompts(spec.prompts, spec.split)
    prompts = [*s.train, *s.valid]
    ids = [chat_prompt(tok, [{"role": "user", "content": p.text}]) for p in prompts]
    gens = generate_batch(model, tok, ids, spec.eval.decoding, batch_size=1)
    return {p.id: g.text for p, g in zip(prompts, gens, strict=True)}


@pytest.fixture(scope="module")
def task(tiny_model_dir, tmp_path_factory):
    """A spec where the policy is right, by construction, on every other train/valid prompt:
    its reference is the policy's own answer there, and an answer it never gives elsewhere."""
    tmp = tmp_path_factory.mktemp("task")
    placeholder = {f"q{i:02d}": "x" for i in range(len(QUESTIONS))}
    first = load_spec(write_spec(tmp / "probe.yaml", tiny_model_dir, placeholder))
    answers = own_answers(tiny_model_dir, first)
    from distiller.metrics import normalize_answer

    usable = sorted(k for k, a in answers.items() if normalize_answer(a))
    assert len(usable) >= 6, f"the tiny model answered too few prompts with words: {answers}"
    right = set(usable[::2])
    refs = {k: (answers[k] if k in right else f"The sum is {k}.") for k in placeholder}
    spec = load_spec(write_spec(tmp / "spec.yaml", tiny_model_dir, refs))
    return spec, dataset_for(spec, tmp), answers, right


# ---------------------------------------------------------------------------------- spec


def test_on_policy_keys_parse(tmp_path, tiny_model_dir):
    spec = load_spec(
        write_spec(tmp_path / "s.yaml", tiny_model_dir, {f"q{i:02d}": "a" for i in range(24)})
    )
    d = spec.student.dpo
    assert (d.beta, d.pairs, d.policy, d.samples_per_prompt, d.temperature) == (
        0.5, "on_policy", "sft", 1, 0.0,
    )  # fmt: skip
    other = write_spec(
        tmp_path / "o.yaml",
        tiny_model_dir,
        {f"q{i:02d}": "a" for i in range(24)},
        dpo="{pairs: on_policy, policy: ./sft_model, samples_per_prompt: 3, temperature: 0.8}",
    )
    d = load_spec(other).student.dpo
    assert d.policy == str((tmp_path / "sft_model").resolve()) and d.samples_per_prompt == 3


@pytest.mark.parametrize(
    ("dpo", "key", "expected"),
    [
        ("{pairs: on_policy}", "student.dpo.policy", "required with pairs: on_policy"),
        ("{policy: sft}", "student.dpo.policy", "absent unless pairs is on_policy"),
        ("{pairs: mine, policy: sft}", "student.dpo.pairs", "one of teacher, on_policy"),
        (
            "{pairs: on_policy, policy: sft, samples_per_prompt: 2}",
            "student.dpo.temperature",
            "above 0 with samples_per_prompt > 1",
        ),
        (
            "{pairs: on_policy, policy: sft, temperature: -1}",
            "student.dpo.temperature",
            "in [0, inf]",
        ),
        ("{pairs: on_policy, policy: sft, beams: 2}", "student.dpo.beams", "unknown key"),
    ],
)
def test_bad_dpo_keys_fail_in_one_line(tmp_path, tiny_model_dir, dpo, key, expected):
    path = write_spec(
        tmp_path / "s.yaml", tiny_model_dir, {f"q{i:02d}": "a" for i in range(24)}, dpo=dpo
    )
    with pytest.raises(SpecError) as info:
        load_spec(path)
    err = info.value
    assert err.key == key and expected in str(err) and "\n" not in str(err)


def test_policy_sft_names_the_missing_sft_student(tmp_path, tiny_model_dir):
    spec = load_spec(
        write_spec(tmp_path / "s.yaml", tiny_model_dir, {f"q{i:02d}": "a" for i in range(24)})
    )
    with pytest.raises(UserError, match=r"no fused SFT student at .*fuse/model"):
        build_pairs(spec, tmp_path, tmp_path / "pairs", run_dir=tmp_path / "run", progress=False)


# ---------------------------------------------------------------------------------- pairs


def test_pairs_reject_the_policys_failures_and_skip_its_passes(task, tiny_model_dir, tmp_path):
    spec, dataset, answers, right = task
    s = build_pairs(
        spec, dataset, tmp_path / "pairs", policy=str(tiny_model_dir), batch_size=1, progress=False
    )
    rows = {
        name: [
            json.loads(x)
            for x in (tmp_path / "pairs" / f"pairs_{name}.jsonl").read_text().splitlines()
        ]
        for name in ("train", "valid")
    }
    by_id = {p.id: p for p in spec.prompts}
    paired = {r["id"] for rs in rows.values() for r in rs}
    trained = set(answers)
    assert paired == trained - right  # one pair per wrong prompt, none where it is right
    assert s.pairs == {k: len(v) for k, v in rows.items()} and s.prompts_passed == len(right)
    check = build_validator(spec.validators)
    for r in rows["train"] + rows["valid"]:
        p = by_id[r["id"]]
        assert r["rejected"] == answers[r["id"]]  # the policy's own answer ...
        assert gold_check(spec, p, r["rejected"]) is not None  # ... which is wrong
        assert r["chosen"] == p.reference and gold_check(spec, p, r["chosen"]) is None
        assert check(r["chosen"], p).passed
        assert r["prompt"] == [{"role": "user", "content": p.text}]
    # The store holds every sample with its verdict; the card names the policy DPO starts from.
    recs = list(SampleStore(tmp_path / "pairs" / STORE_FILE, readonly=True).records())
    assert {r["prompt_id"]: r["accepted"] for r in recs} == {k: k in right for k in trained}
    assert policy_of(tmp_path / "pairs") == str(tiny_model_dir)
    # A second run generates nothing and writes the same pairs.
    again = build_pairs(
        spec, dataset, tmp_path / "pairs", policy=str(tiny_model_dir), progress=False
    )
    assert again.generated == 0 and again.pairs == s.pairs


def test_a_policy_right_everywhere_gives_no_pairs(tiny_model_dir, tmp_path):
    probe = load_spec(
        write_spec(tmp_path / "p.yaml", tiny_model_dir, {f"q{i:02d}": "x" for i in range(24)})
    )
    answers = own_answers(tiny_model_dir, probe)
    if not all(answers.values()):
        pytest.skip("the tiny model gave an empty answer: it cannot be a reference")
    refs = {f"q{i:02d}": answers.get(f"q{i:02d}", "x") for i in range(24)}
    spec = load_spec(write_spec(tmp_path / "s.yaml", tiny_model_dir, refs))
    with pytest.raises(UserError, match="no on-policy pair"):
        build_pairs(
            spec,
            dataset_for(spec, tmp_path),
            tmp_path / "pairs",
            policy=str(tiny_model_dir),
            batch_size=1,
            progress=False,
        )


def _pairs_cmd(spec: Path, data: Path, out: Path, policy: Path) -> list[str]:
    return [sys.executable, "-m", "distiller.cli", "pairs", str(spec), "--data", str(data),
            "--out", str(out), "--policy", str(policy), "--batch-size", "1"]  # fmt: skip


def test_sigkill_then_resume_generates_only_the_missing_samples(task, tiny_model_dir, tmp_path):
    spec, dataset, _, _ = task
    # Sampled, many per prompt: enough work for the kill to land in the middle of it.
    dpo = "{beta: 0.5, pairs: on_policy, policy: sft, samples_per_prompt: 12, temperature: 1.0}"
    refs = {p.id: p.reference for p in spec.prompts}
    path = write_spec(tmp_path / "s.yaml", tiny_model_dir, refs, dpo=dpo)
    sampled = load_spec(path)
    total = 12 * sum(1 for _ in (dataset / "train.jsonl").read_text().splitlines()) + 12 * sum(
        1 for _ in (dataset / "valid.jsonl").read_text().splitlines()
    )
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        _pairs_cmd(path, dataset, out, tiny_model_dir),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    store = out / STORE_FILE
    kill_when(proc, lambda: store.exists() and store.read_bytes().count(b"\n") >= 5, poll_s=0.005)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (out / "pairs_train.jsonl").exists()  # pairs are written only at the end
    s = build_pairs(sampled, dataset, out, policy=str(tiny_model_dir), batch_size=1, progress=False)
    with SampleStore(store) as st_:  # a writer: cuts a torn tail, if the kill left one
        ids = [r["id"] for r in st_.records()]
    assert len(ids) == len(set(ids)) == total  # nothing lost, nothing twice
    assert 5 <= total - s.generated < total  # the killed run's samples were kept, not redone
    straight = build_pairs(
        sampled,
        dataset,
        tmp_path / "straight",
        policy=str(tiny_model_dir),
        batch_size=1,
        progress=False,
    )
    assert straight.generated == total
    for name in ("pairs_train.jsonl", "pairs_valid.jsonl"):  # seeded per sample: the same pairs
        assert (out / name).read_text() == (tmp_path / "straight" / name).read_text()


# ---------------------------------------------------------------------------------- rewards


def test_preference_stats_by_hand():
    # log-ratios (policy - reference): chosen +1, 0; rejected -1, +1; beta 0.5
    s = preference_stats([-1.0, -2.0], [-3.0, -1.0], [-2.0, -2.0], [-2.0, -2.0], 0.5)
    assert s == pytest.approx(
        {
            "reward_chosen": 0.25,
            "reward_rejected": 0.0,
            "reward_margin": 0.25,
            "preference_accuracy": 0.5,
        }
    )
    # policy == reference: no reward, and a tie is not a preference
    tie = preference_stats([-1.0], [-2.0], [-1.0], [-2.0], 0.1)
    assert tie["reward_margin"] == 0.0 and tie["preference_accuracy"] == 0.0


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.tuples(*[st.floats(-50, 0, allow_nan=False)] * 4), min_size=1, max_size=20),
    st.floats(0.01, 2.0),
)
def test_preference_stats_agree_with_the_dpo_loss(rows, beta):
    import mlx.core as mx

    from distiller.train.losses import dpo_loss

    pc, pr, rc, rr = (np.array(c, np.float32) for c in zip(*rows, strict=True))
    s = preference_stats(pc, pr, rc, rr, beta)
    _, margin = dpo_loss(*(mx.array(x) for x in (pc, pr, rc, rr)), beta)
    assert s["reward_margin"] == pytest.approx(margin.item(), abs=1e-3)
    assert s["reward_margin"] == pytest.approx(s["reward_chosen"] - s["reward_rejected"], abs=1e-9)
    assert 0.0 <= s["preference_accuracy"] <= 1.0


def _sequence_logprob(model, tok, prompt: list[dict], answer: str) -> float:
    """log p(answer + end of turn | prompt), from one plain forward pass over the whole text."""
    full = chat_prompt(
        tok, [*prompt, {"role": "assistant", "content": answer}], add_generation_prompt=False
    )
    start = len(chat_prompt(tok, prompt))
    logits = model(mx.array([full[:-1]]))[0].astype(mx.float32)
    logp = np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
    # every token after the prompt is supervised: the answer and the template's end of turn
    return float(sum(logp[i - 1, full[i]] for i in range(start, len(full))))


def test_logged_rewards_match_an_independent_computation(task, tiny_model_dir, tmp_path):
    spec, dataset, _, _ = task
    pairs = tmp_path / "pairs"
    build_pairs(spec, dataset, pairs, policy=str(tiny_model_dir), batch_size=1, progress=False)
    # keep: last, so the adapter saved is the one the last evaluation scored
    path = write_spec(
        tmp_path / "s.yaml", tiny_model_dir, {p.id: p.reference for p in spec.prompts}
    )
    text = path.read_text().replace("steps_per_eval: 2}", "steps_per_eval: 2, keep: last}")
    path.write_text(text)
    r = train(load_spec(path), pairs, tmp_path / "out", progress=False)
    rows = json.loads((tmp_path / "out" / "metrics.json").read_text())
    last = rows[-1]
    assert last["step"] == r.steps == 4
    with open(tmp_path / "out" / "metrics.csv") as f:
        header = next(csv.reader(f))
    for k in ("reward_margin", "preference_accuracy", "reward_chosen", "reward_rejected"):
        assert f"val_{k}" in header and f"train_{k}" in header

    # The same figures from scratch: the base model is the reference, base + adapter the policy.
    from mlx_lm import load

    ref_model, tok = load(str(tiny_model_dir))
    policy, _ = load(str(tiny_model_dir), adapter_path=str(tmp_path / "out"))
    valid = [json.loads(x) for x in (pairs / "pairs_valid.jsonl").read_text().splitlines()]
    assert valid, "no validation pair to check the logged rewards with"
    lp = {
        (who, k): [_sequence_logprob(m, tok, v["prompt"], v[k]) for v in valid]
        for who, m in (("policy", policy), ("ref", ref_model))
        for k in ("chosen", "rejected")
    }
    beta = 0.5
    chosen = beta * (np.array(lp["policy", "chosen"]) - lp["ref", "chosen"])
    rejected = beta * (np.array(lp["policy", "rejected"]) - lp["ref", "rejected"])
    assert last["val_reward_chosen"] == pytest.approx(chosen.mean(), abs=2e-3)
    assert last["val_reward_rejected"] == pytest.approx(rejected.mean(), abs=2e-3)
    assert last["val_reward_margin"] == pytest.approx((chosen - rejected).mean(), abs=2e-3)
    assert last["val_preference_accuracy"] == pytest.approx(((chosen - rejected) > 0).mean())
    loss = np.mean(np.log1p(np.exp(-(chosen - rejected))))
    assert last["val_loss"] == pytest.approx(loss, abs=2e-3)


def test_untrained_policy_logs_no_margin(task, tiny_model_dir, tmp_path):
    """Learning rate 0: the policy stays the reference, so every reward is 0, no pair is
    preferred, and the loss is ln 2, at every report."""
    spec, dataset, _, _ = task
    pairs = tmp_path / "pairs"
    build_pairs(spec, dataset, pairs, policy=str(tiny_model_dir), batch_size=1, progress=False)
    path = write_spec(
        tmp_path / "s.yaml", tiny_model_dir, {p.id: p.reference for p in spec.prompts}
    )
    still = load_spec(path)  # (the parser wants a rate above 0: this one is set in code)
    t = replace(still.student.train, learning_rate=0.0)
    still = replace(still, student=replace(still.student, train=t))
    train(still, pairs, tmp_path / "out", progress=False)
    rows = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert rows and all(r["train_reward_margin"] == pytest.approx(0.0, abs=1e-5) for r in rows)
    assert all(r["train_preference_accuracy"] == 0.0 for r in rows)
    val = [r for r in rows if r["val_loss"] is not None]
    assert val and all(r["val_reward_margin"] == pytest.approx(0.0, abs=1e-5) for r in val)
    assert all(r["val_loss"] == pytest.approx(math.log(2), abs=1e-4) for r in val)
