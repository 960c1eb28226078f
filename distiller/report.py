"""Reports: the teacher-vs-student table, side-by-side samples, latest/history files, baseline.

Inputs are ``distiller.evaluate.EvalResult`` objects (one model on one prompt set) and,
optionally, single-stream latency figures per (task, model). Tables are pandas DataFrames
rendered as Markdown with tabulate. Files written by ``write_reports`` into a directory the
caller names (the pytest harness: ``.distiller/reports/``, git-ignored; ``distiller run``: the
run directory's ``report/``), never into the tracked tree:

- ``latest.md``      the tables and samples, for humans (CI artifacts, PR comments);
- ``latest.json``    the same figures, for machines;
- ``history.jsonl``  one line per run appended, to watch trends.

The baseline (``reports/baseline.json``, committed) holds, per ``task/prompt_set/model`` entry,
the counts behind each rate and, since version 2, each prompt's verdict per figure
(``by_prompt``: prompt id -> passed) so the gate can pair the baseline's prompts with the run's
(McNemar's exact test) instead of treating the two rates as independent. Version-1 files load
as they are: their entries carry counts only and are gated unpaired. The baseline is read for
gating and rewritten only on request (``--distiller-update-baseline``).
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from distiller.files import atomic_write
from distiller.metrics import Rate, rate
from distiller.plots import write_plots

# 2: rates carry ``by_prompt`` verdicts (paired gating). 1: counts only.
BASELINE_VERSION = 2
RATE_FIELDS = ("k", "n", "lo", "hi", "value")
# Task metrics in order of preference for the table's single "task metric" column.
TASK_METRICS = ("accuracy", "field_f1", "field_accuracy", "token_f1", "exact_match", "macro_f1")


def entry_key(task: str, prompt_set: str, model: str) -> str:
    return f"{task}/{prompt_set}/{model}"


def main_task_metric(task: dict[str, Any]) -> tuple[str, float] | None:
    for name in TASK_METRICS:
        if isinstance(task.get(name), (int, float)):
            return name, float(task[name])
    return None


def _fmt_rate(d: dict[str, Any]) -> str:
    r = Rate.from_dict(d)
    if r.n == 0:
        return "n/a"
    return f"{r.value:.2f} [{r.lo:.2f}, {r.hi:.2f}]"


def _num(x: Any, digits: int = 1) -> Any:
    return None if x is None else round(float(x), digits)


# ---------------------------------------------------------------------------------------------
# Summaries


def prompt_verdicts(
    records: Sequence[dict[str, Any]], section: str | None = None
) -> dict[str, bool]:
    """``{prompt id: passed}`` of an evaluation's records: the whole format check, or with
    ``section`` whether that section was satisfied (absent counts as not, as in the rates)."""
    if section is None:
        return {r["id"]: bool(r["passed"]) for r in records}
    return {r["id"]: bool((r.get("sections") or {}).get(section)) for r in records}


def _rate_entry(rate: dict[str, Any], verdicts: dict[str, bool]) -> dict[str, Any]:
    entry = {k: rate[k] for k in RATE_FIELDS}
    # Paired gating needs one verdict per prompt; with repeated ids the pairing is ambiguous.
    if len(verdicts) == rate["n"]:
        entry["by_prompt"] = verdicts
    return entry


def summarize(result: Any, latency: dict[str, Any] | None = None) -> dict[str, Any]:
    """The figures of one EvalResult (plus latency) that reports and the baseline keep."""
    m = result.metrics
    task = {k: v for k, v in m.get("task", {}).items() if isinstance(v, (int, float))}
    if isinstance(m.get("task", {}).get("json_valid"), dict):
        task["json_valid"] = Rate.from_dict(m["task"]["json_valid"]).value
    out = {
        "task": result.task,
        "prompt_set": result.prompt_set,
        "model": result.model,
        "style": result.style,
        "n": m["n"],
        "format": _rate_entry(m["format"], prompt_verdicts(result.records)),
        "sections": {
            h: _rate_entry(r, prompt_verdicts(result.records, h))
            for h, r in m.get("sections", {}).items()
        },
        "task_metrics": task,
        "mean_output_tokens": m.get("mean_output_tokens"),
        "params": m.get("params"),
        "disk_mb": m.get("disk_mb"),
        "peak_memory_mb": m.get("peak_memory_mb"),
        "batch_prefill_tps": m.get("prefill_tps"),
        "batch_decode_tps": m.get("decode_tps"),
        "batch_generation_tps": m.get("generation_tps"),
        "eval_key": result.key,
    }
    if isinstance(m.get("task", {}).get("extraction"), dict):
        out["extraction"] = m["task"]["extraction"]
    if latency:
        out["latency"] = {
            k: latency[k]
            for k in ("ms_per_sample", "ms_per_token", "prefill_tps", "decode_tps", "samples")
            if k in latency
        }
    return out


MODEL_ORDER = ("teacher", "vanilla", "distilled")


def _row_order(s: dict[str, Any]) -> tuple:
    """Task, then the held-out split before extra prompt sets, then teacher, vanilla, distilled
    (other names after them, alphabetically): results arrive in whatever order they were made."""
    rank = MODEL_ORDER.index(s["model"]) if s["model"] in MODEL_ORDER else len(MODEL_ORDER)
    return (s["task"], not s["prompt_set"].startswith("split:"), s["prompt_set"], rank, s["model"])


def comparison_frame(summaries: Sequence[dict[str, Any]], reference: str = "vanilla") -> Any:
    """One row per (task, prompt set, model); deltas against the ``reference`` model's row."""
    import pandas as pd

    rows = []
    by_key = {(s["task"], s["prompt_set"], s["model"]): s for s in summaries}
    for s in sorted(summaries, key=_row_order):
        ref = by_key.get((s["task"], s["prompt_set"], reference))
        lat = s.get("latency") or {}
        tm = main_task_metric(s["task_metrics"])
        row = {
            "task": s["task"],
            "prompts": f"{s['prompt_set']} (n={s['n']})",
            "model": s["model"],
            "params (M)": _num((s["params"] or 0) / 1e6, 1) if s.get("params") else None,
            "disk MB": _num(s.get("disk_mb"), 1),
            "latency ms/sample": _num(lat.get("ms_per_sample"), 0),
            "prefill tok/s": _num(lat.get("prefill_tps") or s.get("batch_prefill_tps"), 0),
            "decode tok/s": _num(lat.get("decode_tps"), 1),
            "batch decode tok/s": _num(s.get("batch_decode_tps"), 1),
            "peak MB": _num(s.get("peak_memory_mb"), 0),
            "format rate [95% CI]": _fmt_rate(s["format"]),
        }
        for h, r in s["sections"].items():
            row[h] = None if r["n"] == 0 else round(r["value"], 2)
        row["task metric"] = f"{tm[0]} {tm[1]:.2f}" if tm else None
        answers = s["task_metrics"]
        if isinstance(answers.get("exact_match"), (int, float)) and s["n"]:
            # Exact match is a mean of 0/1 scores: a rate of round(value * n) prompts, with its
            # Wilson interval; token F1 (graded per prompt) is shown as its mean.
            em = rate(round(answers["exact_match"] * s["n"]), s["n"])
            row["exact match [95% CI]"] = _fmt_rate(em.to_dict())
            row["token F1"] = _num(answers.get("token_f1"), 2)
        ex = s.get("extraction")
        if ex:
            lo, hi = ex["f1_interval"]
            row["schema valid [95% CI]"] = _fmt_rate(ex["schema_valid"])
            row["exact record [95% CI]"] = _fmt_rate(ex["exact_record"])
            row["field F1 [95% CI]"] = f"{ex['f1']:.2f} [{lo:.2f}, {hi:.2f}]"
        if ref is not None and ref is not s and ref["format"]["n"] and s["format"]["n"]:
            row[f"Δ format vs {reference}"] = (
                f"{s['format']['value'] - ref['format']['value']:+.2f}"
            )
            ref_tm = main_task_metric(ref["task_metrics"])
            if tm and ref_tm and ref_tm[0] == tm[0]:
                row[f"Δ task vs {reference}"] = f"{tm[1] - ref_tm[1]:+.2f}"
        rows.append(row)
    frame = pd.DataFrame(rows)
    return frame.dropna(axis=1, how="all") if len(frame) else frame


def retention(model: dict[str, Any], teacher: dict[str, Any]) -> dict[str, float]:
    """The model's figures as a share of the teacher's on the same prompts: ``format_rate``
    and each task metric both have (where the teacher's is above 0)."""
    out = {}
    if model["format"]["n"] and teacher["format"]["n"] and teacher["format"]["value"] > 0:
        out["format_rate"] = model["format"]["value"] / teacher["format"]["value"]
    for name, value in teacher["task_metrics"].items():
        mine = model["task_metrics"].get(name)
        if isinstance(mine, (int, float)) and isinstance(value, (int, float)) and value > 0:
            out[name] = mine / value
    return out


def _ratio(a: Any, b: Any) -> float | None:
    return None if not a or not b else float(a) / float(b)


def compression_rows(summaries: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (task, prompt set) with a teacher row, each other model against the teacher: what
    it keeps (retention, agreement) and what it saves (speed-ups, size, memory)."""
    teachers = {(s["task"], s["prompt_set"]): s for s in summaries if s["model"] == "teacher"}
    rows = []
    for s in sorted(summaries, key=_row_order):
        t = teachers.get((s["task"], s["prompt_set"]))
        if t is None or s is t:
            continue
        lat, t_lat = s.get("latency") or {}, t.get("latency") or {}
        kept = retention(s, t)
        headline = main_task_metric(t["task_metrics"])
        agree = s.get("agreement") or {}
        rows.append(
            {
                "task": s["task"],
                "prompts": f"{s['prompt_set']} (n={s['n']})",
                "model": s["model"],
                "retention (format)": _num(kept.get("format_rate"), 2),
                "retention (task)": (
                    f"{headline[0]} {kept[headline[0]]:.2f}"
                    if headline and headline[0] in kept
                    else None
                ),
                "decode speed-up": _num(_ratio(lat.get("decode_tps"), t_lat.get("decode_tps")), 2),
                "prefill speed-up": _num(
                    _ratio(lat.get("prefill_tps"), t_lat.get("prefill_tps")), 2
                ),
                "latency speed-up": _num(
                    _ratio(t_lat.get("ms_per_sample"), lat.get("ms_per_sample")), 2
                ),
                "params ratio": _num(_ratio(s.get("params"), t.get("params")), 2),
                "disk ratio": _num(_ratio(s.get("disk_mb"), t.get("disk_mb")), 2),
                "peak memory ratio": _num(
                    _ratio(s.get("peak_memory_mb"), t.get("peak_memory_mb")), 2
                ),
                "top-1 agreement": _num(agree.get("top1_agreement"), 3),
                "KL to teacher": _num(agree.get("kl_to_teacher"), 3),
                "perplexity": _num(agree.get("student_perplexity"), 2),
                "teacher perplexity": _num(agree.get("teacher_perplexity"), 2),
            }
        )
    return rows


def frame_markdown(frame: Any) -> str:
    from tabulate import tabulate

    if len(frame) == 0:
        return "(no results)"
    # deltas are text ("+0.60"): parsed as numbers they would lose their sign
    deltas = [i for i, c in enumerate(frame.columns) if str(c).startswith("Δ")]
    return tabulate(
        frame.astype(object).fillna("").to_dict("list"),  # blanks in numeric columns too
        headers="keys",
        tablefmt="github",
        disable_numparse=deltas or False,
    )


def _clip(text: str, n: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def samples_markdown(results: Sequence[Any], n: int = 3, width: int = 400) -> str:
    """Side-by-side outputs of every model for the same first ``n`` prompts of each set."""
    groups: dict[tuple[str, str], list[Any]] = {}
    for r in results:
        groups.setdefault((r.task, r.prompt_set), []).append(r)
    parts = []
    for (task, pset), rs in groups.items():
        ids = [rec["id"] for rec in rs[0].records[:n]]
        for pid in ids:
            recs = {r.model: next((x for x in r.records if x["id"] == pid), None) for r in rs}
            first = next(x for x in recs.values() if x is not None)
            parts.append(f"#### {task} / {pset} / `{pid}`\n\n> {_clip(first['prompt'], width)}\n")
            for model, rec in recs.items():
                if rec is None:
                    continue
                mark = "PASS" if rec["passed"] else "FAIL: " + "; ".join(rec["reasons"][:3])
                if "exact_match" in rec:  # scored against gold answers
                    mark += f"; EM {rec['exact_match']:.0f}, F1 {rec['token_f1']:.2f}"
                if "extraction" in rec:  # scored against a gold object
                    e = rec["extraction"]
                    mark += (
                        f"; schema-valid {'yes' if e['schema_valid'] else 'no'}, exact "
                        f"{'yes' if e['exact'] else 'no'}, field F1 {e['f1']:.2f} "
                        f"(TP {e['tp']}, FP {e['fp']}, FN {e['fn']})"
                    )
                body = rec["output"].strip().replace("```", "'''") or "(empty)"
                parts.append(f"**{model}** ({mark})\n\n```\n{body[: width * 2]}\n```\n")
    return "\n".join(parts)


def classification_markdown(results: Sequence[Any]) -> str:
    """Per result of a classification task: accuracy with its Wilson interval, macro-F1 (and,
    for ranked labels, the same without calibration), per-class precision / recall / F1 and the
    confusion matrix. Empty when no result has per-class figures."""
    from tabulate import tabulate

    from distiller.metrics import rate

    parts = []
    for r in sorted(results, key=lambda r: _row_order({**r.header(), "model": r.model})):
        task = r.metrics.get("task", {})
        per_class, confusion = task.get("per_class"), task.get("confusion")
        if not per_class or not confusion:
            continue
        n = r.metrics["n"]
        acc = rate(round(task["accuracy"] * n), n)
        line = f"accuracy {acc.value:.3f} [{acc.lo:.3f}, {acc.hi:.3f}] ({acc.k}/{n}), "
        line += f"macro-F1 {task['macro_f1']:.3f}"
        decoder = (r.metrics.get("classify") or {}).get("decoder", "generate")
        if "accuracy_uncalibrated" in task:
            line += (
                f"; without calibration or bias: accuracy {task['accuracy_uncalibrated']:.3f}, "
                f"macro-F1 {task['macro_f1_uncalibrated']:.3f}"
            )
        if "mean_margin" in task:
            line += f"; mean top-2 margin {task['mean_margin']:.3f}"
        labels = confusion["labels"]
        rows = [
            [
                y,
                *(f"{per_class[y][k]:.3f}" for k in ("precision", "recall", "f1")),
                per_class[y]["support"],
            ]
            for y in labels
        ]
        matrix = [[y, *row] for y, row in zip(labels, confusion["matrix"], strict=True)]
        parts += [
            f"### {r.task} / {r.prompt_set} / {r.model} (decoder: {decoder})\n",
            line + "\n",
            tabulate(
                rows,
                headers=["class", "precision", "recall", "F1", "support"],
                tablefmt="github",
                disable_numparse=True,  # keep three decimals, as the line above
            ),
            "",
            tabulate(matrix, headers=["gold \\ predicted", *labels], tablefmt="github"),
            "",
        ]
    return "\n".join(parts)


def _prf_text(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def extraction_markdown(results: Sequence[Any]) -> str:
    """Per task and prompt set with extraction figures: one row per model (schema-valid and
    exact-record rates with Wilson intervals, field precision / recall with theirs, micro F1
    with its bootstrap interval over records), then the per-field breakdown (each flattened
    path's gold support, and per model precision / recall / F1). Empty when no result has them."""
    from tabulate import tabulate

    groups: dict[tuple[str, str], list[Any]] = {}
    for r in sorted(results, key=lambda r: _row_order({**r.header(), "model": r.model})):
        if isinstance(r.metrics.get("task", {}).get("extraction"), dict):
            groups.setdefault((r.task, r.prompt_set), []).append(r)
    parts = []
    for (task, pset), rs in groups.items():
        rows, paths = [], {}
        for r in rs:
            ex = r.metrics["task"]["extraction"]
            lo, hi = ex["f1_interval"]
            rows.append(
                [
                    r.model,
                    str(Rate.from_dict(ex["schema_valid"])),
                    str(Rate.from_dict(ex["exact_record"])),
                    str(Rate.from_dict(ex["precision"])),
                    str(Rate.from_dict(ex["recall"])),
                    f"{ex['f1']:.3f} [{lo:.3f}, {hi:.3f}]",
                    r.metrics.get("hit_max_tokens", ""),
                ]
            )
            for path, f in ex["fields"].items():
                paths.setdefault(path, f["support"])
        n = rs[0].metrics["n"]
        parts += [
            f"### {task} / {pset} (n={n})\n",
            tabulate(
                rows,
                headers=[
                    "model",
                    "schema valid",
                    "exact record",
                    "field precision",
                    "field recall",
                    "field F1 [95% bootstrap]",
                    "hit max_tokens",
                ],
                tablefmt="github",
                disable_numparse=True,
            ),
            "",
        ]
        field_rows = []
        for path, support in paths.items():
            row = [path, support]
            for r in rs:
                f = r.metrics["task"]["extraction"]["fields"].get(path)
                row.append(
                    "—"
                    if f is None
                    else " / ".join(_prf_text(f[k]) for k in ("precision", "recall", "f1"))
                )
            field_rows.append(row)
        parts += [
            tabulate(
                field_rows,
                headers=["field", "gold values", *(f"{r.model} P / R / F1" for r in rs)],
                tablefmt="github",
                disable_numparse=True,
            ),
            "",
        ]
    if parts:
        parts.append(
            "Fields are flattened paths (`a.b`; `a[]` for an array's elements, compared as a "
            "multiset); null, absent and empty state no value on either side (metrics."
            "extraction_scores). Precision and recall intervals are Wilson over values, which "
            "are not independent within a record: optimistic. The F1 interval resamples "
            "records. n/a: nothing predicted (precision) or nothing in gold (recall).\n"
        )
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------
# Files


def _git_commit(cwd: Path) -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def result_latency(
    latency: Mapping[Any, dict[str, Any]], task: str, model: str
) -> dict[str, Any] | None:
    """A model's latency figures in ``latency``, keyed by ``(task, model)``; a bare model name
    key stands for that model in every task (callers that report one task)."""
    found = latency.get((task, model))
    return found if found is not None else latency.get(model)


def build_report(
    results: Sequence[Any],
    latency: Mapping[Any, dict[str, Any]] | None = None,
    extra: dict[str, Any] | None = None,
    reference: str = "vanilla",
    samples: int = 3,
    agreement: Mapping[tuple[str, str, str], dict[str, Any]] | None = None,
) -> tuple[dict[str, Any], str]:
    """(JSON document, Markdown text) for a set of evaluations; ``latency`` as in
    ``result_latency``; ``agreement`` with the teacher per (task, prompt set, model)
    (``distiller.agreement``)."""
    latency, agreement = latency or {}, agreement or {}
    summaries = [summarize(r, result_latency(latency, r.task, r.model)) for r in results]
    for s in summaries:
        found = agreement.get((s["task"], s["prompt_set"], s["model"]))
        if found is not None:
            s["agreement"] = dict(found)
    frame = comparison_frame(summaries, reference)
    compression = compression_rows(summaries)
    created = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    doc = {
        "created": created,
        "commit": _git_commit(Path.cwd()),
        "entries": {entry_key(s["task"], s["prompt_set"], s["model"]): s for s in summaries},
        "compression": compression,
        "extra": extra or {},
    }
    md = [f"# distiller report ({created}, commit {doc['commit'] or 'unknown'})\n"]
    md.append("## Teacher vs students\n")
    md.append(frame_markdown(frame) + "\n")
    md.append(
        "Format rate: share of outputs passing every validator, with its Wilson 95% interval. "
        "Section columns: share of outputs with that section present once, in order, non-empty. "
        "Latency and decode tok/s: single stream; batch columns: batched greedy generation.\n"
    )
    if compression:
        import pandas as pd

        md.append("## Against the teacher\n")
        frame = pd.DataFrame(compression).dropna(axis=1, how="all")
        md.append(frame_markdown(frame) + "\n")
        md.append(
            "Retention: the model's figure ÷ the teacher's on the same prompts. Speed-ups: the "
            "teacher's single-stream time ÷ the model's (decode and prefill tok/s, whole-answer "
            "latency), measured in the same run. Agreement, KL (nats per token, teacher ‖ model) "
            "and perplexity: teacher-forced on the teacher's own answers to these prompts.\n"
        )
    classes = classification_markdown(results)
    if classes:
        md.append("## Classification\n")
        md.append(classes)
    extraction = extraction_markdown(results)
    if extraction:
        md.append("## Extraction\n")
        md.append(extraction)
    if extra:
        md.append("## Other measurements\n")
        for k, v in extra.items():
            md.append(f"- {k}: {json.dumps(v, default=str)}")
        md.append("")
    if samples and results:
        md.append("## Sample outputs\n")
        md.append(samples_markdown(results, samples))
    return doc, "\n".join(md)


def write_reports(doc: dict[str, Any], markdown: str, out_dir: str | Path) -> Path:
    """Write latest.md and latest.json, append one line to history.jsonl; returns out_dir."""
    out = Path(out_dir)
    atomic_write(out / "latest.md", markdown, durable=False)
    atomic_write(out / "latest.json", json.dumps(doc, indent=2, default=str) + "\n", durable=False)
    write_plots(doc, out)  # the PNG plots beside latest.md (distiller.plots)
    with open(out / "history.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(doc, default=str, separators=(",", ":")) + "\n")
    return out


# ---------------------------------------------------------------------------------------------
# Baseline


def load_baseline(path: str | Path) -> dict[str, dict[str, Any]]:
    """Entries of a baseline file (``{}`` when there is none yet); version 1 and 2 files.

    A file from a newer distiller, or per-prompt verdicts that disagree with their counts, is a
    ``UserError`` naming the file and the fix.
    """
    from distiller.errors import UserError

    path = Path(path)
    if not path.exists():
        return {}
    fix = "fix it or rewrite it with --distiller-update-baseline"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise UserError(f"{path}: not valid JSON ({e}); {fix}") from None
    version = doc.get("version", 1)
    if not isinstance(version, int) or not 1 <= version <= BASELINE_VERSION:
        raise UserError(
            f"{path}: baseline version {version!r}; this distiller reads versions 1 to "
            f"{BASELINE_VERSION} (a newer distiller wrote it?); {fix}"
        )
    entries = dict(doc.get("entries", {}))
    for key, entry in entries.items():
        figures = {"format": entry.get("format"), **(entry.get("sections") or {})}
        for figure, r in figures.items():
            by_prompt = (r or {}).get("by_prompt")
            if by_prompt is None:
                continue
            if len(by_prompt) != r["n"] or sum(map(bool, by_prompt.values())) != r["k"]:
                raise UserError(
                    f"{path}: {key} {figure}: {len(by_prompt)} per-prompt verdicts with "
                    f"{sum(map(bool, by_prompt.values()))} passed, but the counts say "
                    f"{r['k']}/{r['n']}; {fix}"
                )
    return entries


def update_baseline(
    path: str | Path, summaries: Iterable[dict[str, Any]], replace: bool = False
) -> dict[str, Any]:
    """Merge (or with ``replace``, overwrite) entries into the baseline file; returns the doc."""
    path = Path(path)
    entries = {} if replace else load_baseline(path)
    for s in summaries:
        entries[entry_key(s["task"], s["prompt_set"], s["model"])] = s
    doc = {
        "version": BASELINE_VERSION,
        "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "commit": _git_commit(path.resolve().parent),
        "entries": dict(sorted(entries.items())),
    }
    atomic_write(path, json.dumps(doc, indent=2, default=str) + "\n")
    return doc
