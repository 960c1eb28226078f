"""evaluate: a tiny random model through generation, validation, metrics, files and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from distiller import evaluate as E
from distiller.decoding import Decoding
from distiller.errors import UserError
from distiller.spec import load_spec
from distiller.validators import build_validator

SPEC = """\
name: tiny_sections
prompts:
  items:
    - {{id: p1, text: "Explain the split brain."}}
    - {{id: p2, text: "Explain the thundering herd."}}
    - {{id: p3, text: "Explain the retry storm."}}
    - {{id: p4, text: "Explain clock skew."}}
    - {{id: p5, text: "Explain the lost update."}}
teacher:
  model: {model}
  system_prompt: "Answer with two sections, A: and B:."
  few_shot:
    - {{user: "Explain X.", assistant: "A: x is bad.\\nB: fix x."}}
validators:
  - type: sections
    headers: [A, B]
student: {{model: {model}}}
split: {{train: 0.6, valid: 0.0, test: 0.4, seed: 0}}
eval:
  max_tokens: 6
  batch_size: 4
  thresholds: {{format_rate: 0.9}}
  prompt_sets:
    extra:
      items: ["Explain a partition."]
"""


def write_spec(tmp_path: Path, model_dir: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(SPEC.format(model=model_dir))
    return path


@pytest.fixture(scope="module")
def tiny_spec(tiny_model_dir, tmp_path_factory):
    return load_spec(write_spec(tmp_path_factory.mktemp("spec"), tiny_model_dir))


def test_evaluate_records_metrics_and_files(tiny_model_dir, tiny_spec, tmp_path):
    out = tmp_path / "ev" / "tiny.jsonl"
    r = E.evaluate(tiny_model_dir, tiny_spec, tiny_spec.prompts, out_path=out, progress=False)
    assert [rec["id"] for rec in r.records] == ["p1", "p2", "p3", "p4", "p5"]
    m = r.metrics
    assert m["n"] == 5 and m["format"]["n"] == 5
    # An independent recount: the spec's validators run again on every stored output.
    validate = build_validator(tiny_spec.validators)
    recheck = [validate(rec["output"]) for rec in r.records]
    assert [rec["passed"] for rec in r.records] == [v.passed for v in recheck]
    assert [rec["reasons"] for rec in r.records] == [v.reasons for v in recheck]
    assert r.format_rate.k == sum(v.passed for v in recheck)
    assert set(m["sections"]) == {"A", "B"}
    for header in ("A", "B"):
        assert r.section_rates[header].k == sum(bool(v.sections.get(header)) for v in recheck)
    assert all(0 < rec["output_tokens"] <= 6 for rec in r.records)
    # failing(n): the failed records, in order, at most n (on records made to pass and fail).
    mixed = replace(r, records=[{**rec, "passed": i % 2 == 0} for i, rec in enumerate(r.records)])
    assert [rec["id"] for rec in mixed.failing(5)] == ["p2", "p4"]
    assert [rec["id"] for rec in mixed.failing(1)] == ["p2"]
    assert m["prefill_tps"] > 0 and m["decode_tps"] > 0 and m["peak_memory_mb"] > 0
    # 2 layers, d=64, vocab 49152, tied: the embedding dominates.
    assert 49152 * 64 < m["params"] < 49152 * 64 + 200_000
    weights = (tiny_model_dir / "model.safetensors").stat().st_size / 1e6
    assert m["disk_mb"] > weights
    back = E.read_result(out)
    assert back.records == json.loads(json.dumps(r.records)) and back.metrics["n"] == 5
    assert E.metrics_path(out).name == "tiny.metrics.json"


def test_scaffold_style_makes_longer_prompts(tiny_model_dir, tiny_spec):
    bare = E.evaluate(tiny_model_dir, tiny_spec, tiny_spec.prompts, limit=2, progress=False)
    scaf = E.evaluate(
        tiny_model_dir, tiny_spec, tiny_spec.prompts, style="scaffold", limit=2, progress=False
    )
    assert bare.metrics["n"] == 2
    for b, s in zip(bare.records, scaf.records, strict=True):
        assert s["prompt_tokens"] > b["prompt_tokens"] + 10
    with pytest.raises(UserError):
        E.evaluate(tiny_model_dir, tiny_spec, tiny_spec.prompts, style="fancy")


def test_cached_evaluate_reuses_and_invalidates(tiny_model_dir, tiny_spec, tmp_path):
    first = E.cached_evaluate(tiny_model_dir, tiny_spec, tiny_spec.prompts, tmp_path, limit=3)
    assert not first.reused and first.key
    again = E.cached_evaluate(tiny_model_dir, tiny_spec, tiny_spec.prompts, tmp_path, limit=3)
    assert again.reused and again.key == first.key and again.records == first.records
    shorter = replace(tiny_spec, eval=replace(tiny_spec.eval, decoding=Decoding(max_tokens=4)))
    other = E.cached_evaluate(tiny_model_dir, shorter, tiny_spec.prompts, tmp_path, limit=3)
    assert not other.reused and other.key != first.key
    assert max(r["output_tokens"] for r in other.records) <= 4


def test_sets_evaluated_together_equal_sets_evaluated_alone(tiny_model_dir, tiny_spec, tmp_path):
    """One joint pass gives each set the records a pass of its own gives; each set is cached
    under its own key, so a later request for one set alone reuses it."""
    sets = {"a": tiny_spec.prompts[:2], "b": tiny_spec.prompts[2:]}
    together = E.cached_evaluate_together(tiny_model_dir, tiny_spec, sets, tmp_path)
    assert list(together) == ["a", "b"]
    for name, prompts in sets.items():
        alone = E.evaluate(tiny_model_dir, tiny_spec, prompts, prompt_set=name, progress=False)
        assert together[name].records == alone.records
        assert together[name].metrics["n"] == len(prompts)
        assert together[name].metrics["generated_with"] == ["a", "b"]
        assert together[name].prompt_set == name
        reused = E.cached_evaluate(tiny_model_dir, tiny_spec, prompts, tmp_path, prompt_set=name)
        assert reused.reused and reused.key == together[name].key
    # A new set next to a cached one: only the new one is generated.
    more = E.cached_evaluate_together(
        tiny_model_dir, tiny_spec, {"a": sets["a"], "c": tiny_spec.prompts[1:3]}, tmp_path
    )
    assert more["a"].reused and not more["c"].reused
    assert more["c"].metrics["generated_with"] == ["c"]


def test_resolve_prompts(tiny_spec, tmp_path):
    name, test = E.resolve_prompts(tiny_spec, "split:test")
    assert name == "split:test" and len(test) == 2
    assert len(E.resolve_prompts(tiny_spec, "set:extra")[1]) == 1
    assert len(E.resolve_prompts(tiny_spec, "all")[1]) == 5
    f = tmp_path / "more.yaml"
    f.write_text("- one prompt\n- another\n")
    assert [p.text for p in E.resolve_prompts(tiny_spec, str(f))[1]] == ["one prompt", "another"]
    for bad in ("split:nope", "set:nope", str(tmp_path / "missing.yaml")):
        with pytest.raises(UserError):
            E.resolve_prompts(tiny_spec, bad)


def test_task_metrics_classification_and_extraction():
    spec = load_spec(Path(__file__).parent.parent / "fixtures/tasks/label_ranking.yaml")
    recs = [
        {"output": "Critical.", "label": "critical", "reference": None},
        {"output": "minor", "label": "major", "reference": None},
        {"output": "no idea", "label": "minor", "reference": None},
    ]
    tm = E.task_metrics(spec, recs)
    assert tm["accuracy"] == pytest.approx(1 / 3)
    assert [r["prediction"] for r in recs] == ["critical", "minor", None]
    assert tm["confusion"]["labels"] == ["critical", "major", "minor"]
    spec = load_spec(Path(__file__).parent.parent / "fixtures/tasks/json_extraction.yaml")
    ref = spec.prompts[0].reference
    assert isinstance(ref, dict)
    tm = E.task_metrics(
        spec,
        [
            {"output": json.dumps(ref), "reference": ref, "label": None},
            {"output": "{}", "reference": ref, "label": None},
        ],
    )
    assert tm["field_accuracy"] == pytest.approx(0.5) and tm["exact_object"] == 0.5
    assert tm["json_valid"]["k"] == 1


def test_measure_latency_times_the_evaluations_own_decoding(tiny_model_dir):
    from distiller.generate import build_messages, chat_prompt, generate_batch
    from distiller.models import load_model

    model, tok = load_model(tiny_model_dir)
    ids = [chat_prompt(tok, build_messages(t)) for t in ("a question", "another question")]
    free = generate_batch(model, tok, ids, Decoding(max_tokens=16))
    # A stop string from the middle of the first answer (greedy decoding is the same up to it):
    # latency measured with the decoding must stop there too, as the evaluation does.
    text = free[0].text
    at = next(
        i for i in range(3, len(text) - 2) if text[i : i + 2].isascii() and text[i : i + 2].strip()
    )
    decoding = Decoding(max_tokens=16, stop=(text[at : at + 2],))
    evaluated = generate_batch(model, tok, ids, decoding)
    lat = E.measure_latency(model, tok, ids, decoding)
    assert lat.samples == 2 and len(lat.per_sample_ms) == 2
    assert lat.mean_output_tokens == sum(g.generation_tokens for g in evaluated) / 2
    assert lat.mean_output_tokens < sum(g.generation_tokens for g in free) / 2
    assert lat.ms_per_sample > 0 and lat.decode_tps > 0 and lat.prefill_tps > 0


def test_cli_eval(tiny_model_dir, tmp_path):
    spec = write_spec(tmp_path, tiny_model_dir)
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "distiller.cli", "eval", "--model", str(tiny_model_dir)]
    proc = subprocess.run(
        [*cmd, "--task", str(spec), "--prompts", "split:test", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "format rate" in proc.stdout and out.exists() and E.metrics_path(out).exists()
    assert len(out.read_text().splitlines()) == 2
    bad = subprocess.run(
        [*cmd, "--task", str(spec), "--prompts", "split:bogus"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "split:test" in bad.stderr
    shaped = tmp_path / "shaped.jsonl"
    proc = subprocess.run(
        [*cmd, "--task", str(spec), "--out", str(shaped), "--no-repeat-ngram", "2"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert E.read_result(shaped).metrics["no_repeat_ngram"] == 2
    stopped = tmp_path / "stopped.jsonl"
    proc = subprocess.run(
        [*cmd, "--task", str(spec), "--out", str(stopped), "--stop", "\\n", "--stop", "e"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert E.read_result(stopped).metrics["stop"] == ["\n", "e"]
    assert not any("e" in r["output"] for r in map(json.loads, stopped.read_text().splitlines()))
    bad = subprocess.run(
        [*cmd, "--task", str(spec), "--no-repeat-ngram", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and ">= 2, got 1" in bad.stderr


def test_fixed_workload_peak_measures_the_same_work_alike(tiny_model_dir):
    from distiller.evaluate import fixed_workload_peak_mb, weight_bytes
    from distiller.models import load_model

    model, _ = load_model(str(tiny_model_dir))
    prompts = [list(range(10, 40)), list(range(50, 90))]  # cut to the shorter: 30 tokens
    first = fixed_workload_peak_mb(model, prompts, decode_steps=8)
    again = fixed_workload_peak_mb(model, prompts, decode_steps=8)
    assert first > weight_bytes(model) / 1e6
    assert abs(first - again) <= 0.05 * first
    # More work (a longer KV cache, a wider batch) needs more memory.
    wider = fixed_workload_peak_mb(model, prompts * 16, decode_steps=64)
    assert wider > first
