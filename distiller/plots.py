"""Plots of a report (matplotlib, Agg backend: no display needed), written as PNG files.

``write_plots(report, out_dir)`` draws, from a report JSON document (``distiller.report``):

- ``format_rate.png``: the format rate of every model on every prompt set, with its Wilson 95%
  interval;
- ``task_metrics.png``: the task metrics per model (interval bars where the figure has one);
- ``throughput_memory.png``: decode tok/s (batched and single stream) and peak memory per model;
- ``train_loss.png``: training and validation loss per step, from a train stage's
  ``metrics.json`` or ``metrics.csv`` (when one is given).

A plot with nothing to draw is not written. The report writer calls it once, next to the
Markdown; ``distiller serve`` shows the files on ``/report``.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from distiller.files import atomic_write

PLOT_NAMES = ("format_rate.png", "task_metrics.png", "throughput_memory.png", "train_loss.png")


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window, never a display
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    import io

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    _pyplot().close(fig)
    atomic_write(path, buf.getvalue(), durable=False)
    return path


def _entries(doc: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The report's entries, each with its task, prompt set and model named ("?" if not)."""
    entries = doc.get("entries", {})
    return [
        {**e, **{k: str(e.get(k, "?")) for k in ("task", "prompt_set", "model")}}
        for e in (entries.values() if isinstance(entries, Mapping) else ())
        if isinstance(e, dict)
    ]


def _grouped_bars(ax: Any, groups: list[str], models: list[str], value: Any) -> None:
    """Bars per group (x) and model (colour); ``value(group, model) -> (v, lo, hi) | None``."""
    width = 0.8 / max(1, len(models))
    for j, model in enumerate(models):
        xs, vs, errs = [], [], [[], []]
        for i, g in enumerate(groups):
            got = value(g, model)
            if got is None:
                continue
            v, lo, hi = got
            xs.append(i + (j - (len(models) - 1) / 2) * width)
            vs.append(v)
            errs[0].append(max(0.0, v - lo) if lo is not None else 0.0)
            errs[1].append(max(0.0, hi - v) if hi is not None else 0.0)
        if xs:
            has_interval = any(errs[0]) or any(errs[1])
            ax.bar(xs, vs, width, yerr=errs if has_interval else None, capsize=3, label=model)
    ax.set_xticks(range(len(groups)), groups, rotation=15, ha="right")
    if models:
        ax.legend(fontsize=8)


def plot_format_rate(doc: Mapping[str, Any], path: Path) -> Path | None:
    entries = [e for e in _entries(doc) if isinstance(e.get("format"), dict)]
    if not entries:
        return None
    plt = _pyplot()
    groups = sorted({f"{e['task']} {e['prompt_set']}" for e in entries})
    models = list(dict.fromkeys(e["model"] for e in entries))
    by = {(f"{e['task']} {e['prompt_set']}", e["model"]): e["format"] for e in entries}

    def value(g: str, m: str) -> tuple[float, float | None, float | None] | None:
        f = by.get((g, m))
        return None if f is None else (f.get("value", 0.0), f.get("lo"), f.get("hi"))

    fig, ax = plt.subplots(figsize=(7, 3.6))
    _grouped_bars(ax, groups, models, value)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("format rate (Wilson 95%)")
    ax.set_title("Outputs passing every validator")
    return _save(fig, path)


def plot_task_metrics(doc: Mapping[str, Any], path: Path) -> Path | None:
    entries = [e for e in _entries(doc) if e.get("task_metrics")]
    if not entries:
        return None
    plt = _pyplot()
    metrics = sorted({k for e in entries for k in e["task_metrics"]})
    models = list(dict.fromkeys(e["model"] for e in entries))
    sets = sorted({e["prompt_set"] for e in entries})
    fig, axes = plt.subplots(1, len(sets), figsize=(max(5, 3.5 * len(metrics)), 3.6), squeeze=False)
    for ax, prompt_set in zip(axes[0], sets, strict=True):
        by = {e["model"]: e["task_metrics"] for e in entries if e["prompt_set"] == prompt_set}

        def value(metric: str, m: str, by: dict = by) -> tuple[float, Any, Any] | None:
            v = by.get(m, {}).get(metric)
            if isinstance(v, dict):  # a rate with its interval
                return v.get("value", 0.0), v.get("lo"), v.get("hi")
            return None if v is None else (float(v), None, None)

        _grouped_bars(ax, metrics, models, value)
        ax.set_title(prompt_set, fontsize=9)
    fig.suptitle("Task metrics per model")
    return _save(fig, path)


def plot_throughput_memory(doc: Mapping[str, Any], path: Path) -> Path | None:
    per_model: dict[str, dict[str, float]] = {}
    for e in _entries(doc):
        row = per_model.setdefault(e["model"], {})
        for name, v in (
            ("batched decode", e.get("batch_decode_tps")),
            ("single-stream decode", (e.get("latency") or {}).get("decode_tps")),
            ("peak memory", e.get("peak_memory_mb")),
        ):
            if isinstance(v, (int, float)):
                row[name] = max(row.get(name, 0.0), float(v))
    if not any(per_model.values()):
        return None
    plt = _pyplot()
    models = list(per_model)
    fig, (ax_tps, ax_mem) = plt.subplots(1, 2, figsize=(8, 3.6))
    speeds = ["batched decode", "single-stream decode"]
    _grouped_bars(
        ax_tps,
        models,
        speeds,
        lambda m, s: (per_model[m][s], None, None) if s in per_model[m] else None,
    )
    ax_tps.set_ylabel("tokens / s")
    ax_tps.set_title("Decode throughput")
    mem = [per_model[m].get("peak memory", 0.0) for m in models]
    ax_mem.bar(range(len(models)), mem, color="#8a6fd1")
    ax_mem.set_xticks(range(len(models)), models, rotation=15, ha="right")
    ax_mem.set_ylabel("MB")
    ax_mem.set_title("Peak memory")
    return _save(fig, path)


def read_train_metrics(path: str | Path) -> list[dict[str, float | None]]:
    """Rows of a train stage's ``metrics.json`` or ``metrics.csv`` (numbers or None)."""
    path = Path(path)
    if path.suffix == ".json":
        rows = json.loads(path.read_text(encoding="utf-8"))
    else:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))

    def num(v: Any) -> float | None:
        try:
            return None if v in (None, "") else float(v)
        except (TypeError, ValueError):
            return None

    return [{k: num(v) for k, v in r.items()} for r in rows if isinstance(r, dict)]


def plot_train_loss(metrics_path: str | Path, path: Path) -> Path | None:
    rows = [r for r in read_train_metrics(metrics_path) if r.get("step") is not None]
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for key, label in (("train_loss", "train"), ("val_loss", "validation")):
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", markersize=3, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("Training loss")
    ax.legend(fontsize=8)
    return _save(fig, path)


def write_plots(
    report: str | Path | Mapping[str, Any],
    out_dir: str | Path,
    *,
    train_metrics: str | Path | None = None,
) -> list[Path]:
    """Draw every plot there is data for into ``out_dir``; returns the files written.
    ``report``: a report JSON document or its path."""
    doc = (
        json.loads(Path(report).read_text(encoding="utf-8"))
        if isinstance(report, (str, Path))
        else report
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [
        plot_format_rate(doc, out / "format_rate.png"),
        plot_task_metrics(doc, out / "task_metrics.png"),
        plot_throughput_memory(doc, out / "throughput_memory.png"),
    ]
    if train_metrics is not None:
        written.append(plot_train_loss(train_metrics, out / "train_loss.png"))
    return [p for p in written if p is not None]
