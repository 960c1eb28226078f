"""A teacher that is another spec's distilled student (``teacher.task``), a layer-dropped student
distilled from it, agreement with the teacher, and the report's figures against the teacher."""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from conftest import build_tiny_model_dir
from distiller.agreement import answer_ids, answer_log_probs, teacher_agreement
from distiller.errors import SpecError
from distiller.models import load_model
from distiller.pipeline import compare, distill, vanilla_model
from distiller.report import build_report, compression_rows, retention
from distiller.spec import load_spec

TEACHER = """\
name: tiny_teacher
prompts:
  template: "Rate: {{text}}"
  items:
    - {{id: a, text: "pays on time", label: Good}}
    - {{id: b, text: "misses payments", label: Bad}}
    - {{id: c, text: "always on time, low debt", label: Good}}
    - {{id: d, text: "defaulted twice", label: Bad}}
    - {{id: e, text: "on time for years", label: Good}}
    - {{id: f, text: "missed three payments", label: Bad}}
teacher: {{gold: true}}
validators: [{{type: label}}]
student:
  model: {model}
  lora: {{rank: 2, alpha: 4}}
  train: {{iters: 2, batch_size: 2, learning_rate: 1.0e-3, steps_per_eval: 2, max_seq_length: 64}}
split: {{test_per_class: 1, valid_per_class: 1, stratify_by: label}}
eval: {{max_tokens: 3, batch_size: 4}}
"""

STUDENT = """\
name: tiny_small
prompts:
  template: "Rate: {text}"
  items:
    - {id: a, text: "pays on time", label: Good}
    - {id: b, text: "misses payments", label: Bad}
    - {id: c, text: "always on time, low debt", label: Good}
    - {id: d, text: "defaulted twice", label: Bad}
    - {id: e, text: "on time for years", label: Good}
    - {id: f, text: "missed three payments", label: Bad}
teacher: {task: teacher.yaml, gold: true}
validators: [{type: label}]
student:
  route: logit-kd
  full_finetune: true
  drop_layers: {count: 2}
  kd: {alpha: 0.5, beta: 0.5, temperature: 2.0}
  train: {iters: 2, batch_size: 2, learning_rate: 1.0e-4, steps_per_eval: 2, max_seq_length: 64}
split: {test_per_class: 1, valid_per_class: 1, stratify_by: label}
eval:
  max_tokens: 3
  batch_size: 4
  thresholds: {retention_format_rate: 0.5, top1_agreement: 0.1}
"""


@pytest.fixture(scope="module")
def four_layer_model(tmp_path_factory) -> Path:
    return build_tiny_model_dir(tmp_path_factory.mktemp("four"), seed=3, num_hidden_layers=4)


def write_specs(tmp: Path, model: Path, student: str = STUDENT) -> Path:
    (tmp / "teacher.yaml").write_text(TEACHER.format(model=model))
    (tmp / "small.yaml").write_text(student)
    return tmp / "small.yaml"


# -- the spec -------------------------------------------------------------------------------------


def test_teacher_task_is_read_and_checked_with_the_spec(tmp_path, four_layer_model):
    spec = load_spec(write_specs(tmp_path, four_layer_model))
    assert spec.teacher.task == (tmp_path / "teacher.yaml").resolve()
    assert spec.teacher.gold and spec.teacher.model is None  # known once the task is built
    assert spec.student.model == ""  # the teacher task's student, filled in by the pipeline
    assert spec.student.drop_layers.layers_to_keep(4) == [0, 3]
    assert spec.student.drop_layers.layers_to_keep(30) == [0, 29]


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("{task: teacher.yaml, gold: true}", "{task: nope.yaml}", "teacher.task: a task spec file"),
        ("{task: teacher.yaml, gold: true}", "{task: small.yaml}", "not a cycle back to it"),
        (
            "{task: teacher.yaml, gold: true}",
            "{task: teacher.yaml, model: smollm2-135m-instruct}",
            "exactly one of 'model' (local), 'endpoint' (a server), 'task'",
        ),
        ("drop_layers: {count: 2}", "drop_layers: {count: 0}", "drop_layers.count"),
        (
            "drop_layers: {count: 2}",
            "drop_layers: {count: 2, keep_every: 2}",
            "exactly one of keep_every",
        ),
    ],
)
def test_bad_teacher_tasks_fail_with_the_key(tmp_path, four_layer_model, old, new, expected):
    assert old in STUDENT
    path = write_specs(tmp_path, four_layer_model, STUDENT.replace(old, new))
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert expected in str(info.value), str(info.value)
    assert "small.yaml" in str(info.value)


def test_a_broken_teacher_task_is_named_from_the_student_spec(tmp_path, four_layer_model):
    path = write_specs(tmp_path, four_layer_model)
    (tmp_path / "teacher.yaml").write_text(TEACHER.format(model=four_layer_model) + "bogus: 1\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    message = str(info.value)
    assert "small.yaml" in message and "teacher.task" in message and "bogus" in message


# -- the pipeline ---------------------------------------------------------------------------------


def test_a_layer_dropped_student_of_a_distilled_teacher_end_to_end(tmp_path, four_layer_model):
    spec_path = write_specs(tmp_path, four_layer_model)
    runs = tmp_path / "runs"
    run = distill(load_spec(spec_path), runs / "tiny_small")
    # The teacher task was distilled first, beside this run, and its student is the teacher.
    teacher_dir = runs / "tiny_teacher" / "fuse" / "model"
    assert run.spec.teacher.model == str(teacher_dir) == run.spec.student.model
    assert json.loads((teacher_dir / "config.json").read_text())["num_hidden_layers"] == 4
    student_config = json.loads((run.student_dir / "config.json").read_text())
    assert student_config["num_hidden_layers"] == 2  # layers 0 and 3 of the teacher
    # The untrained student is the teacher with the same layers dropped.
    vanilla = Path(vanilla_model(run.spec, run.run_dir))
    assert json.loads((vanilla / "config.json").read_text())["num_hidden_layers"] == 2
    teacher_w = dict(mx.load(str(teacher_dir / "model.safetensors")))
    vanilla_w = dict(mx.load(str(vanilla / "model.safetensors")))
    key = "model.layers.1.mlp.down_proj.weight"
    assert np.array_equal(np.array(vanilla_w[key]), np.array(teacher_w[key.replace(".1.", ".3.")]))

    again = distill(load_spec(spec_path), runs / "tiny_small")
    assert all(stage.reused for stage in again.stages.values())

    results, _, agreement = compare(run.spec, run, latency_prompts=0)
    assert {r.model for r in results} == {"teacher", "vanilla", "distilled"}
    assert set(agreement) == {
        ("tiny_small", "split:test", "vanilla"),
        ("tiny_small", "split:test", "distilled"),
    }
    for figures in agreement.values():
        assert 0 <= figures["top1_agreement"] <= 1 and figures["kl_to_teacher"] >= 0
        assert figures["tokens"] > figures["sequences"] == 2  # one test prompt per class
    doc, markdown = build_report(results, agreement=agreement)
    assert "## Against the teacher" in markdown
    rows = {row["model"]: row for row in doc["compression"]}
    assert set(rows) == {"vanilla", "distilled"}
    assert rows["distilled"]["params ratio"] < 1  # half the blocks
    assert rows["distilled"]["top-1 agreement"] == round(
        agreement[("tiny_small", "split:test", "distilled")]["top1_agreement"], 3
    )


# -- agreement ------------------------------------------------------------------------------------


def _numpy_reference(student, teacher, prompt, answer):
    """The same figures computed in numpy, one position at a time."""
    ids = [*prompt, *answer]
    agree = kl = nll = 0.0
    for i, target in enumerate(answer):
        pos = len(prompt) - 1 + i
        s = np.array(student(mx.array([ids[: pos + 1]]))[0, -1], dtype=np.float64)
        t = np.array(teacher(mx.array([ids[: pos + 1]]))[0, -1], dtype=np.float64)
        log_q = s - np.log(np.exp(s - s.max()).sum()) - s.max()
        log_p = t - np.log(np.exp(t - t.max()).sum()) - t.max()
        agree += float(np.argmax(s) == np.argmax(t))
        kl += float((np.exp(log_p) * (log_p - log_q)).sum())
        nll -= log_q[target]
    n = len(answer)
    return agree / n, kl / n, math.exp(nll / n)


def test_agreement_matches_a_position_by_position_reference(tiny_model_factory):
    student, tok = load_model(tiny_model_factory(seed=1))
    teacher, _ = load_model(tiny_model_factory(seed=2))
    prompt = tok.encode("The answer is")
    answer = answer_ids(tok, " forty two")
    assert answer[-1] == tok.eos_token_id
    got = teacher_agreement(student, teacher, [prompt], [prompt], [answer])
    agree, kl, ppl = _numpy_reference(student, teacher, prompt, answer)
    assert got.tokens == len(answer) and got.sequences == 1
    assert got.top1_agreement == pytest.approx(agree)
    assert got.kl_to_teacher == pytest.approx(kl, rel=1e-4, abs=1e-5) and kl > 0
    assert got.student_perplexity == pytest.approx(ppl, rel=1e-4)


def test_a_model_agrees_with_itself_whatever_its_prompt(tiny_model_dir):
    model, tok = load_model(tiny_model_dir)
    prompt = tok.encode("Say something")
    answer = answer_ids(tok, " something useful")
    same = teacher_agreement(model, model, [prompt], [prompt], [answer])
    assert same.top1_agreement == 1.0 and same.kl_to_teacher == pytest.approx(0, abs=1e-6)
    assert same.student_perplexity == pytest.approx(same.teacher_perplexity)
    # Each model is prompted its own way: only answer positions are compared.
    other = teacher_agreement(
        model, model, [prompt], [tok.encode("A longer prompt here")], [answer]
    )
    assert other.tokens == len(answer)
    log_probs = answer_log_probs(model, prompt, answer)
    assert log_probs.shape == (len(answer), model.args.vocab_size)
    with pytest.raises(ValueError, match="no answer tokens"):
        teacher_agreement(model, model, [prompt], [prompt], [[]])


# -- retention and the table ----------------------------------------------------------------------


def _summary(model: str, k: int, n: int, accuracy: float, **extra) -> dict:
    return {
        "task": "t",
        "prompt_set": "split:test",
        "model": model,
        "n": n,
        "format": {"k": k, "n": n, "value": k / n},
        "task_metrics": {"accuracy": accuracy},
        **extra,
    }


def test_retention_is_the_students_figure_over_the_teachers():
    teacher = _summary("teacher", 8, 10, 0.5, latency={"decode_tps": 10.0, "prefill_tps": 100.0})
    student = _summary("distilled", 9, 10, 0.45, latency={"decode_tps": 21.0, "prefill_tps": 250.0})
    kept = retention(student, teacher)
    assert kept == pytest.approx({"format_rate": 9 / 8, "accuracy": 0.9})
    # A teacher figure of 0 has nothing to keep: no ratio rather than a division by zero.
    assert "accuracy" not in retention(student, _summary("teacher", 8, 10, 0.0))
    (row,) = compression_rows([teacher, student])
    assert row["decode speed-up"] == 2.1 and row["prefill speed-up"] == 2.5
    assert row["retention (task)"] == "accuracy 0.90"


# -- the agreement gate in a real pytest run ------------------------------------------------------

GATE_SPEC = """\
name: tiny_gate
prompts:
  items:
    - {{id: p1, text: "Explain the split brain."}}
    - {{id: p2, text: "Explain the thundering herd."}}
    - {{id: p3, text: "Explain the retry storm."}}
    - {{id: p4, text: "Explain clock skew."}}
    - {{id: p5, text: "Explain the lost update."}}
teacher: {{model: {teacher}}}
validators: [{{type: length, max_words: 1000}}]
student: {{model: {teacher}}}
split: {{train: 0.6, valid: 0.0, test: 0.4, seed: 0}}
eval:
  max_tokens: 6
  batch_size: 4
  thresholds: {{retention_format_rate: 0.9, top1_agreement: {top1}, kl_to_teacher: 1000}}
"""


def run_agreement_gate(tmp: Path, teacher: Path, student: Path, top1: float):
    import subprocess
    import sys

    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "spec.yaml").write_text(GATE_SPEC.format(teacher=teacher, top1=top1))
    repo = Path(__file__).resolve().parent.parent
    cmd = [
        sys.executable, "-m", "pytest", str(repo / "evals"), "-p", "no:cacheprovider",
        "-m", "agreement", f"--distiller-spec={tmp / 'spec.yaml'}",
        f"--distiller-student={student}", f"--distiller-out={tmp / 'runs'}",
        f"--distiller-baseline={tmp / 'baseline.json'}", f"--distiller-reports={tmp / 'reports'}",
        "--distiller-models=teacher,distilled",
    ]  # fmt: skip
    return subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=300)


def test_agreement_gate_passes_and_fails_on_its_thresholds(tmp_path, tiny_model_factory):
    teacher, student = tiny_model_factory(seed=4), tiny_model_factory(seed=5)
    # Every answer passes the length check: retention is 1.0; two random models agree on far
    # fewer than all tokens, so a top-1 threshold of 1.0 must fail and 0.0 must pass.
    failing = run_agreement_gate(tmp_path / "a", teacher, student, top1=1.0)
    out = failing.stdout
    assert failing.returncode == 1, out[-3000:] + failing.stderr[-2000:]
    assert "test_agreement_with_teacher_meets_thresholds" in out
    assert "top-1 agreement with the teacher" in out and "below the spec threshold 1" in out
    assert "1 failed, 1 passed" in out  # the retention gate passed
    report = json.loads((tmp_path / "a" / "reports" / "latest.json").read_text())
    (row,) = report["compression"]
    assert row["model"] == "distilled" and row["retention (format)"] == 1.0
    assert 0 <= row["top-1 agreement"] < 1 and row["KL to teacher"] > 0

    passing = run_agreement_gate(tmp_path / "b", teacher, student, top1=0.0)
    assert passing.returncode == 0, passing.stdout[-3000:] + passing.stderr[-2000:]
    assert "2 passed" in passing.stdout and "against the teacher" in passing.stdout


# -- scripts/compare_routes.py: only the route changes -------------------------------------------


def test_compare_routes_changes_only_the_route(tmp_path, four_layer_model):
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "scripts" / "compare_routes.py"
    module_spec = importlib.util.spec_from_file_location("compare_routes", path)
    routes = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(routes)
    spec = load_spec(write_specs(tmp_path, four_layer_model))
    variants = {r: routes.route_spec(spec, r) for r in routes.ROUTES}
    assert {v.name for v in variants.values()} == {
        "tiny_small-seq-kd", "tiny_small-logit-kd-kl", "tiny_small-logit-kd-reverse-kl",
        "tiny_small-logit-kd-jsd", "tiny_small-gkd",
    }  # fmt: skip
    for v in variants.values():
        # Same layers, initialisation, steps, batch and learning rate; same data and teacher.
        assert v.student.drop_layers == spec.student.drop_layers
        assert v.student.train == spec.student.train and v.teacher == spec.teacher
        assert v.prompts == spec.prompts and v.split == spec.split
    assert variants["seq-kd"].student.route == "sft" and variants["seq-kd"].student.kd is None
    kl = variants["logit-kd/kl"].student.kd
    assert (kl.divergence, kl.alpha, kl.beta) == ("kl", spec.student.kd.alpha, spec.student.kd.beta)
    assert kl.cache is not None  # logit-kd routes learn from the cached top-k
    assert variants["logit-kd/jsd"].student.kd.divergence == "jsd"
    assert variants["logit-kd/reverse_kl"].student.kd.cache == kl.cache
    assert variants["gkd"].student.route == "gkd" and variants["gkd"].student.kd.lmbda == 0.5
    with pytest.raises(ValueError, match="unknown route"):
        routes.route_spec(spec, "magic")


# -- the compression fixtures ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fixture", "teacher_task", "retained"),
    [
        ("structured_cot_small.yaml", "structured_cot.yaml", "retention_format_rate"),
        ("credit_risk_small.yaml", "credit_risk.yaml", "retention_accuracy"),
    ],
)
def test_compression_fixtures_cut_a_distilled_teacher(fixture, teacher_task, retained):
    tasks = Path(__file__).resolve().parent.parent / "fixtures" / "tasks"
    spec = load_spec(tasks / fixture)
    assert spec.teacher.task == (tasks / teacher_task).resolve()
    assert spec.student.drop_layers.layers_to_keep(30) == [
        0,
        3,
        5,
        8,
        11,
        13,
        16,
        18,
        21,
        24,
        26,
        29,
    ]
    assert spec.student.route == "logit-kd" and spec.student.kd.cache is not None
    assert spec.eval.thresholds[retained] == 0.9
    # The same held-out prompts as the teacher's own task: retention compares like with like.
    teacher = load_spec(spec.teacher.task)
    from distiller.dataset import split_prompts

    ids = {p.id for p in split_prompts(spec.prompts, spec.split).test}
    assert ids == {p.id for p in split_prompts(teacher.prompts, teacher.split).test}


def test_the_harness_builds_a_teacher_task_and_gates_against_it(tmp_path, four_layer_model):
    import subprocess
    import sys

    student = STUDENT.replace(
        "thresholds: {retention_format_rate: 0.5, top1_agreement: 0.1}",
        "thresholds: {kl_to_teacher: 1000}",
    )
    write_specs(tmp_path, four_layer_model, student)
    repo = Path(__file__).resolve().parent.parent
    cmd = [
        sys.executable, "-m", "pytest", str(repo / "evals"), "-p", "no:cacheprovider",
        "-m", "agreement", f"--distiller-spec={tmp_path / 'small.yaml'}",
        f"--distiller-out={tmp_path / 'runs'}", f"--distiller-reports={tmp_path / 'reports'}",
        f"--distiller-baseline={tmp_path / 'baseline.json'}", "--distiller-models=teacher,distilled",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "1 passed, 1 skipped" in proc.stdout  # the KL gate ran; no retention threshold
    # The teacher task was distilled first beside this run, and the student cut from it.
    assert (tmp_path / "runs" / "tiny_teacher" / "fuse" / "model" / "config.json").exists()
    assert (tmp_path / "runs" / "tiny_small" / "fuse" / "model" / "config.json").exists()
    report = json.loads((tmp_path / "reports" / "latest.json").read_text())
    (row,) = report["compression"]
    assert row["model"] == "distilled" and row["params ratio"] < 1
    assert report["entries"]["tiny_small/split:test/teacher"]["params"] > row["params ratio"]
