"""Shared-prefix KV caching in batched generation: same tokens, less prefill."""

from hypothesis import given
from hypothesis import strategies as st

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
    cached = generate_batch(model, tokenizer, prompts, max_tokens=12, batch_size=3)
    plain = generate_batch(
        model, tokenizer, prompts, max_tokens=12, batch_size=3, min_shared_prefix=10**9
    )
    assert [g.tokens for g in cached] == [g.tokens for g in plain]
    assert cached.stats.cached_prompt_tokens == 80 * 4
    assert plain.stats.cached_prompt_tokens == 0
    assert cached.stats.prompt_tokens == plain.stats.prompt_tokens == sum(map(len, prompts))
