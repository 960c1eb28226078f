"""Throughput: single-stream prefill/decode, batched generation and training-step tok/s.

Each figure is measured with pytest-benchmark (``pytest evals --benchmark-only`` runs just these;
``--benchmark-autosave`` / ``--benchmark-compare --benchmark-compare-fail=mean:25%`` gate on
wall time across runs on the same machine) and stored in ``benchmark.extra_info``. The timed
function does the work it reports (a fresh measurement, never a memo hit); models are loaded
and prompts rendered before it.

Every ``extra_info`` also holds the machine's GEMM GFLOP/s and read bandwidth, measured right
after the call (``distiller.doctor.machine_figures``): a shared machine's speed varies, and a
rate means little without what the machine gave at that moment.

No test here holds a speed target. Each checks that its figures are consistent: tokens counted
are the tokens returned, and the reported times nest inside a clock the test reads around the
benchmarked call, so a rate cannot claim more tokens or less time than really went by. Within
one session the distilled student is also compared with the vanilla one measured alongside it.
"""

from __future__ import annotations

import time

import pytest

from distiller.doctor import machine_figures

pytestmark = [pytest.mark.throughput, pytest.mark.slow]

MAX_TOKENS = 64  # enough decode steps for a stable rate, short enough for CI
PROMPTS = 2  # single-stream prompts
BATCH = 8
# The reported times must cover at least this share of the benchmarked call: setup outside
# the generation's own clock (samplers, bookkeeping) is tiny next to decoding MAX_TOKENS tokens.
MEASURED_SHARE = 0.5


def timed(benchmark, fn):
    """(result, seconds): ``benchmark.pedantic`` once, and an outer clock around it."""
    start = time.perf_counter()
    result = benchmark.pedantic(fn, rounds=1, iterations=1, warmup_rounds=0)
    return result, time.perf_counter() - start


def test_single_stream(benchmark, distiller, distiller_model):
    distiller.model(distiller_model).load()  # loading (or building) the model is not timed
    lat, outer_s = timed(
        benchmark,
        lambda: distiller.single_stream(
            distiller_model, n=PROMPTS, max_tokens=MAX_TOKENS, fresh=True
        ),
    )
    benchmark.extra_info.update(
        machine_figures(),
        model=distiller_model,
        ms_per_sample=lat.ms_per_sample,
        ms_per_token=lat.ms_per_token,
        prefill_tps=lat.prefill_tps,
        decode_tps=lat.decode_tps,
        peak_memory_mb=lat.peak_memory_mb,
    )
    # The memo now holds this very measurement: later readers get what was timed.
    assert distiller.single_stream(distiller_model, n=PROMPTS, max_tokens=MAX_TOKENS) is lat
    assert lat.samples == PROMPTS and len(lat.per_sample_ms) == PROMPTS
    assert 1 <= lat.mean_output_tokens <= MAX_TOKENS, lat
    assert lat.ms_per_sample == pytest.approx(sum(lat.per_sample_ms) / PROMPTS)
    tokens = lat.mean_output_tokens * lat.samples
    assert lat.ms_per_token == pytest.approx(sum(lat.per_sample_ms) / tokens), lat
    measured_s = sum(lat.per_sample_ms) / 1e3
    assert MEASURED_SHARE * outer_s <= measured_s <= outer_s, (measured_s, outer_s, lat)
    assert lat.prefill_tps > 0 and lat.decode_tps > 0, lat


def test_batched_generation(benchmark, distiller, distiller_model):
    from distiller.generate import generate_batch

    model, tokenizer = distiller.model(distiller_model).load()
    ids = distiller.prompt_ids(distiller_model, BATCH)
    decoding = distiller.spec().eval.decoding.replace(max_tokens=MAX_TOKENS)
    gens, outer_s = timed(
        benchmark, lambda: generate_batch(model, tokenizer, ids, decoding, batch_size=BATCH)
    )
    st = gens.stats
    benchmark.extra_info.update(
        machine_figures(),
        model=distiller_model,
        sequences=st.sequences,
        prefill_tps=st.prompt_tps,
        decode_tps=st.decode_tps,
        generation_tps=st.generation_tps,
    )
    distiller.extra[f"batched generation tok/s ({distiller_model}, batch {len(ids)})"] = round(
        st.generation_tps, 1
    )
    # Tokens counted are the tokens returned, sequence by sequence.
    assert st.sequences == len(gens) == len(ids)
    assert st.prompt_tokens == sum(len(p) for p in ids)
    assert st.generation_tokens == sum(g.generation_tokens for g in gens)
    for g in gens:
        # ``tokens`` leaves out a final stop token, which still cost a decode step.
        assert len(g.tokens) <= g.generation_tokens <= min(len(g.tokens) + 1, MAX_TOKENS), g
        assert g.finish_reason in ("stop", "length")
        if g.finish_reason == "length":
            assert g.generation_tokens == MAX_TOKENS, g
    # The generation's clock nests inside the outer one, and the rates follow from the counts.
    assert MEASURED_SHARE * outer_s <= st.wall_time <= outer_s, (st, outer_s)
    assert st.prompt_time + st.decode_time <= st.wall_time * 1.01 + 1e-3, st
    assert st.generation_tokens / outer_s <= st.generation_tps, (st, outer_s)
    assert st.generation_tokens >= len(ids)  # every sequence decoded at least one token


@pytest.mark.parametrize("full", [False, True], ids=["lora", "full"])
def test_training_step(benchmark, distiller, full):
    """One training step of the vanilla student: LoRA (the spec's settings) or full
    fine-tuning, the same batch."""
    if "vanilla" not in distiller.options.models:
        pytest.skip("needs the vanilla student (the model being trained)")
    figures, outer_s = timed(benchmark, lambda: distiller.train_step("vanilla", full=full))
    benchmark.extra_info.update(figures, **machine_figures())
    what = "full fine-tune" if full else "LoRA"
    distiller.extra[f"{what} train step tok/s (vanilla student)"] = round(
        figures["tokens_per_s"], 1
    )
    # Each example of n tokens gives n - 1 (input, target) positions; padding is not counted.
    assert figures["tokens_per_step"] == figures["example_tokens"] - figures["examples"], figures
    assert figures["tokens_per_s"] == pytest.approx(figures["tokens_per_step"] / figures["step_s"])
    assert figures["steps"] * figures["step_s"] <= outer_s, (figures, outer_s)
    if full:  # every weight trains
        assert figures["trainable_params"] == figures["params"], figures
    else:  # LoRA trains its adapters only: the base weights stay frozen
        assert 0 < figures["trainable_params"] < figures["params"], figures


def test_distilled_speed_is_reported_beside_vanilla(distiller):
    """The distilled/vanilla decode ratio goes into the report, measured in the same session;
    a speed target is read there (and in the benchmark tables), not asserted here, where a
    busy machine would make it flake."""
    if not {"vanilla", "distilled"} <= set(distiller.options.models):
        pytest.skip("needs both vanilla and distilled in --distiller-models")
    vanilla = distiller.single_stream("vanilla", n=PROMPTS, max_tokens=MAX_TOKENS)
    distilled = distiller.single_stream("distilled", n=PROMPTS, max_tokens=MAX_TOKENS)
    ratio = distilled.decode_tps / vanilla.decode_tps
    distiller.extra["single-stream decode, distilled / vanilla"] = round(ratio, 2)
    # A fused adapter keeps the architecture: the same parameter count, so the same work.
    from distiller.evaluate import count_parameters

    (v, _), (d, _) = distiller.model("vanilla").load(), distiller.model("distilled").load()
    assert count_parameters(v) == count_parameters(d)
