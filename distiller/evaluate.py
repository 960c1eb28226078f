"""Stage: model -> metrics. Evaluate any model on any prompt set of a task.

``evaluate(model_ref, spec, prompts)`` loads the model, renders each prompt ``bare`` (the user
text alone, how the distilled student is used) or ``scaffold`` (the teacher's system prompt and
few-shot turns first, how the teacher is used), generates greedily in batches, runs the spec's
validators on every output and returns per-sample records plus metrics: format rate with its
Wilson interval, per-section rates, task metrics (classification, extraction, exact match),
output lengths, batched prefill/decode throughput, peak memory, parameter count and the size of
the model directory. ``cached_evaluate`` keys that on everything that determines it (model
weights, prompts, rendering, validators, decoding) so repeated test sessions reuse it.

``measure_latency`` is the single-stream path: what one user waiting for one answer sees.

    distiller eval --model smollm2-135m-instruct --task fixtures/tasks/structured_cot.yaml \\
        --prompts split:test --out runs/eval/vanilla.jsonl
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from distiller import cli_types
from distiller import metrics as M
from distiller.decoding import Decoding, add_decoding_arguments, decoding_from_args
from distiller.errors import UserError
from distiller.files import atomic_write
from distiller.hashing import canonical, stable_hash
from distiller.models import disk_size_mb, load_model, model_fingerprint
from distiller.spec import Prompt, TaskSpec

STYLES = ("bare", "scaffold")
# Bump when the meaning of a stored evaluation changes, so stale caches are not reused.
EVAL_FORMAT = 1


@dataclass
class EvalResult:
    """One model on one prompt set: per-sample records and aggregate metrics (JSON-able)."""

    model: str
    task: str
    prompt_set: str
    style: str
    records: list[dict[str, Any]]
    metrics: dict[str, Any]
    key: str = ""
    reused: bool = False  # loaded from the evaluation cache rather than generated now

    @property
    def format_rate(self) -> M.Rate:
        return M.Rate.from_dict(self.metrics["format"])

    @property
    def section_rates(self) -> dict[str, M.Rate]:
        return {h: M.Rate.from_dict(r) for h, r in self.metrics["sections"].items()}

    def failing(self, n: int = 3) -> list[dict[str, Any]]:
        """The first ``n`` records that failed validation."""
        return [r for r in self.records if not r["passed"]][:n]

    def header(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "task": self.task,
            "prompt_set": self.prompt_set,
            "style": self.style,
            "key": self.key,
        }


# ---------------------------------------------------------------------------------------------
# Models


def weight_bytes(model: Any) -> int:
    """Bytes held by the model's parameters (as loaded: dtype and quantization included)."""
    from mlx.utils import tree_flatten

    return int(sum(v.nbytes for _, v in tree_flatten(model.parameters())))


def model_peak_mb(model: Any, active_before: int) -> float:
    """The model's weights plus what the measured work added to MLX's peak since the peak was
    reset (``active_before``: active memory then). MLX's peak is process-wide; this way other
    models alive in the process (a test session holds several) do not count against this one."""
    import mlx.core as mx

    return (weight_bytes(model) + max(0, mx.get_peak_memory() - active_before)) / 1e6


def count_parameters(model: Any) -> int:
    """Number of weights; quantized matrices count their unpacked elements, not scales/biases."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    total = 0
    for _, module in model.named_modules():
        bits = getattr(module, "bits", None)
        for name, value in module.items():  # this module's own arrays, not its children's
            if not isinstance(value, mx.array):
                continue
            if bits and name == "weight":
                total += value.size * 32 // bits
            elif not (bits and name in ("scales", "biases")):
                total += value.size
    if total == 0:  # not an nn.Module tree we can walk: count the flat parameter tree
        total = sum(v.size for _, v in tree_flatten(model.parameters()))
    return int(total)


# ---------------------------------------------------------------------------------------------
# Prompts


def render_messages(spec: TaskSpec, prompt: Prompt, style: str) -> list[dict]:
    from distiller.generate import build_messages

    if style == "bare":
        return build_messages(prompt.text)
    if style == "scaffold":
        return build_messages(prompt.text, spec.teacher.system_prompt, spec.teacher.few_shot)
    raise UserError(f"style must be one of {', '.join(STYLES)}, got {style!r}")


def resolve_prompts(spec: TaskSpec, which: str) -> tuple[str, list[Prompt]]:
    """A prompt set by name: ``split:test|valid|train``, ``set:NAME`` (eval.prompt_sets),
    ``dev`` (eval.dev), ``all``, or a YAML/JSONL file (read with the spec's prompt rules). Returns (name, prompts)."""
    if which.startswith("split:"):
        from distiller.dataset import split_prompts

        part = which.split(":", 1)[1]
        if part not in ("train", "valid", "test"):
            raise UserError(f"--prompts {which}: expected split:train, split:valid or split:test")
        return which, list(getattr(split_prompts(spec.prompts, spec.split), part))
    if which.startswith("set:") or which in spec.eval.prompt_sets:
        name = which.removeprefix("set:")
        if name not in spec.eval.prompt_sets:
            known = ", ".join(spec.eval.prompt_sets) or "none"
            raise UserError(f"--prompts {which}: no such eval.prompt_sets entry (have: {known})")
        return f"set:{name}", list(spec.eval.prompt_sets[name])
    if which == "all":
        return "all", list(spec.prompts)
    if which == "dev":
        if not spec.eval.dev:
            raise UserError(f"--prompts dev: the spec {spec.path} has no eval.dev prompts")
        return "dev", list(spec.eval.dev)
    path = Path(which)
    if not path.exists():
        raise UserError(
            f"--prompts {which}: not a file, nor split:train|valid|test, set:NAME or all"
        )
    from distiller.spec import read_prompts

    return path.stem, list(read_prompts(path))


# ---------------------------------------------------------------------------------------------
# Task metrics


def _validator_params(spec: TaskSpec, type_: str) -> dict[str, Any] | None:
    from distiller.validators import check_params

    for v in spec.validators:
        if v.type == type_:
            return check_params(type_, dict(v.params))
    return None


def task_metrics(spec: TaskSpec, records: list[dict[str, Any]]) -> dict[str, Any]:
    """Metrics beyond format, chosen by what the task has: labels, JSON references, answers."""
    from distiller.validators import normalize_label

    out: dict[str, Any] = {}
    if not records:
        return out
    texts = [r["output"] for r in records]
    label_params = _validator_params(spec, "label")
    if label_params is not None:
        labels = list(label_params.get("labels") or spec.labels)
        cs = bool(label_params.get("case_sensitive"))
        preds = [normalize_label(t, labels, cs) for t in texts]
        for r, p in zip(records, preds, strict=True):
            r["prediction"] = p
        refs = [r.get("label") for r in records]
        if labels and all(ref in labels for ref in refs):
            out["accuracy"] = M.accuracy(preds, refs)
            out["macro_f1"] = M.macro_f1(preds, refs, labels)
            out["per_class"] = M.classification_report(preds, refs, labels)
            out["confusion"] = {
                "labels": labels,
                "matrix": M.confusion_matrix(preds, refs, labels).tolist(),
            }
            ranked = all("raw_scores" in r for r in records)
            c = spec.eval.classify
            if ranked and c is not None and (c.calibrate or c.bias):  # what calibration did
                from distiller.classify import uncalibrated_prediction

                raw = [uncalibrated_prediction(r["raw_scores"], labels) for r in records]
                out["accuracy_uncalibrated"] = M.accuracy(raw, refs)
                out["macro_f1_uncalibrated"] = M.macro_f1(raw, refs, labels)
            if ranked:
                out["mean_margin"] = statistics.fmean(r["margin"] for r in records)
    json_params = _validator_params(spec, "json_schema")
    if json_params is not None:
        out["json_valid"] = M.json_validity(texts, json_params.get("schema")).to_dict()
    refs = [r.get("reference") for r in records]
    if refs and all(isinstance(x, dict) for x in refs):
        fa = M.field_accuracy(texts, refs)
        out["field_accuracy"] = fa["overall"]
        out["field_accuracy_by_field"] = fa["fields"]
        out["exact_object"] = fa["exact"]
        out.update(_extraction_metrics(spec, records, texts, refs, json_params))
    elif refs and all(_is_answers(x) for x in refs):
        # Gold answers: a string, or a list of accepted ones (the best match counts, as SQuAD).
        for r, t, x in zip(records, texts, refs, strict=True):
            r["exact_match"], r["token_f1"] = M.exact_match(t, x), M.token_f1(t, x)
        out["exact_match"] = statistics.fmean(r["exact_match"] for r in records)
        out["token_f1"] = statistics.fmean(r["token_f1"] for r in records)
    return out


def _extraction_metrics(
    spec: TaskSpec,
    records: list[dict[str, Any]],
    texts: list[str],
    refs: list[dict],
    json_params: dict[str, Any] | None,
) -> dict[str, Any]:
    """``metrics.extraction_scores`` against the schema the answers are judged by (the
    json_schema validator's, else the one decoding was constrained to): the figures a threshold
    can name as numbers, the rates, intervals and per-field counts under ``extraction``, and
    each record's own scores in ``record["extraction"]``."""
    schema = (json_params or {}).get("schema")
    if schema is None and spec.eval.decoding.json_schema is not None:
        schema = json.loads(spec.eval.decoding.json_schema)
    ex = M.extraction_scores(texts, refs, schema)
    for r, scores in zip(records, ex.pop("records"), strict=True):
        r["extraction"] = scores
    rates = {k: ex[k] for k in ("schema_valid", "exact_record", "precision", "recall")}
    return {
        "schema_valid": rates["schema_valid"].value,
        "exact_record": rates["exact_record"].value,
        "field_precision": rates["precision"].value,
        "field_recall": rates["recall"].value,
        "field_f1": ex["f1"],
        "extraction": {
            **{k: r.to_dict() for k, r in rates.items()},
            "f1": ex["f1"],
            "f1_interval": list(ex["f1_interval"]),
            "tp": ex["tp"],
            "fp": ex["fp"],
            "fn": ex["fn"],
            "fields": ex["fields"],
            "schema": "validator"
            if (json_params or {}).get("schema")
            else ("eval.json_schema" if schema is not None else "none (parses to an object)"),
        },
    }


def _is_answers(reference: Any) -> bool:
    """A gold answer string, or a non-empty list of them."""
    if isinstance(reference, list):
        return bool(reference) and all(isinstance(x, str) for x in reference)
    return isinstance(reference, str)


# ---------------------------------------------------------------------------------------------
# Evaluation


def metrics_path(out_path: str | Path) -> Path:
    """Where the metrics JSON of a per-sample JSONL file lives: ``x.jsonl`` -> ``x.metrics.json``."""
    p = Path(out_path)
    return p.with_name(p.name.removesuffix(".jsonl") + ".metrics.json")


def write_result(result: EvalResult, out_path: str | Path) -> None:
    """Per-sample JSONL at ``out_path`` and metrics JSON beside it (each written atomically)."""
    out_path = Path(out_path)
    lines = [json.dumps(r, ensure_ascii=False, default=str) for r in result.records]
    atomic_write(out_path, "".join(line + "\n" for line in lines))
    doc = {**result.header(), "metrics": result.metrics}
    atomic_write(metrics_path(out_path), json.dumps(doc, indent=2, default=str) + "\n")


def read_result(out_path: str | Path) -> EvalResult:
    out_path = Path(out_path)
    doc = json.loads(metrics_path(out_path).read_text(encoding="utf-8"))
    records = [json.loads(line) for line in out_path.read_text(encoding="utf-8").splitlines()]
    return EvalResult(
        model=doc["model"],
        task=doc["task"],
        prompt_set=doc["prompt_set"],
        style=doc["style"],
        records=records,
        metrics=doc["metrics"],
        key=doc.get("key", ""),
        reused=True,
    )


def evaluate(
    model_ref: str | Path,
    spec: TaskSpec,
    prompts: list[Prompt] | tuple[Prompt, ...],
    out_path: str | Path | None = None,
    style: str = "bare",
    limit: int | None = None,
    *,
    prompt_set: str = "prompts",
    name: str | None = None,
    loaded: tuple[Any, Any] | None = None,
    batch_size: int | None = None,
    progress: bool = True,
) -> EvalResult:
    """Generate (batched, decoded as ``spec.eval.decoding`` says) for every prompt, validate,
    and measure. To evaluate with other decoding settings, evaluate a spec that has them
    (``dataclasses.replace``): the settings are part of what a result means.

    ``loaded`` is an already loaded ``(model, tokenizer)`` for ``model_ref`` (saves a reload);
    ``name`` is the display name in reports (default: ``model_ref``).
    """
    result = evaluate_together(
        model_ref,
        spec,
        {prompt_set: prompts},
        style,
        limit,
        name=name,
        loaded=loaded,
        batch_size=batch_size,
        progress=progress,
    )[prompt_set]
    if out_path is not None:
        write_result(result, out_path)
    return result


def evaluate_together(
    model_ref: str | Path,
    spec: TaskSpec,
    sets: dict[str, list[Prompt] | tuple[Prompt, ...]],
    style: str = "bare",
    limit: int | None = None,
    *,
    name: str | None = None,
    loaded: tuple[Any, Any] | None = None,
    batch_size: int | None = None,
    progress: bool = True,
) -> dict[str, EvalResult]:
    """``evaluate`` on several prompt sets at once: one batched generation over all their
    prompts, then records and metrics per set.

    Batched decoding is bound by reading the weights, so a fuller batch costs little more per
    step than a smaller one: one pass over every set beats one pass per set.
    Throughput and memory figures are then those of the joint pass (``metrics["generated_with"]``
    names the sets that shared it).
    """
    from distiller.generate import chat_prompt, generate_batch
    from distiller.validators import build_validator

    if style not in STYLES:
        raise UserError(f"style must be one of {', '.join(STYLES)}, got {style!r}")
    sets = {k: list(v)[:limit] if limit is not None else list(v) for k, v in sets.items()}
    prompts = [p for ps in sets.values() for p in ps]
    decoding = spec.eval.decoding
    batch_size = batch_size or spec.eval.batch_size
    model, tokenizer = loaded if loaded is not None else load_model(model_ref)
    validator = build_validator(spec.validators)
    ids = [chat_prompt(tokenizer, render_messages(spec, p, style)) for p in prompts]

    import mlx.core as mx

    mx.eval(model.parameters())  # resident before measuring (see model_peak_mb)
    active_before = mx.get_active_memory()
    bar = None
    if progress and prompts:
        from tqdm import tqdm

        bar = tqdm(total=len(prompts), desc=f"eval {name or model_ref}", unit="prompt", leave=False)
    classify = spec.eval.classify
    rankings = None  # with eval.classify's ranking decoder: the labels scored, not generated
    try:
        if classify is not None and classify.decoder == "ranking":
            from distiller.classify import rank_for_evaluation, ranking_record

            mx.reset_peak_memory()
            null = [Prompt("content-free", text) for text in classify.content_free]
            rankings, gens = rank_for_evaluation(
                model,
                tokenizer,
                classify,
                [render_messages(spec, p, style) for p in prompts],
                [render_messages(spec, p, style) for p in null],
                [len(x) for x in ids],
                batch_size=batch_size,
                progress=bar.update if bar is not None else None,
            )
        else:
            gens = generate_batch(
                model,
                tokenizer,
                ids,
                decoding,
                batch_size=batch_size,
                progress=bar.update if bar is not None else None,
                reset_peak_memory=True,
            )
    finally:
        if bar is not None:
            bar.close()
    peak_mb = model_peak_mb(model, active_before)

    results: dict[str, EvalResult] = {}
    outputs = iter(gens)
    ranked = iter(rankings or ())
    for set_name, set_prompts in sets.items():
        records, verdicts = [], []
        for p, g in zip(set_prompts, outputs, strict=False):
            v = validator(g.text, p)
            verdicts.append(v)
            records.append(
                {
                    "id": p.id,
                    "prompt": p.text,
                    "output": g.text,
                    "passed": v.passed,
                    "score": v.score,
                    "reasons": v.reasons,
                    "sections": dict(v.sections),
                    "prompt_tokens": g.prompt_tokens,
                    "output_tokens": len(g.tokens),
                    "finish_reason": g.finish_reason,
                    "label": p.label,
                    "reference": p.reference,
                }
            )
            if rankings is not None:
                records[-1].update(ranking_record(next(ranked)))
        fc = M.format_compliance(verdicts)
        stats = gens.stats
        n = len(records)
        metrics: dict[str, Any] = {
            "n": n,
            "format": fc["overall"].to_dict(),
            "sections": {h: r.to_dict() for h, r in fc["sections"].items()},
            "failed_checks": fc["failed_checks"],
            "task": task_metrics(spec, records),
            "mean_output_tokens": statistics.fmean(r["output_tokens"] for r in records)
            if n
            else 0.0,
            "hit_max_tokens": sum(r["finish_reason"] == "length" for r in records),
            "prefill_tps": stats.prompt_tps,
            "decode_tps": stats.decode_tps,
            "generation_tps": stats.generation_tps,
            "wall_s": stats.wall_time,
            "peak_memory_mb": peak_mb,
            "params": count_parameters(model),
            "weights_mb": weight_bytes(model) / 1e6,
            "disk_mb": disk_size_mb(model_ref),
            "max_tokens": decoding.max_tokens,
            "batch_size": batch_size,
            "no_repeat_ngram": decoding.no_repeat_ngram,
            "repetition_penalty": decoding.repetition_penalty,
            "stop": list(decoding.stop),
            "decoding": decoding.to_dict(),
            "generated_with": list(sets),
        }
        if classify is not None:
            metrics["classify"] = canonical(classify)  # as it reads back from the JSON
        results[set_name] = EvalResult(
            model=name or str(model_ref),
            task=spec.name,
            prompt_set=set_name,
            style=style,
            records=records,
            metrics=metrics,
        )
    return results


def eval_key(
    model_ref: str | Path,
    spec: TaskSpec,
    prompts: list[Prompt] | tuple[Prompt, ...],
    style: str,
    limit: int | None,
    batch_size: int | None = None,
) -> str:
    """Hash of everything that determines an evaluation's outputs and metrics."""
    prompts = list(prompts)[:limit] if limit is not None else list(prompts)
    scaffold = (
        {"system": spec.teacher.system_prompt, "few_shot": list(spec.teacher.few_shot)}
        if style == "scaffold"
        else None
    )
    return stable_hash(
        {
            "format": EVAL_FORMAT,
            "model": model_fingerprint(model_ref),
            "prompts": [(p.id, p.text, p.label, p.reference) for p in prompts],
            "style": style,
            "scaffold": scaffold,
            "validators": [asdict(v) for v in spec.validators],
            "batch_size": batch_size or spec.eval.batch_size,
            "decoding": spec.eval.decoding,
            # Only when set, so keys made before eval.classify existed stay valid.
            **({"classify": spec.eval.classify} if spec.eval.classify else {}),
        }
    )


def cached_evaluate(
    model_ref: str | Path,
    spec: TaskSpec,
    prompts: list[Prompt] | tuple[Prompt, ...],
    cache_dir: str | Path,
    style: str = "bare",
    limit: int | None = None,
    *,
    prompt_set: str = "prompts",
    **kwargs: Any,
) -> EvalResult:
    """``evaluate``, reused from ``cache_dir/<key>.jsonl`` when nothing that determines it changed.

    Throughput and memory figures in a reused result are those measured when it was made.
    """
    return cached_evaluate_together(
        model_ref, spec, {prompt_set: prompts}, cache_dir, style, limit, **kwargs
    )[prompt_set]


def cached_evaluate_together(
    model_ref: str | Path,
    spec: TaskSpec,
    sets: dict[str, list[Prompt] | tuple[Prompt, ...]],
    cache_dir: str | Path,
    style: str = "bare",
    limit: int | None = None,
    **kwargs: Any,
) -> dict[str, EvalResult]:
    """``evaluate_together`` with each set's result cached under its own key: sets found in
    ``cache_dir`` are reused, the missing ones are generated in one pass."""
    found: dict[str, EvalResult] = {}
    missing: dict[str, tuple[str, Path]] = {}
    for set_name, prompts in sets.items():
        key = eval_key(model_ref, spec, prompts, style, limit, kwargs.get("batch_size"))
        out = Path(cache_dir) / f"{key[:16]}.jsonl"
        missing[set_name] = (key, out)
        if out.exists() and metrics_path(out).exists():
            try:
                result = read_result(out)
            except (OSError, ValueError, KeyError):
                continue  # a damaged cache entry is recomputed
            if result.key == key:
                if kwargs.get("name"):
                    result.model = kwargs["name"]
                # Task metrics are a function of the records and the spec: recomputed, a reused
                # evaluation carries every metric this distiller computes, with no regeneration.
                result.metrics["task"] = task_metrics(spec, result.records)
                found[set_name] = result
                del missing[set_name]
    if missing:
        fresh = evaluate_together(
            model_ref,
            spec,
            {k: sets[k] for k in missing},
            style,
            limit,
            **kwargs,
        )
        for set_name, (key, out) in missing.items():
            fresh[set_name].key = key
            write_result(fresh[set_name], out)
            found[set_name] = fresh[set_name]
    return {k: found[k] for k in sets}


# ---------------------------------------------------------------------------------------------
# Single-stream latency


@dataclass
class Latency:
    """Single-stream figures averaged over prompts (after ``warmup`` unmeasured runs)."""

    samples: int
    ms_per_sample: float  # wall time of one whole answer
    ms_per_token: float  # wall time / generated tokens
    prefill_tps: float
    decode_tps: float
    mean_output_tokens: float
    peak_memory_mb: float
    per_sample_ms: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fixed_workload_peak_mb(model: Any, prompts: list[list[int]], decode_steps: int = 32) -> float:
    """Peak MB (weights + what the work adds) of prefilling ``prompts`` (cut to the shortest)
    and decoding ``decode_steps`` forced tokens, batched with a KV cache.

    The work is the same for any two models of one architecture, whatever they would generate,
    so the figure compares models' memory costs, not their output lengths (a model that stops
    early holds a smaller KV cache in an ordinary evaluation).
    """
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    if not prompts:
        raise ValueError("fixed_workload_peak_mb needs at least one prompt")
    width = min(len(p) for p in prompts)
    tokens = mx.array([p[:width] for p in prompts])
    mx.eval(model.parameters())
    active_before = mx.get_active_memory()
    mx.reset_peak_memory()
    cache = make_prompt_cache(model)
    mx.eval(model(tokens, cache=cache))
    step = tokens[:, -1:]
    for _ in range(decode_steps):
        mx.eval(model(step, cache=cache))
    return model_peak_mb(model, active_before)


def measure_latency(
    model: Any,
    tokenizer: Any,
    prompts: list[list[int]],
    decoding: Decoding,
    warmup: int = 1,
) -> Latency:
    """Single-stream generation of each prompt, one at a time, decoded as ``decoding`` says:
    give it the evaluation's own settings (``spec.eval.decoding``), so the latency beside an
    evaluation times the same answers (the same stop strings and logit shaping)."""
    import mlx.core as mx

    from distiller.generate import generate_one

    if not prompts:
        raise ValueError("measure_latency needs at least one prompt")
    for p in prompts[:warmup]:
        generate_one(model, tokenizer, p, decoding.replace(max_tokens=min(decoding.max_tokens, 8)))
    active_before = mx.get_active_memory()
    mx.reset_peak_memory()
    gens = []
    for p in prompts:
        start = time.perf_counter()
        g = generate_one(model, tokenizer, p, decoding)
        gens.append((g, time.perf_counter() - start))
    ms = [1e3 * t for _, t in gens]
    tokens = sum(g.generation_tokens for g, _ in gens)
    return Latency(
        samples=len(gens),
        ms_per_sample=statistics.fmean(ms),
        ms_per_token=sum(ms) / tokens if tokens else float("nan"),
        prefill_tps=statistics.fmean(g.prompt_tps for g, _ in gens),
        decode_tps=statistics.fmean(g.generation_tps for g, _ in gens),
        mean_output_tokens=tokens / len(gens),
        peak_memory_mb=model_peak_mb(model, active_before),
        per_sample_ms=ms,
    )


# ---------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="registry name or model directory")
    parser.add_argument("--task", required=True, help="task spec (YAML): validators, prompts")
    parser.add_argument(
        "--prompts",
        default="split:test",
        help="split:test|valid|train (held-out split of the spec's prompts), set:NAME "
        "(eval.prompt_sets), dev (eval.dev: for choosing settings), all, or a YAML/JSONL "
        "prompts file (default: split:test)",
    )
    parser.add_argument(
        "--style",
        choices=STYLES,
        default="bare",
        help="bare: the prompt alone (students); scaffold: with the teacher's system prompt "
        "and few-shot turns (default: bare)",
    )
    parser.add_argument(
        "--out", type=cli_types.out_file, help="per-sample JSONL (metrics: <out>.metrics.json)"
    )
    parser.add_argument(
        "--limit", type=cli_types.positive_int, help="evaluate only the first N prompts"
    )
    parser.add_argument(
        "--batch-size", type=cli_types.positive_int, help="default: the spec's eval.batch_size"
    )
    add_decoding_arguments(parser, None)
    parser.add_argument(
        "--latency",
        type=cli_types.non_negative_int,
        default=0,
        metavar="N",
        help="also time N prompts single-stream",
    )


def run_cli(args: argparse.Namespace) -> int:
    from distiller.pipeline import load_task

    spec = load_task(args.task)
    decoding = decoding_from_args(args, spec.eval.decoding)
    if decoding != spec.eval.decoding:
        spec = replace(spec, eval=replace(spec.eval, decoding=decoding))
    set_name, prompts = resolve_prompts(spec, args.prompts)
    if not prompts:
        raise UserError(f"--prompts {args.prompts}: no prompts")
    loaded = load_model(args.model)
    result = evaluate(
        args.model,
        spec,
        prompts,
        out_path=args.out,
        style=args.style,
        limit=args.limit,
        prompt_set=set_name,
        loaded=loaded,
        batch_size=args.batch_size,
    )
    m = result.metrics
    print(f"{spec.name} / {set_name} / {args.model} ({args.style}), n={m['n']}")
    print(f"  format rate   {result.format_rate}")
    for h, r in result.section_rates.items():
        print(f"  {h:<13} {r}")
    for k, v in m["task"].items():
        if isinstance(v, float):
            print(f"  {k:<13} {v:.3f}")
    print(
        f"  tokens/answer {m['mean_output_tokens']:.1f} | prefill {m['prefill_tps']:.1f} tok/s | "
        f"decode {m['decode_tps']:.1f} tok/s (batched) | peak {m['peak_memory_mb']:.0f} MB | "
        f"{m['params'] / 1e6:.1f}M params"
        + (f" | {m['disk_mb']:.1f} MB on disk" if m["disk_mb"] is not None else "")
    )
    if args.latency:
        from distiller.generate import chat_prompt

        model, tokenizer = loaded
        ids = [
            chat_prompt(tokenizer, render_messages(spec, p, args.style))
            for p in prompts[: args.latency]
        ]
        lat = measure_latency(model, tokenizer, ids, spec.eval.decoding)
        print(
            f"  single stream: {lat.ms_per_sample:.0f} ms/answer, {lat.ms_per_token:.1f} ms/token, "
            f"prefill {lat.prefill_tps:.1f} tok/s, decode {lat.decode_tps:.1f} tok/s"
        )
    if args.out:
        print(f"wrote {args.out} and {metrics_path(args.out)}")
    return 0
