"""``distiller spec FILE`` checks a spec; ``--check TEXT`` runs its validators on a text."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from distiller.spec.schema import TaskSpec
from distiller.spec.sections import load_spec
from distiller.spec.yamldoc import decode_utf8, read_text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Load and validate a task spec and print a summary (exit 2 on the first problem, "
        "naming file, key and line). With --check, run the spec's validators on a text."
    )
    parser.add_argument("spec", help="task spec YAML, e.g. fixtures/tasks/structured_cot.yaml")
    parser.add_argument(
        "--check",
        metavar="TEXT_FILE",
        help="a file ('-' for stdin) holding one model output to validate; exit 1 if it fails",
    )
    parser.add_argument("--json", action="store_true", help="print the summary/verdict as JSON")


def run_cli(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec)
    if args.check:
        from distiller.validators import build_validator

        if args.check == "-":
            text = decode_utf8(sys.stdin.buffer.read(), "<stdin>")
        else:
            text = read_text(Path(args.check), "text file to check")
        verdict = build_validator(spec.validators)(text)
        if args.json:
            print(json.dumps(verdict.to_dict(), indent=2))
        else:
            print(f"{'PASS' if verdict.passed else 'FAIL'}  score {verdict.score:.3f}")
            for reason in verdict.reasons:
                print(f"  - {reason}")
        return 0 if verdict.passed else 1
    summary = {
        "name": spec.name,
        "path": str(spec.path),
        "prompts": len(spec.prompts),
        "labels": {lb: sum(p.label == lb for p in spec.prompts) for lb in spec.labels},
        "prompt_sets": {k: len(v) for k, v in spec.eval.prompt_sets.items()},
        "teacher": _teacher_text(spec),
        "few_shot": len(spec.teacher.few_shot),
        "validators": [v.type for v in spec.validators],
        "student": _student_text(spec),
        "split": (
            f"{spec.split.test_per_class} test / {spec.split.valid_per_class} valid per class"
            if spec.split.test_per_class is not None
            else f"{spec.split.train:g}/{spec.split.valid:g}/{spec.split.test:g}"
        )
        + f" seed {spec.split.seed}",
        "fingerprint": spec.fingerprint()[:16],
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        for k, v in summary.items():
            if v or v == 0:
                print(f"{k:12} {v}")
    return 0


def _teacher_text(spec: TaskSpec) -> str:
    t = spec.teacher
    if t.task is not None:
        samples = "; samples: the prompts' own answers" if t.gold else ""
        return f"the distilled student of {t.task.name} (built first){samples}"
    if t.model:
        return t.model
    if t.gold:
        return "gold (the prompts' own answers)"
    assert t.endpoint is not None
    return f"{t.endpoint.model} @ {', '.join(t.endpoint.urls)}"


def _student_text(spec: TaskSpec) -> str:
    s = spec.student
    model = s.model or "the teacher"
    d = s.drop_layers
    if d is not None:
        if d.count:
            kept = f"{d.count} layers"
        elif d.keep:
            kept = f"layers {list(d.keep)}"
        else:
            kept = f"every {d.keep_every}th layer"
        model = f"{model}, {kept} kept"
    return f"{model} ({s.route}, {'full fine-tune' if s.full_finetune else 'LoRA'})"
