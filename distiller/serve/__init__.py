"""``distiller serve``: models over HTTP (OpenAI-compatible), a side-by-side page, the report.

``cli`` (options, loading), ``app`` (routes), ``batching`` (one worker and queue per model),
``telemetry`` (/metrics), ``report_page`` (/report), ``page/`` (the static chat page).
"""

from distiller.serve.cli import add_arguments, run_cli

__all__ = ["add_arguments", "run_cli"]
