"""Dataset stage: prompt-level split properties, leakage check, chat files and data card."""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distiller.dataset import (
    Splits,
    find_leaks,
    normalize,
    prepare_dataset,
    resolve_leaks,
    split_prompts,
)
from distiller.errors import UserError
from distiller.samples import SampleStore, sample_id
from distiller.spec import Prompt, SplitSpec, load_spec

REPO = Path(__file__).resolve().parent.parent

fractions = st.tuples(st.floats(0.05, 0.9), st.floats(0.0, 0.5), st.floats(0.05, 0.9)).map(
    lambda t: tuple(x / sum(t) for x in t)
)


def _prompts(n: int, labels: int = 0, offset: int = 0) -> list[Prompt]:
    return [
        Prompt(
            id=f"p{i:04d}",
            text=f"question number {i} about topic {i * 7919 % 1000}",
            label=f"l{i % labels}" if labels else None,
        )
        for i in range(offset, offset + n)
    ]


def _spec(fr, seed=0, stratify=None) -> SplitSpec:
    return SplitSpec(train=fr[0], valid=fr[1], test=fr[2], seed=seed, stratify_by=stratify)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 120), fr=fractions, seed=st.integers(0, 10**6), labels=st.integers(0, 4))
def test_split_disjoint_covering_fractions_deterministic(n, fr, seed, labels):
    prompts = _prompts(n, labels)
    spec = _spec(fr, seed, "label" if labels else None)
    s = split_prompts(prompts, spec)
    ids = [p.id for name in ("train", "valid", "test") for p in getattr(s, name)]
    assert sorted(ids) == sorted(p.id for p in prompts)  # covers all, no duplicates
    assert len(set(ids)) == len(ids)
    # Per stratum, each split is within rounding of its share.
    strata = Counter(p.label for p in prompts)
    for label, size in strata.items():
        got = {
            name: sum(p.label == label for p in getattr(s, name))
            for name in ("train", "valid", "test")
        }
        assert abs(got["test"] - size * fr[2]) <= 0.5 + 1e-6
        assert abs(got["valid"] - size * fr[1]) <= 1 + 1e-6
        assert abs(got["train"] - size * fr[0]) <= 1 + 1e-6
    # Same seed, shuffled input: same split. Different seed: usually different (not asserted).
    again = split_prompts(list(reversed(prompts)), spec)
    assert again == s


@settings(max_examples=40, deadline=None)
@given(n=st.integers(10, 80), k=st.integers(1, 10), fr=fractions, seed=st.integers(0, 1000))
def test_appending_prompts_moves_few_existing_ones(n, k, fr, seed):
    before = split_prompts(_prompts(n), _spec(fr, seed))
    after = split_prompts(_prompts(n + k), _spec(fr, seed))
    where = lambda s: {p.id: name for name in ("train", "valid", "test") for p in getattr(s, name)}  # noqa: E731
    b, a = where(before), where(after)
    moved = [pid for pid in b if a[pid] != b[pid]]
    assert len(moved) <= 2 * (k + 1)


@settings(max_examples=30, deadline=None)
@given(per_label=st.lists(st.integers(5, 40), min_size=2, max_size=4), seed=st.integers(0, 1000))
def test_stratification_keeps_label_proportions(per_label, seed):
    prompts = [
        Prompt(id=f"{j}-{i}", text=f"text {j} {i}", label=f"L{j}")
        for j, n in enumerate(per_label)
        for i in range(n)
    ]
    s = split_prompts(prompts, _spec((0.6, 0.1, 0.3), seed, "label"))
    total = len(prompts)
    for j, n in enumerate(per_label):
        in_test = sum(p.label == f"L{j}" for p in s.test)
        # each label's share of the test set tracks its share of all prompts
        assert abs(in_test - 0.3 * n) <= 0.5 + 1e-9
    assert abs(len(s.test) - 0.3 * total) <= len(per_label) * 0.5 + 1e-9


def test_split_rejects_duplicate_ids():
    p = _prompts(3)
    with pytest.raises(UserError, match="unique"):
        split_prompts([*p, p[0]], _spec((0.6, 0.2, 0.2)))


# ------------------------------------------------------------------ leakage


def test_normalize():
    assert normalize("  Hello,   WORLD!\n") == "hello world"


def test_exact_and_near_duplicates_are_found_and_moved():
    base = _prompts(30)
    test_p = Prompt(
        id="t", text="How do I reset the password of the admin account on the staging server"
    )
    exact = Prompt(id="dup-exact", text=test_p.text.upper() + " !!")
    near = Prompt(
        id="dup-near",
        text="how do I reset the password for the admin account on the staging server?",
    )
    far = Prompt(id="far", text="something else entirely different")
    s = Splits(train=[*base[1:20], exact, far], valid=[*base[20:], near], test=[test_p])
    leaks = find_leaks(s)
    assert {(lk.other_id, lk.other_split) for lk in leaks} == {
        ("dup-exact", "train"),
        ("dup-near", "valid"),
    }
    assert next(lk for lk in leaks if lk.other_id == "dup-exact").similarity == 1.0
    fixed, found = resolve_leaks(s)
    assert {p.id for p in fixed.test} == {"t", "dup-exact", "dup-near"}
    assert "far" in {p.id for p in fixed.train}
    assert find_leaks(fixed) == []
    assert {lk.other_id for lk in found} == {"dup-exact", "dup-near"}
    with pytest.raises(UserError, match="dup-exact"):
        resolve_leaks(s, on_leak="fail")


def test_leak_resolution_is_transitive():
    # c is near b, b is near test a: after b moves to test, c must follow.
    a = Prompt(id="a", text="the cat sat on the mat in the hall today")
    b = Prompt(id="b", text="the cat sat on the mat in the hall today!")
    c = Prompt(id="c", text="the cat sat on the mat in the hall today!!")
    s = Splits(train=[b, c, *_prompts(5)], valid=[], test=[a])
    fixed, _ = resolve_leaks(s, threshold=0.9)
    assert {"a", "b", "c"} <= {p.id for p in fixed.test}


def test_shared_template_text_is_not_a_near_duplicate():
    tpl = "Rate the severity of this production incident as critical, major or minor. Incident: {}"
    prompts = [
        Prompt(id=f"i{i}", text=tpl.format(t))
        for i, t in enumerate(
            ["database down", "slow dashboard", "login page typo", "payments failing", "disk full"]
        )
    ]
    s = Splits(train=prompts[1:], valid=[], test=prompts[:1])
    assert find_leaks(s) == []


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    texts=st.lists(
        st.text(alphabet="abcdefg ,.", min_size=1, max_size=30), min_size=2, max_size=15
    ),
    seed=st.integers(0, 100),
)
def test_after_resolution_no_train_prompt_matches_a_test_prompt(texts, seed):
    prompts = [Prompt(id=f"q{i}", text=t) for i, t in enumerate(texts)]
    s = split_prompts(prompts, _spec((0.5, 0.2, 0.3), seed))
    fixed, _ = resolve_leaks(s)
    assert find_leaks(fixed, all_prompts=prompts) == []
    test_norm = {normalize(p.text) for p in fixed.test}
    assert not any(normalize(p.text) in test_norm for p in fixed.train + fixed.valid)
    assert sorted(p.id for p in fixed.train + fixed.valid + fixed.test) == sorted(
        p.id for p in prompts
    )


# ------------------------------------------------------------------ prepare


def _write_store(path: Path, spec, accept=lambda i, k: True, samples=2):
    with SampleStore(path) as store:
        for i, p in enumerate(spec.prompts):
            for k in range(samples):
                ok = accept(i, k)
                store.append(
                    {
                        "id": sample_id(p.text, "cfg", k),
                        "prompt_id": p.id,
                        "prompt": p.text,
                        "sample_index": k,
                        "messages": [
                            {"role": "system", "content": "SYS"},
                            {"role": "user", "content": p.text},
                        ],
                        "completion": f"{p.label or 'answer'} {k}" if ok else f"bad {k}",
                        "accepted": ok,
                        "reasons": [] if ok else ["label: not one of the labels"],
                        "score": 1.0 if ok else 0.0,
                    }
                )


def test_prepare_dataset_files_and_card(tmp_path):
    spec = load_spec(REPO / "fixtures" / "tasks" / "label_ranking.yaml")
    store = tmp_path / "samples.jsonl"
    # prompt 3 never passes; others pass on sample 1 only (sample 0 rejected -> DPO pairs)
    _write_store(store, spec, accept=lambda i, k: i != 3 and k == 1)
    info = prepare_dataset(spec, store, tmp_path / "ds", tokenizer=None)
    ds = tmp_path / "ds"
    rows = {
        n: [json.loads(x) for x in (ds / f"{n}.jsonl").read_text().splitlines()]
        for n in ("train", "valid", "test")
    }
    splits = split_prompts(spec.prompts, spec.split)
    test_ids = {r["id"] for r in rows["test"]}
    # every test prompt is in test.jsonl (teacher outcome does not matter), none elsewhere
    assert {p.id for p in splits.test} <= test_ids
    assert not test_ids & {r["id"] for r in rows["train"] + rows["valid"]}
    for r in rows["train"]:
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"]  # bare: no system prompt
        assert r["messages"][1]["content"].endswith(" 1")
    assert len(rows["train"]) + len(rows["valid"]) == len(spec.prompts) - len(test_ids) - (
        spec.prompts[3].id not in test_ids
    )
    pairs = [json.loads(x) for x in (ds / "pairs_train.jsonl").read_text().splitlines()]
    assert pairs and all(p["chosen"].endswith(" 1") and p["rejected"] == "bad 0" for p in pairs)
    card = json.loads((ds / "data_card.json").read_text())
    assert card["spec_hash"] == spec.fingerprint()
    assert card["teacher"]["acceptance_rate"] == pytest.approx(
        (len(spec.prompts) - 1) / (2 * len(spec.prompts)), abs=1e-4
    )
    assert card["teacher"]["rejection_reasons"] == {"label": len(spec.prompts) + 1}
    assert card["examples"]["train"] == info.counts["train"] == len(rows["train"])
    assert "Leakage check" in (ds / "DATA_CARD.md").read_text()
    # deterministic: a second run writes identical files
    prepare_dataset(spec, store, tmp_path / "ds2", tokenizer=None)
    for n in ("train.jsonl", "valid.jsonl", "test.jsonl", "pairs_train.jsonl"):
        assert (ds / n).read_bytes() == (tmp_path / "ds2" / n).read_bytes()


def test_prepare_scaffold_style_uses_teacher_messages(tmp_path):
    spec = load_spec(REPO / "fixtures" / "tasks" / "label_ranking.yaml")
    spec = dataclasses.replace(
        spec, student=dataclasses.replace(spec.student, prompt_style="scaffold")
    )
    _write_store(tmp_path / "s.jsonl", spec)
    prepare_dataset(spec, tmp_path / "s.jsonl", tmp_path / "ds", tokenizer=None)
    row = json.loads((tmp_path / "ds" / "train.jsonl").read_text().splitlines()[0])
    assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant"]


def test_prepare_dpo_without_pairs_fails_clearly(tmp_path):
    spec = load_spec(REPO / "fixtures" / "tasks" / "label_ranking.yaml")
    spec = dataclasses.replace(spec, student=dataclasses.replace(spec.student, route="dpo"))
    _write_store(tmp_path / "s.jsonl", spec, samples=1)
    with pytest.raises(UserError, match="preference pairs"):
        prepare_dataset(spec, tmp_path / "s.jsonl", tmp_path / "ds", tokenizer=None)


def test_prepare_missing_store(tmp_path):
    spec = load_spec(REPO / "fixtures" / "tasks" / "label_ranking.yaml")
    with pytest.raises(UserError, match="distiller teach"):
        prepare_dataset(spec, tmp_path / "nope.jsonl", tmp_path / "ds")


def test_token_stats_with_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(REPO / "fixtures" / "tokenizer"))
    spec = load_spec(REPO / "fixtures" / "tasks" / "label_ranking.yaml")
    _write_store(tmp_path / "s.jsonl", spec, samples=1)
    info = prepare_dataset(spec, tmp_path / "s.jsonl", tmp_path / "ds", tokenizer=tok)
    st_ = info.card["lengths"]["train"]["prompt_tokens"]
    assert (
        st_["min"] > 0 and st_["max"] >= st_["median"] >= st_["min"] and not math.isnan(st_["mean"])
    )
    assert st_["min"] <= st_["p95"] <= st_["max"]


def test_files_train_with_plain_mlx_lm_lora(tmp_path, tiny_model_dir):
    import subprocess
    import sys

    spec = load_spec(REPO / "fixtures" / "tasks" / "label_ranking.yaml")
    _write_store(tmp_path / "s.jsonl", spec)
    prepare_dataset(spec, tmp_path / "s.jsonl", tmp_path / "ds", tokenizer=None)
    cmd = [
        sys.executable,
        "-m",
        "mlx_lm",
        "lora",
        "--model",
        str(tiny_model_dir),
        "--train",
        "--data",
        str(tmp_path / "ds"),
        "--iters",
        "2",
        "--batch-size",
        "2",
        "--num-layers",
        "2",
        "--val-batches",
        "1",
        "--steps-per-eval",
        "2",
        "--mask-prompt",
        "--adapter-path",
        str(tmp_path / "ad"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "ad" / "adapters.safetensors").exists()
