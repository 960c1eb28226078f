"""`distiller run` on on-policy DPO, end to end on a tiny model: the SFT policy's task is built
first beside the run, then the pairs, DPO and the fuse, each a cached stage; a rerun reuses
every stage, a changed dpo setting rebuilds from the pairs on, a killed run resumes, and the
report shows the SFT policy beside the DPO student. Bad combinations fail in one line."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hostile import run as run_cli
from procs import kill_when

from distiller.errors import SpecError, UserError
from distiller.metrics import normalize_answer
from distiller.pairs import STORE_FILE, policy_of
from distiller.pipeline import distill
from distiller.samples import SampleStore
from distiller.spec import load_spec

ROOT = Path(__file__).resolve().parent.parent
QUESTIONS = [f"What is {a} plus {b}?" for a in range(6) for b in range(4)]
# Four words after normalization: no answer of at most MAX_TOKENS tokens (a token never spans
# a space) matches one, so every answer of the policy is wrong and every train prompt a pair.
REFS = {f"q{i:02d}": f"the sum is zz {i}" for i in range(len(QUESTIONS))}
MAX_TOKENS = 3
DPO = {"beta": 0.5, "pairs": "on_policy", "policy": "sft", "policy_task": "sft.yaml"}
SPLIT = {"train": 0.6, "valid": 0.2, "test": 0.2, "seed": 0}


def task(name: str, model: Path, student: dict, split: dict = SPLIT, **eval_: object) -> dict:
    """A gold task (the references are the answers) on the tiny model."""
    return {
        "name": name,
        "prompts": [
            {"id": k, "text": q, "reference": REFS[k]} for k, q in zip(REFS, QUESTIONS, strict=True)
        ],
        "teacher": {"gold": True},
        # Every answer passes the validators: only the gold answer decides.
        "validators": [{"type": "regex", "must_not_match": ["ZZZ-never"]}],
        "student": {
            "model": str(model),
            "lora": {"rank": 4, "alpha": 16},
            "train": {"iters": 4, "batch_size": 2, "learning_rate": 1e-3, "steps_per_eval": 2},
            **student,
        },
        "split": split,
        "eval": {"max_tokens": MAX_TOKENS, **eval_},
    }


def write_specs(tmp: Path, model: Path, dpo: dict = DPO, **eval_: object) -> Path:
    """sft.yaml (the policy's task) and dpo.yaml (DPO on its student's answers); dpo.yaml's path."""
    (tmp / "sft.yaml").write_text(yaml.safe_dump(task("tiny_sft", model, {"route": "sft"})))
    dpo_spec = task("tiny_dpo", model, {"route": "dpo", "dpo": dpo}, **eval_)
    (tmp / "dpo.yaml").write_text(yaml.safe_dump(dpo_spec))
    return tmp / "dpo.yaml"


def stage_keys(run_dir: Path) -> dict[str, str]:
    return {
        p.parent.name: json.loads(p.read_text())["key"]
        for p in sorted(run_dir.glob("*/stage.json"))
    }


def test_run_builds_the_policy_then_pairs_dpo_fuse_and_reports_both(tmp_path, tiny_model_dir):
    spec_path = write_specs(tmp_path, tiny_model_dir)
    runs = tmp_path / "runs"
    cmd = [sys.executable, "-m", "distiller.cli", "run", str(spec_path), "--out", str(runs / "tiny_dpo")]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # The policy's task was distilled beside the run, every stage of both built once.
    assert set(stage_keys(runs / "tiny_sft")) == {"teacher", "dataset", "train", "fuse"}
    assert set(stage_keys(runs / "tiny_dpo")) == {"teacher", "dataset", "pairs", "train", "fuse"}
    policy = runs / "tiny_sft" / "fuse" / "model"
    pairs = runs / "tiny_dpo" / "pairs"
    assert policy_of(pairs) == str(policy)  # the pairs are the SFT student's own answers
    train_result = json.loads((runs / "tiny_dpo" / "train" / "train_result.json").read_text())
    assert train_result["base_model"] == str(policy)  # DPO started from it
    # Every policy answer is wrong by construction: each train prompt is a pair.
    spec = load_spec(spec_path)
    card = json.loads((pairs / "pairs_card.json").read_text())
    n_train = len((runs / "tiny_dpo" / "dataset" / "train.jsonl").read_text().splitlines())
    assert card["pairs"]["train"] == n_train and card["prompts_passed"] == 0
    recs = list(SampleStore(pairs / STORE_FILE, readonly=True).records())
    assert recs and not any(r["accepted"] for r in recs)
    assert all(len(normalize_answer(r["completion"]).split()) < 4 for r in recs)
    # The report: the SFT policy beside the vanilla model and the DPO student.
    report = json.loads((runs / "tiny_dpo" / "report" / "latest.json").read_text())
    models = {key.split("/")[-1] for key in report["entries"]}
    assert {"vanilla", "sft", "distilled"} <= models, sorted(report["entries"])
    assert "sft" in proc.stdout and "distilled" in proc.stdout

    # A second run rebuilds nothing, the policy's task included.
    before = {d: stage_keys(runs / d) for d in ("tiny_sft", "tiny_dpo")}
    mtimes = {p: p.stat().st_mtime_ns for p in runs.glob("*/*/stage.json")}
    again = distill(spec, runs / "tiny_dpo")
    assert all(s.reused for s in again.stages.values())
    assert again.policy_run is not None and all(s.reused for s in again.policy_run.stages.values())
    assert {p: p.stat().st_mtime_ns for p in runs.glob("*/*/stage.json")} == mtimes
    assert again.policy == str(policy)

    # A changed dpo setting that changes the pairs: from the pairs on, nothing before them.
    sampled = {**DPO, "samples_per_prompt": 2, "temperature": 1.0}
    changed = distill(load_spec(write_specs(tmp_path, tiny_model_dir, sampled)), runs / "tiny_dpo")
    reused = {name: s.reused for name, s in changed.stages.items()}
    assert reused == {
        "teacher": True,
        "dataset": True,
        "pairs": False,
        "train": False,
        "fuse": False,
    }
    assert all(s.reused for s in changed.policy_run.stages.values())
    assert stage_keys(runs / "tiny_sft") == before["tiny_sft"]
    card = json.loads((pairs / "pairs_card.json").read_text())
    assert card["samples"] == 2 * sum(card["prompts"].values())

    # beta is DPO's alone: the same pairs, trained again.
    beta = {**sampled, "beta": 0.25}
    rebeta = distill(load_spec(write_specs(tmp_path, tiny_model_dir, beta)), runs / "tiny_dpo")
    reused = {name: s.reused for name, s in rebeta.stages.items()}
    assert reused == {
        "teacher": True,
        "dataset": True,
        "pairs": True,
        "train": False,
        "fuse": False,
    }


def test_a_killed_run_resumes_its_pairs(tmp_path, tiny_model_dir):
    # Sampled, many per prompt, one at a time: enough work for the kill to land among them.
    dpo = {**DPO, "samples_per_prompt": 12, "temperature": 1.0}
    spec_path = write_specs(tmp_path, tiny_model_dir, dpo, batch_size=1)
    runs = tmp_path / "runs"
    cmd = [sys.executable, "-m", "distiller.cli", "run", str(spec_path), "--no-eval",
           "--out", str(runs / "tiny_dpo")]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    store = runs / "tiny_dpo" / "pairs" / STORE_FILE
    kill_when(
        proc,
        lambda: store.exists() and store.read_bytes().count(b"\n") >= 5,
        timeout_s=300,
        poll_s=0.005,
    )
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (runs / "tiny_dpo" / "pairs" / "stage.json").exists()
    assert not (runs / "tiny_dpo" / "train").exists()

    resumed = distill(load_spec(spec_path), runs / "tiny_dpo")
    assert all(s.reused for s in resumed.policy_run.stages.values())  # built before the kill
    reused = {name: s.reused for name, s in resumed.stages.items()}
    assert reused == {
        "teacher": True,
        "dataset": True,
        "pairs": False,
        "train": False,
        "fuse": False,
    }
    info = resumed.stages["pairs"].info
    assert 5 <= info["samples"] - info["generated"] < info["samples"]  # kept, not redone
    with SampleStore(store) as st_:  # a writer: cuts a torn tail, if the kill left one
        ids = [r["id"] for r in st_.records()]
    assert len(ids) == len(set(ids)) == info["samples"]  # nothing lost, nothing twice
    assert (resumed.student_dir / "config.json").exists()


# ---------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("dpo", "key", "expected"),
    [
        (
            {"pairs": "on_policy", "policy": "./some_model", "policy_task": "sft.yaml"},
            "student.dpo.policy_task",
            "absent unless policy is sft",
        ),
        (
            {"pairs": "teacher", "policy_task": "sft.yaml"},
            "student.dpo.policy_task",
            "absent unless pairs is on_policy",
        ),
        (
            {"pairs": "on_policy", "policy_task": "nope.yaml"},
            "student.dpo.policy_task",
            "a task spec file (its student is the policy)",
        ),
        (
            {"pairs": "on_policy", "policy_task": "dpo.yaml"},
            "student.dpo.policy_task",
            "another spec than this one",
        ),
    ],
)
def test_bad_policy_tasks_fail_in_one_line(tmp_path, tiny_model_dir, dpo, key, expected):
    path = write_specs(tmp_path, tiny_model_dir, dpo)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    err = info.value
    assert err.key == key and expected in str(err) and "\n" not in str(err)


def test_policy_task_alone_means_its_sft_student(tmp_path, tiny_model_dir):
    dpo = load_spec(
        write_specs(tmp_path, tiny_model_dir, {"pairs": "on_policy", "policy_task": "sft.yaml"})
    ).student.dpo
    assert dpo.policy == "sft" and dpo.policy_task == (tmp_path / "sft.yaml").resolve()


def test_a_policy_that_trained_on_the_held_out_prompts_is_refused(tmp_path, tiny_model_dir):
    path = write_specs(tmp_path, tiny_model_dir)
    other = task("tiny_sft", tiny_model_dir, {"route": "sft"}, split={**SPLIT, "seed": 7})
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(other))
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert info.value.key == "student.dpo.policy_task" and "holds out" in str(info.value)


def test_policy_sft_without_its_task_is_one_line_from_distiller_run(tmp_path, tiny_model_dir):
    path = write_specs(tmp_path, tiny_model_dir, {"pairs": "on_policy", "policy": "sft"})
    out = run_cli(["run", str(path), "--out", str(tmp_path / "runs" / "tiny_dpo")], timeout_s=60)
    assert out.code == 2 and len(out.error_lines) == 1, out.stderr
    assert "student.dpo.policy_task: required by `distiller run`" in out.error_lines[0]
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("stage.json"))


def test_a_policy_task_of_the_same_name_is_refused(tmp_path, tiny_model_dir):
    path = write_specs(tmp_path, tiny_model_dir)
    same = task("tiny_dpo", tiny_model_dir, {"route": "sft"})
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(same))
    with pytest.raises(UserError, match=r"student\.dpo\.policy_task: a task named other"):
        distill(load_spec(path), tmp_path / "runs" / "tiny_dpo")


def test_the_credit_risk_dpo_fixture_names_its_sft_task():
    spec = load_spec(ROOT / "fixtures" / "tasks" / "credit_risk_dpo.yaml")
    assert spec.student.dpo.policy == "sft"
    assert spec.student.dpo.policy_task == ROOT / "fixtures" / "tasks" / "credit_risk.yaml"
    assert load_spec(spec.student.dpo.policy_task).student.route == "sft"


def test_the_harness_builds_the_dpo_student_through_the_same_stages(tmp_path, tiny_model_dir):
    """A real pytest run of the quality gate on the DPO spec: its ``distilled`` model is the
    pipeline's, the SFT policy's task built first beside the run."""
    spec_path = write_specs(tmp_path, tiny_model_dir, thresholds={"token_f1": 0.0})
    runs = tmp_path / "runs"
    cmd = [
        sys.executable, "-m", "pytest", str(ROOT / "evals" / "test_quality.py"),
        "-p", "no:cacheprovider", "-k", "test_task_metrics_meet_thresholds",
        f"--distiller-spec={spec_path}", f"--distiller-out={runs}",
        f"--distiller-reports={tmp_path / 'reports'}",
        f"--distiller-baseline={tmp_path / 'baseline.json'}", "--distiller-models=distilled",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "1 passed" in proc.stdout
    assert set(stage_keys(runs / "tiny_sft")) == {"teacher", "dataset", "train", "fuse"}
    assert set(stage_keys(runs / "tiny_dpo")) == {"teacher", "dataset", "pairs", "train", "fuse"}
    assert policy_of(runs / "tiny_dpo" / "pairs") == str(runs / "tiny_sft" / "fuse" / "model")


def test_the_pairs_command_looks_for_the_policy_tasks_run(tmp_path, tiny_model_dir, monkeypatch):
    from distiller.pairs import resolve_policy

    monkeypatch.setenv("DISTILLER_HOME", str(tmp_path / "home"))
    spec = load_spec(write_specs(tmp_path, tiny_model_dir))
    expected = tmp_path / "home" / "runs" / "tiny_sft" / "fuse" / "model"
    with pytest.raises(UserError, match=rf"no fused SFT student at {expected} .*distiller run"):
        resolve_policy(spec)
    # Once that run holds a fused model, it is the policy.
    expected.mkdir(parents=True)
    (expected / "config.json").write_text("{}")
    assert resolve_policy(spec) == str(expected)
