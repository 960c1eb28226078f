"""Memory and size: peak memory in generation and training, parameters, disk size.

Peak figures are the model's weights plus what the measured work adds on top (MLX's peak is
process-wide; other models alive in the session are discounted). The distilled student must fit
in the vanilla student's budget; a layer-dropped student must be measurably smaller and faster.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.memory

BUDGET = 1.10  # distilled may use at most 10% more than vanilla (a fused adapter adds nothing)


def test_generation_peak_memory(distiller, distiller_task, distiller_model):
    # The evaluation of the held-out split measures it (batched generation, reset per model).
    result = distiller.evaluate(distiller_model, "split:test", distiller_task)
    m = result.metrics
    assert m["params"] > 0
    # The peak holds the weights plus the KV cache and activations of the batch.
    assert m["peak_memory_mb"] > m["weights_mb"] > 0, m
    distiller.extra.setdefault("generation peak MB", {})[distiller_model] = round(
        m["peak_memory_mb"], 1
    )


def test_training_step_peak_memory(distiller):
    if "vanilla" not in distiller.options.models:
        pytest.skip("needs the vanilla student (the model being trained)")
    figures = distiller.train_step("vanilla", steps=1)
    distiller.extra["LoRA train step peak MB (vanilla student)"] = round(
        figures["peak_memory_mb"], 1
    )
    # Training holds activations, LoRA gradients and optimizer state on top of the weights.
    weights_mb = distiller.evaluate("vanilla", "split:test").metrics["weights_mb"]
    assert figures["peak_memory_mb"] > weights_mb, figures


def test_distilled_within_vanilla_budget(distiller, distiller_task):
    if not {"vanilla", "distilled"} <= set(distiller.options.models):
        pytest.skip("needs both vanilla and distilled in --distiller-models")
    from distiller.evaluate import fixed_workload_peak_mb

    v = distiller.evaluate("vanilla", "split:test", distiller_task).metrics
    d = distiller.evaluate("distilled", "split:test", distiller_task).metrics
    problems = []
    if d["params"] > v["params"]:
        problems.append(f"params {d['params']:,} > vanilla {v['params']:,}")
    if d.get("disk_mb") and v.get("disk_mb") and d["disk_mb"] > BUDGET * v["disk_mb"]:
        problems.append(f"disk {d['disk_mb']:.1f} MB > {BUDGET:g} x vanilla {v['disk_mb']:.1f} MB")
    # The same generation work for both (an evaluation's peak also depends on how long each
    # model's answers are: a KV cache grows with them).
    ids = distiller.prompt_ids("vanilla", 8, distiller_task)
    peaks = {
        name: fixed_workload_peak_mb(distiller.model(name, distiller_task).load()[0], ids)
        for name in ("vanilla", "distilled")
    }
    distiller.extra["fixed-workload generation peak MB"] = {
        k: round(x, 1) for k, x in peaks.items()
    }
    if peaks["distilled"] > BUDGET * peaks["vanilla"]:
        problems.append(
            f"generation peak (same work) {peaks['distilled']:.0f} MB > {BUDGET:g} x vanilla "
            f"{peaks['vanilla']:.0f} MB"
        )
    assert not problems, f"{distiller_task}: distilled student over budget: " + "; ".join(problems)


@pytest.mark.throughput
@pytest.mark.slow
def test_layer_dropped_student_smaller_and_faster(distiller, tmp_path_factory):
    if "vanilla" not in distiller.options.models:
        pytest.skip("needs the vanilla student (the model layers are dropped from)")
    from distiller.evaluate import count_parameters, load_model, measure_latency
    from distiller.spec import DropLayersSpec
    from distiller.train.students import make_dropped_student

    vanilla = distiller.model("vanilla")
    if vanilla.path is None:
        pytest.skip(f"{vanilla.ref}: no local model directory to drop layers from")
    out = tmp_path_factory.mktemp("dropped")
    kept = make_dropped_student(vanilla.path, out, DropLayersSpec(keep_every=2))
    n_layers = len(vanilla.load()[0].layers)
    if len(kept) >= n_layers:
        pytest.skip(f"{vanilla.ref} has {n_layers} layers: too few to drop every second one")
    model, _ = vanilla.load()
    small, small_tok = load_model(out)
    n_full, n_small = count_parameters(model), count_parameters(small)
    ids = distiller.prompt_ids("vanilla", 2)
    full_lat = distiller.single_stream("vanilla", max_tokens=64)
    small_lat = measure_latency(small, small_tok, ids, max_tokens=64)
    distiller.extra["layer-dropped student (keep every 2nd)"] = {
        "layers": len(kept),
        "params": n_small,
        "decode_tps": round(small_lat.decode_tps, 1),
        "vanilla_decode_tps": round(full_lat.decode_tps, 1),
    }
    assert n_small < n_full
    # Embeddings are shared, so params shrink less than layers; decode time is mostly layers.
    assert small_lat.decode_tps > 1.2 * full_lat.decode_tps, (
        f"dropping to {len(kept)} layers: decode {small_lat.decode_tps:.1f} tok/s vs "
        f"{full_lat.decode_tps:.1f} tok/s for the full model"
    )
