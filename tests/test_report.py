"""report: tables, sample comparison, latest/history files and the baseline file."""

from __future__ import annotations

import json

import pytest

from distiller import report as R
from distiller.evaluate import EvalResult
from distiller.metrics import rate


def make_result(model: str, passed: list[bool], accuracy: float | None = None) -> EvalResult:
    records = [
        {
            "id": f"p{i}",
            "prompt": f"Explain failure {i}",
            "output": f"A: {model} says {i}\nB: done" if ok else "rambling",
            "passed": ok,
            "reasons": [] if ok else ["missing section 'A'"],
            "sections": {"A": ok, "B": True},
        }
        for i, ok in enumerate(passed)
    ]
    n, k = len(passed), sum(passed)
    task = {} if accuracy is None else {"accuracy": accuracy, "per_class": {"x": {}}}
    metrics = {
        "n": n,
        "format": rate(k, n).to_dict(),
        "sections": {"A": rate(k, n).to_dict(), "B": rate(n, n).to_dict()},
        "task": task,
        "mean_output_tokens": 20.0,
        "prefill_tps": 300.0,
        "decode_tps": 100.0,
        "generation_tps": 90.0,
        "peak_memory_mb": 700.0,
        "params": 134_515_008,
        "disk_mb": 540.2,
    }
    return EvalResult(model, "tiny", "split:test", "bare", records, metrics, key=f"k-{model}")


@pytest.fixture
def results():
    return [
        make_result("teacher", [True] * 9 + [False], 0.9),
        make_result("vanilla", [False] * 8 + [True] * 2, 0.5),
        make_result("distilled", [True] * 8 + [False] * 2, 0.8),
    ]


def test_comparison_frame_has_figures_and_deltas(results):
    summaries = [R.summarize(r, {"ms_per_sample": 1234.5, "decode_tps": 21.0}) for r in results]
    frame = R.comparison_frame(summaries)
    assert list(frame["model"]) == ["teacher", "vanilla", "distilled"]
    row = frame.set_index("model").loc["distilled"]
    assert row["format rate [95% CI]"].startswith("0.80 [")
    assert row["Δ format vs vanilla"] == "+0.60"
    assert row["Δ task vs vanilla"] == "+0.30"
    assert row["task metric"] == "accuracy 0.80"
    assert row["params (M)"] == pytest.approx(134.5)
    assert row["latency ms/sample"] == 1234 or row["latency ms/sample"] == 1235
    assert pytest.approx(0.2) == frame.set_index("model").loc["vanilla", "A"]
    md = R.frame_markdown(frame)
    assert md.splitlines()[0].startswith("| task") and "distilled" in md
    assert "+0.60" in md.splitlines()[-1]  # the delta keeps its sign in the table


def test_comparison_rows_are_ordered_split_first_then_teacher_vanilla_distilled(results):
    unseen = [make_result(r.model, [True, False]) for r in results]
    for r in unseen:
        r.prompt_set = "set:unseen"
    mixed = [unseen[2], results[1], unseen[0], results[2], unseen[1], results[0]]
    frame = R.comparison_frame([R.summarize(r) for r in mixed])
    assert [p.split(" ")[0] for p in frame["prompts"]] == ["split:test"] * 3 + ["set:unseen"] * 3
    assert list(frame["model"]) == ["teacher", "vanilla", "distilled"] * 2


def test_samples_side_by_side(results):
    md = R.samples_markdown(results, n=2)
    assert md.count("#### tiny / split:test / `p0`") == 1
    block = md.split("`p1`")[0]
    assert "**teacher** (PASS)" in block and "**vanilla** (FAIL: missing section 'A')" in block


def test_write_reports_appends_history(results, tmp_path):
    doc, md = R.build_report(results, extra={"train_step_tps": 150.0})
    assert set(doc["entries"]) == {
        "tiny/split:test/teacher",
        "tiny/split:test/vanilla",
        "tiny/split:test/distilled",
    }
    assert "Teacher vs students" in md and "train_step_tps" in md and "Sample outputs" in md
    R.write_reports(doc, md, tmp_path)
    R.write_reports(doc, md, tmp_path)
    assert (tmp_path / "latest.md").read_text() == md
    assert (
        json.loads((tmp_path / "latest.json").read_text())["entries"].keys()
        == doc["entries"].keys()
    )
    lines = (tmp_path / "history.jsonl").read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[1])["created"] == doc["created"]


def test_baseline_roundtrip_merge_and_errors(results, tmp_path):
    path = tmp_path / "baseline.json"
    assert R.load_baseline(path) == {}
    summaries = [R.summarize(r) for r in results]
    R.update_baseline(path, summaries[:1])
    R.update_baseline(path, summaries[1:])
    entries = R.load_baseline(path)
    assert len(entries) == 3
    assert entries["tiny/split:test/teacher"]["format"]["k"] == 9
    assert json.loads(path.read_text())["version"] == R.BASELINE_VERSION == 2
    R.update_baseline(path, summaries[1:2], replace=True)
    assert list(R.load_baseline(path)) == ["tiny/split:test/vanilla"]
    path.write_text("{broken")
    from distiller.errors import UserError

    with pytest.raises(UserError, match="not valid JSON"):
        R.load_baseline(path)


def test_baseline_keeps_each_prompts_verdict_per_figure(results, tmp_path):
    teacher = results[0]  # p0..p8 pass, p9 fails; section A follows the verdict, B always holds
    s = R.summarize(teacher)
    assert s["format"]["by_prompt"] == {f"p{i}": i < 9 for i in range(10)}
    assert s["sections"]["A"]["by_prompt"] == {f"p{i}": i < 9 for i in range(10)}
    assert s["sections"]["B"]["by_prompt"] == {f"p{i}": True for i in range(10)}
    path = tmp_path / "baseline.json"
    R.update_baseline(path, [s])
    back = R.load_baseline(path)["tiny/split:test/teacher"]
    assert back["format"]["by_prompt"] == s["format"]["by_prompt"]
    # Repeated prompt ids cannot be paired: the counts are kept, the verdicts are not.
    twice = make_result("teacher", [True, False])
    for rec in twice.records:
        rec["id"] = "same"
    assert "by_prompt" not in R.summarize(twice)["format"]


def test_version_1_baseline_loads_and_newer_or_inconsistent_ones_fail_clearly(tmp_path):
    from distiller.errors import UserError

    path = tmp_path / "baseline.json"
    v1 = {"tiny/split:test/vanilla": {"n": 8, "format": {"k": 8, "n": 8}, "sections": {}}}
    path.write_text(json.dumps({"version": 1, "entries": v1}))
    assert R.load_baseline(path) == v1  # counts only: gated unpaired
    path.write_text(json.dumps({"version": 3, "entries": {}}))
    with pytest.raises(UserError, match="baseline version 3; this distiller reads versions 1 to 2"):
        R.load_baseline(path)
    bad = {"n": 2, "format": {"k": 2, "n": 2, "by_prompt": {"a": True, "b": False}}}
    path.write_text(json.dumps({"version": 2, "entries": {"t/s/m": bad}}))
    with pytest.raises(UserError, match="t/s/m format: 2 per-prompt verdicts with 1 passed"):
        R.load_baseline(path)


def test_latency_is_reported_per_task_and_model(results):
    other = make_result("vanilla", [True, False])
    other.task = "other"
    latency = {
        ("tiny", "vanilla"): {"ms_per_sample": 100.0, "decode_tps": 10.0},
        ("other", "vanilla"): {"ms_per_sample": 900.0, "decode_tps": 90.0},
        "distilled": {"ms_per_sample": 50.0, "decode_tps": 20.0},  # a bare name: every task
    }
    doc, _ = R.build_report([*results, other], latency)
    entries = doc["entries"]
    assert entries["tiny/split:test/vanilla"]["latency"]["ms_per_sample"] == 100.0
    assert entries["other/split:test/vanilla"]["latency"]["ms_per_sample"] == 900.0
    assert entries["tiny/split:test/distilled"]["latency"]["decode_tps"] == 20.0
    assert "latency" not in entries["tiny/split:test/teacher"]
