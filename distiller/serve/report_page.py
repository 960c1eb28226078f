"""The ``/report`` page: the latest report's plots (``distiller.plots``) and a compact table."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from distiller.plots import PLOT_NAMES

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 0 auto; padding: 1rem 1.5rem;
       color: #1d2330; background: #f6f7f9; }
h1 { font-size: 1.4rem; } a { color: #3057d5; }
.plots { display: grid; grid-template-columns: repeat(auto-fit, minmax(480px, 1fr)); gap: 1rem; }
.plots img { width: 100%; background: #fff; border: 1px solid #d9dde5; border-radius: 8px; }
table { border-collapse: collapse; background: #fff; font-size: .85rem; margin-top: 1rem; }
td, th { border: 1px solid #d9dde5; padding: .3rem .6rem; text-align: right; }
td:first-child, td:nth-child(2) { text-align: left; }
"""


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.1f}" if abs(v) >= 10 else f"{v:.3g}"
    return "" if v is None else html.escape(str(v))


def _rows(doc: dict[str, Any]) -> str:
    out = []
    for e in doc.get("entries", {}).values():
        f = e.get("format") or {}
        rate = f"{f.get('value', 0):.2f} [{f.get('lo', 0):.2f}, {f.get('hi', 0):.2f}]" if f else ""
        metrics = ", ".join(f"{k} {_fmt(v)}" for k, v in (e.get("task_metrics") or {}).items())
        out.append(
            "<tr>"
            + "".join(
                f"<td>{c}</td>"
                for c in (
                    html.escape(str(e.get("model"))),
                    html.escape(f"{e.get('task')} {e.get('prompt_set')}"),
                    _fmt(e.get("n")),
                    rate,
                    html.escape(metrics),
                    _fmt(e.get("batch_decode_tps")),
                    _fmt((e.get("latency") or {}).get("decode_tps")),
                    _fmt(e.get("peak_memory_mb")),
                )
            )
            + "</tr>"
        )
    return "\n".join(out)


def report_html(report_path: Path | None, plots_dir: Path | None) -> str:
    """The page for the report JSON at ``report_path`` (a clear note when there is none)."""
    head = f"<!doctype html><html><head><meta charset='utf-8'><title>distiller report</title><style>{STYLE}</style></head><body>"
    nav = "<p><a href='/'>side by side</a></p>"
    if report_path is None or not report_path.is_file():
        where = html.escape(str(report_path)) if report_path else "(none given)"
        return f"{head}<h1>No report yet</h1>{nav}<p>No report at {where}: run <code>distiller run SPEC</code> or the harness, or start the server with <code>--report FILE</code>.</p></body></html>"
    try:
        doc = json.loads(report_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f"{head}<h1>Unreadable report</h1>{nav}<p>{html.escape(str(report_path))}: {html.escape(str(exc))}</p></body></html>"
    plots = [
        f"<img alt='{name[:-4]}' src='/report/plots/{name}'>"
        for name in PLOT_NAMES
        if plots_dir is not None and (plots_dir / name).is_file()
    ]
    table = (
        "<table><tr><th>model</th><th>prompt set</th><th>n</th><th>format rate [95%]</th>"
        "<th>task metrics</th><th>batch decode tok/s</th><th>stream decode tok/s</th>"
        f"<th>peak MB</th></tr>{_rows(doc)}</table>"
    )
    title = f"distiller report {html.escape(str(doc.get('created', '')))} (commit {html.escape(str(doc.get('commit') or 'unknown'))})"
    return f"{head}<h1>{title}</h1>{nav}<div class='plots'>{''.join(plots)}</div>{table}<p>{html.escape(str(report_path))}</p></body></html>"
