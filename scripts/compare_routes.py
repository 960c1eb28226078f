"""Compare distillation routes on one student at equal training steps: one table.

    python scripts/compare_routes.py fixtures/tasks/structured_cot_small.yaml

For each route the spec's student (same layers, same initialisation, same steps, batch size and
learning rate) is trained on the spec's teacher samples and evaluated on the held-out prompts
against the teacher:

- ``seq-kd``: cross-entropy on the teacher's samples (sequence-level KD; route sft);
- ``logit-kd/<divergence>``: CE + divergence to the teacher's cached top-k log-probabilities
  (forward KL, reverse KL, JSD);
- ``gkd``: on-policy, a fraction ``lmbda`` of batches are the student's own samples scored by
  the live teacher, generalized JSD.

"Equal compute" is equal optimizer steps on equal batches; the wall time of each route is in the
table too (logit-kd adds one teacher pass to fill the cache; gkd a teacher forward every step
and generation on on-policy steps). Each route has its own run directory beside the spec's
(``runs/<task>-<route>``); the teacher samples, and the teacher's evaluation, are shared from
the spec's own run so every route learns from and is measured against the same thing.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

import distiller  # noqa: F401  (the fast BLAS before mlx)
from distiller.metrics import rate
from distiller.pipeline import compare, default_run_dir, distill, load_task
from distiller.report import frame_markdown, retention, summarize
from distiller.spec import KDSpec, LogitCacheSpec, TaskSpec

ROUTES = ("seq-kd", "logit-kd/kl", "logit-kd/reverse_kl", "logit-kd/jsd", "gkd")


def route_spec(spec: TaskSpec, route: str) -> TaskSpec:
    """The spec with only the route (and its loss) changed."""
    student = spec.student
    base_kd = student.kd or KDSpec(cache=LogitCacheSpec())
    if route == "seq-kd":
        student = replace(student, route="sft", kd=None)
    elif route.startswith("logit-kd/"):
        divergence = route.split("/", 1)[1]
        kd = replace(base_kd, divergence=divergence, cache=base_kd.cache or LogitCacheSpec())
        student = replace(student, route="logit-kd", kd=kd)
    elif route == "gkd":
        kd = KDSpec(temperature=1.0, lmbda=0.5, jsd_beta=0.5)
        student = replace(student, route="gkd", kd=kd)
    else:
        raise ValueError(f"unknown route {route!r}; expected one of {ROUTES}")
    name = f"{spec.name}-{route.replace('/', '-').replace('_', '-')}"
    return replace(spec, name=name, student=student)


def share_teacher(base_run: Path, run_dir: Path) -> None:
    """Hard-link the base run's teacher samples and teacher evaluations into ``run_dir``."""
    for part in ("teacher", "eval"):
        src, dst = base_run / part, run_dir / part
        if src.exists() and not dst.exists():
            run_dir.mkdir(parents=True, exist_ok=True)
            shutil.copytree(src, dst, copy_function=_link)


def _link(src: str, dst: str) -> None:
    try:
        Path(dst).hardlink_to(src)
    except OSError:
        shutil.copy2(src, dst)


def measure(spec: TaskSpec, route: str, runs_root: Path) -> dict:
    variant = route_spec(spec, route)
    if variant.student == spec.student:  # the spec's own route: its own run
        variant = spec
    run_dir = runs_root / variant.name
    share_teacher(runs_root / spec.name, run_dir)
    start = time.perf_counter()
    run = distill(variant, run_dir)
    built = time.perf_counter() - start
    results, _, agreement = compare(run.spec, run, latency_prompts=0)
    by = {(r.prompt_set, r.model): r for r in results}
    teacher = by[("split:test", "teacher")]
    student = by[("split:test", "distilled")]
    fmt = student.format_rate
    kept = retention(summarize(student), summarize(teacher))
    agree = agreement.get((variant.name, "split:test", "distilled"), {})
    train = run.stages["train"].info
    row = {
        "route": route,
        "steps": train.get("steps"),
        "train s": round(float(train.get("seconds", 0))),
        "format rate [95% CI]": f"{fmt.value:.2f} [{fmt.lo:.2f}, {fmt.hi:.2f}] ({fmt.k}/{fmt.n})",
        "retention (format)": round(kept.get("format_rate", float("nan")), 2),
        "top-1 agreement": round(agree.get("top1_agreement", float("nan")), 3),
        "KL to teacher": round(agree.get("kl_to_teacher", float("nan")), 3),
        "perplexity": round(agree.get("student_perplexity", float("nan")), 2),
        "built s": round(built),
    }
    unseen = by.get(("set:unseen", "distilled"))
    if unseen is not None:
        u = unseen.format_rate
        row["unseen format rate"] = f"{u.value:.2f} ({u.k}/{u.n})"
    for name, value in student.metrics.get("task", {}).items():
        if name in ("accuracy", "exact_match", "field_f1") and isinstance(value, (int, float)):
            n = student.metrics["n"]
            r = rate(round(value * n), n)
            row[name] = f"{r.value:.3f} [{r.lo:.3f}, {r.hi:.3f}]"
            row[f"retention ({name})"] = round(kept.get(name, float("nan")), 2)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("spec", help="a spec with a teacher model and a student (layer-dropped)")
    parser.add_argument("--routes", default=",".join(ROUTES), help=f"subset of {ROUTES}")
    parser.add_argument("--out", type=Path, help="where the table goes (default: runs/<task>/)")
    args = parser.parse_args()
    spec = load_task(args.spec)
    runs_root = default_run_dir(spec).parent
    distill(spec, runs_root / spec.name)  # the shared teacher samples (and the spec's route)
    rows = []
    out = args.out or runs_root / spec.name
    for route in args.routes.split(","):
        rows.append(measure(spec, route.strip(), runs_root))
        import pandas as pd

        table = frame_markdown(pd.DataFrame(rows))
        print(table, flush=True)
        out.mkdir(parents=True, exist_ok=True)
        (out / "routes.md").write_text(table + "\n")
        (out / "routes.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(f"table: {out / 'routes.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
