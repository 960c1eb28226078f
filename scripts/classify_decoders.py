"""Compare a classification task's decoders on one model and prompt set: greedy generation
(the text normalized to a label), label ranking without calibration, and calibrated ranking.

    .venv/bin/python scripts/classify_decoders.py fixtures/tasks/credit_risk.yaml \\
        --model smollm2-135m-instruct --prompts dev [--bias Standard=0.2]

Accuracy carries its Wilson 95% interval. The raw and calibrated rankings come from one scoring
pass (the raw scores are kept in every record). Choose settings on ``dev``, never on the test
split. Evaluations are cached under ``--cache`` (default runs/<task>/eval), as ``distiller run``
caches them.
"""

from __future__ import annotations

import argparse
from collections import Counter
from dataclasses import replace
from pathlib import Path

import distiller  # noqa: F401  (loads the fast BLAS before mlx)
from distiller import metrics as M
from distiller.classify import uncalibrated_prediction
from distiller.evaluate import cached_evaluate, resolve_prompts
from distiller.models import load_model
from distiller.pipeline import default_run_dir
from distiller.spec import load_spec


def _row(name: str, preds: list, refs: list, labels: list[str]) -> str:
    k = sum(p == r for p, r in zip(preds, refs, strict=True))
    acc = M.rate(k, len(refs))
    f1 = M.macro_f1(preds, refs, labels)
    dist = Counter(str(p) for p in preds)
    spread = ", ".join(f"{y} {dist.get(y, 0)}" for y in [*labels, "None"] if dist.get(y, 0))
    return f"| {name} | {acc.value:.3f} [{acc.lo:.3f}, {acc.hi:.3f}] | {f1:.3f} | {spread} |"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec")
    parser.add_argument("--model", required=True, help="registry name or model directory")
    parser.add_argument("--prompts", default="dev", help="dev (default), split:test, ...")
    parser.add_argument("--style", default="bare", choices=("bare", "scaffold"))
    parser.add_argument("--name", help="display name (default: the model)")
    parser.add_argument(
        "--bias", action="append", default=[], metavar="LABEL=X", help="per-label bias"
    )
    parser.add_argument("--cache", type=Path, help="evaluation cache directory")
    args = parser.parse_args()

    spec = load_spec(args.spec)
    classify = spec.eval.classify
    if classify is None:
        parser.error(f"{args.spec} has no eval.classify section")
    bias = dict(classify.bias)
    for item in args.bias:
        label, _, value = item.partition("=")
        bias[label] = float(value)
    set_name, prompts = resolve_prompts(spec, args.prompts)
    cache = args.cache or default_run_dir(spec) / "eval"
    loaded = load_model(args.model)
    labels = list(classify.labels)
    refs = [p.label for p in prompts]

    def run(**changes):
        s = replace(spec, eval=replace(spec.eval, classify=replace(classify, **changes)))
        return cached_evaluate(
            args.model, s, prompts, cache, args.style, prompt_set=set_name, loaded=loaded,
            name=args.name,
        ).records  # fmt: skip

    generated = run(decoder="generate")
    ranked = run(decoder="ranking", calibrate=True, bias=bias)
    print(f"{spec.name} / {set_name} (n={len(prompts)}) / {args.name or args.model} ({args.style})")
    print("\n| decoder | accuracy [95% CI] | macro-F1 | predictions |\n|---|---|---|---|")
    print(
        _row(
            "generate (greedy, label normalized)",
            [r["prediction"] for r in generated],
            refs,
            labels,
        )
    )
    raw = [uncalibrated_prediction(r["raw_scores"], labels) for r in ranked]
    print(_row("ranking, raw", raw, refs, labels))
    name = "ranking, calibrated" + (f" + bias {bias}" if bias else "")
    print(_row(name, [r["prediction"] for r in ranked], refs, labels))
    prior = ranked[0]["prior"] if ranked else {}
    print("\nprior (mean content-free score): " + ", ".join(f"{y} {prior[y]:.3f}" for y in labels))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
