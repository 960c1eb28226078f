"""The pytest harness: its gates on constructed results, then real pytest subprocesses running
evals/ on a tiny model.

The tiny random model cannot write the spec's sections (at most 6 tokens per answer), so a
baseline claiming it did must fail the run with a message naming model, task, figure, baseline,
the test that ran and failing samples; the baseline file must change only with
--distiller-update-baseline; and a run must leave a git checkout clean.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_evaluate import SPEC

from distiller.evaluate import EvalResult
from distiller.harness import gates
from distiller.metrics import rate
from distiller.report import prompt_verdicts

pytest_plugins = ["pytester"]

REPO = Path(__file__).resolve().parent.parent
EXTRA = [f"Explain failure number {i}." for i in range(6)]  # enough prompts to pair


# -- gates on constructed results ----------------------------------------------------------------


def result_of(passed: list[bool], ids: list[str] | None = None) -> EvalResult:
    ids = ids or [f"p{i}" for i in range(len(passed))]
    records = [
        {
            "id": pid,
            "output": "A: x\nB: y" if ok else "rambling",
            "passed": ok,
            "reasons": [] if ok else ["missing header: A"],
            "sections": {"A": ok},
        }
        for pid, ok in zip(ids, passed, strict=True)
    ]
    k, n = sum(passed), len(passed)
    metrics = {"n": n, "format": rate(k, n).to_dict(), "sections": {"A": rate(k, n).to_dict()}}
    return EvalResult("distilled", "tiny", "split:test", "bare", records, metrics)


def baseline_of(result: EvalResult, paired: bool = True) -> dict:
    figure = {"k": result.format_rate.k, "n": result.format_rate.n}
    if paired:
        figure["by_prompt"] = prompt_verdicts(result.records)
    return figure


def test_paired_gate_catches_a_drop_the_unpaired_test_misses():
    # Half of 20 prompts passed in the baseline; 5 of those fail now, none got better.
    base = result_of([i < 10 for i in range(20)])
    new = result_of([i < 5 for i in range(20)])
    problem = gates.check_baseline(
        new, "format rate", new.format_rate, baseline_of(base), 0.05, prompt_verdicts(new.records)
    )
    assert problem is not None
    assert problem.startswith("model=distilled task=tiny prompts=split:test: format rate")
    assert "regressed vs baseline (paired McNemar exact test on 20 prompts)" in problem
    assert "5 went pass->fail, 0 fail->pass" in problem and "p=0.03125" in problem
    assert "pass->fail: p5, p6, p7, p8, p9" in problem
    # The same counts without per-prompt verdicts (a version-1 baseline): within the noise.
    unpaired = baseline_of(base, paired=False)
    assert (
        gates.check_baseline(
            new, "format rate", new.format_rate, unpaired, 0.05, prompt_verdicts(new.records)
        )
        is None
    )


def test_gate_says_why_it_fell_back_to_the_unpaired_test():
    base, new = result_of([True] * 8), result_of([False] * 8)
    cases = {
        "the baseline keeps only counts for it (a version-1 entry)": (
            baseline_of(base, paired=False),
            prompt_verdicts(new.records),
        ),
        "the prompt sets differ (8 ids only in the baseline, 8 only in this run)": (
            baseline_of(result_of([True] * 8, [f"q{i}" for i in range(8)])),
            prompt_verdicts(new.records),
        ),
        "this run has no per-prompt verdicts for the figure": (baseline_of(base), None),
    }
    for why, (base_figure, verdicts) in cases.items():
        problem = gates.check_baseline(
            new, "format rate", new.format_rate, base_figure, 0.05, verdicts
        )
        assert problem is not None and f"(unpaired Newcombe test: {why})" in problem, problem
        assert "(0/8)" in problem and "(8/8)" in problem


def test_gate_passes_without_flips_or_without_a_baseline():
    same = result_of([True, False] * 5)
    verdicts = prompt_verdicts(same.records)
    assert (
        gates.check_baseline(same, "f", same.format_rate, baseline_of(same), 0.05, verdicts) is None
    )
    assert gates.check_baseline(same, "f", same.format_rate, None, 0.05, verdicts) is None
    assert gates.check_baseline(same, "f", same.format_rate, {"k": 0, "n": 0}, 0.05) is None


def test_format_gate_checks_every_section_and_fail_lists_samples():
    base, new = result_of([True] * 6), result_of([False] * 6)
    entry = {"format": baseline_of(base), "sections": {"A": baseline_of(base)}}
    problems = gates.check_format_baseline(new, entry, 0.05)
    assert len(problems) == 2
    assert "format rate regressed" in problems[0] and "section 'A' regressed" in problems[1]
    assert all("paired McNemar exact test on 6 prompts" in p for p in problems)
    with pytest.raises(pytest.fail.Exception) as failed:
        gates.fail_with_samples(new, problems)
    assert "failing samples:\n  - [p0] missing header: A" in str(failed.value)
    gates.fail_with_samples(new, [None])  # nothing to report: no failure


def test_threshold_gate_message():
    r = result_of([True] * 8 + [False] * 2)
    assert gates.check_threshold(r, "format rate", r.format_rate, 0.8) is None
    problem = gates.check_threshold(r, "format rate", r.format_rate, 0.9)
    assert problem is not None and "format rate 0.800" in problem
    assert "below the spec threshold 0.9" in problem


# -- the plugin in real pytest runs --------------------------------------------------------------


def run_evals(
    tmp: Path, model: Path, *args: str, reports: bool = True
) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        str(REPO / "evals"),
        "-p",
        "no:cacheprovider",
        "-m",
        "structure",
        f"--distiller-spec={tmp / 'spec.yaml'}",
        f"--distiller-student={model}",
        f"--distiller-out={tmp / 'runs'}",
        f"--distiller-baseline={tmp / 'baseline.json'}",
        "--distiller-models=vanilla,distilled",
        *([f"--distiller-reports={tmp / 'reports'}"] if reports else []),
        *args,
    ]
    return subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=300)


def write_gate_spec(tmp: Path, model: Path, extra: list[str] | None = None) -> None:
    spec = SPEC.format(model=model).replace("format_rate: 0.9", "format_rate: 0.0")
    if extra is not None:
        spec = spec.replace('items: ["Explain a partition."]', f"items: {json.dumps(extra)}")
    (tmp / "spec.yaml").write_text(spec)


def test_gate_fails_on_regression_and_keeps_baseline(tmp_path, tiny_model_dir):
    write_gate_spec(tmp_path, tiny_model_dir)
    # A version-1 baseline (counts only) the tiny model cannot reach: every prompt passed,
    # every section present. Unpaired: its prompts are not known.
    full = {"k": 8, "n": 8}
    entries = {
        f"tiny_sections/{s}/{m}": {"n": 8, "format": full, "sections": {"A": full, "B": full}}
        for s in ("split:test", "set:extra")
        for m in ("vanilla", "distilled")
    }
    baseline = tmp_path / "baseline.json"
    baseline.write_text(json.dumps({"version": 1, "entries": entries}))
    before = baseline.read_bytes()

    proc = run_evals(tmp_path, tiny_model_dir)
    out = proc.stdout
    assert proc.returncode == 1, out[-3000:] + proc.stderr[-2000:]
    assert "test_format_rate_no_regression" in out
    assert "model=distilled task=tiny_sections prompts=split:test" in out
    assert "format rate regressed vs baseline (unpaired Newcombe test: the baseline keeps" in out
    assert "(0/2)" in out and "(8/8)" in out  # the counts behind both rates
    assert "section 'A' regressed" in out and "failing samples:" in out
    assert "missing header: A" in out  # a failing sample's reason
    assert "distiller: teacher vs students" in out  # terminal summary table
    assert baseline.read_bytes() == before  # gating never rewrites the baseline
    assert (tmp_path / "reports" / "latest.md").exists()
    history = (tmp_path / "reports" / "history.jsonl").read_text().splitlines()
    assert len(history) == 1

    # Accept the current figures, then the same run passes against them.
    proc = run_evals(tmp_path, tiny_model_dir, "--distiller-update-baseline")
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "baseline rewritten" in proc.stdout
    doc = json.loads(baseline.read_text())
    assert doc["version"] == 2
    rewritten = doc["entries"]
    assert rewritten["tiny_sections/split:test/distilled"]["format"]["k"] == 0
    proc = run_evals(tmp_path, tiny_model_dir)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "passed" in proc.stdout and "reused" not in proc.stderr
    assert json.loads(baseline.read_text())["entries"] == rewritten


def test_gate_pairs_the_prompts_of_a_version_2_baseline(tmp_path, tiny_model_dir):
    write_gate_spec(tmp_path, tiny_model_dir, EXTRA)
    baseline = tmp_path / "baseline.json"
    proc = run_evals(tmp_path, tiny_model_dir, "--distiller-update-baseline")
    assert proc.returncode == 0, proc.stdout[-3000:]
    # Claim every prompt passed in the baseline: each of them now went pass -> fail.
    doc = json.loads(baseline.read_text())
    for entry in doc["entries"].values():
        for figure in [entry["format"], *entry["sections"].values()]:
            assert len(figure["by_prompt"]) == figure["n"] > 0
            figure["by_prompt"] = dict.fromkeys(figure["by_prompt"], True)
            figure["k"] = figure["n"]
    baseline.write_text(json.dumps(doc))

    proc = run_evals(tmp_path, tiny_model_dir, "-k", "no_regression")
    out = proc.stdout
    assert proc.returncode == 1, out[-3000:] + proc.stderr[-2000:]
    # 6 prompts all flipped: p = 1/64. The 2 test-split prompts flipping (p = 1/4) is noise.
    assert "prompts=set:extra: format rate regressed vs baseline (paired McNemar exact test " in out
    assert "6 went pass->fail, 0 fail->pass (McNemar exact, one-sided p=0.01562" in out
    assert "prompts=split:test: format rate regressed" not in out
    assert "2 failed" in out and "2 passed" in out  # set:extra fails for both models


def test_threshold_gate_fails(tmp_path, tiny_model_dir):
    (tmp_path / "spec.yaml").write_text(SPEC.format(model=tiny_model_dir))
    proc = run_evals(tmp_path, tiny_model_dir, "-k", "threshold")
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert "format rate 0.000" in proc.stdout and "below the spec threshold 0.9" in proc.stdout
    assert not (tmp_path / "baseline.json").exists()


def test_a_run_leaves_the_checkout_clean(tmp_path, tiny_model_dir):
    """With the default reports directory, a run in a git checkout (this repo's .gitignore)
    leaves ``git status`` clean: reports and caches land in ignored places."""

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            check=True,
        )
        return done.stdout

    write_gate_spec(tmp_path, tiny_model_dir)
    shutil.copy(REPO / ".gitignore", tmp_path / ".gitignore")
    git("init", "-q")
    git("add", ".gitignore", "spec.yaml")
    git("commit", "-q", "-m", "checkout")
    proc = run_evals(tmp_path, tiny_model_dir, f"--rootdir={tmp_path}", reports=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert (tmp_path / ".distiller" / "reports" / "latest.md").exists()
    assert f"reports: {tmp_path / '.distiller' / 'reports' / 'latest.md'}" in proc.stdout
    assert git("status", "--porcelain", "--untracked-files=all") == ""


def test_plugin_is_inert_and_registers_markers(pytester):
    pytester.makepyfile("def test_x():\n    assert True\n")
    result = pytester.runpytest("-p", "no:cacheprovider", "--strict-markers", "--markers")
    result.stdout.fnmatch_lines(["*structure: format compliance*", "*throughput:*"])
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    assert "distiller: teacher vs students" not in result.stdout.str()


def test_plugin_import_is_light():
    code = (
        "import sys, distiller.harness.plugin as p; "
        "bad = [m for m in ('mlx.core', 'mlx_lm', 'pandas', 'distiller.evaluate') if m in sys.modules]; "
        "print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_bad_options_are_usage_errors(pytester):
    pytester.makepyfile("def test_x(distiller_model):\n    pass\n")
    result = pytester.runpytest("-p", "no:cacheprovider", "--distiller-models=teacher,oracle")
    assert result.ret != 0
    result.stderr.fnmatch_lines(["*--distiller-models: unknown*oracle*"])
    result = pytester.runpytest("-p", "no:cacheprovider", "--distiller-alpha=1.5")
    assert result.ret != 0
    result.stderr.fnmatch_lines(["*--distiller-alpha must be in (0, 1), got 1.5*"])
