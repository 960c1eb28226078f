"""The schema-constrained extraction playbook: the incident-ticket generator and its committed
files, the schema (validator and llguidance alike accept every gold object), the extraction
metrics (hand-computed cases and properties), and their wiring into evaluation and reports."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distiller import metrics as M
from distiller import report as R
from distiller.datagen import extraction as X
from distiller.evaluate import EvalResult, task_metrics
from distiller.metrics import rate, wilson_interval
from distiller.spec import load_spec

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "fixtures" / "tasks" / "incident_extraction"
TASK = ROOT / "fixtures" / "tasks" / "incident_extraction.yaml"
FILES = ("tickets.jsonl", "dev.jsonl", "schema.json")


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text().splitlines()]


# -- the generator -----------------------------------------------------------------------------


def test_script_regenerates_the_committed_files_byte_for_byte(tmp_path):
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "make_extraction_data.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    for name in FILES:
        assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes(), name


def test_rows_do_not_depend_on_how_many_are_generated():
    assert X.generate(5, 3) == X.generate(12, 3)[:5]
    assert X.generate(5, 3) != X.generate(5, 4)


def _date_forms(iso: str) -> list[str]:
    y, m, d = (int(x) for x in iso.split("-"))
    return [X._date((y, m, d), k) for k in range(3)]


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 100_000), st.integers(0, 5))
def test_every_stated_fact_is_in_the_text_and_every_distractor_differs(index, seed):
    row = X.make_row(index, seed)
    ref, text = row.reference, row.text
    low = text.casefold()
    assert list(ref) == list(X.FIELDS)  # gold keys in the schema's (and constraint's) order
    assert ref["id"] in text and ref["service"] in text and ref["reporter"]["name"] in text
    assert ref["severity"] in low
    assert any(f in text for f in _date_forms(ref["opened"]))
    for region in ref["regions"]:
        assert region in text
    assert ref["users"] is None or f"{ref['users']:,}" in text or str(ref["users"]) in text
    assert ref["error_pct"] is None or f"{ref['error_pct']}%" in text
    assert ref["reporter"]["team"] is None or ref["reporter"]["team"] in text
    # What gold leaves null, the text does not state (its phrases are absent).
    if ref["error_pct"] is None:
        assert not re.search(r"(^|\n|\| )(Error rate:|err )|return errors|errors at", text)
    if ref["users"] is None:
        assert not any(
            p in low for p in ("users affected", "affected users", "users are", "users hit")
        )
        if row.style == "alert":  # its users fact is a bare "1,200 users" part
            assert not any(re.fullmatch(r"[\d,]+ users", part) for part in text.split(" | "))
    # Each distractor kind leaves a value in the text that is not the answer.
    assert 1 <= len(row.distractors) <= 3
    x = X.draw_incident(X.Draws("extraction", seed, index))
    assert x.related != x.ticket and x.assignee != x.reporter and x.healthy != x.service
    assert x.deployed != x.opened and x.failover not in x.regions
    shown = {
        "related": x.related, "assignee": x.assignee, "healthy": x.healthy,
        "failover": x.failover, "total_users": f"{x.total_users:,}",
        "normal_rate": f"{x.normal_rate}%",
    }  # fmt: skip
    for kind in row.distractors:
        if kind in shown:
            assert shown[kind] in text, kind
        else:
            assert any(f in text for f in (X._date(x.deployed, k) for k in range(3)))


def test_committed_set_varies_styles_nulls_and_distractors():
    rows = _rows("tickets.jsonl")
    assert len(rows) == 300 and len({r["id"] for r in rows}) == 300
    assert len({r["reference"]["id"] for r in rows}) == 300  # distinct ticket numbers
    styles = Counter(r["meta"]["style"] for r in rows)  # in turn, a skipped repeat aside
    assert set(styles) == set(X.STYLES) and min(styles.values()) >= 70, styles
    missing = Counter(m for r in rows for m in r["meta"]["missing"])
    assert set(missing) == {"users", "error_pct", "reporter.team", "regions"}
    assert all(40 <= k <= 120 for k in missing.values()), missing
    distractors = Counter(d for r in rows for d in r["meta"]["distractors"])
    assert len(distractors) == 7 and min(distractors.values()) >= 50, distractors
    # The answer's key is not always the first fact of its kind: fact order is shuffled.
    first_line = Counter(r["text"].split("\n")[0].split(":")[0] for r in rows[::4])
    assert len(first_line) >= 6
    dev_texts = {r["text"] for r in _rows("dev.jsonl")}
    assert len(dev_texts) == 40 and not dev_texts & {r["text"] for r in rows}


def test_every_gold_object_validates_and_the_schema_compiles_for_constrained_decoding():
    from distiller.constrain import schema_problem

    schema = json.loads((DATA / "schema.json").read_text())
    assert schema == X.SCHEMA
    assert schema_problem(json.dumps(schema)) is None
    validator = jsonschema.Draft202012Validator(schema)
    for r in _rows("tickets.jsonl") + _rows("dev.jsonl"):
        validator.validate(r["reference"])
    # The schema covers what the playbook asks for, and bounds everything it can.
    props = schema["properties"]
    kinds = {json.dumps(p.get("type", "enum")) for p in props.values()}
    assert {'"string"', '"boolean"', '"object"', '"array"', '"enum"'} <= kinds
    assert '["integer", "null"]' in kinds and '["number", "null"]' in kinds
    assert (
        schema["additionalProperties"] is False
        and props["reporter"]["additionalProperties"] is False
    )
    assert set(schema["required"]) == set(props) and props["regions"]["maxItems"] == 3


def test_llguidance_accepts_every_gold_answer_as_the_gold_teacher_writes_it():
    """The gold teacher's JSON (json.dumps, keys in gold order) is a complete value under the
    constraint, so SFT targets and constrained decoding agree token for token."""
    import llguidance.hf
    from llguidance import LLMatcher
    from transformers import AutoTokenizer

    from distiller.backends.gold import gold_answer
    from distiller.constrain import JSON_LAYOUT
    from distiller.spec.schema import Prompt

    tok = AutoTokenizer.from_pretrained(str(ROOT / "fixtures" / "tokenizer"))
    grammar = LLMatcher.grammar_from_json_schema(json.dumps(X.SCHEMA), overrides=JSON_LAYOUT)
    ll = llguidance.hf.from_tokenizer(tok)
    for r in _rows("tickets.jsonl")[:60]:
        answer = gold_answer(Prompt(r["id"], r["text"], reference=r["reference"]))
        m = LLMatcher(ll, grammar)
        assert m.consume_tokens(tok.encode(answer, add_special_tokens=False)), answer
        assert m.is_accepting() and not m.is_error()


# -- the metrics -------------------------------------------------------------------------------

GOLD = {"a": "x", "n": 3, "b": True, "o": {"p": "q", "z": None}, "arr": ["u", "v"]}


def test_flatten_fields_paths_and_what_states_no_value():
    leaves = M.flatten_fields(
        {"a": " X ", "n": 12, "o": {"p": [1, {"q": None}]}, "e": [], "z": None}
    )
    assert leaves == [("a", ("str", "x")), ("n", ("num", 12.0)), ("o.p[]", ("num", 1.0))]
    assert M.flatten_fields({"b": True})[0][1] != M.flatten_fields({"b": 1})[0][1]
    assert M.flatten_fields({"x": 0.1 + 0.2}) == M.flatten_fields({"x": 0.3})  # float dust


def test_extraction_scores_by_hand():
    pred = {"a": "X ", "n": 3.0, "b": False, "o": {"p": "q", "z": "w"}, "arr": ["v"], "extra": 1}
    s = M.extraction_scores([json.dumps(pred)], [GOLD])
    # gold leaves a, n, b, o.p, arr[]=u, arr[]=v (o.z null: none); right: a, n, o.p, arr[]=v;
    # wrong or extra in the answer: b, o.z, extra; gold values missed: b, arr[]=u.
    assert (s["tp"], s["fp"], s["fn"]) == (4, 3, 2)
    assert s["precision"].value == pytest.approx(4 / 7) and s["recall"].value == pytest.approx(
        4 / 6
    )
    assert s["f1"] == pytest.approx(8 / 13)
    f = s["fields"]
    assert f["b"] == {
        "tp": 0,
        "fp": 1,
        "fn": 1,
        "support": 1,
        "precision": 0.0,
        "recall": 0.0,
        "f1": 0.0,
    }
    assert (f["arr[]"]["tp"], f["arr[]"]["fn"], f["arr[]"]["recall"]) == (1, 1, 0.5)
    assert f["o.z"]["support"] == 0 and f["o.z"]["recall"] is None and f["o.z"]["precision"] == 0.0
    assert f["extra"]["fp"] == 1 and f["a"]["f1"] == 1.0
    assert s["exact_record"].k == 0 and s["schema_valid"].k == 1  # no schema: an object parses
    r = s["records"][0]
    assert (r["tp"], r["fp"], r["fn"], r["exact"]) == (4, 3, 2, False)


def test_extraction_scores_nulls_absent_keys_and_unparseable_answers():
    gold = {"a": "x", "m": None, "arr": []}
    same = ['{"a": "x"}', '{"a": "x", "m": null, "arr": []}', '```json\n{"a": "X"}\n```']
    s = M.extraction_scores(same, [gold] * 3)
    assert s["exact_record"].k == 3 and (s["tp"], s["fp"], s["fn"]) == (3, 0, 0)
    s = M.extraction_scores(['{"a": "x", "m": 0}', "not json", '["x"]'], [gold] * 3)
    assert (s["tp"], s["fp"], s["fn"]) == (1, 1, 2)  # a filled-in null is a false positive
    assert s["schema_valid"].k == 1 and s["exact_record"].k == 0
    assert [r["f1"] for r in s["records"]] == [pytest.approx(2 / 3), 0.0, 0.0]
    # Nothing in gold, nothing answered: no count; the record is exact with F1 1.
    s = M.extraction_scores(['{"m": null}'], [{"m": None}])
    assert s["records"][0]["f1"] == 1.0 and s["exact_record"].k == 1 and math.isnan(s["f1"])
    with pytest.raises(ValueError):
        M.extraction_scores(["{}"], [gold, gold])


def test_extraction_scores_schema_validity_and_wilson_intervals():
    texts = [json.dumps(r["reference"]) for r in _rows("dev.jsonl")]
    texts[0] = texts[0].replace('"severity": "', '"severity": "x')  # not in the enum
    texts[1] = texts[1][:-1]  # cut off: does not parse
    s = M.extraction_scores(texts, [r["reference"] for r in _rows("dev.jsonl")], X.SCHEMA)
    assert (s["schema_valid"].k, s["schema_valid"].n) == (38, 40)
    assert (s["schema_valid"].lo, s["schema_valid"].hi) == pytest.approx(wilson_interval(38, 40))
    assert s["exact_record"].k == 38 and s["fn"] > 0
    lo, hi = s["f1_interval"]
    assert lo <= s["f1"] <= hi <= 1.0


json_scalars = (
    st.none() | st.booleans() | st.integers(-50, 50) | st.sampled_from(["a", "B", " c", "dd"])
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from("pqr"), inner, max_size=3)
    ),
    max_leaves=8,
)
json_objects = st.dictionaries(st.sampled_from("abcde"), json_values, max_size=5)


@settings(max_examples=200, deadline=None)
@given(json_objects, json_objects, st.randoms(use_true_random=False))
def test_extraction_scores_properties(gold, pred, rnd):
    s = M.extraction_scores([json.dumps(pred)], [gold])
    n_gold, n_pred = len(M.flatten_fields(gold)), len(M.flatten_fields(pred))
    assert s["tp"] + s["fn"] == n_gold and s["tp"] + s["fp"] == n_pred
    assert sum(f["support"] for f in s["fields"].values()) == n_gold
    for k in ("tp", "fp", "fn"):
        assert sum(f[k] for f in s["fields"].values()) == s[k]
    # Swapping answer and gold swaps false positives and false negatives; F1 is symmetric.
    back = M.extraction_scores([json.dumps(gold)], [pred])
    assert (back["tp"], back["fp"], back["fn"]) == (s["tp"], s["fn"], s["fp"])
    assert s["records"][0]["f1"] == pytest.approx(back["records"][0]["f1"])
    # F1 is the harmonic mean of precision and recall: between them.
    p, r, f = s["precision"], s["recall"], s["records"][0]["f1"]
    if p.n and r.n and s["tp"]:
        assert min(p.value, r.value) - 1e-12 <= f <= max(p.value, r.value) + 1e-12

    # An answer equal to gold is exact with F1 1, in any array order.
    def shuffled(v):
        if isinstance(v, list):
            v = [shuffled(x) for x in v]
            rnd.shuffle(v)
            return v
        return {k: shuffled(x) for k, x in v.items()} if isinstance(v, dict) else v

    same = M.extraction_scores([json.dumps(shuffled(gold))], [gold])
    assert same["exact_record"].k == 1 and same["records"][0]["f1"] == 1.0 and same["fp"] == 0


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 9), st.integers(0, 9), st.integers(0, 9)), max_size=30))
def test_bootstrap_f1_interval_is_seeded_and_brackets_resampled_f1(counts):
    a = M.bootstrap_f1_interval(counts, resamples=300)
    assert a == M.bootstrap_f1_interval(counts, resamples=300)
    assert 0.0 <= a[0] <= a[1] <= 1.0
    if counts:
        tp, fp, fn = (sum(c[j] for c in counts) for j in range(3))
        if all(c == counts[0] for c in counts) and 2 * tp + fp + fn:
            assert a[0] == pytest.approx(a[1]) == pytest.approx(2 * tp / (2 * tp + fp + fn))
    else:
        assert a == (0.0, 1.0)


# -- evaluation, report and the quality gate ---------------------------------------------------


def _result(model: str, outputs: list[str], prompts: list) -> EvalResult:
    spec = load_spec(TASK)
    records = [
        {"id": p.id, "prompt": p.text, "output": o, "passed": True, "reasons": [],
         "reference": p.reference, "label": None, "sections": {}}
        for p, o in zip(prompts, outputs, strict=True)
    ]  # fmt: skip
    task = task_metrics(spec, records)
    n = len(records)
    metrics = {"n": n, "format": rate(n, n).to_dict(), "sections": {}, "task": task}
    return EvalResult(model, spec.name, "split:test", "bare", records, metrics, key=model)


def test_task_metrics_and_report_carry_the_extraction_figures_and_per_field_table():
    spec = load_spec(TASK)
    prompts = list(spec.eval.dev)[:10]
    gold = [json.dumps(p.reference) for p in prompts]
    wrong = [g.replace('"severity": "', '"severity": "x', 1) for g in gold[5:8]]  # not in the enum
    vanilla = _result("vanilla", gold[:5] + wrong + ["oops"] * 2, prompts)
    distilled = _result("distilled", gold, prompts)
    tv, td = vanilla.metrics["task"], distilled.metrics["task"]
    # The figures a threshold names are plain numbers; the schema is the validator's.
    assert td["schema_valid"] == td["exact_record"] == td["field_f1"] == 1.0
    assert tv["schema_valid"] == tv["exact_record"] == pytest.approx(0.5)
    assert tv["extraction"]["schema"] == "validator" and tv["extraction"]["schema_valid"]["k"] == 5
    assert 0 < tv["field_f1"] < 1 and tv["field_precision"] < 1  # the wrong severities
    assert distilled.records[0]["extraction"]["exact"] is True
    frame = R.comparison_frame([R.summarize(r) for r in (vanilla, distilled)]).set_index("model")
    assert frame.loc["distilled", "task metric"] == "field_f1 1.00"
    assert frame.loc["vanilla", "schema valid [95% CI]"].startswith("0.50 [")
    assert frame.loc["distilled", "field F1 [95% CI]"] == "1.00 [1.00, 1.00]"
    _, md = R.build_report([vanilla, distilled], samples=1)
    section = md.split("## Extraction")[1].split("## Sample outputs")[0]
    assert "| vanilla " in section and "0.500 [" in section  # schema valid 5/10 with interval
    assert "| reporter.name " in section and "| regions[] " in section
    assert "1.00 / 1.00 / 1.00" in section  # the distilled student's per-field P / R / F1
    assert "schema-valid yes, exact yes, field F1 1.00" in md.split("## Sample outputs")[1]


def test_reused_evaluations_get_the_current_task_metrics(tmp_path, tiny_model_dir):
    """Task metrics are recomputed from the stored records when an evaluation is reused, so a
    cache made before a metric existed still reports it (without generating again)."""
    from distiller.evaluate import cached_evaluate

    spec = load_spec(TASK)
    prompts = list(spec.eval.dev)[:2]
    first = cached_evaluate(tiny_model_dir, spec, prompts, tmp_path, progress=False)
    stored = tmp_path / f"{first.key[:16]}.metrics.json"
    doc = json.loads(stored.read_text())
    del doc["metrics"]["task"]["field_f1"]
    stored.write_text(json.dumps(doc))
    again = cached_evaluate(tiny_model_dir, spec, prompts, tmp_path, progress=False)
    assert again.reused and again.metrics["task"]["field_f1"] == first.metrics["task"]["field_f1"]
    # Constrained decoding: every answer the tiny random model finished validates.
    for r in again.records:
        assert r["finish_reason"] != "stop" or r["extraction"]["schema_valid"]


QUALITY_SPEC = """\
name: tiny_extraction
prompts:
  file: tickets.jsonl
  template: "Extract as JSON.\\n{{text}}"
teacher: {{gold: true}}
validators:
  - type: json_schema
    schema_file: schema.json
student: {{model: {model}, route: sft}}
split: {{train: 0.5, valid: 0.25, test: 0.25, seed: 0}}
eval:
  max_tokens: 24
  json_schema: schema.json
  thresholds: {{exact_record: 1.01, field_f1: 1.01}}
"""


def test_quality_gate_names_the_extraction_figures_in_a_real_pytest_run(tmp_path, tiny_model_dir):
    (tmp_path / "tickets.jsonl").write_text(
        "".join(line + "\n" for line in (DATA / "tickets.jsonl").read_text().splitlines()[:8])
    )
    (tmp_path / "schema.json").write_text((DATA / "schema.json").read_text())
    (tmp_path / "spec.yaml").write_text(QUALITY_SPEC.format(model=tiny_model_dir))
    cmd = [
        sys.executable, "-m", "pytest", str(ROOT / "evals" / "test_quality.py"),
        "-p", "no:cacheprovider", "-m", "quality", "-k", "threshold",
        f"--distiller-spec={tmp_path / 'spec.yaml'}", f"--distiller-student={tiny_model_dir}",
        f"--distiller-out={tmp_path / 'runs'}", f"--distiller-baseline={tmp_path / 'b.json'}",
        f"--distiller-reports={tmp_path / 'reports'}", "--distiller-models=distilled",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    out = proc.stdout
    assert proc.returncode == 1, out[-3000:] + proc.stderr[-2000:]
    # Both thresholds exceed any rate: they fail by construction, whatever the model writes.
    assert "exact_record " in out and "field_f1 " in out and "below the spec threshold 1.01" in out
    assert "lacks" not in out  # both are metrics the task has
    assert "## Extraction" in (tmp_path / "reports" / "latest.md").read_text()


@settings(max_examples=50, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 9), st.integers(0, 9), st.integers(0, 9)), min_size=1, max_size=30
    )
)
def test_paired_f1_difference_is_zero_against_itself_and_antisymmetric(counts):
    assert M.paired_bootstrap_f1_difference(counts, counts, resamples=200) == (0.0, 0.0)
    better = [(tp + fp + fn, 0, 0) for tp, fp, fn in counts]  # every value right
    lo, hi = M.paired_bootstrap_f1_difference(counts, better, resamples=200)
    assert 0.0 <= lo <= hi
    if all(fp + fn for _, fp, fn in counts):  # every record gains in every resample
        assert lo > 0
    back = M.paired_bootstrap_f1_difference(better, counts, resamples=200)
    assert back == pytest.approx((-hi, -lo))


def test_compare_script_tables_constrained_and_unconstrained_per_model(tmp_path, tiny_model_dir):
    prompts = tmp_path / "few.jsonl"
    prompts.write_text(
        "".join(line + "\n" for line in (DATA / "dev.jsonl").read_text().splitlines()[:3])
    )
    cmd = [
        sys.executable, str(ROOT / "scripts" / "compare_extraction.py"), str(TASK),
        "--model", f"a={tiny_model_dir}", "--model", f"b={tiny_model_dir}",
        "--prompts", str(prompts), "--cache", str(tmp_path / "cache"),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for name in ("a", "b"):
        for decoding in ("constrained", "unconstrained"):
            assert f"| {name} | {decoding} | " in out
    assert "| reporter.name | 3 |" in out and "| regions[] |" in out
    # One evaluation per decoding (the two names share a model): one of them unconstrained.
    stored = [json.loads(f.read_text()) for f in (tmp_path / "cache").glob("*.metrics.json")]
    schemas = sorted(d["metrics"]["decoding"]["json_schema"] is None for d in stored)
    assert schemas == [False, True]
    # The same model under the same decoding: the paired difference is exactly 0.
    assert "b - a field F1, constrained: +0.000, paired bootstrap 95% [+0.000, +0.000]" in out
