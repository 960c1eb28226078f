"""distiller.generate on a tiny random chat model: batching, EOS, seeds, stats, CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_lm import build_tiny_model_dir  # tests/ is on sys.path (pytest rootdir import)

from distiller.decoding import Decoding
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
    gens = generate_batch(
        model, tok, prompts, Decoding(max_tokens=12), batch_size=4, progress=done.append
    )
    assert sum(done) == len(prompts)
    assert len(gens) == len(prompts)
    for p, g in zip(prompts, gens, strict=True):
        single = generate_one(model, tok, p, Decoding(max_tokens=12))
        assert g.tokens == single.tokens
        assert g.text == single.text == tok.decode(g.tokens)
        assert g.prompt_tokens == len(p)
        assert g.finish_reason == "length" and g.generation_tokens == 12


def test_stops_at_eos_per_sequence(tiny):
    model, tok = tiny
    prompts = [_raw(tok, t) for t in ["hello world", "lazy dog", "forty-two", "quorum", "fox"]]
    free = generate_batch(model, tok, prompts, Decoding(max_tokens=8), batch_size=8)
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
        gens = generate_batch(model, tok, prompts, Decoding(max_tokens=8), batch_size=8)
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
    sampled = Decoding(max_tokens=16, temperature=1.0, top_p=0.95)
    a = generate_batch(model, tok, prompts, sampled.replace(seed=7), batch_size=4)
    b = generate_batch(model, tok, prompts, sampled.replace(seed=7), batch_size=4)
    assert [g.tokens for g in a] == [g.tokens for g in b]
    # explicit per-prompt seeds, reversed order, smaller batches: same samples per prompt
    seeds = [11, 22, 33, 44]
    c = generate_batch(model, tok, prompts, sampled, seeds=seeds, batch_size=4)
    d = generate_batch(model, tok, prompts[::-1], sampled, seeds=seeds[::-1], batch_size=2)
    assert [g.tokens for g in c] == [g.tokens for g in d[::-1]]
    # the single-stream path draws the same sample for the same prompt and run seed
    one = generate_one(model, tok, prompts[0], sampled.replace(seed=7))
    assert one.tokens == a[0].tokens
    # a different seed gives different samples (16 tokens from a 384-token vocab)
    e = generate_batch(model, tok, prompts, sampled.replace(seed=8), batch_size=4)
    assert [g.tokens for g in e] != [g.tokens for g in a]


def test_stats_are_measured(tiny):
    model, tok = tiny
    prompts = [chat_prompt(tok, build_messages(u)) for u in ["hello", "a quorum is"]]
    gens = generate_batch(model, tok, prompts, Decoding(max_tokens=5), reset_peak_memory=True)
    s = gens.stats
    assert s.sequences == 2
    assert s.prompt_tokens == sum(len(p) for p in prompts)
    assert s.generation_tokens == sum(g.generation_tokens for g in gens) == 10
    assert s.prompt_tps > 0 and s.decode_tps > 0 and s.generation_tps > 0
    assert s.peak_memory_gb > 0
    assert 0 < gens[0].elapsed_s <= s.wall_time
    one = generate_one(model, tok, prompts[0], Decoding(max_tokens=5))
    assert one.prompt_tps > 0 and one.generation_tps > 0 and one.peak_memory_gb > 0


def test_bad_arguments(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="empty prompt"):
        generate_batch(model, tok, [[]])
    with pytest.raises(ValueError, match="empty prompt"):
        generate_one(model, tok, [])
    with pytest.raises(ValueError, match="max_tokens"):
        Decoding(max_tokens=0)
    with pytest.raises(ValueError, match="seeds"):
        generate_batch(model, tok, [[5], [6]], Decoding(temperature=1.0), seeds=[1])
    with pytest.raises(ValueError, match="top_p"):
        make_sampler(1.0, top_p=0.0)
    assert generate_batch(model, tok, []) == []


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
    assert bad.returncode == 2 and "--max-tokens: expected an integer > 0, got 0" in bad.stderr


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


class FixedLogits(nn.Module):
    """The tiny model with its head replaced by one fixed logit vector: a real forward pass
    (the KV caches fill as usual) whose greedy choice is known by construction."""

    def __init__(self, inner: nn.Module, logits: list[float]):
        super().__init__()
        self.inner = inner
        self.fixed = mx.array(logits)

    @property
    def layers(self) -> list:
        return self.inner.layers

    def __call__(self, inputs: mx.array, cache=None) -> mx.array:
        return self.inner(inputs, cache=cache) * 0 + self.fixed


def _ranked_words(tok, k: int) -> list[int]:
    """``k`` token ids that are neither end-of-sequence nor whitespace."""
    exempt = whitespace_token_ids(tok) | set(tok.eos_token_ids)
    return [i for i in range(10, 400) if i not in exempt and tok.decode([i]).strip()][:k]


def _fixed_model(tiny, scores: dict[int, float]) -> FixedLogits:
    model, _ = tiny
    logits = [-10.0] * model.args.vocab_size
    for token, score in scores.items():
        logits[token] = score
    return FixedLogits(model, logits)


def test_no_repeat_ngram_in_generation(tiny):
    _, tok = tiny
    a, b, c = _ranked_words(tok, 3)
    # Greedy always picks a: without the constraint the answer is a, a, a, ... by construction.
    model = _fixed_model(tiny, {a: 3.0, b: 2.0, c: 1.0})
    prompts = [chat_prompt(tok, build_messages(u)) for u in ["hello world", "a quorum", "fox"]]
    free = generate_batch(model, tok, prompts, Decoding(max_tokens=12), batch_size=3)
    assert all(g.tokens == [a] * 12 for g in free)
    nrng = Decoding(max_tokens=12, no_repeat_ngram=3)
    shaped = generate_batch(model, tok, prompts, nrng, batch_size=2)
    for p, g in zip(prompts, shaped, strict=True):
        grams = _ngrams(g.tokens, 3)
        assert len(set(grams)) == len(grams), g.tokens
        # Once (a, a, a) has been generated, (a, a) may not be followed by a again.
        assert g.tokens[:4] == [a, a, a, b]
        single = generate_one(model, tok, p, nrng)
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
    _, tok = tiny
    a, b = _ranked_words(tok, 2)
    # Penalty 1.5 divides a's logit once a is in the context: 3.0 / 1.5 < 2.5, so b comes next.
    model = _fixed_model(tiny, {a: 3.0, b: 2.5})
    prompts = [_raw(tok, "hello world")]
    free = generate_batch(model, tok, prompts, Decoding(max_tokens=4))
    penalized = generate_batch(model, tok, prompts, Decoding(max_tokens=4, repetition_penalty=1.5))
    assert free[0].tokens == [a] * 4
    assert penalized[0].tokens[:2] == [a, b]


@pytest.mark.parametrize("path", ["batch", "shared_prefix", "single"])
def test_stop_strings_end_the_text_before_their_first_occurrence(tiny, tiny_dir, path):
    from distiller.generate import use_shared_prefix
    from distiller.models import load_model

    model, tok = load_model(str(tiny_dir)) if path == "shared_prefix" else tiny
    scaffold = list(range(100, 180)) if path == "shared_prefix" else []
    prompts = [scaffold + _raw(tok, t) for t in ["hello world", "lazy dog", "forty-two"]]

    def run(stop=()):
        decoding = Decoding(max_tokens=24, stop=stop)
        if path == "single":
            return [generate_one(model, tok, p, decoding) for p in prompts]
        return list(generate_batch(model, tok, prompts, decoding, batch_size=2))

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
