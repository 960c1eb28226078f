"""Agreement gate: the distilled student against its teacher on held-out prompts.

A distilled student is worth its speed only if it keeps what the teacher does. Thresholds in
``eval.thresholds`` (checked for the distilled student; the teacher must be evaluated too):

- ``retention_<figure>``: the student's ``format_rate`` or task metric (``accuracy``,
  ``exact_match``, ...) divided by the teacher's on the same prompts, at least this;
- ``top1_agreement``: the share of the teacher's answer tokens where the student's most likely
  next token is the teacher's, at least this;
- ``kl_to_teacher``: mean KL(teacher || student) per answer token in nats, at most this.

Agreement is teacher-forced on the teacher's own greedy answers (``distiller.agreement``).
Retention is gated on its point estimate; the report shows both models' intervals.
"""

from __future__ import annotations

import pytest

from distiller.harness.gates import (
    AGREEMENT_THRESHOLDS,
    RETENTION_PREFIX,
    fail_with_samples,
    where,
)
from distiller.harness.plugin import models
from distiller.report import retention, summarize

pytestmark = pytest.mark.agreement


def _need_teacher(distiller, spec) -> None:
    if "teacher" not in distiller.options.models:
        pytest.skip("needs the teacher in --distiller-models")
    if not spec.teacher.model and spec.teacher.task is None:
        pytest.skip(f"{spec.name}: no local teacher model to compare with")


@models("distilled")
def test_retention_meets_threshold(
    distiller, distiller_task, distiller_prompt_set, distiller_model
):
    spec = distiller.spec(distiller_task)
    wanted = {
        k.removeprefix(RETENTION_PREFIX): v
        for k, v in spec.eval.thresholds.items()
        if k.startswith(RETENTION_PREFIX)
    }
    if not wanted:
        pytest.skip(f"{spec.name}: eval.thresholds has no retention_<figure>")
    _need_teacher(distiller, spec)
    teacher = distiller.evaluate("teacher", distiller_prompt_set, distiller_task)
    result = distiller.evaluate(distiller_model, distiller_prompt_set, distiller_task)
    mine, theirs = summarize(result), summarize(teacher)
    kept = retention(mine, theirs)
    problems = []
    for figure, threshold in wanted.items():
        if figure not in kept:
            have = ", ".join(kept) or "none"
            problems.append(
                f"{where(result)}: threshold retention_{figure}, but the teacher has no figure "
                f"{figure!r} above 0 to keep (retained figures: {have})"
            )
            continue
        value = kept[figure]
        if value < threshold - 1e-12:
            s = mine["format"]["value"] if figure == "format_rate" else mine["task_metrics"][figure]
            t = (
                theirs["format"]["value"]
                if figure == "format_rate"
                else theirs["task_metrics"][figure]
            )
            problems.append(
                f"{where(result)}: retention of {figure} {value:.3f} ({s:.3f} vs the teacher's "
                f"{t:.3f}, n={result.metrics['n']}) is below the spec threshold {threshold:g}"
            )
    fail_with_samples(result, problems)


@models("distilled")
def test_agreement_with_teacher_meets_thresholds(
    distiller, distiller_task, distiller_prompt_set, distiller_model
):
    spec = distiller.spec(distiller_task)
    wanted = {k: v for k, v in spec.eval.thresholds.items() if k in AGREEMENT_THRESHOLDS}
    _need_teacher(distiller, spec)
    figures = distiller.agreement(distiller_model, distiller_prompt_set, distiller_task)
    if not wanted:
        pytest.skip(
            f"{spec.name}: eval.thresholds sets neither top1_agreement nor kl_to_teacher "
            f"(measured: top-1 {figures['top1_agreement']:.3f}, KL {figures['kl_to_teacher']:.3f})"
        )
    result = distiller.evaluate(distiller_model, distiller_prompt_set, distiller_task)
    said = f"on {figures['tokens']} answer tokens of {figures['sequences']} teacher answers"
    problems = []
    if "top1_agreement" in wanted and figures["top1_agreement"] < wanted["top1_agreement"]:
        problems.append(
            f"{where(result)}: top-1 agreement with the teacher {figures['top1_agreement']:.3f} "
            f"{said} is below the spec threshold {wanted['top1_agreement']:g}"
        )
    if "kl_to_teacher" in wanted and figures["kl_to_teacher"] > wanted["kl_to_teacher"]:
        problems.append(
            f"{where(result)}: KL to the teacher {figures['kl_to_teacher']:.3f} nats/token "
            f"{said} is above the spec threshold {wanted['kl_to_teacher']:g}"
        )
    fail_with_samples(result, problems)
