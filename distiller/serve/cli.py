"""``distiller serve``: the command line (options, model loading, uvicorn)."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
from pathlib import Path

from distiller.cli_types import positive_int
from distiller.errors import UserError

DEFAULT_REPORT = Path(".distiller/reports/latest.json")

DESCRIPTION = """\
Serve models over HTTP: OpenAI-compatible /v1/chat/completions (streamed or not) and /v1/models,
/v1/classify (calibrated label ranking, with --spec of a classification task), /v1/validate
({"text", "prompt", "fields"}: the spec's validators on an answer to that prompt), /health, /metrics (request counts, p50/p95 latencies), the side-by-side chat page at / and the
report page at /report.

examples:
  distiller serve --model teacher=smollm2-135m-instruct --model distilled=runs/x/fused \\
      --spec fixtures/tasks/structured_cot.yaml
  open http://127.0.0.1:8000/
"""


def _model_arg(text: str) -> tuple[str, str]:
    name, sep, ref = text.partition("=")
    if not sep:  # a bare model: named after itself
        name, ref = Path(text).name or text, text
    if not name or not ref or "/" in name:
        raise argparse.ArgumentTypeError(f"expected NAME=MODEL (a name without '/'), got {text!r}")
    return name, ref


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = DESCRIPTION
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "--model",
        action="append",
        type=_model_arg,
        required=True,
        metavar="NAME=MODEL",
        help="a model to serve under NAME (the `model` of requests): a registry name, a cached "
        "import or a model dir; repeatable, in the order the page shows them",
    )
    parser.add_argument(
        "--spec",
        default=None,
        help="a task spec: its validators judge every answer (the verdict), its eval.classify "
        "enables /v1/classify",
    )
    parser.add_argument(
        "--scaffold",
        action="append",
        default=[],
        metavar="NAME",
        help="prompt model NAME as the pipeline prompts the teacher: the --spec's system prompt "
        "and few-shot examples before each conversation that has no system message "
        "(repeatable)",
    )
    parser.add_argument(
        "--report",
        default=None,
        help=f"the report JSON the /report page shows (default: {DEFAULT_REPORT})",
    )
    parser.add_argument(
        "--train-metrics",
        default=None,
        help="a train stage's metrics file (CSV or JSON) whose loss curves /report plots",
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default: 127.0.0.1, this machine only; 0.0.0.0 exposes it)",
    )
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 = any free)")
    parser.add_argument(
        "--api-key-env",
        default=None,
        metavar="NAME",
        help="require `Authorization: Bearer KEY` on /v1/* and /metrics, KEY read from the "
        "environment variable NAME (default: no key)",
    )
    parser.add_argument(
        "--max-tokens",
        type=positive_int,
        default=256,
        help="most tokens a completion may ask for, and what it gets when it asks for none "
        "(default: 256)",
    )
    parser.add_argument(
        "--max-prompt-tokens",
        type=positive_int,
        default=4096,
        help="longest prompt, in tokens after the chat template (default: 4096)",
    )
    parser.add_argument(
        "--max-body-bytes",
        type=positive_int,
        default=1 << 20,
        help="largest request body (default: 1 MiB); larger is refused with 413",
    )
    parser.add_argument(
        "--max-concurrency",
        type=positive_int,
        default=32,
        help="requests doing model work at once, queued or running (default: 32); more get 429",
    )
    parser.add_argument(
        "--max-batch",
        type=positive_int,
        default=8,
        help="most completions one model decodes together (default: 8)",
    )
    parser.add_argument(
        "--log-level", default="info", choices=("debug", "info", "warning", "error"),
        help="server log level (default: info)",
    )  # fmt: skip


def run_cli(args: argparse.Namespace) -> int:
    import uvicorn

    from distiller.models import load_model
    from distiller.serve.app import Limits, ServeState, create_app
    from distiller.serve.batching import ModelWorker

    names = [n for n, _ in args.model]
    if len(set(names)) != len(names):
        raise UserError(f"--model: each NAME once, got {', '.join(names)}")
    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env, "")
        if not api_key:
            raise UserError(
                f"--api-key-env: the environment variable {args.api_key_env} is unset or empty"
            )
    spec = validator = None
    if args.spec:
        from distiller.spec import load_spec
        from distiller.validators import build_validator

        spec = load_spec(args.spec)
        validator = build_validator(spec.validators)
    unknown = sorted(set(args.scaffold) - set(names))
    if unknown:
        raise UserError(f"--scaffold: not a served model: {', '.join(unknown)}")
    if args.scaffold and spec is None:
        raise UserError("--scaffold needs --spec (its teacher's system prompt and examples)")
    report = Path(args.report) if args.report else DEFAULT_REPORT
    plots_dir = None
    if report.is_file():
        from distiller.plots import write_plots

        # Drawn afresh into a private directory: a served (maybe tracked) report dir is
        # never written to.
        plots_dir = Path(tempfile.mkdtemp(prefix="distiller-serve-plots-"))
        write_plots(report, plots_dir, train_metrics=args.train_metrics)
    workers = {}
    for name, ref in args.model:
        model, tokenizer = load_model(ref)  # once; every request reuses it
        workers[name] = ModelWorker(name, model, tokenizer, max_batch=args.max_batch)
    state = ServeState(
        workers=workers,
        limits=Limits(
            max_body_bytes=args.max_body_bytes,
            max_tokens=args.max_tokens,
            max_prompt_tokens=args.max_prompt_tokens,
            max_concurrency=args.max_concurrency,
        ),
        api_key=api_key,
        spec=spec,
        validator=validator,
        report_path=report,
        plots_dir=plots_dir,
        scaffolded=frozenset(args.scaffold),
    )
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    config = uvicorn.Config(
        create_app(state), host=args.host, port=args.port, log_level=args.log_level,
        timeout_graceful_shutdown=5,
    )  # fmt: skip
    server = uvicorn.Server(config)
    try:
        server.run()
    finally:
        for w in workers.values():
            w.close()
        if plots_dir is not None:
            shutil.rmtree(plots_dir, ignore_errors=True)
    return 0
