"""`distiller run`: every stage in order, each reused when its inputs and settings are unchanged.

spec -> teacher samples -> dataset -> adapter -> fused student -> metrics -> report

On-policy DPO (``student.dpo.pairs: on_policy``) puts its SFT policy first (``dpo.policy_task``,
distilled beside the run) and a pairs stage between dataset and training:
dataset + policy -> pairs -> DPO adapter -> fused student.

Each stage writes into its own directory under the run directory and, last of all, a
``stage.json`` holding the stage's cache key (a hash of everything that determines its output,
chained from the upstream stage's key). A stage whose ``stage.json`` carries the current key is
reused; a changed spec rebuilds only the stages downstream of the change. Stages that can resume
(teacher generation, training) pick up where a killed run stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from distiller import cli_types
from distiller.files import atomic_dir, atomic_write
from distiller.models import model_fingerprint
from distiller.spec import Prompt, TaskSpec, load_spec, stable_hash

STAGE_FILE = "stage.json"


@dataclass
class StageResult:
    name: str
    path: Path
    key: str
    reused: bool
    info: dict[str, Any] = field(default_factory=dict)


def _read_stage(stage_dir: Path) -> dict | None:
    try:
        return json.loads((stage_dir / STAGE_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def run_stage(
    name: str,
    stage_dir: Path,
    key_inputs: Any,
    build: Callable[[Path], dict],
    resumable: bool = False,
    log: Callable[[str], None] = print,
) -> StageResult:
    """Run `build(dir)` unless `stage_dir` already holds this exact key's output.

    A stage is complete when its ``stage.json`` carries the key. Other stages build in an
    empty temporary directory that replaces `stage_dir` whole, ``stage.json`` included
    (``atomic_dir``): a kill leaves the previous output, never a mix. `resumable` stages
    (teacher, train) build in place instead, keeping the partial directory of an interrupted
    run with the same key (their own stores skip finished work), and write ``stage.json`` last.
    """
    key = stable_hash(key_inputs)
    done = _read_stage(stage_dir)
    if done and done.get("key") == key:
        log(f"[{name}] up to date ({stage_dir})")
        return StageResult(name, stage_dir, key, True, done.get("info", {}))
    if not resumable:
        log(f"[{name}] building -> {stage_dir}")
        with atomic_dir(stage_dir) as tmp:
            info = _build_and_record(name, key, tmp, build, final=stage_dir)
        return StageResult(name, stage_dir, key, False, info)
    partial_key_file = stage_dir / ".key"
    same_partial = partial_key_file.exists() and partial_key_file.read_text() == key
    if stage_dir.exists() and not same_partial:
        shutil.rmtree(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    partial_key_file.write_text(key)
    log(f"[{name}] {'resuming' if same_partial else 'building'} -> {stage_dir}")
    info = _build_and_record(name, key, stage_dir, build)
    return StageResult(name, stage_dir, key, False, info)


def _build_and_record(
    name: str, key: str, out: Path, build: Callable[[Path], dict], final: Path | None = None
) -> dict:
    """``build(out)``, then its ``stage.json``. Paths the build reports inside ``out`` are
    recorded as under ``final``, where ``out`` is about to be moved."""
    start = time.perf_counter()
    info = build(out) or {}
    info = {**info, "seconds": round(time.perf_counter() - start, 1)}
    if final is not None:
        dumped = json.dumps(info, default=str)
        info = json.loads(dumped.replace(json.dumps(str(out))[1:-1], json.dumps(str(final))[1:-1]))
    record = {"key": key, "stage": name, "finished": time.time(), "info": info}
    atomic_write(out / STAGE_FILE, json.dumps(record, indent=2, default=str))
    return info


def _teacher_key(spec: TaskSpec) -> dict:
    teacher = asdict(spec.teacher)
    # A teacher task is its fused model, fingerprinted below (and keys made before the field
    # existed stay valid).
    teacher.pop("task")
    if spec.teacher.model:
        teacher["model"] = model_fingerprint(spec.teacher.model)
    return {
        "stage": "teacher",
        "teacher": teacher,
        "prompts": [(p.id, p.text) for p in spec.prompts],
        "validators": [asdict(v) for v in spec.validators],
    }


@dataclass
class RunResult:
    spec: TaskSpec
    run_dir: Path
    stages: dict[str, StageResult]
    # On-policy DPO: the model whose own answers made the pairs (DPO starts from it), and the
    # run that built it when it is ``dpo.policy_task``'s student.
    policy: str | None = None
    policy_run: RunResult | None = None

    @property
    def student_dir(self) -> Path:
        return self.stages["fuse"].path / "model"


def trainable_prompts(spec: TaskSpec) -> TaskSpec:
    """The spec narrowed to its train and valid prompts: held-out prompts need no teacher."""
    from distiller.dataset import split_prompts

    splits = split_prompts(spec.prompts, spec.split)
    return replace(spec, prompts=(*splits.train, *splits.valid))


def teacher_stage(spec: TaskSpec, run_dir: Path, limit: int | None = None) -> StageResult:
    from distiller.teacher import run_teacher

    spec = trainable_prompts(spec)

    def build(out: Path) -> dict:
        return asdict(run_teacher(spec, out / "samples.jsonl", limit=limit))

    key = {**_teacher_key(spec), "limit": limit}
    return run_stage("teacher", run_dir / "teacher", key, build, resumable=True)


def dataset_stage(spec: TaskSpec, run_dir: Path, teacher: StageResult) -> StageResult:
    from distiller.dataset import prepare_dataset

    def build(out: Path) -> dict:
        return asdict(prepare_dataset(spec, teacher.path / "samples.jsonl", out))

    key = {
        "stage": "dataset",
        "teacher": teacher.key,
        "split": asdict(spec.split),
        "prompt_style": spec.student.prompt_style,
        "route": spec.student.route,
    }
    return run_stage("dataset", run_dir / "dataset", key, build)


def train_stage(spec: TaskSpec, run_dir: Path, dataset: StageResult) -> StageResult:
    from distiller.train import train

    def build(out: Path) -> dict:
        result = asdict(train(spec, dataset.path, out, resume=True))
        result.pop("metrics", None)  # the curve lives in metrics.csv/json beside the adapter
        return result

    student = asdict(spec.student)
    student.pop("quantize", None)  # quantization happens at fuse time
    if student["dpo"] is not None:
        # On-policy: the policy is in the pairs' key, which `dataset` is then.
        student["dpo"].pop("policy_task", None)
    student["model"] = model_fingerprint(spec.student.model)
    key = {"stage": "train", "dataset": dataset.key, "student": student}
    if spec.student.route in ("logit-kd", "gkd") or spec.student.drop_layers is not None:
        key["teacher_model"] = model_fingerprint(spec.teacher.model or "")
    return run_stage("train", run_dir / "train", key, build, resumable=True)


def pairs_stage(spec: TaskSpec, run_dir: Path, dataset: StageResult, policy: str) -> StageResult:
    """On-policy DPO pairs: the policy answers the dataset's train/valid prompts, its failures
    become ``rejected`` (``distiller.pairs``). Resumable: each answer is stored as decoded."""
    from distiller.pairs import build_pairs

    def build(out: Path) -> dict:
        return asdict(build_pairs(spec, dataset.path, out, policy=policy))

    dpo = asdict(spec.student.dpo)
    for name in ("beta", "policy", "policy_task"):  # beta is DPO's; the policy is below
        dpo.pop(name)
    key = {
        "stage": "pairs",
        "dataset": dataset.key,
        "policy": model_fingerprint(policy),
        "dpo": dpo,
        "decoding": spec.eval.decoding.to_dict(),
        "seed": spec.student.train.seed,  # sampled answers (dpo.temperature > 0) are seeded
        "validators": [asdict(v) for v in spec.validators],
        # What the gold check compares each answer with.
        "gold": [(p.id, p.label, p.reference) for p in spec.prompts],
        "labels": list(spec.labels),
    }
    return run_stage("pairs", run_dir / "pairs", key, build, resumable=True)


def fuse_stage(spec: TaskSpec, run_dir: Path, trained: StageResult) -> StageResult:
    from distiller.fuse import fuse

    def build(out: Path) -> dict:
        result = fuse(
            trained.info["adapter_dir"],
            out / "model",
            base_model=trained.info.get("base_model"),
            quantize=spec.student.quantize,
            spec_hash=trained.key,
        )
        return asdict(result)

    quantize = asdict(spec.student.quantize) if spec.student.quantize else None
    key = {"stage": "fuse", "train": trained.key, "quantize": quantize}
    return run_stage("fuse", run_dir / "fuse", key, build)


def with_teacher_task(spec: TaskSpec, runs_root: Path, limit: int | None = None) -> TaskSpec:
    """``spec`` with its ``teacher.task`` built: that spec is distilled first (into
    ``runs_root/<its name>``, each stage reused when unchanged) and its fused student becomes
    the teacher model, and the student's model where the spec left it to the teacher's."""
    if spec.teacher.task is None:
        return spec
    teacher_spec = load_spec(spec.teacher.task)
    model = str(distill(teacher_spec, runs_root / teacher_spec.name, limit).student_dir)
    return replace(
        spec,
        teacher=replace(spec.teacher, model=model),
        student=replace(spec.student, model=spec.student.model or model),
    )


def policy_run(spec: TaskSpec, runs_root: Path, limit: int | None = None) -> RunResult | None:
    """On-policy DPO's SFT policy, ``dpo.policy_task``: that spec distilled first (into
    ``runs_root/<its name>``, each stage reused when unchanged, as a ``teacher.task``). None
    when the spec is not on-policy DPO or names its policy model."""
    from distiller.errors import UserError
    from distiller.pairs import on_policy

    dpo = spec.student.dpo
    if not on_policy(spec) or dpo is None or dpo.policy != "sft":
        return None
    if dpo.policy_task is None:
        raise UserError(
            f"{spec.path}: student.dpo.policy_task: required by `distiller run` with policy: "
            "sft (the task spec whose fused student is the policy; `distiller pairs --run-dir` "
            "names a run instead)"
        )
    policy_spec = load_spec(dpo.policy_task)
    if policy_spec.name == spec.name:
        raise UserError(
            f"{spec.path}: student.dpo.policy_task: a task named other than this one "
            f"({spec.name}): each builds in <runs>/<its name>"
        )
    return distill(policy_spec, runs_root / policy_spec.name, limit)


def distill(spec: TaskSpec, run_dir: Path, limit: int | None = None) -> RunResult:
    """Spec -> fused student: every build stage, each reused when unchanged (and, first, the
    teacher's own task when the teacher is another spec's student, and the SFT policy's task
    of on-policy DPO)."""
    from distiller.pairs import on_policy

    spec = with_teacher_task(spec, run_dir.parent, limit)
    built = policy_run(spec, run_dir.parent, limit)
    stages: dict[str, StageResult] = {}
    stages["teacher"] = teacher_stage(spec, run_dir, limit)
    stages["dataset"] = dataset_stage(spec, run_dir, stages["teacher"])
    data = stages["dataset"]
    policy = None
    if on_policy(spec):
        assert spec.student.dpo is not None and spec.student.dpo.policy is not None
        policy = str(built.student_dir) if built is not None else spec.student.dpo.policy
        stages["pairs"] = data = pairs_stage(spec, run_dir, data, policy)
    stages["train"] = train_stage(spec, run_dir, data)
    stages["fuse"] = fuse_stage(spec, run_dir, stages["train"])
    return RunResult(spec, run_dir, stages, policy, built)


def vanilla_model(spec: TaskSpec, run_dir: Path) -> str:
    """The student before training: the spec's student model or, for a layer-dropped student,
    the teacher with those layers dropped (built once into ``run_dir/vanilla``)."""
    drop = spec.student.drop_layers
    if drop is None:
        return spec.student.model
    from distiller.models import resolve_model
    from distiller.train import students as S

    out = run_dir / "vanilla"
    S.dropped_student(resolve_model(spec.teacher.model), out, drop)
    return str(out)


def load_task(path: str | Path) -> TaskSpec:
    """``load_spec`` for the stage commands: a ``teacher.task`` is built first (into the
    default runs directory), so every stage sees the teacher model it names."""
    spec = load_spec(path)
    return with_teacher_task(spec, default_run_dir(spec).parent)


def default_run_dir(spec: TaskSpec) -> Path:
    """runs/<task> (under $DISTILLER_HOME when set), where the pytest plugin looks too."""
    home = os.environ.get("DISTILLER_HOME")
    return (Path(home) / "runs" if home else Path("runs")) / spec.name


@dataclass(frozen=True)
class Contender:
    """A model in the comparison: display name, model reference, and how it is prompted."""

    name: str
    model: str
    style: str  # "scaffold" (system prompt + few-shot, as the teacher) or "bare"


def contenders(spec: TaskSpec, run: RunResult | None) -> list[Contender]:
    """Teacher (with its scaffold), vanilla and distilled student (prompted as the student is);
    for on-policy DPO its policy too, the model DPO started from (``sft`` when it is an SFT
    student, ``policy`` when the spec names a model)."""
    found = []
    if spec.teacher.model:  # an endpoint teacher is not evaluated locally
        found.append(Contender("teacher", spec.teacher.model, "scaffold"))
    style = spec.student.prompt_style
    run_dir = run.run_dir if run is not None else default_run_dir(spec)
    found.append(Contender("vanilla", vanilla_model(spec, run_dir), style))
    if run is not None and run.policy is not None:
        name = "sft" if run.policy_run is not None else "policy"
        found.append(Contender(name, run.policy, style))
    if run is not None:
        found.append(Contender("distilled", str(run.student_dir), style))
    return found


def prompt_sets(spec: TaskSpec) -> list[str]:
    """The held-out test split, then every extra eval prompt set of the spec."""
    return ["split:test", *(f"set:{name}" for name in spec.eval.prompt_sets)]


def compare(
    spec: TaskSpec,
    run: RunResult | None,
    limit: int | None = None,
    latency_prompts: int = 1,
    sets: list[str] | None = None,
) -> tuple[list, dict[tuple[str, str], dict], dict[tuple[str, str, str], dict]]:
    """Evaluate every contender on every prompt set (cached in the run dir by input hash).

    Returns (EvalResults, single-stream latency per (task, contender name), agreement with the
    teacher per (task, prompt set, contender name) when the teacher is a local model). Latency is one
    whole answer per model after a warm-up by default, decoded as the evaluation decodes; the
    throughput benchmarks in ``evals/`` time more rounds.
    """
    from distiller.evaluate import cached_evaluate_together, resolve_prompts
    from distiller.models import load_model

    run_dir = run.run_dir if run is not None else default_run_dir(spec)
    cache = run_dir / "eval"
    sets = dict(resolve_prompts(spec, which) for which in sets or prompt_sets(spec))
    sets = {name: prompts for name, prompts in sets.items() if prompts}
    results, latency, agreement = [], {}, {}
    if not sets:
        return results, latency, agreement
    teacher: tuple[tuple, dict] | None = None  # (loaded, its evaluations), once evaluated
    for who in contenders(spec, run):
        loaded = load_model(who.model)
        # Every prompt set in one batched pass: fuller batches decode much faster on a CPU.
        together = cached_evaluate_together(
            who.model, spec, sets, cache, style=who.style, limit=limit, name=who.name, loaded=loaded
        )
        results.extend(together.values())
        if who.name == "teacher":
            teacher = (loaded, together)
        elif teacher is not None:
            for set_name, result in together.items():
                agreement[(spec.name, set_name, who.name)] = _agreement(
                    spec, sets[set_name], result, who, loaded, *teacher, cache
                )
        if latency_prompts:
            first = next(iter(together.values()))
            latency[(spec.name, who.name)] = _latency(
                cache / f"latency-{first.key[:16]}.json",
                spec,
                who,
                next(iter(sets.values())),
                loaded,
                latency_prompts,
            )
    return results, latency, agreement


def _agreement(
    spec: TaskSpec,
    prompts: list[Prompt],
    result: Any,
    who: Contender,
    loaded: tuple,
    teacher_loaded: tuple,
    teacher_results: dict,
    cache: Path,
) -> dict:
    """Agreement of ``who`` with the teacher on the teacher's answers (cached with the pair of
    evaluations it comes from)."""
    from distiller.agreement import agreement_with_teacher, cached_teacher_agreement

    teacher_result = teacher_results[result.prompt_set]
    return cached_teacher_agreement(
        cache,
        ["agreement", result.key, teacher_result.key],
        lambda: agreement_with_teacher(
            spec, prompts, teacher_result.records, loaded, teacher_loaded, who.style
        ),
    )


def _latency(
    path: Path, spec: TaskSpec, who: Contender, prompts: list[Prompt], loaded: tuple, n: int
) -> dict:
    """Single-stream latency on the first `n` prompts, cached beside the evaluation it goes with."""
    from distiller.evaluate import measure_latency, render_messages
    from distiller.generate import chat_prompt

    if path.exists():
        return json.loads(path.read_text())
    model, tokenizer = loaded
    ids = [chat_prompt(tokenizer, render_messages(spec, p, who.style)) for p in prompts[:n]]
    figures = measure_latency(model, tokenizer, ids, spec.eval.decoding).to_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(figures, indent=2))
    return figures


def compare_and_report(run: RunResult, limit: int | None = None) -> int:
    """Evaluate teacher, vanilla and distilled student; print and write the comparison report."""
    from distiller.report import build_report, write_reports

    results, latency, agreement = compare(run.spec, run, limit=limit)
    doc, markdown = build_report(
        results, latency, extra={"run_dir": str(run.run_dir)}, agreement=agreement
    )
    out = write_reports(doc, markdown, run.run_dir / "report")
    print(markdown.split("## Sample outputs")[0])
    print(f"report: {out / 'latest.md'}")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", help="task spec (YAML), e.g. fixtures/tasks/structured_cot.yaml")
    parser.add_argument(
        "--out",
        type=cli_types.out_dir,
        help="run directory (default: runs/<task name>, as the pytest plugin)",
    )
    parser.add_argument(
        "--limit",
        type=cli_types.positive_int,
        help="use only the first N prompts per stage (quick trial runs)",
    )
    parser.add_argument(
        "--no-eval", action="store_true", help="stop after fusing; skip evaluation and report"
    )
    parser.epilog = (
        "Stages, each in its own directory of the run and reused while its inputs are unchanged:\n"
        "  teacher -> dataset -> train -> fuse -> eval -> report\n"
        "On-policy DPO (student.route: dpo, dpo.pairs: on_policy) adds a pairs stage:\n"
        "  teacher -> dataset -> pairs -> train (DPO from the policy) -> fuse -> eval -> report\n"
        "with policy: sft the SFT student of dpo.policy_task is built first, beside the run\n"
        "(<runs>/<its name>, as a teacher.task), and the report shows it as 'sft'.\n"
        "A killed run resumes: rerun the same command."
    )


def run_cli(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec)
    run_dir = args.out or default_run_dir(spec)
    result = distill(spec, run_dir, limit=args.limit)
    print(f"distilled student: {result.student_dir}")
    if args.no_eval:
        return 0
    return compare_and_report(result, limit=args.limit)
