"""Gates: threshold and baseline-regression checks, with their failure messages.

Each check returns ``None`` when it passes, else one line that says what failed, where (model,
task, prompt set), against what, and by which test; ``fail_with_samples`` fails the test with
every problem and a few failing samples with their validator reasons.

Against a baseline, a pass rate is compared prompt by prompt when it can be: when the baseline
kept each prompt's verdict for the figure (baseline version 2) and scored the same prompt ids as
this run, McNemar's exact test runs on the prompts whose verdict changed
(``metrics.paired_regression_test``). Otherwise (other prompts, a version-1 baseline, a figure
with no per-prompt verdicts such as a task metric's mean) the two rates are compared as
independent samples (``metrics.regression_test``, Newcombe). The message names the test and,
for the unpaired one, why pairing was not possible.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from distiller.metrics import Rate, meets_threshold, paired_regression_test, regression_test
from distiller.report import prompt_verdicts

# eval.thresholds that are not a task metric of the student alone (evals/test_agreement.py):
RETENTION_PREFIX = "retention_"  # retention_<figure>: the student's figure / the teacher's
AGREEMENT_THRESHOLDS = ("top1_agreement", "kl_to_teacher")  # at least / at most


def against_teacher(name: str) -> bool:
    """Whether a threshold compares the student with its teacher."""
    return name.startswith(RETENTION_PREFIX) or name in AGREEMENT_THRESHOLDS


def where(result: Any) -> str:
    return f"model={result.model} task={result.task} prompts={result.prompt_set}"


def samples_text(result: Any, n: int = 3, width: int = 160) -> str:
    lines = []
    for rec in result.failing(n):
        out = " ".join(rec["output"].split())
        out = out if len(out) <= width else out[: width - 1] + "…"
        reasons = "; ".join(rec["reasons"][:3]) or "(no reason recorded)"
        lines.append(f"  - [{rec['id']}] {reasons}\n      output: {out!r}")
    return "\n".join(lines) if lines else "  (no failing samples)"


def check_threshold(result: Any, figure: str, rate: Rate, threshold: float) -> str | None:
    """A failure message if ``rate`` is below ``threshold``, else None."""
    if meets_threshold(rate, threshold):
        return None
    return f"{where(result)}: {figure} {rate} is below the spec threshold {threshold:g}"


def _why_unpaired(
    base: Mapping[str, Any], new: Rate, verdicts: Mapping[str, bool] | None
) -> str | None:
    """Why this figure cannot be tested paired, or None when it can."""
    if verdicts is None:
        return "this run has no per-prompt verdicts for the figure"
    if (len(verdicts), sum(map(bool, verdicts.values()))) != (new.n, new.k):
        return "this run's per-prompt verdicts do not add up to its rate (repeated prompt ids?)"
    by_prompt = base.get("by_prompt")
    if by_prompt is None:
        return "the baseline keeps only counts for it (a version-1 entry)"
    only_base, only_new = set(by_prompt) - set(verdicts), set(verdicts) - set(by_prompt)
    if only_base or only_new:
        return (
            f"the prompt sets differ ({len(only_base)} ids only in the baseline, "
            f"{len(only_new)} only in this run)"
        )
    return None


def check_baseline(
    result: Any,
    figure: str,
    new: Rate,
    base: Mapping[str, Any] | None,
    alpha: float,
    verdicts: Mapping[str, bool] | None = None,
    against: str = "baseline",
) -> str | None:
    """A failure message if ``new`` is significantly below ``base`` (a baseline rate entry:
    ``k``, ``n`` and, when kept, ``by_prompt``), else None. ``verdicts`` are this run's
    ``{prompt id: passed}`` for the figure; with the baseline's they make the test paired."""
    if not base or not base.get("n"):
        return None
    why = _why_unpaired(base, new, verdicts)
    if why is None:
        paired = paired_regression_test(base["by_prompt"], verdicts or {}, alpha)
        if not paired.regressed:
            return None
        test, explanation = f"paired McNemar exact test on {new.n} prompts", paired.explain()
    else:
        unpaired = regression_test(int(base["k"]), int(base["n"]), new.k, new.n, alpha=alpha)
        if not unpaired.regressed:
            return None
        test, explanation = f"unpaired Newcombe test: {why}", unpaired.explain()
    return f"{where(result)}: {figure} regressed vs {against} ({test}): {explanation}"


def check_format_baseline(result: Any, entry: Mapping[str, Any], alpha: float) -> list[str]:
    """Problems of the format rate and of each section rate of ``result`` against a baseline
    entry (``summarize``'s form), each paired with the baseline's prompts where it can be."""
    problems = [
        check_baseline(
            result,
            "format rate",
            result.format_rate,
            entry.get("format"),
            alpha,
            prompt_verdicts(result.records),
        )
    ]
    for header, rate in result.section_rates.items():
        problems.append(
            check_baseline(
                result,
                f"section {header!r}",
                rate,
                (entry.get("sections") or {}).get(header),
                alpha,
                prompt_verdicts(result.records, header),
            )
        )
    return [p for p in problems if p]


def fail_with_samples(result: Any, problems: list[str | None]) -> None:
    """pytest.fail listing every problem, then a few failing samples with their reasons."""
    found = [p for p in problems if p]
    if found:
        text = "\n".join(found)
        pytest.fail(f"{text}\nfailing samples:\n{samples_text(result)}", pytrace=False)
