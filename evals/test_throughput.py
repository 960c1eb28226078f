"""Throughput: single-stream prefill/decode, batched generation and training-step tok/s.

Each figure is measured with pytest-benchmark (``pytest evals --benchmark-only`` runs just these;
``--benchmark-autosave`` / ``--benchmark-compare --benchmark-compare-fail=mean:25%`` gate on
wall time across runs on the same machine) and stored in ``benchmark.extra_info``. Within one
session the distilled student is also compared with the vanilla one measured alongside it.
"""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.throughput, pytest.mark.slow]

MAX_TOKENS = 64  # enough decode steps for a stable rate, short enough for CI
BATCH = 8


def test_single_stream(benchmark, distiller, distiller_model):
    lat = benchmark.pedantic(
        lambda: distiller.single_stream(distiller_model, max_tokens=MAX_TOKENS),
        rounds=1,
        iterations=1,
    )
    benchmark.extra_info.update(
        model=distiller_model,
        ms_per_sample=lat.ms_per_sample,
        ms_per_token=lat.ms_per_token,
        prefill_tps=lat.prefill_tps,
        decode_tps=lat.decode_tps,
        peak_memory_mb=lat.peak_memory_mb,
    )
    assert lat.decode_tps > 0 and lat.prefill_tps > 0


def test_batched_generation(benchmark, distiller, distiller_model):
    from distiller.generate import generate_batch

    model, tokenizer = distiller.model(distiller_model).load()
    ids = distiller.prompt_ids(distiller_model, BATCH)
    gens = benchmark.pedantic(
        lambda: generate_batch(model, tokenizer, ids, MAX_TOKENS, batch_size=BATCH),
        rounds=1,
        iterations=1,
        warmup_rounds=0,
    )
    st = gens.stats
    benchmark.extra_info.update(
        model=distiller_model,
        sequences=st.sequences,
        prefill_tps=st.prompt_tps,
        decode_tps=st.decode_tps,
        generation_tps=st.generation_tps,
    )
    distiller.extra[f"batched generation tok/s ({distiller_model}, batch {len(ids)})"] = round(
        st.generation_tps, 1
    )
    assert st.generation_tokens > 0 and st.generation_tps > 0


def test_training_step(benchmark, distiller):
    if "vanilla" not in distiller.options.models:
        pytest.skip("needs the vanilla student (the model being trained)")
    figures = benchmark.pedantic(lambda: distiller.train_step("vanilla"), rounds=1, iterations=1)
    benchmark.extra_info.update(figures)
    distiller.extra["LoRA train step tok/s (vanilla student)"] = round(figures["tokens_per_s"], 1)
    assert figures["tokens_per_s"] > 0 and figures["trainable_params"] > 0


def test_distilled_not_slower_than_vanilla(distiller):
    if not {"vanilla", "distilled"} <= set(distiller.options.models):
        pytest.skip("needs both vanilla and distilled in --distiller-models")
    vanilla = distiller.single_stream("vanilla", max_tokens=MAX_TOKENS)
    distilled = distiller.single_stream("distilled", max_tokens=MAX_TOKENS)
    # Same architecture (a fused adapter) decodes at the same speed; 25% covers a shared box.
    assert distilled.decode_tps >= 0.75 * vanilla.decode_tps, (
        f"distilled decodes at {distilled.decode_tps:.1f} tok/s, vanilla at "
        f"{vanilla.decode_tps:.1f} tok/s (single stream, {MAX_TOKENS} tokens)"
    )
