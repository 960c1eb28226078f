"""Decode and prefill speed of the embedded model (SmolLM2-135M-Instruct, float32), beside the
machine's own figures: single-stream greedy decode (``generate_one``: what ``distiller
generate``, ``eval --latency`` and the server run), batched decode (``generate_batch``) and
prefill (one forward over a long prompt).

Each benchmark's ``extra_info`` holds its tokens/s, the machine's measured float32 GEMM GFLOP/s
and one-thread memory read bandwidth, and for decode the bandwidth bound (weight bytes / read
bandwidth: every weight is read once per step) and the share of it reached. README "Decode
speed" explains the figures. No speed target is asserted (the machine is shared); what is
asserted holds by construction: tokens counted are tokens returned, and the reported times nest
inside a clock read around the call.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

import distiller  # noqa: F401  (must precede mlx: it loads the fast BLAS)

pytestmark = [pytest.mark.throughput, pytest.mark.slow, pytest.mark.real_model]

MODEL = "smollm2-135m-instruct"
TOKENS = 64
BATCH = 8
PREFILL = 512
TOPICS = ["quorum", "leader election", "idempotency", "backpressure", "consistent hashing",
          "vector clocks", "two-phase commit", "gossip protocols"]  # fmt: skip


@pytest.fixture(scope="module")
def loaded() -> tuple[Any, Any]:
    from distiller.models import load_model

    return load_model(MODEL)


@pytest.fixture(scope="module")
def weight_bytes(loaded) -> int:
    from mlx.utils import tree_flatten

    return sum(v.nbytes for _, v in tree_flatten(loaded[0].parameters()))


@pytest.fixture
def machine(weight_bytes) -> dict[str, Any]:
    """``doctor.machine_figures`` (measured now, next to this benchmark) and the bandwidth bound:
    weight bytes / one thread's read bandwidth, the tok/s at which reading every weight once per
    token would take all the time."""
    from distiller.doctor import machine_figures

    figures = machine_figures()
    bound = figures["read_bandwidth_gbps"] * 1e9 / weight_bytes
    return {**figures, "weight_mb": weight_bytes / 1e6, "bandwidth_bound_tps": bound}


def _prompts(tokenizer: Any, n: int) -> list[list[int]]:
    from distiller.generate import build_messages, chat_prompt

    return [
        chat_prompt(tokenizer, build_messages(f"Explain {TOPICS[i % len(TOPICS)]} in detail."))
        for i in range(n)
    ]


def _timed(benchmark, fn):
    start = time.perf_counter()
    result = benchmark.pedantic(fn, rounds=1, iterations=1, warmup_rounds=0)
    return result, time.perf_counter() - start


def test_single_stream_decode(benchmark, loaded, machine):
    from distiller.decoding import Decoding
    from distiller.generate import generate_one

    model, tokenizer = loaded
    prompt = _prompts(tokenizer, 1)[0]
    generate_one(model, tokenizer, prompt, Decoding(max_tokens=4))  # warm up
    g, outer_s = _timed(
        benchmark, lambda: generate_one(model, tokenizer, prompt, Decoding(max_tokens=TOKENS))
    )
    benchmark.extra_info.update(
        machine, decode_tps=g.generation_tps, prefill_tps=g.prompt_tps,
        tokens=g.generation_tokens,
        share_of_bandwidth_bound=g.generation_tps / machine["bandwidth_bound_tps"],
    )  # fmt: skip
    assert len(g.tokens) <= g.generation_tokens <= TOKENS, g
    assert g.elapsed_s <= outer_s, (g, outer_s)
    # Decoding the tokens took at least (tokens - 1) / rate seconds of the call.
    assert (g.generation_tokens - 1) / g.generation_tps <= outer_s, (g, outer_s)


def test_batched_decode(benchmark, loaded, machine):
    from distiller.decoding import Decoding
    from distiller.generate import generate_batch

    model, tokenizer = loaded
    prompts = _prompts(tokenizer, BATCH)
    gens, outer_s = _timed(benchmark, lambda: generate_batch(
        model, tokenizer, prompts, Decoding(max_tokens=TOKENS), batch_size=BATCH))  # fmt: skip
    st = gens.stats
    benchmark.extra_info.update(
        machine,
        batch=BATCH,
        decode_tps=st.decode_tps,
        generation_tps=st.generation_tps,
        prefill_tps=st.prompt_tps,
    )
    assert st.generation_tokens == sum(g.generation_tokens for g in gens) >= BATCH
    assert st.prompt_time + st.decode_time <= st.wall_time * 1.01 + 1e-3 <= outer_s * 1.01 + 1e-3
    assert st.generation_tokens / outer_s <= st.generation_tps, (st, outer_s)


def test_prefill(benchmark, loaded, machine):
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    model, tokenizer = loaded
    ids = [t for p in _prompts(tokenizer, 16) for t in p][:PREFILL]
    assert len(ids) == PREFILL

    def prefill() -> float:
        cache = make_prompt_cache(model)
        start = time.perf_counter()
        mx.eval(model(mx.array(ids)[None], cache=cache))
        return time.perf_counter() - start

    prefill()  # warm up
    seconds, outer_s = _timed(benchmark, prefill)
    benchmark.extra_info.update(machine, tokens=PREFILL, prefill_tps=PREFILL / seconds)
    assert 0 < seconds <= outer_s
