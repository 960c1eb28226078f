"""Throughput of JSON-Schema-constrained decoding beside unconstrained, on the embedded model.

Each test benchmarks the constrained call (pytest-benchmark, one round: a fresh measurement)
and runs the same prompts unconstrained right after it, each held to the number of tokens its
constrained run took, so both decode as many tokens after the same prefill. ``extra_info``
holds both decode rates (wall clock), both CPU milliseconds per generated token (CPU time of
the process: steadier than wall time on a machine shared with other jobs), their ratios, and
the constraint processor's own cost per token (its calls replayed on the tokens the model
wrote, without the model), and the machine's GEMM and read bandwidth measured right after
(``doctor.machine_figures``).

No test holds a speed target. Each checks what holds by construction: every constrained
output is complete (ends with the end token) and validates; tokens counted are the tokens
returned; the processor's own time over a run's tokens fits inside that run's decode time.
"""

from __future__ import annotations

import json
import time

import jsonschema
import mlx.core as mx
import pytest

from distiller.decoding import Decoding
from distiller.doctor import machine_figures

pytestmark = [pytest.mark.throughput, pytest.mark.slow, pytest.mark.real_model]

MODEL = "smollm2-135m-instruct"
# Every value SCHEMA accepts, with the whitespace the constraint allows, has fewer bytes than
# this (strings: 6 bytes a character at most), so a constrained run always ends with its value.
CONSTRAINED_MAX_TOKENS = 1200
BATCH = 8

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 30},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "city": {"type": "string", "maxLength": 30},
        "employed": {"type": "boolean"},
        "languages": {"type": "array", "items": {"type": "string", "maxLength": 15},
                      "maxItems": 3},
    },
    "required": ["name", "age", "city", "employed", "languages"],
    "additionalProperties": False,
}  # fmt: skip

DOCUMENTS = [
    "Maria Lopez is 34 years old and lives in Lisbon, where she works as a nurse. She speaks "
    "Portuguese, Spanish and English.",
    "John Smith, 52, retired last year and moved from Chicago to Denver. He speaks English.",
    "Aiko Tanaka (27) is a software engineer in Osaka who speaks Japanese and English.",
    "Pierre Dubois is a 45-year-old unemployed baker from Lyon; he speaks French.",
    "Olu Adeyemi, 61, teaches history in Lagos and speaks Yoruba, English and French.",
    "Sven Berg is 19, studies in Uppsala, has no job and speaks Swedish and German.",
    "Priya Nair, aged 38, is a lawyer in Kochi; she speaks Malayalam, Hindi and English.",
    "Tomas Novak, 29, drives a tram in Prague and speaks Czech.",
]


@pytest.fixture(scope="module")
def real():
    from distiller.generate import build_messages, chat_prompt
    from distiller.models import load_model

    model, tokenizer = load_model(MODEL)
    prompts = [
        chat_prompt(
            tokenizer,
            build_messages(f"Extract name, age, city, employed and languages as JSON:\n{doc}"),
        )
        for doc in DOCUMENTS
    ]
    return model, tokenizer, prompts


def _timed(benchmark, fn):
    """(result, wall seconds, CPU seconds): ``benchmark.pedantic`` once, clocks around it."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = benchmark.pedantic(fn, rounds=1, iterations=1, warmup_rounds=0)
    return result, time.perf_counter() - wall, time.process_time() - cpu


def _cpu(fn):
    cpu = time.process_time()
    result = fn()
    return result, time.process_time() - cpu


def _check_constrained(gens) -> None:
    for g in gens:
        assert g.finish_reason == "stop", g.text
        assert g.generation_tokens == len(g.tokens) + 1, g
        jsonschema.validate(json.loads(g.text), SCHEMA)


def _processor_ms_per_token(tokenizer, prompt: list[int], tokens: list[int], vocab: int) -> float:
    """The constraint processor's own time per call, replaying ``tokens`` without the model."""
    from distiller.constrain import json_schema_processor

    process = json_schema_processor(tokenizer, Decoding(json_schema=SCHEMA).json_schema)
    logits = mx.zeros((1, vocab))
    context = list(prompt)
    start = time.perf_counter()
    for token in [*tokens, None]:
        mx.eval(process(mx.array(context), logits))
        if token is not None:
            context.append(token)
    return (time.perf_counter() - start) * 1e3 / (len(tokens) + 1)


def _figures(constrained: tuple[float, float, int], plain: tuple[float, float, int]) -> dict:
    """Each of ``constrained`` and ``plain``: (decode tok/s, CPU seconds, generated tokens)."""
    (c_tps, c_cpu, c_tokens), (p_tps, p_cpu, p_tokens) = constrained, plain
    c_cpu_ms, p_cpu_ms = 1e3 * c_cpu / c_tokens, 1e3 * p_cpu / p_tokens
    return {
        "constrained_tokens": c_tokens,
        "unconstrained_tokens": p_tokens,
        "constrained_decode_tps": c_tps,
        "unconstrained_decode_tps": p_tps,
        "decode_tps_ratio": c_tps / p_tps,
        "constrained_cpu_ms_per_token": c_cpu_ms,
        "unconstrained_cpu_ms_per_token": p_cpu_ms,
        "cpu_per_token_ratio": c_cpu_ms / p_cpu_ms,
    }


def test_single_stream_constrained_decode(benchmark, real):
    from distiller.generate import generate_one

    model, tokenizer, prompts = real
    constrained = Decoding(json_schema=SCHEMA, max_tokens=CONSTRAINED_MAX_TOKENS)
    chosen = prompts[:2]
    generate_one(model, tokenizer, chosen[0], constrained.replace(max_tokens=4))  # compile, warm
    gens, outer_s, cpu_s = _timed(
        benchmark, lambda: [generate_one(model, tokenizer, p, constrained) for p in chosen]
    )
    unconstrained, plain_cpu_s = _cpu(
        lambda: [
            generate_one(model, tokenizer, p, Decoding(max_tokens=len(g.tokens)))
            for p, g in zip(chosen, gens, strict=True)
        ]
    )
    _check_constrained(gens)

    def tps(gs) -> float:  # decode rate over the prompts: tokens / summed decode time
        return sum(g.generation_tokens for g in gs) / sum(
            g.generation_tokens / g.generation_tps for g in gs
        )

    def tokens(gs) -> int:
        return sum(g.generation_tokens for g in gs)

    vocab = model(mx.array([[1]])).shape[-1]
    processor_ms = _processor_ms_per_token(tokenizer, chosen[0], gens[0].tokens, vocab)
    benchmark.extra_info.update(
        model=MODEL,
        sequences=len(gens),
        processor_ms_per_token=processor_ms,
        **machine_figures(),
        **_figures((tps(gens), cpu_s, tokens(gens)), (tps(unconstrained), plain_cpu_s,
                                                      tokens(unconstrained))),
    )  # fmt: skip
    decode_s = [g.generation_tokens / g.generation_tps for g in gens]
    assert sum(decode_s) <= outer_s, (decode_s, outer_s)
    assert processor_ms * gens[0].generation_tokens / 1e3 <= decode_s[0], (processor_ms, gens[0])
    assert all(g.generation_tps > 0 for g in [*gens, *unconstrained])
    assert all(len(u.tokens) <= len(g.tokens) for u, g in zip(unconstrained, gens, strict=True))


def test_batched_constrained_decode(benchmark, real):
    from distiller.generate import generate_batch

    model, tokenizer, prompts = real
    constrained = Decoding(json_schema=SCHEMA, max_tokens=CONSTRAINED_MAX_TOKENS)
    generate_batch(model, tokenizer, prompts[:2], constrained.replace(max_tokens=4))  # warm
    gens, outer_s, cpu_s = _timed(
        benchmark, lambda: generate_batch(model, tokenizer, prompts, constrained, batch_size=BATCH)
    )
    plain = Decoding(max_tokens=max(len(g.tokens) for g in gens))
    unconstrained, plain_cpu_s = _cpu(
        lambda: generate_batch(model, tokenizer, prompts, plain, batch_size=BATCH)
    )
    _check_constrained(gens)
    st, sp = gens.stats, unconstrained.stats
    benchmark.extra_info.update(
        model=MODEL,
        sequences=st.sequences,
        batch_size=BATCH,
        **machine_figures(),
        **_figures(
            (st.decode_tps, cpu_s, st.generation_tokens),
            (sp.decode_tps, plain_cpu_s, sp.generation_tokens),
        ),
    )
    assert st.sequences == len(gens) == len(prompts)
    assert st.generation_tokens == sum(g.generation_tokens for g in gens)
    assert st.prompt_time + st.decode_time <= st.wall_time * 1.01 + 1e-3 <= outer_s * 1.01 + 1e-3
    assert st.decode_tps > 0 and sp.decode_tps > 0
