"""pytest plugin: gate CI on a distilled student's format rate, quality, speed and size.

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
    --distiller-reports DIR      where latest.md/latest.json/history.jsonl go (default reports/)
    --distiller-student PATH     evaluate this model dir as the distilled student instead of
                                 building it through the pipeline
    --distiller-models LIST      which of teacher,vanilla,distilled to evaluate (default all)
    --distiller-alpha A          one-sided level of the baseline regression test (default 0.05)

Markers: structure, quality, throughput, memory, slow.

Fixtures (session scope; artifacts cached on disk by a hash of what determines them)
    distiller              the harness: specs, models, prompt sets, evaluations, baseline
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
reports/latest.md, latest.json and appended to history.jsonl.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

MARKERS = {
    "structure": "format compliance (overall and per section) vs spec thresholds and baseline",
    "quality": "task metrics (accuracy, F1, exact match, field accuracy) vs thresholds/baseline",
    "throughput": "prefill/decode/batched/training tok/s (pytest-benchmark)",
    "memory": "peak memory, parameter count and disk size of each model",
    "slow": "takes minutes on CPU (real model, pipeline builds)",
}
MODEL_NAMES = ("teacher", "vanilla", "distilled")
DEFAULT_SPEC = "fixtures/tasks/structured_cot.yaml"
_STATE_ATTR = "_distiller_harness"


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
        default="reports/baseline.json",
        metavar="PATH",
        help="baseline figures to gate against (default: reports/baseline.json)",
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
        default="reports",
        metavar="DIR",
        help="directory for latest.md, latest.json and history.jsonl (default: reports)",
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
    _options(config)  # bad --distiller-* values: a usage error now, not at collection


# ---------------------------------------------------------------------------------------------
# The harness


@dataclass
class Options:
    specs: list[Path]
    baseline: Path
    update_baseline: bool
    limit: int | None
    out: Path
    reports: Path
    student: Path | None
    models: list[str]
    alpha: float


def _options(config: pytest.Config) -> Options:
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
        alpha=float(config.getoption("distiller_alpha")),
    )


@dataclass
class ModelUnderTest:
    """One model of the comparison: its role, where it lives, and how prompts are rendered."""

    name: str  # teacher | vanilla | distilled (or another label)
    ref: str  # registry name or model dir
    style: str  # bare | scaffold
    task: str = ""
    _loaded: tuple[Any, Any] | None = field(default=None, repr=False)

    def load(self) -> tuple[Any, Any]:
        """(model, tokenizer), loaded once per session."""
        if self._loaded is None:
            from distiller.evaluate import load_model

            self._loaded = load_model(self.ref)
        return self._loaded

    @property
    def path(self) -> Path | None:
        from distiller.evaluate import model_dir

        return model_dir(self.ref)


class Harness:
    """Session state: specs, models, prompt sets and evaluations, each built at most once."""

    def __init__(self, options: Options):
        self.options = options
        self._specs: dict[str, Any] | None = None
        self._models: dict[tuple[str, str], ModelUnderTest] = {}
        self._results: dict[tuple[str, str, str], Any] = {}
        self.latency: dict[str, dict[str, Any]] = {}  # model label -> single-stream figures
        self._latency: dict[str, Any] = {}
        self.extra: dict[str, Any] = {}  # other measurements for the report
        self._baseline: dict[str, dict] | None = None

    # -- specs and prompts

    @property
    def specs(self) -> dict[str, Any]:
        if self._specs is None:
            from distiller.errors import SpecError
            from distiller.spec import load_spec

            specs = {}
            for p in self.options.specs:
                try:
                    spec = load_spec(p)
                except SpecError as e:
                    raise pytest.UsageError(f"--distiller-spec: {e}") from None
                specs[spec.name] = spec
            self._specs = specs
        return self._specs

    def spec(self, task: str | None = None) -> Any:
        return self.specs[task] if task else next(iter(self.specs.values()))

    def prompt_sets(self, task: str | None = None) -> dict[str, list[Any]]:
        from distiller.dataset import split_prompts

        spec = self.spec(task)
        limit = self.options.limit
        sets = {"split:test": list(split_prompts(spec.prompts, spec.split).test)}
        for name, prompts in spec.eval.prompt_sets.items():
            sets[f"set:{name}"] = list(prompts)
        return {k: v[:limit] if limit else v for k, v in sets.items()}

    def run_dir(self, task: str | None = None) -> Path:
        return self.options.out / self.spec(task).name

    # -- models

    def model(self, name: str, task: str | None = None) -> ModelUnderTest:
        spec = self.spec(task)
        key = (spec.name, name)
        if key not in self._models:
            self._models[key] = self._make_model(spec, name)
        return self._models[key]

    def _make_model(self, spec: Any, name: str) -> ModelUnderTest:
        student_style = spec.student.prompt_style
        if name == "teacher":
            if not spec.teacher.model:
                pytest.skip(f"{spec.name}: the teacher is a remote endpoint; nothing local to run")
            return ModelUnderTest("teacher", spec.teacher.model, "scaffold", spec.name)
        if name == "vanilla":
            return ModelUnderTest("vanilla", spec.student.model, student_style, spec.name)
        if name == "distilled":
            if self.options.student is not None:
                ref = self.options.student
            else:
                ref = self._build_student(spec)
            return ModelUnderTest("distilled", str(ref), student_style, spec.name)
        raise KeyError(name)

    def _build_student(self, spec: Any) -> Path:
        """spec -> teacher samples -> dataset -> adapter -> fused model, each stage cached."""
        from distiller.pipeline import distill

        result = distill(spec, self.run_dir(spec.name), limit=self.options.limit)
        return Path(result.student_dir)

    # -- evaluations

    def evaluate(self, model_name: str, prompt_set: str, task: str | None = None) -> Any:
        """The model's evaluation on one prompt set. The first request for a model evaluates
        it on every prompt set of the task in one batched pass (much faster on a CPU than a
        pass per set); each set is cached on disk under its own key."""
        from distiller.evaluate import cached_evaluate_together

        spec = self.spec(task)
        key = (spec.name, model_name, prompt_set)
        if key not in self._results:
            m = self.model(model_name, spec.name)
            sets = self.prompt_sets(spec.name)
            if prompt_set not in sets:
                raise KeyError(f"{spec.name} has no prompt set {prompt_set!r}")
            together = cached_evaluate_together(
                m.ref,
                spec,
                {
                    k: v
                    for k, v in sets.items()
                    if v and (spec.name, model_name, k) not in self._results
                }
                | {prompt_set: sets[prompt_set]},
                self.run_dir(spec.name) / "eval",
                style=m.style,
                name=model_name,
                loaded=m.load(),
            )
            for k, result in together.items():
                self._results[(spec.name, model_name, k)] = result
        return self._results[key]

    @property
    def results(self) -> list[Any]:
        return list(self._results.values())

    # -- speed

    def prompt_ids(self, name: str, n: int, task: str | None = None) -> list[list[int]]:
        """Token ids of the first ``n`` held-out prompts, rendered as ``name`` is used."""
        from distiller.evaluate import render_messages
        from distiller.generate import chat_prompt

        spec = self.spec(task)
        m = self.model(name, spec.name)
        _, tokenizer = m.load()
        prompts = self.prompt_sets(spec.name)["split:test"][:n]
        return [chat_prompt(tokenizer, render_messages(spec, p, m.style)) for p in prompts]

    def single_stream(
        self, name: str, task: str | None = None, n: int = 2, max_tokens: int = 64
    ) -> Any:
        """Single-stream latency of ``name`` (measured once per session, kept for the report)."""
        from distiller.evaluate import measure_latency

        spec = self.spec(task)
        key = f"{spec.name}/{name}"
        if key not in self._latency:
            model, tokenizer = self.model(name, spec.name).load()
            lat = measure_latency(model, tokenizer, self.prompt_ids(name, n, spec.name), max_tokens)
            self._latency[key] = lat
            self.latency[name] = lat.to_dict()
        return self._latency[key]

    def train_step(self, name: str, steps: int = 3, batch_size: int = 4) -> dict[str, Any]:
        """Time LoRA training steps of ``name`` on held-out prompts (the spec's LoRA settings)."""
        import time

        import mlx.core as mx
        import mlx.optimizers as optim
        from mlx.utils import tree_flatten

        from distiller.evaluate import load_model, weight_bytes
        from distiller.train.batches import Example, collate, token_count
        from distiller.train.lora import adapter_config, prepare_trainable
        from distiller.train.trainer import make_train_step, sft_loss

        spec = self.spec()
        m = self.model(name)
        model, _ = load_model(m.ref)  # a private copy: LoRA layers change the model
        prepare_trainable(model, adapter_config(model, spec.student.lora, False, m.ref))
        ids = self.prompt_ids(name, batch_size)
        # Prompt then a fixed-length supervised tail, like an SFT example of 128+ tokens.
        examples = [Example(p + (p * 4)[:128], len(p)) for p in ids]
        batch = collate(examples)
        step = make_train_step(model, optim.Adam(learning_rate=1e-5), sft_loss)
        mx.eval(model.parameters())
        # Peak is process-wide: discount arrays of other models alive in this session.
        others = mx.get_active_memory() - weight_bytes(model)
        mx.reset_peak_memory()
        step(batch)  # compile + first step: not timed
        start = time.perf_counter()
        for _ in range(steps):
            step(batch)
        seconds = (time.perf_counter() - start) / steps
        trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
        return {
            "tokens_per_step": token_count(batch),
            "step_s": seconds,
            "tokens_per_s": token_count(batch) / seconds,
            "peak_memory_mb": (mx.get_peak_memory() - others) / 1e6,
            "trainable_params": trainable,
        }

    # -- baseline

    @property
    def baseline(self) -> dict[str, dict]:
        if self._baseline is None:
            from distiller.report import load_baseline

            self._baseline = load_baseline(self.options.baseline)
        return self._baseline

    def baseline_entry(self, task: str, prompt_set: str, model: str) -> dict | None:
        from distiller.report import entry_key

        return self.baseline.get(entry_key(task, prompt_set, model))


def _harness(config: pytest.Config) -> Harness:
    h = getattr(config, _STATE_ATTR, None)
    if h is None:
        h = Harness(_options(config))
        setattr(config, _STATE_ATTR, h)
    return h


# ---------------------------------------------------------------------------------------------
# Parametrization


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    names = metafunc.fixturenames
    if not any(n in names for n in ("distiller_task", "distiller_model", "distiller_prompt_set")):
        return
    h = _harness(metafunc.config)
    if "distiller_model" in names:
        wanted = getattr(metafunc.function, "distiller_models", None)
        models = [m for m in h.options.models if wanted is None or m in wanted]
        metafunc.parametrize("distiller_model", models, scope="session")
    if "distiller_prompt_set" in names:
        # One (task, prompt set) axis, so each task gets its own prompt sets.
        pairs = [(t, s) for t in h.specs for s in h.prompt_sets(t)]
        if "distiller_task" in names:
            metafunc.parametrize(
                ("distiller_task", "distiller_prompt_set"),
                pairs,
                ids=[f"{t}-{s}" for t, s in pairs],
                scope="session",
            )
        else:
            first = next(iter(h.specs))
            metafunc.parametrize(
                "distiller_prompt_set", [s for t, s in pairs if t == first], scope="session"
            )
    elif "distiller_task" in names:
        metafunc.parametrize("distiller_task", list(h.specs), scope="session")


def models(*names: str):
    """Decorator: restrict a test's ``distiller_model`` parametrization to these models."""

    def mark(fn):
        fn.distiller_models = names
        return fn

    return mark


# ---------------------------------------------------------------------------------------------
# Gates: checks with failure messages that say what, where, against what, and show samples


def _samples_text(result: Any, n: int = 3, width: int = 160) -> str:
    lines = []
    for rec in result.failing(n):
        out = " ".join(rec["output"].split())
        out = out if len(out) <= width else out[: width - 1] + "…"
        reasons = "; ".join(rec["reasons"][:3]) or "(no reason recorded)"
        lines.append(f"  - [{rec['id']}] {reasons}\n      output: {out!r}")
    return "\n".join(lines) if lines else "  (no failing samples)"


def _where(result: Any) -> str:
    return f"model={result.model} task={result.task} prompts={result.prompt_set}"


def check_threshold(result: Any, figure: str, rate: Any, threshold: float) -> str | None:
    """A failure message if ``rate`` (a metrics.Rate) is below ``threshold``, else None."""
    from distiller.metrics import meets_threshold

    if meets_threshold(rate, threshold):
        return None
    return f"{_where(result)}: {figure} {rate} is below the spec threshold {threshold:g}"


def check_baseline(
    result: Any, figure: str, new: Any, base: dict | None, alpha: float
) -> str | None:
    """A failure message if ``new`` (a Rate) is significantly below the baseline's counts."""
    from distiller.metrics import regression_test

    if not base or not base.get("n"):
        return None
    r = regression_test(int(base["k"]), int(base["n"]), new.k, new.n, alpha=alpha)
    if not r.regressed:
        return None
    return f"{_where(result)}: {figure} regressed vs baseline: {r.explain()}"


def fail_with_samples(result: Any, problems: list[str]) -> None:
    """pytest.fail listing every problem, then a few failing samples with their reasons."""
    problems = [p for p in problems if p]
    if problems:
        text = "\n".join(problems)
        pytest.fail(f"{text}\nfailing samples:\n{_samples_text(result)}", pytrace=False)


# ---------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="session")
def distiller(request: pytest.FixtureRequest) -> Harness:
    """The evaluation harness of this session (specs, models, prompt sets, evaluations)."""
    return _harness(request.config)


@pytest.fixture(scope="session")
def distiller_spec(distiller: Harness) -> Any:
    return distiller.spec()


@pytest.fixture(scope="session")
def teacher_model(distiller: Harness) -> ModelUnderTest:
    return distiller.model("teacher")


@pytest.fixture(scope="session")
def vanilla_student(distiller: Harness) -> ModelUnderTest:
    return distiller.model("vanilla")


@pytest.fixture(scope="session")
def distilled_student(distiller: Harness) -> ModelUnderTest:
    return distiller.model("distilled")


@pytest.fixture(scope="session")
def heldout_prompts(distiller: Harness) -> dict[str, list[Any]]:
    return distiller.prompt_sets()


@pytest.fixture(scope="session")
def eval_results(distiller: Harness):
    """``eval_results(model_name, prompt_set="split:test", task=None) -> EvalResult``."""

    def get(model_name: str, prompt_set: str = "split:test", task: str | None = None) -> Any:
        return distiller.evaluate(model_name, prompt_set, task)

    return get


@pytest.fixture(scope="session")
def baseline(distiller: Harness) -> dict[str, dict]:
    return distiller.baseline


# ---------------------------------------------------------------------------------------------
# Session end: reports, baseline, terminal table


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    h = getattr(session.config, _STATE_ATTR, None)
    if h is None or not h.results:
        return
    if hasattr(session.config, "workerinput"):  # xdist worker: the controller reports
        return
    from distiller.report import build_report, summarize, update_baseline, write_reports

    doc, md = build_report(h.results, h.latency, h.extra)
    write_reports(doc, md, h.options.reports)
    h.report_doc, h.report_md = doc, md
    if h.options.update_baseline:
        update_baseline(
            h.options.baseline, [summarize(r, h.latency.get(r.model)) for r in h.results]
        )
        h.baseline_written = True


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    h = getattr(config, _STATE_ATTR, None)
    if h is None or not getattr(h, "report_doc", None):
        return
    from distiller.report import comparison_frame, frame_markdown

    tr = terminalreporter
    tr.write_sep("=", "distiller: teacher vs students")
    frame = comparison_frame(list(h.report_doc["entries"].values()))
    for line in frame_markdown(frame).splitlines():
        tr.write_line(line)
    tr.write_line(f"reports: {h.options.reports / 'latest.md'} (+ latest.json, history.jsonl)")
    if getattr(h, "baseline_written", False):
        tr.write_line(f"baseline rewritten: {h.options.baseline}")
