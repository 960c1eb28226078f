"""Quality gate: task metrics (accuracy, macro-F1, field accuracy, token F1) per model.

Thresholds in ``eval.thresholds`` other than format/section rates name task metrics; they apply
to the distilled student. ``accuracy_lift`` is the distilled student's accuracy minus the vanilla
student's on the same prompts (both decoded as the spec says): the point estimate must reach it
and the paired 95% interval of the lift must exclude 0. Against the baseline, a task metric (a mean of per-sample scores in
[0, 1]) is tested like a rate of round(value * n) successes in n: a mean of [0, 1] scores varies
no more than a Bernoulli rate with the same mean, so the test is conservative, never jumpy.
"""

from __future__ import annotations

import pytest

from distiller.harness.gates import (
    against_teacher,
    check_baseline,
    check_threshold,
    fail_with_samples,
    where,
)
from distiller.harness.plugin import models
from distiller.metrics import paired_difference_interval, rate
from distiller.report import prompt_verdicts

pytestmark = pytest.mark.quality

RATE_THRESHOLDS = ("format_rate", "section_rate")
LIFT_THRESHOLDS = ("accuracy_lift",)  # distilled minus vanilla (test_accuracy_lift_over_vanilla)


def _metric_rate(value: float, n: int):
    return rate(max(0, min(n, round(value * n))), n)


@models("distilled")
def test_task_metrics_meet_thresholds(
    distiller, distiller_task, distiller_prompt_set, distiller_model
):
    spec = distiller.spec(distiller_task)
    wanted = {
        k: v
        for k, v in spec.eval.thresholds.items()
        if k not in RATE_THRESHOLDS + LIFT_THRESHOLDS and not against_teacher(k)
    }
    if not wanted:
        pytest.skip(f"{spec.name}: eval.thresholds names no task metric")
    result = distiller.evaluate(distiller_model, distiller_prompt_set, distiller_task)
    task = result.metrics["task"]
    problems = []
    for name, threshold in wanted.items():
        value = task.get(name)
        if not isinstance(value, (int, float)):
            have = ", ".join(k for k, v in task.items() if isinstance(v, (int, float))) or "none"
            problems.append(
                f"{spec.name}: threshold on {name!r}, a metric this task lacks ({have})"
            )
            continue
        problems.append(
            check_threshold(result, name, _metric_rate(value, result.metrics["n"]), threshold)
        )
    fail_with_samples(result, problems)


def test_task_metrics_no_regression(
    distiller, distiller_task, distiller_prompt_set, distiller_model
):
    result = distiller.evaluate(distiller_model, distiller_prompt_set, distiller_task)
    if distiller.options.update_baseline:
        pytest.skip("--distiller-update-baseline: this run's figures become the baseline")
    entry = distiller.baseline_entry(result.task, result.prompt_set, result.model)
    if entry is None:
        pytest.skip(f"no baseline entry for {result.task}/{result.prompt_set}/{result.model}")
    base_metrics = entry.get("task_metrics", {})
    n = result.metrics["n"]
    shared = [
        k
        for k, v in result.metrics["task"].items()
        if k in base_metrics and isinstance(v, (int, float))
    ]
    if not shared:
        pytest.skip(f"{result.task}: no task metrics to compare")
    problems = []
    for name in shared:
        base_n = int(entry.get("n") or 0)
        base = _metric_rate(float(base_metrics[name]), base_n) if base_n else None
        new = _metric_rate(float(result.metrics["task"][name]), n)
        problems.append(
            check_baseline(
                result, name, new, base and {"k": base.k, "n": base.n}, distiller.options.alpha
            )
        )
    fail_with_samples(result, problems)


def test_distilled_not_worse_than_vanilla(distiller, distiller_task, distiller_prompt_set):
    chosen = distiller.options.models
    if not {"vanilla", "distilled"} <= set(chosen):
        pytest.skip("needs both vanilla and distilled in --distiller-models")
    vanilla = distiller.evaluate("vanilla", distiller_prompt_set, distiller_task)
    distilled = distiller.evaluate("distilled", distiller_prompt_set, distiller_task)
    # Both answered the same prompts: paired, like a baseline with per-prompt verdicts.
    v = vanilla.format_rate
    problem = check_baseline(
        distilled,
        "format rate",
        distilled.format_rate,
        {"k": v.k, "n": v.n, "by_prompt": prompt_verdicts(vanilla.records)},
        distiller.options.alpha,
        prompt_verdicts(distilled.records),
        against="the vanilla student",
    )
    fail_with_samples(distilled, [problem])


def test_accuracy_lift_over_vanilla(distiller, distiller_task, distiller_prompt_set):
    spec = distiller.spec(distiller_task)
    threshold = spec.eval.thresholds.get("accuracy_lift")
    if threshold is None:
        pytest.skip(f"{spec.name}: eval.thresholds has no accuracy_lift")
    if not {"vanilla", "distilled"} <= set(distiller.options.models):
        pytest.skip("needs both vanilla and distilled in --distiller-models")
    vanilla = distiller.evaluate("vanilla", distiller_prompt_set, distiller_task)
    distilled = distiller.evaluate("distilled", distiller_prompt_set, distiller_task)
    if "accuracy" not in distilled.metrics["task"]:
        pytest.fail(f"{spec.name}: accuracy_lift needs labelled prompts and a label validator")
    right_v = {r["id"]: r.get("prediction") == r["label"] for r in vanilla.records}
    right_d = {r["id"]: r.get("prediction") == r["label"] for r in distilled.records}
    if right_v.keys() != right_d.keys():
        pytest.fail(f"{spec.name}: vanilla and distilled scored different prompts")
    pairs = [(right_d[i], right_v[i]) for i in right_d]
    both = sum(d and v for d, v in pairs)
    only_d = sum(d and not v for d, v in pairs)
    only_v = sum(v and not d for d, v in pairs)
    lo, hi = paired_difference_interval(both, only_d, only_v, len(pairs) - both - only_d - only_v)
    lift = (only_d - only_v) / len(pairs)
    figure = (
        f"accuracy lift over vanilla {lift:+.3f} [{lo:+.3f}, {hi:+.3f}] (paired 95%, n="
        f"{len(pairs)}; distilled {both + only_d}, vanilla {both + only_v} correct)"
    )
    problems = []
    if lift < threshold - 1e-12:
        problems.append(f"{where(distilled)}: {figure} is below the spec threshold {threshold:g}")
    elif lo <= 0:
        problems.append(f"{where(distilled)}: {figure}: sampling noise explains it")
    fail_with_samples(distilled, problems)
