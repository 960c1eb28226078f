"""The logit-KD training step with a live teacher beside the same step from the teacher-logit
cache, on the embedded model (teacher: SmolLM2-135M-Instruct; student: the same model with
every other layer dropped, LoRA as the spec's defaults).

pytest-benchmark times the cached step (one round: a fresh measurement); the live step runs
right after on the same batch. ``extra_info`` holds both step times, their ratio, the cache's
k and bytes per token and the time it took to build. No speed target is asserted (a busy
machine would make it flake); what is asserted holds by construction: both steps train on the
same supervised tokens, the cache holds exactly one entry per supervised token, and its size
is the format's bytes per token.

``kd_step_figures`` runs on any (teacher, student) pair, e.g. the tiny test models:
``python -c "from evals.test_kd_throughput import main; main()" [teacher_dir student_dir]``.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

import distiller  # noqa: F401  (must precede mlx: it loads the fast BLAS)

pytestmark = [pytest.mark.throughput, pytest.mark.slow, pytest.mark.real_model]

MODEL = "smollm2-135m-instruct"
TOP_K = 32
BATCH = 4
STEPS = 3

QUESTIONS = [
    "Explain in two sentences why the sky is blue.",
    "List three uses of a paperclip and say which is the most surprising.",
    "What is the difference between weather and climate?",
    "Write a haiku about a train leaving a station at night.",
]
ANSWER = (
    "Sunlight is scattered by the molecules of the air, and blue light, with its shorter "
    "wavelength, is scattered far more than red light, so the sky looks blue from every side. "
)


def _examples(tokenizer: Any) -> list:
    from distiller.train import batches as B

    rows = [
        [{"role": "user", "content": q}, {"role": "assistant", "content": ANSWER * 2}]
        for q in QUESTIONS[:BATCH]
    ]
    return [B.encode_chat(tokenizer, m, 512) for m in rows]


def _time_steps(step: Any, batch: dict, steps: int) -> float:
    step(batch)  # compile + first step: not timed
    start = time.perf_counter()
    for _ in range(steps):
        step(batch)
    return (time.perf_counter() - start) / steps


def kd_step_figures(
    teacher_ref: str, student_ref: str | None = None, top_k: int = TOP_K, steps: int = STEPS
) -> dict[str, Any]:
    """Seconds per logit-kd step with the live teacher and from the cache, on one batch."""
    import mlx.core as mx
    import mlx.optimizers as optim

    from distiller.models import load_model, resolve_model
    from distiller.spec import KDSpec, LogitCacheSpec, LoraSpec
    from distiller.train import batches as B
    from distiller.train import logit_cache as LC
    from distiller.train import routes as R
    from distiller.train import students as S
    from distiller.train.lora import adapter_config, prepare_trainable
    from distiller.train.step import make_train_step

    teacher_dir = resolve_model(teacher_ref)
    teacher, tokenizer = load_model(str(teacher_dir))
    teacher.freeze()
    teacher.eval()
    with tempfile.TemporaryDirectory() as tmp:
        if student_ref is None:  # every other layer of the teacher
            student_dir = Path(tmp) / "student"
            S.make_dropped_student(teacher_dir, student_dir, _keep_every_other())
            student_ref = str(student_dir)
        examples = _examples(tokenizer)
        kd = KDSpec(alpha=0.5, beta=0.5, temperature=2.0, cache=LogitCacheSpec(top_k=top_k))
        tic = time.perf_counter()
        cache, report = LC.build_cache(
            examples,
            Path(tmp) / "cache",
            LC.local_scorer(teacher, top_k, kd.temperature),
            fingerprint=LC.teacher_fingerprint(teacher_dir),
            top_k=top_k,
            temperature=kd.temperature,
        )
        build_s = time.perf_counter() - tic

        def fresh_step(loss_fn):
            model, _ = load_model(student_ref)
            prepare_trainable(model, adapter_config(model, LoraSpec(), False, student_ref))
            model.train()
            mx.eval(model.parameters())
            return make_train_step(model, optim.Adam(learning_rate=1e-5), loss_fn, workers=1)

        batch = B.collate(examples)
        cached_batch = LC.attach(batch, cache, list(range(len(examples))))
        cached_s = _time_steps(fresh_step(R.make_cached_kd_loss(kd)), cached_batch, steps)
        live_s = _time_steps(fresh_step(R.make_kd_loss(teacher, kd, {})), batch, steps)
    supervised = int(batch["sel_mask"].sum())
    return {
        "top_k": report.top_k,
        "bytes_per_token": LC.bytes_per_token(report.top_k),
        "bytes_per_token_on_disk": round(report.bytes_per_position, 1),
        "cached_positions": report.positions,
        "supervised_tokens": supervised,
        "cache_build_s": build_s,
        "live_step_s": live_s,
        "cached_step_s": cached_s,
        "live_over_cached": live_s / cached_s,
        "tokens_per_step": B.token_count(batch),
        # The live step's time includes the teacher's forward over the batch.
        "live_tokens_per_s": B.token_count(batch) / live_s,
        "cached_tokens_per_s": B.token_count(batch) / cached_s,
        "steps": steps,
    }


def _keep_every_other() -> Any:
    from distiller.spec import DropLayersSpec

    return DropLayersSpec(keep_every=2)


def test_kd_step_with_and_without_the_cache(benchmark):
    figures: dict[str, Any] = {}
    benchmark.pedantic(
        lambda: figures.update(kd_step_figures(MODEL)), rounds=1, iterations=1, warmup_rounds=0
    )
    from distiller.doctor import machine_figures

    benchmark.extra_info.update(figures, **machine_figures())
    assert figures["cached_positions"] == figures["supervised_tokens"] > 0, figures
    assert figures["bytes_per_token"] == 6 * figures["top_k"] + 4
    # The shard file adds only the npz container's headers to the arrays.
    assert figures["bytes_per_token"] <= figures["bytes_per_token_on_disk"], figures
    assert figures["bytes_per_token_on_disk"] < 1.2 * figures["bytes_per_token"] + 8, figures
    for route in ("live", "cached"):
        rate = figures[f"{route}_tokens_per_s"] * figures[f"{route}_step_s"]
        assert rate == pytest.approx(figures["tokens_per_step"]), figures


def main() -> None:
    args = sys.argv[1:]
    figures = kd_step_figures(args[0] if args else MODEL, args[1] if len(args) > 1 else None)
    for k, v in figures.items():
        print(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}")


if __name__ == "__main__":
    main()
