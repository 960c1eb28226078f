"""distiller.generate on a tiny random chat model: batching, EOS, seeds, stats, CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_lm import build_tiny_model_dir  # tests/ is on sys.path (pytest rootdir import)

from distiller.generate import build_messages, chat_prompt, generate_batch, generate_one
from distiller.sampling import make_sampler, no_repeat_ngram_processor, whitespace_token_ids


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny_lm"))


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    from mlx_lm import load

    return load(str(tiny_dir))


def _raw(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def test_build_messages_order():
    msgs = build_messages("q", system="sys", few_shot=[("u1", "a1"), ("u2", "a2")])
    assert [m["role"] for m in msgs] == [
        "system",
        "user",
        "assistant",
        "user",
        "assistant",
        "user",
    ]
    assert [m["content"] for m in msgs] == ["sys", "u1", "a1", "u2", "a2", "q"]
    assert build_messages("q") == [{"role": "user", "content": "q"}]


def test_chat_prompt_uses_template(tiny):
    _, tok = tiny
    ids = chat_prompt(tok, build_messages("hello world", system="be brief"))
    text = tok.decode(ids)
    assert text.startswith("<|im_start|>system\nbe brief<|im_end|>")
    assert text.endswith("<|im_start|>assistant\n")
    no_gen = tok.decode(chat_prompt(tok, build_messages("hi"), add_generation_prompt=False))
    assert not no_gen.endswith("assistant\n")


def test_batch_greedy_matches_single_stream_in_order(tiny):
    model, tok = tiny
    prompts = [
        chat_prompt(tok, build_messages(u))
        for u in ["hello world", "what is a quorum", "a", "the quick brown fox jumps over"]
    ] + [_raw(tok, "lazy dog"), _raw(tok, "forty-two")]
    done = []
    # batch_size < len(prompts): finished slots are refilled (continuous batching)
    gens = generate_batch(model, tok, prompts, max_tokens=12, batch_size=4, progress=done.append)
    assert sum(done) == len(prompts)
    assert len(gens) == len(prompts)
    for p, g in zip(prompts, gens, strict=True):
        single = generate_one(model, tok, p, max_tokens=12)
        assert g.tokens == single.tokens
        assert g.text == single.text == tok.decode(g.tokens)
        assert g.prompt_tokens == len(p)
        assert g.finish_reason == "length" and g.generation_tokens == 12


def test_stops_at_eos_per_sequence(tiny):
    model, tok = tiny
    prompts = [_raw(tok, t) for t in ["hello world", "lazy dog", "forty-two", "quorum", "fox"]]
    free = generate_batch(model, tok, prompts, max_tokens=8, batch_size=8)
    # Pick a stop token that occurs in some outputs but not in others.
    stop = None
    for g in free:
        for t in g.tokens:
            if any(t not in other.tokens for other in free):
                stop = t
                break
        if stop is not None:
            break
    assert stop is not None, "tiny model outputs are all identical; cannot test per-sequence EOS"
    saved = set(tok.eos_token_ids)
    tok.eos_token_ids = saved | {stop}
    try:
        gens = generate_batch(model, tok, prompts, max_tokens=8, batch_size=8)
    finally:
        tok.eos_token_ids = saved
    reasons = set()
    for f, g in zip(free, gens, strict=True):
        if stop in f.tokens:
            cut = f.tokens.index(stop)
            assert g.finish_reason == "stop"
            assert g.tokens == f.tokens[:cut]
            assert g.generation_tokens == cut + 1  # the stop token cost a step
        else:
            assert g.finish_reason == "length"
            assert g.tokens == f.tokens
        reasons.add(g.finish_reason)
    assert reasons == {"stop", "length"}


def test_seeded_sampling_is_reproducible_and_batch_independent(tiny):
    model, tok = tiny
    prompts = [chat_prompt(tok, build_messages(u)) for u in ["hello", "a quorum", "fox", "dog"]]
    kw = dict(max_tokens=16, temperature=1.0, top_p=0.95)
    a = generate_batch(model, tok, prompts, seed=7, batch_size=4, **kw)
    b = generate_batch(model, tok, prompts, seed=7, batch_size=4, **kw)
    assert [g.tokens for g in a] == [g.tokens for g in b]
    # explicit per-prompt seeds, reversed order, smaller batches: same samples per prompt
    seeds = [11, 22, 33, 44]
    c = generate_batch(model, tok, prompts, seed=seeds, batch_size=4, **kw)
    d = generate_batch(model, tok, prompts[::-1], seed=seeds[::-1], batch_size=2, **kw)
    assert [g.tokens for g in c] == [g.tokens for g in d[::-1]]
    # the single-stream path draws the same sample for the same prompt and run seed
    one = generate_one(model, tok, prompts[0], seed=7, **kw)
    assert one.tokens == a[0].tokens
    # a different seed gives different samples (16 tokens from a 384-token vocab)
    e = generate_batch(model, tok, prompts, seed=8, batch_size=4, **kw)
    assert [g.tokens for g in e] != [g.tokens for g in a]


def test_stats_are_measured(tiny):
    model, tok = tiny
    prompts = [chat_prompt(tok, build_messages(u)) for u in ["hello", "a quorum is"]]
    gens = generate_batch(model, tok, prompts, max_tokens=5, reset_peak_memory=True)
    s = gens.stats
    assert s.sequences == 2
    assert s.prompt_tokens == sum(len(p) for p in prompts)
    assert s.generation_tokens == sum(g.generation_tokens for g in gens) == 10
    assert s.prompt_tps > 0 and s.decode_tps > 0 and s.generation_tps > 0
    assert s.peak_memory_gb > 0
    assert 0 < gens[0].elapsed_s <= s.wall_time
    one = generate_one(model, tok, prompts[0], max_tokens=5)
    assert one.prompt_tps > 0 and one.generation_tps > 0 and one.peak_memory_gb > 0


def test_bad_arguments(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="empty prompt"):
        generate_batch(model, tok, [[]], max_tokens=4)
    with pytest.raises(ValueError, match="max_tokens"):
        generate_batch(model, tok, [[5]], max_tokens=0)
    with pytest.raises(ValueError, match="seeds"):
        generate_batch(model, tok, [[5], [6]], max_tokens=2, temperature=1.0, seed=[1])
    with pytest.raises(ValueError, match="top_p"):
        make_sampler(1.0, top_p=0.0)
    assert generate_batch(model, tok, [], max_tokens=4) == []


def test_cli_generate(tiny_dir):
    env = dict(os.environ)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "distiller.cli",
            "generate",
            "--model",
            str(tiny_dir),
            "--prompt",
            "hello world",
            "--max-tokens",
            "6",
            "--temperature",
            "0.8",
            "--seed",
            "3",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "6 generated tok" in proc.stderr
    assert "tok/s" in proc.stderr and "peak memory" in proc.stderr
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "distiller.cli",
            "generate",
            "--model",
            str(tiny_dir),
            "--prompt",
            "x",
            "--max-tokens",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "--max-tokens must be > 0" in bad.stderr


def _ngrams(tokens: list[int], n: int) -> list[tuple[int, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(2, 4),
    prompt=st.lists(st.integers(0, 5), min_size=1, max_size=6),
    generated=st.lists(st.integers(0, 5), max_size=30),
    exempt=st.sets(st.integers(0, 5), max_size=2),
)
def test_no_repeat_ngram_bans_exactly_the_completing_tokens(n, prompt, generated, exempt):
    import mlx.core as mx

    process = no_repeat_ngram_processor(n, exempt)
    vocab = 6
    context = list(prompt)
    for step in range(len(generated) + 1):
        out = process(mx.array(context), mx.zeros((1, vocab)))
        done = context[len(prompt) :]  # the prompt never counts
        seen = set(_ngrams(done, n))
        want = {
            t
            for t in range(vocab)
            if len(done) >= n - 1 and (*done[len(done) - n + 1 :], t) in seen and t not in exempt
        }
        got = {t for t in range(vocab) if out[0, t].item() == float("-inf")}
        assert got == want, (step, done)
        if step < len(generated):
            context.append(generated[step])


def test_no_repeat_ngram_in_generation(tiny):
    model, tok = tiny
    prompts = [chat_prompt(tok, build_messages(u)) for u in ["hello world", "a quorum", "fox"]]
    free = generate_batch(model, tok, prompts, max_tokens=48, batch_size=3)
    # A random tiny model loops under greedy decoding: the constraint has something to do.
    assert any(len(set(_ngrams(g.tokens, 3))) < len(_ngrams(g.tokens, 3)) for g in free)
    shaped = generate_batch(model, tok, prompts, max_tokens=48, batch_size=2, no_repeat_ngram=3)
    exempt = whitespace_token_ids(tok)
    for g in shaped:
        grams = [gram for gram in _ngrams(g.tokens, 3) if gram[-1] not in exempt]
        assert len(set(grams)) == len(grams), g.tokens
        single = generate_one(
            model, tok, prompts[shaped.index(g)], max_tokens=48, no_repeat_ngram=3
        )
        assert single.tokens == g.tokens  # batched and single-stream agree, state is per sequence
    with pytest.raises(ValueError, match=">= 2"):
        no_repeat_ngram_processor(1)


def test_line_breaks_are_exempt_from_no_repeat_ngram(tiny):
    _, tok = tiny
    exempt = whitespace_token_ids(tok)
    assert set(tok.encode("\n", add_special_tokens=False)) <= exempt
    assert all(not tok.decode([i]).strip() for i in exempt)
    assert not set(tok.encode("MECHANISM", add_special_tokens=False)) & exempt


def test_repetition_penalty_changes_greedy_output(tiny):
    model, tok = tiny
    prompts = [chat_prompt(tok, build_messages("hello world"))]
    free = generate_batch(model, tok, prompts, max_tokens=32)
    penalized = generate_batch(model, tok, prompts, max_tokens=32, repetition_penalty=1.5)
    assert penalized[0].tokens != free[0].tokens
    assert len(set(penalized[0].tokens)) >= len(set(free[0].tokens))


@pytest.mark.parametrize("path", ["batch", "shared_prefix", "single"])
def test_stop_strings_end_the_text_before_their_first_occurrence(tiny, tiny_dir, path):
    from distiller.generate import use_shared_prefix
    from distiller.models import load_model

    model, tok = load_model(str(tiny_dir)) if path == "shared_prefix" else tiny
    scaffold = list(range(100, 180)) if path == "shared_prefix" else []
    prompts = [scaffold + _raw(tok, t) for t in ["hello world", "lazy dog", "forty-two"]]

    def run(stop=()):
        if path == "single":
            return [generate_one(model, tok, p, max_tokens=24, stop=stop) for p in prompts]
        return list(generate_batch(model, tok, prompts, max_tokens=24, batch_size=2, stop=stop))

    assert use_shared_prefix(model, prompts, 64) == (path == "shared_prefix")
    free = run()
    # A stop string from the middle of the first output (plain ASCII, so that it decodes alike
    # from any token boundary); greedy decoding is identical up to where it stops.
    text = free[0].text
    at = next(
        i for i in range(4, len(text) - 2) if text[i : i + 2].isascii() and text[i : i + 2].strip()
    )
    stop = text[at : at + 2]
    stopped = run(stop=(stop, "never-generated-\u2603"))
    for f, s in zip(free, stopped, strict=True):
        if stop in f.text:
            assert s.text == f.text[: f.text.find(stop)]
            assert s.finish_reason == "stop"
            assert s.tokens == f.tokens[: len(s.tokens)] and len(s.tokens) < len(f.tokens) + 1
        else:
            assert (s.text, s.finish_reason) == (f.text, f.finish_reason)
    assert stopped[0].finish_reason == "stop" and len(stopped[0].text) <= at
