"""The pytest gate end to end: real pytest subprocesses running evals/ on a tiny model.

The tiny random model cannot write the spec's sections, so a baseline claiming it did must
fail the run with a message naming model, task, figure, baseline and failing samples; and the
baseline file must change only with --distiller-update-baseline.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_evaluate import SPEC

pytest_plugins = ["pytester"]

REPO = Path(__file__).resolve().parent.parent


def run_evals(tmp: Path, model: Path, *args: str) -> subprocess.CompletedProcess:
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
        f"--distiller-reports={tmp / 'reports'}",
        f"--distiller-baseline={tmp / 'baseline.json'}",
        "--distiller-models=vanilla,distilled",
        *args,
    ]
    return subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=300)


@pytest.fixture
def gate_dir(tmp_path, tiny_model_dir):
    (tmp_path / "spec.yaml").write_text(
        SPEC.format(model=tiny_model_dir).replace("format_rate: 0.9", "format_rate: 0.0")
    )
    return tmp_path


def test_gate_fails_on_regression_and_keeps_baseline(gate_dir, tiny_model_dir):
    # A baseline the tiny model cannot reach: every test prompt passed, every section present.
    full = {"k": 8, "n": 8}
    entries = {
        f"tiny_sections/{s}/{m}": {"n": 8, "format": full, "sections": {"A": full, "B": full}}
        for s in ("split:test", "set:extra")
        for m in ("vanilla", "distilled")
    }
    baseline = gate_dir / "baseline.json"
    baseline.write_text(json.dumps({"version": 1, "entries": entries}))
    before = baseline.read_bytes()

    proc = run_evals(gate_dir, tiny_model_dir)
    out = proc.stdout
    assert proc.returncode == 1, out[-3000:] + proc.stderr[-2000:]
    assert "test_format_rate_no_regression" in out
    assert "model=distilled task=tiny_sections prompts=split:test" in out
    assert "format rate regressed vs baseline: significant drop" in out
    assert "(0/2)" in out and "(8/8)" in out  # the counts behind both rates
    assert "section 'A' regressed" in out and "failing samples:" in out
    assert "missing header: A" in out  # a failing sample's reason
    assert "distiller: teacher vs students" in out  # terminal summary table
    assert baseline.read_bytes() == before  # gating never rewrites the baseline
    assert (gate_dir / "reports" / "latest.md").exists()
    history = (gate_dir / "reports" / "history.jsonl").read_text().splitlines()
    assert len(history) == 1

    # Accept the current figures, then the same run passes against them.
    proc = run_evals(gate_dir, tiny_model_dir, "--distiller-update-baseline")
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "baseline rewritten" in proc.stdout
    rewritten = json.loads(baseline.read_text())["entries"]
    assert rewritten["tiny_sections/split:test/distilled"]["format"]["k"] == 0
    proc = run_evals(gate_dir, tiny_model_dir)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "passed" in proc.stdout and "reused" not in proc.stderr
    assert json.loads(baseline.read_text())["entries"] == rewritten


def test_threshold_gate_fails(tmp_path, tiny_model_dir):
    (tmp_path / "spec.yaml").write_text(SPEC.format(model=tiny_model_dir))
    proc = run_evals(tmp_path, tiny_model_dir, "-k", "threshold")
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert "format rate 0.000" in proc.stdout and "below the spec threshold 0.9" in proc.stdout
    assert not (tmp_path / "baseline.json").exists()


def test_plugin_is_inert_and_registers_markers(pytester):
    pytester.makepyfile("def test_x():\n    assert True\n")
    result = pytester.runpytest("-p", "no:cacheprovider", "--strict-markers", "--markers")
    result.stdout.fnmatch_lines(["*structure: format compliance*", "*throughput:*"])
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    assert "distiller: teacher vs students" not in result.stdout.str()


def test_plugin_import_is_light():
    code = (
        "import sys, distiller.pytest_plugin as p; "
        "bad = [m for m in ('mlx.core', 'mlx_lm', 'pandas', 'distiller.evaluate') if m in sys.modules]; "
        "print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_bad_models_option_is_a_usage_error(pytester):
    pytester.makepyfile("def test_x(distiller_model):\n    pass\n")
    result = pytester.runpytest("-p", "no:cacheprovider", "--distiller-models=teacher,oracle")
    assert result.ret != 0
    result.stderr.fnmatch_lines(["*--distiller-models: unknown*oracle*"])
