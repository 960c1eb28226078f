"""Constrained vs unconstrained decoding of an extraction task, for each model given: schema-valid
and exact-record rates (Wilson 95%), field precision / recall and micro F1 (bootstrap 95% over
records), answers that hit max_tokens, then F1 per field, and each model's F1 minus the first
model's under the same decoding (paired bootstrap over the same records).

    .venv/bin/python scripts/compare_extraction.py fixtures/tasks/incident_extraction.yaml \\
        --model vanilla=smollm2-135m-instruct \\
        --model distilled=runs/incident_extraction/fuse/model --prompts split:test

"constrained" is the spec's own decoding (``eval.json_schema``); "unconstrained" is the same
decoding without the schema. Both are judged by the spec's json_schema validator and gold. Choose
settings on ``dev``, never on the test split. Evaluations are cached under ``--cache`` (default
runs/<task>/eval, where ``distiller run`` caches them: its constrained ones are reused).
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import distiller  # noqa: F401  (loads the fast BLAS before mlx)
from distiller import metrics as M
from distiller.evaluate import cached_evaluate, resolve_prompts
from distiller.models import load_model
from distiller.pipeline import default_run_dir
from distiller.spec import load_spec


def _counts(result) -> list[tuple[int, int, int]]:
    return [tuple(r["extraction"][k] for k in ("tp", "fp", "fn")) for r in result.records]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec")
    parser.add_argument(
        "--model", action="append", required=True, metavar="NAME=MODEL", help="repeatable"
    )
    parser.add_argument("--prompts", default="dev", help="dev (default), split:test, ...")
    parser.add_argument("--cache", type=Path, help="evaluation cache directory")
    args = parser.parse_args()
    if not all("=" in m for m in args.model):
        parser.error("--model NAME=MODEL")
    spec = load_spec(args.spec)
    if spec.eval.decoding.json_schema is None:
        parser.error(f"{args.spec} has no eval.json_schema: nothing to compare")
    # dataclasses.replace, not Decoding.replace: that one ignores None (an unset CLI option).
    unconstrained = replace(spec.eval.decoding, json_schema=None)
    free = replace(spec, eval=replace(spec.eval, decoding=unconstrained))
    set_name, prompts = resolve_prompts(spec, args.prompts)
    cache = args.cache or default_run_dir(spec) / "eval"
    results = {}
    for item in args.model:
        name, model = item.split("=", 1)
        loaded = load_model(model)
        for decoding, s in (("constrained", spec), ("unconstrained", free)):
            results[name, decoding] = cached_evaluate(
                model, s, prompts, cache, "bare", prompt_set=set_name, loaded=loaded,
                name=name, progress=False,
            )  # fmt: skip
    print(f"{spec.name} / {set_name} (n={len(prompts)})\n")
    print(
        "| model | decoding | schema valid [95% CI] | exact record [95% CI] | field precision "
        "| field recall | field F1 [95% CI] | hit max_tokens | tokens/answer |\n"
        "|---|---|---|---|---|---|---|---|---|"
    )
    for (name, decoding), r in results.items():
        ex = r.metrics["task"]["extraction"]
        lo, hi = ex["f1_interval"]
        print(
            f"| {name} | {decoding} | {M.Rate.from_dict(ex['schema_valid'])} | "
            f"{M.Rate.from_dict(ex['exact_record'])} | {ex['precision']['value'] or 0:.3f} | "
            f"{ex['recall']['value'] or 0:.3f} | {ex['f1']:.3f} [{lo:.3f}, {hi:.3f}] | "
            f"{r.metrics['hit_max_tokens']} | {r.metrics['mean_output_tokens']:.1f} |"
        )
    paths = sorted({p for r in results.values() for p in r.metrics["task"]["extraction"]["fields"]})
    gold = next(iter(results.values())).metrics["task"]["extraction"]["fields"]
    print("\nfield F1 (gold values)\n")
    print("| field | gold | " + " | ".join(f"{n} {d}" for n, d in results) + " |")
    print("|---|---|" + "---|" * len(results))
    for path in paths:
        cells = []
        for r in results.values():
            f = r.metrics["task"]["extraction"]["fields"].get(path)
            cells.append("—" if f is None or f["f1"] is None else f"{f['f1']:.2f}")
        support = gold.get(path, {}).get("support", 0)
        print(f"| {path} | {support} | " + " | ".join(cells) + " |")
    names = list(dict.fromkeys(n for n, _ in results))
    if len(names) > 1:
        print()
        for decoding in ("constrained", "unconstrained"):
            base = results[names[0], decoding]
            for other in names[1:]:
                r = results[other, decoding]
                diff = r.metrics["task"]["field_f1"] - base.metrics["task"]["field_f1"]
                lo, hi = M.paired_bootstrap_f1_difference(_counts(base), _counts(r))
                print(
                    f"{other} - {names[0]} field F1, {decoding}: {diff:+.3f}, paired bootstrap "
                    f"95% [{lo:+.3f}, {hi:+.3f}]"
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
