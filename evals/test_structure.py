"""Structure gate: format compliance of each model on each held-out prompt set.

Threshold checks (``eval.thresholds.format_rate``, and ``section_rate`` for every section) apply
to the distilled student: it is the product; teacher and vanilla are context. Baseline checks
apply to every model: a significant drop against ``reports/baseline.json`` fails, at one-sided
``--distiller-alpha``: McNemar's exact test on the prompts whose verdict changed when the
baseline scored the same prompts, else the unpaired Newcombe test (see harness.gates).
"""

from __future__ import annotations

import pytest

from distiller.harness.gates import check_format_baseline, check_threshold, fail_with_samples
from distiller.harness.plugin import models

pytestmark = pytest.mark.structure


@models("distilled")
def test_format_rate_meets_threshold(
    distiller, distiller_task, distiller_prompt_set, distiller_model
):
    spec = distiller.spec(distiller_task)
    thresholds = spec.eval.thresholds
    if "format_rate" not in thresholds and "section_rate" not in thresholds:
        pytest.skip(f"{spec.name}: eval.thresholds sets neither format_rate nor section_rate")
    result = distiller.evaluate(distiller_model, distiller_prompt_set, distiller_task)
    problems = []
    if "format_rate" in thresholds:
        problems.append(
            check_threshold(result, "format rate", result.format_rate, thresholds["format_rate"])
        )
    if "section_rate" in thresholds:
        for header, rate in result.section_rates.items():
            problems.append(
                check_threshold(result, f"section {header!r}", rate, thresholds["section_rate"])
            )
    fail_with_samples(result, problems)


def test_format_rate_no_regression(
    distiller, distiller_task, distiller_prompt_set, distiller_model
):
    result = distiller.evaluate(distiller_model, distiller_prompt_set, distiller_task)
    if distiller.options.update_baseline:
        pytest.skip("--distiller-update-baseline: this run's figures become the baseline")
    entry = distiller.baseline_entry(result.task, result.prompt_set, result.model)
    if entry is None:
        pytest.skip(
            f"no baseline entry for {result.task}/{result.prompt_set}/{result.model} in "
            f"{distiller.options.baseline} (record one with --distiller-update-baseline)"
        )
    fail_with_samples(result, check_format_baseline(result, entry, distiller.options.alpha))
