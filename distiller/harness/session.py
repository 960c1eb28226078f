"""What one pytest session measured: specs, models under test, evaluations, latency, extras.

``DistillerSession`` builds each artifact at most once per session (and the expensive ones at
most once across sessions, through the on-disk caches of the pipeline and of ``evaluate``). Its
report state is declared here, field by field: the session-end hooks read these fields and
nothing else.

Memo keys hold everything that determines a value: an evaluation is keyed by (task, model,
prompt set); a single-stream measurement by (task, model, number of prompts, decoding), so two
specs, or two token budgets, in one run never share or overwrite a figure.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

MODEL_NAMES = ("teacher", "vanilla", "distilled")


@dataclass(frozen=True)
class Options:
    """The ``--distiller-*`` options, paths resolved against the rootdir."""

    specs: list[Path]
    baseline: Path
    update_baseline: bool
    limit: int | None
    out: Path
    reports: Path
    student: Path | None
    models: list[str]
    alpha: float


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
            from distiller.models import load_model

            self._loaded = load_model(self.ref)
        return self._loaded

    @property
    def path(self) -> Path | None:
        """The local model directory, if the reference has one (never pulls)."""
        from distiller.errors import UserError
        from distiller.models import resolve_model

        try:
            return Path(resolve_model(self.ref, pull=False))
        except UserError:
            return None


# Keys of the session's memos.
EvalKey = tuple[str, str, str]  # (task, model, prompt set)
LatencyKey = tuple[str, str, int, Any]  # (task, model, prompts, Decoding)


@dataclass
class DistillerSession:
    """Session state: specs, models, prompt sets and measurements, each made at most once."""

    options: Options
    # Report state, read by the session-end hooks.
    latency: dict[tuple[str, str], Any] = field(default_factory=dict)
    """(task, model) -> the latest single-stream ``Latency`` measured for that model."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Other named figures for the report (memory peaks, training-step rates, ...)."""
    report_doc: dict[str, Any] | None = None
    report_markdown: str | None = None
    baseline_written: bool = False
    # Memos.
    _specs: dict[str, Any] | None = field(default=None, repr=False)
    _models: dict[tuple[str, str], ModelUnderTest] = field(default_factory=dict, repr=False)
    _results: dict[EvalKey, Any] = field(default_factory=dict, repr=False)
    _single_stream: dict[LatencyKey, Any] = field(default_factory=dict, repr=False)
    _baseline: dict[str, dict] | None = field(default=None, repr=False)
    _teacher_specs: dict[str, Any] = field(default_factory=dict, repr=False)
    # (task, prompt set, model) -> agreement with the teacher, for the report
    agreements: dict[tuple[str, str, str], dict] = field(default_factory=dict, repr=False)

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
        """{prompt set name: [Prompt]}: the held-out "split:test" and each "set:<name>"."""
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

    def _with_teacher(self, spec: Any) -> Any:
        """The spec with a ``teacher.task`` built (its student is the teacher model)."""
        from distiller.pipeline import with_teacher_task

        if spec.name not in self._teacher_specs:
            self._teacher_specs[spec.name] = with_teacher_task(
                spec, self.options.out, limit=self.options.limit
            )
        return self._teacher_specs[spec.name]

    def _make_model(self, spec: Any, name: str) -> ModelUnderTest:
        from distiller.pipeline import vanilla_model

        student_style = spec.student.prompt_style
        if name in ("teacher", "vanilla"):
            spec = self._with_teacher(spec)
        if name == "teacher":
            if not spec.teacher.model:
                what = "the data's gold answers" if spec.teacher.gold else "a remote endpoint"
                pytest.skip(f"{spec.name}: the teacher is {what}; nothing local to run")
            return ModelUnderTest("teacher", spec.teacher.model, "scaffold", spec.name)
        if name == "vanilla":
            ref = vanilla_model(spec, self.run_dir(spec.name))
            return ModelUnderTest("vanilla", ref, student_style, spec.name)
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
            wanted = {
                k: v
                for k, v in sets.items()
                if v and (spec.name, model_name, k) not in self._results
            }
            together = cached_evaluate_together(
                m.ref,
                spec,
                wanted | {prompt_set: sets[prompt_set]},
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

    def agreement(self, model_name: str, prompt_set: str, task: str | None = None) -> dict:
        """``model_name``'s agreement with the teacher (top-1, KL, perplexities:
        ``distiller.agreement``) on the teacher's answers to ``prompt_set``; computed once per
        pair of evaluations (cached on disk beside them) and kept for the report."""
        from distiller.agreement import agreement_with_teacher, cached_teacher_agreement

        spec = self.spec(task)
        key = (spec.name, prompt_set, model_name)
        if key not in self.agreements:
            teacher_result = self.evaluate("teacher", prompt_set, spec.name)
            result = self.evaluate(model_name, prompt_set, spec.name)
            student, teacher = self.model(model_name, spec.name), self.model("teacher", spec.name)
            prompts = self.prompt_sets(spec.name)[prompt_set]
            self.agreements[key] = cached_teacher_agreement(
                self.run_dir(spec.name) / "eval",
                ["agreement", result.key, teacher_result.key],
                lambda: agreement_with_teacher(
                    spec,
                    prompts,
                    teacher_result.records,
                    student.load(),
                    teacher.load(),
                    student.style,
                    teacher.style,
                ),
            )
        return self.agreements[key]

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
        self,
        name: str,
        task: str | None = None,
        n: int = 2,
        max_tokens: int = 64,
        *,
        fresh: bool = False,
    ) -> Any:
        """Single-stream ``Latency`` of ``name`` on ``n`` held-out prompts with the spec's eval
        decoding capped at ``max_tokens``: measured once per session and key, or anew with
        ``fresh`` (a benchmark must time the work, not a memo hit). Either way the result is
        memoized for later callers and kept as the report's figure for (task, model)."""
        from distiller.evaluate import measure_latency

        spec = self.spec(task)
        decoding = spec.eval.decoding.replace(max_tokens=max_tokens)
        key = (spec.name, name, n, decoding)
        if fresh or key not in self._single_stream:
            model, tokenizer = self.model(name, spec.name).load()
            ids = self.prompt_ids(name, n, spec.name)
            self._single_stream[key] = measure_latency(model, tokenizer, ids, decoding)
            self.latency[(spec.name, name)] = self._single_stream[key]
        return self._single_stream[key]

    def train_step(
        self,
        name: str,
        steps: int = 3,
        batch_size: int = 4,
        task: str | None = None,
        *,
        full: bool = False,
    ) -> dict[str, Any]:
        """Time training steps of ``name`` on held-out prompts: LoRA with the spec's settings,
        or with ``full`` every weight trained (full fine-tuning), the same batch and optimizer."""
        import mlx.core as mx
        import mlx.optimizers as optim
        from mlx.utils import tree_flatten

        from distiller.evaluate import count_parameters, weight_bytes
        from distiller.models import load_model
        from distiller.train.batches import Example, collate, token_count
        from distiller.train.lora import adapter_config, prepare_trainable
        from distiller.train.routes import sft_loss
        from distiller.train.step import make_train_step

        spec = self.spec(task)
        m = self.model(name, spec.name)
        model, _ = load_model(m.ref)  # a private copy: training changes the model
        prepare_trainable(model, adapter_config(model, spec.student.lora, full, m.ref))
        ids = self.prompt_ids(name, batch_size, spec.name)
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
            "fine_tune": "full" if full else "lora",
            "examples": len(examples),
            "example_tokens": sum(len(e.tokens) for e in examples),
            "tokens_per_step": token_count(batch),
            "steps": steps,
            "step_s": seconds,
            "tokens_per_s": token_count(batch) / seconds,
            "peak_memory_mb": (mx.get_peak_memory() - others) / 1e6,
            "weights_mb": weight_bytes(model) / 1e6,
            "trainable_params": trainable,
            "params": count_parameters(model),
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

    # -- report

    def latency_figures(self) -> dict[tuple[str, str], dict[str, Any]]:
        """The report's single-stream figures, keyed by (task, model)."""
        return {key: lat.to_dict() for key, lat in self.latency.items()}
