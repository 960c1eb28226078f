"""pytest plugin: options, markers, fixtures and hooks of the distiller harness.

Installed with distiller (entry point ``pytest11``), so it loads in every pytest run in the
environment; it therefore imports nothing heavy at import time and does nothing until a test
asks for one of its fixtures. What it offers:

Options (``pytest --help``, group "distiller")
    --distiller-spec PATH        task spec(s) to evaluate (repeatable; default
                                 fixtures/tasks/structured_cot.yaml under the rootdir)
    --distiller-baseline PATH    committed figures to gate against (default reports/baseline.json)
    --distiller-update-baseline  rewrite the baseline from this run (never done otherwise)
    --distiller-limit N          first N prompts per prompt set (and per pipeline split)
    --distiller-out DIR          artifact cache (default $DISTILLER_HOME/runs or runs/)
    --distiller-reports DIR      where latest.md/latest.json/history.jsonl go (default
                                 .distiller/reports/ under the rootdir, git-ignored)
    --distiller-student PATH     evaluate this model dir as the distilled student instead of
                                 building it through the pipeline
    --distiller-models LIST      which of teacher,vanilla,distilled to evaluate (default all)
    --distiller-alpha A          one-sided level of the baseline regression test (default 0.05)

Markers: structure, quality, agreement, throughput, memory, slow.

Fixtures (session scope; artifacts cached on disk by a hash of what determines them)
    distiller              the ``DistillerSession``: specs, models, prompt sets, evaluations,
                           latency, baseline
    distiller_spec         the (first) TaskSpec
    teacher_model, vanilla_student, distilled_student
                           ``ModelUnderTest`` (name, ref, style, lazily loaded model/tokenizer)
    heldout_prompts        {prompt set name: [Prompt]}: "split:test" and "set:<name>" sets
    eval_results           ``eval_results(model_name, prompt_set, task=None) -> EvalResult``,
                           each computed once (batched, greedy) and shared by every test
    baseline               {task/prompt_set/model: entry} from the baseline file

Tests that take ``distiller_task``, ``distiller_model`` or ``distiller_prompt_set`` arguments are
parametrized over the selected specs, models and each spec's prompt sets.

At the end of a session that evaluated anything, the comparison table is printed and written to
the reports directory (latest.md, latest.json, one line appended to history.jsonl). A test run
writes nothing tracked: the committed baseline changes only with --distiller-update-baseline.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from distiller.harness.session import MODEL_NAMES, DistillerSession, ModelUnderTest, Options

MARKERS = {
    "structure": "format compliance (overall and per section) vs spec thresholds and baseline",
    "quality": "task metrics (accuracy, F1, exact match, field accuracy) vs thresholds/baseline",
    "throughput": "prefill/decode/batched/training tok/s (pytest-benchmark)",
    "memory": "peak memory, parameter count and disk size of each model",
    "slow": "takes minutes on CPU (real model, pipeline builds)",
    "agreement": "against the teacher: retention of its figures, top-1 agreement, KL",
}
DEFAULT_SPEC = "fixtures/tasks/structured_cot.yaml"
DEFAULT_BASELINE = "reports/baseline.json"
# Like pytest-benchmark's .benchmarks/: run output beside the checkout, never tracked.
DEFAULT_REPORTS = ".distiller/reports"
_SESSION_ATTR = "_distiller_session"


# ---------------------------------------------------------------------------------------------
# Options and markers


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("distiller", "distiller evaluation harness")
    g.addoption(
        "--distiller-spec",
        action="append",
        default=None,
        metavar="PATH",
        help=f"task spec to evaluate (repeatable; default {DEFAULT_SPEC} under the rootdir)",
    )
    g.addoption(
        "--distiller-baseline",
        default=DEFAULT_BASELINE,
        metavar="PATH",
        help=f"baseline figures to gate against (default: {DEFAULT_BASELINE})",
    )
    g.addoption(
        "--distiller-update-baseline",
        action="store_true",
        help="rewrite the baseline file from this run's figures",
    )
    g.addoption(
        "--distiller-limit", type=int, default=None, metavar="N", help="first N prompts per set"
    )
    g.addoption(
        "--distiller-out",
        default=None,
        metavar="DIR",
        help="artifact cache (default: $DISTILLER_HOME/runs, else runs/ under the rootdir)",
    )
    g.addoption(
        "--distiller-reports",
        default=DEFAULT_REPORTS,
        metavar="DIR",
        help="directory for latest.md, latest.json and history.jsonl "
        f"(default: {DEFAULT_REPORTS} under the rootdir, git-ignored)",
    )
    g.addoption(
        "--distiller-student",
        default=None,
        metavar="PATH",
        help="use this model dir as the distilled student (skip the pipeline build)",
    )
    g.addoption(
        "--distiller-models",
        default=",".join(MODEL_NAMES),
        metavar="LIST",
        help="comma-separated subset of teacher,vanilla,distilled (default: all)",
    )
    g.addoption(
        "--distiller-alpha",
        type=float,
        default=0.05,
        metavar="A",
        help="one-sided level of the baseline regression test (default: 0.05)",
    )


def pytest_configure(config: pytest.Config) -> None:
    for name, text in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {text}")
    options(config)  # bad --distiller-* values: a usage error now, not at collection


def options(config: pytest.Config) -> Options:
    """The ``--distiller-*`` options of ``config``, checked, paths resolved to the rootdir."""
    root = Path(config.rootpath)

    def path(value: str | os.PathLike) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else root / p

    specs = config.getoption("distiller_spec") or [DEFAULT_SPEC]
    out = config.getoption("distiller_out")
    if out is None:
        home = os.environ.get("DISTILLER_HOME")
        out = Path(home) / "runs" if home else root / "runs"
    models = [m.strip() for m in config.getoption("distiller_models").split(",") if m.strip()]
    bad = [m for m in models if m not in MODEL_NAMES]
    if bad:
        raise pytest.UsageError(
            f"--distiller-models: unknown {bad}; choose from {', '.join(MODEL_NAMES)}"
        )
    limit = config.getoption("distiller_limit")
    if limit is not None and limit <= 0:
        raise pytest.UsageError(f"--distiller-limit must be > 0, got {limit}")
    alpha = float(config.getoption("distiller_alpha"))
    if not 0 < alpha < 1:
        raise pytest.UsageError(f"--distiller-alpha must be in (0, 1), got {alpha}")
    student = config.getoption("distiller_student")
    return Options(
        specs=[path(s) for s in specs],
        baseline=path(config.getoption("distiller_baseline")),
        update_baseline=bool(config.getoption("distiller_update_baseline")),
        limit=limit,
        out=path(out),
        reports=path(config.getoption("distiller_reports")),
        student=path(student) if student else None,
        models=models,
        alpha=alpha,
    )


def session_of(config: pytest.Config) -> DistillerSession:
    """The ``DistillerSession`` of this pytest run (made on first use)."""
    session = getattr(config, _SESSION_ATTR, None)
    if session is None:
        session = DistillerSession(options(config))
        setattr(config, _SESSION_ATTR, session)
    return session


# ---------------------------------------------------------------------------------------------
# Parametrization


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    names = metafunc.fixturenames
    if not any(n in names for n in ("distiller_task", "distiller_model", "distiller_prompt_set")):
        return
    s = session_of(metafunc.config)
    if "distiller_model" in names:
        wanted = getattr(metafunc.function, "distiller_models", None)
        chosen = [m for m in s.options.models if wanted is None or m in wanted]
        metafunc.parametrize("distiller_model", chosen, scope="session")
    if "distiller_prompt_set" in names:
        # One (task, prompt set) axis, so each task gets its own prompt sets.
        pairs = [(t, p) for t in s.specs for p in s.prompt_sets(t)]
        if "distiller_task" in names:
            metafunc.parametrize(
                ("distiller_task", "distiller_prompt_set"),
                pairs,
                ids=[f"{t}-{p}" for t, p in pairs],
                scope="session",
            )
        else:
            first = next(iter(s.specs))
            metafunc.parametrize(
                "distiller_prompt_set", [p for t, p in pairs if t == first], scope="session"
            )
    elif "distiller_task" in names:
        metafunc.parametrize("distiller_task", list(s.specs), scope="session")


def models(*names: str) -> Callable[[Callable], Callable]:
    """Decorator: restrict a test's ``distiller_model`` parametrization to these models."""

    def mark(fn: Callable) -> Callable:
        fn.distiller_models = names  # type: ignore[attr-defined]
        return fn

    return mark


# ---------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="session")
def distiller(request: pytest.FixtureRequest) -> DistillerSession:
    """The evaluation session (specs, models, prompt sets, evaluations, latency, extras)."""
    return session_of(request.config)


@pytest.fixture(scope="session")
def distiller_spec(distiller: DistillerSession) -> Any:
    return distiller.spec()


@pytest.fixture(scope="session")
def teacher_model(distiller: DistillerSession) -> ModelUnderTest:
    return distiller.model("teacher")


@pytest.fixture(scope="session")
def vanilla_student(distiller: DistillerSession) -> ModelUnderTest:
    return distiller.model("vanilla")


@pytest.fixture(scope="session")
def distilled_student(distiller: DistillerSession) -> ModelUnderTest:
    return distiller.model("distilled")


@pytest.fixture(scope="session")
def heldout_prompts(distiller: DistillerSession) -> dict[str, list[Any]]:
    return distiller.prompt_sets()


@pytest.fixture(scope="session")
def eval_results(distiller: DistillerSession) -> Callable[..., Any]:
    """``eval_results(model_name, prompt_set="split:test", task=None) -> EvalResult``."""

    def get(model_name: str, prompt_set: str = "split:test", task: str | None = None) -> Any:
        return distiller.evaluate(model_name, prompt_set, task)

    return get


@pytest.fixture(scope="session")
def baseline(distiller: DistillerSession) -> dict[str, dict]:
    return distiller.baseline


# ---------------------------------------------------------------------------------------------
# Session end: reports, baseline, terminal table


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    s: DistillerSession | None = getattr(session.config, _SESSION_ATTR, None)
    if s is None or not s.results:
        return
    if hasattr(session.config, "workerinput"):  # xdist worker: the controller reports
        return
    from distiller.report import (
        build_report,
        result_latency,
        summarize,
        update_baseline,
        write_reports,
    )

    latency = s.latency_figures()
    s.report_doc, s.report_markdown = build_report(
        s.results, latency, s.extra, agreement=s.agreements
    )
    write_reports(s.report_doc, s.report_markdown, s.options.reports)
    if s.options.update_baseline:
        update_baseline(
            s.options.baseline,
            [summarize(r, result_latency(latency, r.task, r.model)) for r in s.results],
        )
        s.baseline_written = True


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    s: DistillerSession | None = getattr(config, _SESSION_ATTR, None)
    if s is None or s.report_doc is None:
        return
    from distiller.report import comparison_frame, frame_markdown

    tr = terminalreporter
    tr.write_sep("=", "distiller: teacher vs students")
    frame = comparison_frame(list(s.report_doc["entries"].values()))
    for line in frame_markdown(frame).splitlines():
        tr.write_line(line)
    if s.report_doc.get("compression"):
        import pandas as pd

        tr.write_sep("-", "against the teacher")
        against = pd.DataFrame(s.report_doc["compression"]).dropna(axis=1, how="all")
        for line in frame_markdown(against).splitlines():
            tr.write_line(line)
    tr.write_line(f"reports: {s.options.reports / 'latest.md'} (+ latest.json, history.jsonl)")
    if s.baseline_written:
        tr.write_line(f"baseline rewritten: {s.options.baseline}")
