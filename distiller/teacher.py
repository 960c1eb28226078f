"""The teacher stage: generate validated samples for every prompt of a task spec.

Rejection sampling: each prompt gets up to ``teacher.samples_per_prompt`` attempts, each checked
by the spec's validators. ``keep: first`` stops a prompt at its first passing sample; ``keep:
best`` spends the budget (stopping early on a perfect score) and the best passing sample is the
kept one (derived from the records, see ``distiller.samples.select_kept``). Every attempt,
accepted or rejected (with its reasons), is appended durably to the sample store, so a killed
run resumes exactly where it stopped. Work is batched across prompts (``teacher.batch_size``).

Attempts that return an error (a request that failed after all retries) are not samples: they
are not recorded and are tried again on the next run.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from distiller import cli_types
from distiller.backends import Backend, Completion, CompletionRequest, make_backend
from distiller.generate import build_messages
from distiller.samples import SampleStore, config_hash, sample_id

if TYPE_CHECKING:
    from distiller.spec import TaskSpec

MAX_REQUEST_FAILURES = 2  # per attempt and run, before the prompt is given up for this run


@dataclass
class TeacherSummary:
    """What a teacher run did. Counts under "this run" exclude samples found in the store."""

    store: str
    prompts: int  # prompts in scope (after --limit)
    prompts_kept: int  # prompts with a kept (accepted) sample, whole store
    prompts_exhausted: int  # prompts whose budget is spent without an accepted sample
    samples: int  # new attempts recorded this run
    accepted: int  # ... of which accepted
    resumed: int  # attempts already in the store for this teacher setup
    rejection_reasons: dict[str, int] = field(default_factory=dict)  # failed check -> count
    errors: int = 0  # requests that failed (not recorded; retried next run)
    error_examples: list[str] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    elapsed_s: float = 0.0
    interrupted: bool = False
    notes: list[str] = field(default_factory=list)
    config: str = ""  # hash of teacher identity + scaffold + decoding (record["teacher"]["config"])

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.samples if self.samples else 0.0

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(
            acceptance_rate=round(self.acceptance_rate, 4),
            samples_per_s=round(self.samples_per_s, 3),
            tokens_per_s=round(self.tokens_per_s, 2),
        )
        return d

    def format(self) -> str:
        lines = [
            f"teacher samples -> {self.store}",
            f"  prompts: {self.prompts} ({self.prompts_kept} with a kept sample, "
            f"{self.prompts_exhausted} out of budget)",
            f"  this run: {self.samples} samples, {self.accepted} accepted "
            f"({self.acceptance_rate:.0%}), {self.resumed} already done",
            f"  tokens: {self.prompt_tokens} prompt, {self.completion_tokens} completion | "
            f"{self.elapsed_s:.1f} s, {self.samples_per_s:.2f} samples/s, "
            f"{self.tokens_per_s:.1f} tok/s",
        ]
        if self.rejection_reasons:
            top = sorted(self.rejection_reasons.items(), key=lambda kv: -kv[1])
            lines.append("  rejections: " + ", ".join(f"{k} x{v}" for k, v in top[:8]))
        if self.errors:
            lines.append(f"  request errors: {self.errors} (not recorded; rerun to retry)")
            lines += [f"    {e}" for e in self.error_examples]
        if self.interrupted:
            lines.append("  interrupted: rerun the same command to continue")
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])


class TeacherInterrupted(KeyboardInterrupt):
    """Ctrl-C during the teacher stage; everything recorded so far is on disk."""

    def __init__(self, summary: TeacherSummary):
        super().__init__("teacher stage interrupted")
        self.summary = summary


def teacher_config(spec: TaskSpec, backend: Backend) -> tuple[str, dict]:
    """(config hash, teacher record field): identity + scaffold + decoding, no secrets."""
    t = spec.teacher
    identity = backend.fingerprint()
    setup = {
        "teacher": identity,
        "system_prompt": t.system_prompt,
        "few_shot": [list(fs) for fs in t.few_shot],
        # Logit shaping, stop strings and a JSON schema enter the hash only when on, so stores
        # made before they existed stay valid.
        "decoding": {
            k: v
            for k, v in asdict(t.decoding).items()
            if not (k in ("no_repeat_ngram", "repetition_penalty", "stop", "json_schema") and not v)
        },
    }
    config = config_hash(setup)
    return config, {**identity, "config": config}


def attempt_seed(base_seed: int | None, prompt_text: str, index: int) -> int | None:
    """A per-attempt seed: reproducible, different for every prompt and attempt."""
    if base_seed is None:
        return None
    return int(config_hash(["seed", base_seed, prompt_text, index]), 16) % (2**31 - 1)


@dataclass
class _PromptState:
    done: set[int] = field(default_factory=set)
    accepted: bool = False
    perfect: bool = False
    failures: Counter = field(default_factory=Counter)
    given_up: bool = False


def _finished(state: _PromptState, keep: str, budget: int) -> bool:
    if state.given_up or len(state.done) >= budget:
        return True
    return state.perfect if keep == "best" else state.accepted


def run_teacher(
    spec: TaskSpec,
    store_path: str | Path,
    backend: Backend | None = None,
    limit: int | None = None,
    progress: bool = True,
) -> TeacherSummary:
    """Generate, validate and record teacher samples for ``spec``; resumes from ``store_path``.

    Raises ``TeacherInterrupted`` (a KeyboardInterrupt carrying the summary) on Ctrl-C, and
    ``distiller.errors.UserError`` when the backend fails every request of a batch.
    """
    from distiller.errors import UserError

    t = spec.teacher
    prompts = list(spec.prompts if limit is None else spec.prompts[:limit])
    seen: dict[str, str] = {}
    for p in prompts:  # sample ids hash the prompt text: two prompts may not share one
        if p.text in seen:
            raise UserError(f"prompts {seen[p.text]!r} and {p.id!r} have the same text")
        seen[p.text] = p.id
    own_backend = backend is None
    if backend is None and t.gold:
        from distiller.backends.gold import GoldBackend

        backend = GoldBackend(prompts)
    backend = backend or make_backend(t)
    config, teacher_field = teacher_config(spec, backend)
    check = None
    if spec.validators:
        from distiller.validators import build_validator

        check = build_validator(spec.validators)
    budget = t.samples_per_prompt
    if t.decoding.temperature == 0 and budget > 1:
        # Greedy decoding repeats itself: more attempts cannot change the verdict.
        budget = 1

    store = SampleStore(store_path)
    summary = TeacherSummary(
        store=str(store.path), prompts=len(prompts), prompts_kept=0, prompts_exhausted=0,
        samples=0, accepted=0, resumed=0, notes=list(store.notes), config=config,
    )  # fmt: skip
    summary.rejection_reasons = Counter()  # a plain dict again when the run ends
    if budget != t.samples_per_prompt:
        summary.notes.append("temperature is 0 (greedy): one attempt per prompt")

    # State of every prompt from what the store already holds for this teacher setup.
    states: dict[str, _PromptState] = {p.id: _PromptState() for p in prompts}
    ids = {sample_id(p.text, config, i): (p.id, i) for p in prompts for i in range(budget)}
    for rec in store.records():
        if rec["id"] in ids:
            pid, i = ids[rec["id"]]
            st = states[pid]
            st.done.add(i)
            if rec.get("accepted"):
                st.accepted = True
                st.perfect = st.perfect or (rec.get("score") or 0) >= 1.0
            summary.resumed += 1
    by_id = {p.id: p for p in prompts}

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(
            total=len(prompts),
            initial=sum(_finished(s, t.keep, budget) for s in states.values()),
            unit="prompt",
            desc="teacher",
            file=sys.stderr,
            dynamic_ncols=True,
        )

    start = time.perf_counter()

    def make_request(prompt, index: int) -> CompletionRequest:
        messages = build_messages(prompt.text, t.system_prompt, [tuple(fs) for fs in t.few_shot])
        seed = attempt_seed(t.decoding.seed, prompt.text, index)
        return CompletionRequest(messages, dataclasses.replace(t.decoding, seed=seed))

    def record(prompt, index: int, req: CompletionRequest, c: Completion) -> dict:
        if check is not None:
            verdict = check(c.text, prompt)
            accepted, score = verdict.passed, verdict.score
            reasons = list(verdict.reasons)
            failed = [ch.name for ch in verdict.checks if not ch.passed]
            verdict_d = verdict.to_dict()
        else:
            accepted, score, reasons, failed, verdict_d = True, 1.0, [], [], {}
        if c.finish_reason == "length":
            # Cut off mid-answer: not something to teach, whatever the format checks say.
            accepted = False
            reasons.append(f"truncated at max_tokens ({req.decoding.max_tokens})")
            failed.append("truncated")
        return {
            "id": sample_id(prompt.text, config, index),
            "prompt_id": prompt.id,
            "prompt": prompt.text,
            "sample_index": index,
            "messages": req.messages,
            "completion": c.text,
            "accepted": accepted,
            "reasons": reasons,
            "failed_checks": failed,
            "score": score,
            "verdict": verdict_d,
            "teacher": teacher_field,
            "seed": req.decoding.seed,
            "tokens": {"prompt": c.prompt_tokens, "completion": c.completion_tokens},
            "finish_reason": c.finish_reason,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            # The server that answered, for a teacher of several (none for a local model).
            **({"endpoint": c.extra["endpoint"]} if "endpoint" in c.extra else {}),
        }

    def pending() -> list[tuple[str, int]]:
        """The next attempts: one per unfinished prompt ('first'), or all remaining ('best')."""
        out = []
        for p in prompts:
            st = states[p.id]
            if _finished(st, t.keep, budget):
                continue
            todo = [i for i in range(budget) if i not in st.done]
            out += [(p.id, i) for i in (todo if t.keep == "best" else todo[:1])]
        return out

    streak = 0  # requests failed in a row
    try:
        while work := pending():
            for b in range(0, len(work), t.batch_size):
                chunk = [
                    (pid, i) for pid, i in work[b : b + t.batch_size]
                    if not _finished(states[pid], t.keep, budget)
                ]  # fmt: skip
                if not chunk:
                    continue
                reqs = [make_request(by_id[pid], i) for pid, i in chunk]
                handled: set[int] = set()

                def handle(k: int, c: Completion, chunk=chunk, reqs=reqs, handled=handled) -> None:
                    """Record one completion the moment it arrives: an interrupt keeps it."""
                    handled.add(k)
                    pid, i = chunk[k]
                    st = states[pid]
                    was_finished = _finished(st, t.keep, budget)
                    if not c.ok:
                        summary.errors += 1
                        if len(summary.error_examples) < 3:
                            summary.error_examples.append(f"{pid}#{i}: {c.error}")
                        st.failures[i] += 1
                        if st.failures[i] >= MAX_REQUEST_FAILURES:
                            st.given_up = True
                    else:
                        rec = record(by_id[pid], i, reqs[k], c)
                        store.append(rec)
                        st.done.add(i)
                        summary.samples += 1
                        summary.prompt_tokens += c.prompt_tokens
                        summary.completion_tokens += c.completion_tokens
                        if rec["accepted"]:
                            summary.accepted += 1
                            st.accepted = True
                            st.perfect = st.perfect or rec["score"] >= 1.0
                        else:
                            summary.rejection_reasons.update(rec["failed_checks"])
                    if bar is not None and not was_finished and _finished(st, t.keep, budget):
                        bar.update(1)

                completions = backend.complete(reqs, on_done=handle)
                for k, c in enumerate(completions):  # a backend that did not call on_done
                    if k not in handled:
                        handle(k, c)
                failed_now = sum(not c.ok for c in completions)
                streak = streak + failed_now if failed_now == len(completions) else 0
                # A dead or misconfigured backend: stop instead of burning every prompt's retries.
                if streak and (summary.samples == 0 or streak >= max(8, 2 * t.batch_size)):
                    raise UserError(
                        f"teacher backend failed every request ({streak} in a row): "
                        f"{completions[0].error}"
                    )
                if bar is not None:
                    el = max(time.perf_counter() - start, 1e-9)
                    bar.set_postfix(
                        samples=summary.samples,
                        smp_s=f"{summary.samples / el:.2f}",
                        tok_s=f"{summary.completion_tokens / el:.1f}",
                        acc=f"{summary.acceptance_rate:.0%}",
                        refresh=False,
                    )
    except KeyboardInterrupt:
        summary.interrupted = True
        _finish(summary, store, states, start, bar, backend, own_backend, t.keep, budget)
        raise TeacherInterrupted(summary) from None
    except BaseException:
        _finish(summary, store, states, start, bar, backend, own_backend, t.keep, budget)
        raise
    _finish(summary, store, states, start, bar, backend, own_backend, t.keep, budget)
    return summary


def _finish(summary, store, states, start, bar, backend, own_backend, keep, budget) -> None:
    summary.elapsed_s = time.perf_counter() - start
    # Servers that failed on the way (a teacher of several endpoints): the summary says which.
    summary.notes += getattr(backend, "notes", list)()
    kept = store.kept(keep, config=summary.config)
    summary.prompts_kept = sum(1 for pid in states if pid in kept)
    summary.prompts_exhausted = sum(
        1 for pid, st in states.items() if pid not in kept and len(st.done) >= budget
    )
    summary.rejection_reasons = dict(summary.rejection_reasons)
    store.close()
    if bar is not None:
        bar.close()
    if own_backend:
        backend.close()


# -- CLI -----------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", type=Path, help="task spec (YAML)")
    parser.add_argument(
        "--out",
        type=cli_types.out_dir,
        default=None,
        help="output directory for samples.jsonl (default: runs/<task name>/teacher)",
    )
    parser.add_argument(
        "--limit", type=cli_types.positive_int, default=None, help="only the first N prompts"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.epilog = (
        "Reruns resume: attempts already in samples.jsonl are skipped.\n"
        "Ctrl-C stops cleanly; every finished sample is on disk."
    )


def run_cli(args: argparse.Namespace) -> int:
    from distiller.backends import BackendError
    from distiller.errors import UserError
    from distiller.pipeline import load_task

    spec = load_task(args.spec)
    out = args.out or Path("runs") / spec.name / "teacher"
    try:
        summary = run_teacher(
            spec, out / "samples.jsonl", limit=args.limit, progress=not args.no_progress
        )
    except TeacherInterrupted as exc:
        print(exc.summary.format(), file=sys.stderr)
        return 130
    except BackendError as exc:
        raise UserError(f"teacher backend: {exc}") from None
    print(summary.format())
    return 0
