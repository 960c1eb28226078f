"""Two models on one classification prompt set, with the spec's decoder: accuracy with its
Wilson 95% interval, macro-F1, the predictions per label, and the second model's accuracy minus
the first's with Newcombe's paired 95% interval (the same prompts for both).

    .venv/bin/python scripts/compare_classifiers.py fixtures/tasks/credit_risk.yaml \\
        --model sft=runs/credit_risk/fuse/model --model dpo=runs/credit_risk_dpo/fuse/model \\
        --prompts dev

Choose settings on ``dev``, never on the test split. Evaluations are cached under ``--cache``
(default runs/<task>/eval, where ``distiller run`` caches them).
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import distiller  # noqa: F401  (loads the fast BLAS before mlx)
from distiller import metrics as M
from distiller.evaluate import cached_evaluate, resolve_prompts
from distiller.models import load_model
from distiller.pipeline import default_run_dir
from distiller.spec import load_spec


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec")
    parser.add_argument(
        "--model", action="append", required=True, metavar="NAME=MODEL", help="twice: A, then B"
    )
    parser.add_argument("--prompts", default="dev", help="dev (default), split:test, ...")
    parser.add_argument("--cache", type=Path, help="evaluation cache directory")
    args = parser.parse_args()
    if len(args.model) != 2 or not all("=" in m for m in args.model):
        parser.error("--model NAME=MODEL exactly twice")
    spec = load_spec(args.spec)
    if spec.eval.classify is None:
        parser.error(f"{args.spec} has no eval.classify section")
    labels = list(spec.eval.classify.labels)
    set_name, prompts = resolve_prompts(spec, args.prompts)
    cache = args.cache or default_run_dir(spec) / "eval"
    refs = [p.label for p in prompts]
    right = {}
    print(f"{spec.name} / {set_name} (n={len(prompts)}), decoder {spec.eval.classify.decoder}")
    print("\n| model | accuracy [95% CI] | macro-F1 | predictions |\n|---|---|---|---|")
    for item in args.model:
        name, model = item.split("=", 1)
        records = cached_evaluate(
            model, spec, prompts, cache, "bare", prompt_set=set_name, loaded=load_model(model),
            name=name, progress=False,
        ).records  # fmt: skip
        preds = [r["prediction"] for r in records]
        right[name] = [p == y for p, y in zip(preds, refs, strict=True)]
        acc = M.rate(sum(right[name]), len(refs))
        dist = Counter(str(p) for p in preds)
        spread = " / ".join(f"{y} {dist.get(y, 0)}" for y in [*labels, "None"] if dist.get(y, 0))
        print(
            f"| {name} | {acc.value:.3f} [{acc.lo:.3f}, {acc.hi:.3f}] | "
            f"{M.macro_f1(preds, refs, labels):.3f} | {spread} |"
        )
    (a, ra), (b, rb) = right.items()
    both = sum(x and y for x, y in zip(ra, rb, strict=True))
    only_a = sum(x and not y for x, y in zip(ra, rb, strict=True))
    only_b = sum(y and not x for x, y in zip(ra, rb, strict=True))
    lo, hi = M.paired_difference_interval(both, only_b, only_a, len(refs) - both - only_a - only_b)
    print(
        f"\n{b} - {a}: {(only_b - only_a) / len(refs):+.3f}, paired 95% [{lo:+.3f}, {hi:+.3f}] "
        f"(both right {both}, only {a} {only_a}, only {b} {only_b})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
