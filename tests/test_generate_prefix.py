"""Shared-prefix KV caching in batched generation: same tokens, less prefill."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from distiller.decoding import Decoding
from distiller.generate import generate_batch, shared_prefix_length


@given(
    prefix=st.lists(st.integers(0, 5), max_size=20),
    tails=st.lists(st.lists(st.integers(0, 5), min_size=1, max_size=6), min_size=2, max_size=5),
)
def test_shared_prefix_length_is_the_longest_common_prefix(prefix, tails):
    prompts = [prefix + t for t in tails]
    n = shared_prefix_length(prompts)
    assert all(p[:n] == prompts[0][:n] for p in prompts)  # it is common
    assert all(len(p) > n for p in prompts)  # every prompt keeps a token to prefill
    longer_is_common = all(len(p) > n + 1 for p in prompts) and len({p[n] for p in prompts}) == 1
    assert not longer_is_common  # and it is the longest such
    assert n >= min(len(prefix), min(len(p) for p in prompts) - 1)


def test_prefix_cache_changes_nothing_but_the_work(tiny_model_dir):
    from distiller.models import load_model

    model, tokenizer = load_model(str(tiny_model_dir))
    scaffold = list(range(100, 180))  # an 80-token shared "system prompt + few-shot"
    prompts = [[*scaffold, 200 + i, 300 + i, 400] for i in range(5)]
    twelve = Decoding(max_tokens=12)
    cached = generate_batch(model, tokenizer, prompts, twelve, batch_size=3)
    plain = generate_batch(model, tokenizer, prompts, twelve, batch_size=3, min_shared_prefix=10**9)
    assert [g.tokens for g in cached] == [g.tokens for g in plain]
    assert cached.stats.cached_prompt_tokens == 80 * 4
    assert plain.stats.cached_prompt_tokens == 0
    assert cached.stats.prompt_tokens == plain.stats.prompt_tokens == sum(map(len, prompts))


class _StopsAt:
    """The tokenizer, with other end-of-sequence tokens (to end sequences at chosen steps)."""

    def __init__(self, tokenizer, eos: set[int]):
        self._tokenizer, self.eos_token_ids = tokenizer, eos

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from distiller.models import load_model

    return load_model(str(tiny_model_dir))


def _uneven_prompts() -> list[list[int]]:
    scaffold = list(range(100, 180))  # 80 shared tokens
    return [[*scaffold, *range(200 + 10 * i, 200 + 10 * i + 1 + i % 4)] for i in range(7)]


@pytest.mark.parametrize("fast_ops", ["1", "0"])
def test_shared_prefix_decoding_matches_plain_generation(tiny, monkeypatch, fast_ops):
    """Uneven suffixes (left padding), the n-gram guard and sequences ending at different
    steps: the one-prefix cascade path (CPU fast ops) and the copied-cache path (fast ops off)
    both give exactly what greedy generation without prefix sharing gives."""
    from distiller.generate import use_shared_prefix

    monkeypatch.setenv("DISTILLER_FAST_OPS", fast_ops)
    model, tokenizer = tiny
    prompts = _uneven_prompts()
    assert use_shared_prefix(model, prompts, 64) == (fast_ops == "1")
    kwargs = dict(decoding=Decoding(max_tokens=10, no_repeat_ngram=3), batch_size=4)
    first = generate_batch(model, tokenizer, prompts, min_shared_prefix=10**9, **kwargs)
    # End some sequences early: make tokens they produce mid-way end-of-sequence tokens.
    eos = {first[1].tokens[3], first[4].tokens[6]}
    stopping = _StopsAt(tokenizer, eos)
    plain = generate_batch(model, stopping, prompts, min_shared_prefix=10**9, **kwargs)
    shared = generate_batch(model, stopping, prompts, **kwargs)
    assert {g.finish_reason for g in plain} == {"stop", "length"}
    assert [g.tokens for g in shared] == [g.tokens for g in plain]
    assert [g.finish_reason for g in shared] == [g.finish_reason for g in plain]
    assert [g.generation_tokens for g in shared] == [g.generation_tokens for g in plain]
    assert shared.stats.generation_tokens == plain.stats.generation_tokens
    assert shared.stats.cached_prompt_tokens == 80 * (len(prompts) - 1)


def test_shared_prefix_sampling_is_seeded(tiny):
    """Sampled tokens are compared run against run, not against the other paths: MLX's
    categorical draw can move to a neighbouring token when the logits change by float
    rounding (measured: 3e-6), so only greedy outputs are comparable across paths."""
    model, tokenizer = tiny
    prompts = _uneven_prompts()
    sampled = Decoding(max_tokens=8, temperature=0.9, no_repeat_ngram=3)
    once = generate_batch(model, tokenizer, prompts, sampled.replace(seed=5), batch_size=4)
    again = generate_batch(model, tokenizer, prompts, sampled.replace(seed=5), batch_size=4)
    other = generate_batch(model, tokenizer, prompts, sampled.replace(seed=6), batch_size=4)
    assert [g.tokens for g in once] == [g.tokens for g in again]
    assert [g.tokens for g in once] != [g.tokens for g in other]
    assert len({tuple(g.tokens) for g in once}) == len(prompts)  # per-sequence seeds


def test_shared_prefix_cache_gives_the_logits_of_each_prompt_alone(tiny):
    import mlx.core as mx

    from distiller.generate import _prefill_prefix
    from distiller.shared_prefix import prefix_caches

    model, _ = tiny
    prompts = _uneven_prompts()
    n = shared_prefix_length(prompts)
    prefix_cache, _ = _prefill_prefix(model, prompts[0][:n])
    suffixes = [p[n:] for p in prompts]
    width = max(map(len, suffixes))
    padding = [width - len(s) for s in suffixes]
    cache = prefix_caches(prefix_cache, padding)
    batch = mx.array([[0] * pad + s for pad, s in zip(padding, suffixes, strict=True)])
    together = model(batch, cache=cache)
    for i, p in enumerate(prompts):
        alone = model(mx.array(p)[None])[0, n:]
        got = together[i, padding[i] :]
        assert mx.allclose(got, alone, atol=1e-4, rtol=1e-4).item(), i
