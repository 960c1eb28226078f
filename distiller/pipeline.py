"""`distiller run`: every stage in order, each reused when its inputs and settings are unchanged.

spec -> teacher samples -> dataset -> adapter -> fused student -> metrics -> report

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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from distiller.spec import TaskSpec, load_spec, stable_hash

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
    """Run `build(stage_dir)` unless `stage_dir` already holds this exact key's output.

    `resumable` stages keep a partial directory from an interrupted run with the same key
    (their own stores skip finished work); others start from an empty directory.
    """
    key = stable_hash(key_inputs)
    done = _read_stage(stage_dir)
    if done and done.get("key") == key:
        log(f"[{name}] up to date ({stage_dir})")
        return StageResult(name, stage_dir, key, True, done.get("info", {}))
    partial_key_file = stage_dir / ".key"
    same_partial = partial_key_file.exists() and partial_key_file.read_text() == key
    if stage_dir.exists() and not (resumable and same_partial):
        shutil.rmtree(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    partial_key_file.write_text(key)
    log(f"[{name}] {'resuming' if same_partial and resumable else 'building'} -> {stage_dir}")
    start = time.perf_counter()
    info = build(stage_dir) or {}
    info = {**info, "seconds": round(time.perf_counter() - start, 1)}
    record = {"key": key, "stage": name, "finished": time.time(), "info": info}
    tmp = stage_dir / (STAGE_FILE + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str))
    os.replace(tmp, stage_dir / STAGE_FILE)
    return StageResult(name, stage_dir, key, False, info)


def model_fingerprint(model_ref: str) -> dict:
    """Identity of a model reference: the name, plus config and weight sizes for a directory."""
    path = Path(model_ref).expanduser()
    if not path.is_dir():
        return {"ref": model_ref}
    files = {p.name: p.stat().st_size for p in sorted(path.glob("*.safetensors"))}
    config = (path / "config.json").read_text() if (path / "config.json").exists() else ""
    return {"dir": str(path.resolve()), "config": stable_hash(config), "weights": files}


def _teacher_key(spec: TaskSpec) -> dict:
    teacher = asdict(spec.teacher)
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

    @property
    def student_dir(self) -> Path:
        return self.stages["fuse"].path / "model"


def teacher_stage(spec: TaskSpec, run_dir: Path, limit: int | None = None) -> StageResult:
    from distiller.teacher import run_teacher

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
    student["model"] = model_fingerprint(spec.student.model)
    key = {"stage": "train", "dataset": dataset.key, "student": student}
    if spec.student.route == "logit-kd":
        key["teacher_model"] = model_fingerprint(spec.teacher.model or "")
    return run_stage("train", run_dir / "train", key, build, resumable=True)


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


def distill(spec: TaskSpec, run_dir: Path, limit: int | None = None) -> RunResult:
    """Spec -> fused student: every build stage, each reused when unchanged."""
    stages: dict[str, StageResult] = {}
    stages["teacher"] = teacher_stage(spec, run_dir, limit)
    stages["dataset"] = dataset_stage(spec, run_dir, stages["teacher"])
    stages["train"] = train_stage(spec, run_dir, stages["dataset"])
    stages["fuse"] = fuse_stage(spec, run_dir, stages["train"])
    return RunResult(spec, run_dir, stages)


def default_run_dir(spec: TaskSpec) -> Path:
    return Path("runs") / spec.name


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", help="task spec (YAML), e.g. fixtures/tasks/structured_cot.yaml")
    parser.add_argument("--out", type=Path, help="run directory (default: runs/<task name>)")
    parser.add_argument(
        "--limit", type=int, help="use only the first N prompts per split (quick trial runs)"
    )
    parser.add_argument(
        "--no-eval", action="store_true", help="stop after fusing; skip evaluation and report"
    )


def run_cli(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec)
    run_dir = args.out or default_run_dir(spec)
    result = distill(spec, run_dir, limit=args.limit)
    print(f"distilled student: {result.student_dir}")
    if args.no_eval:
        return 0
    from distiller.comparison import compare_and_report

    return compare_and_report(result, limit=args.limit)
