"""Teacher stage: rejection sampling, keep first/best, resume, errors, SIGKILL and SIGINT."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from fake_openai import FakeOpenAI
from tiny_lm import build_tiny_model_dir

from distiller.errors import UserError
from distiller.samples import SampleStore, select_kept
from distiller.spec import load_spec
from distiller.teacher import TeacherInterrupted, run_teacher


def default_sigint() -> None:
    """Child-side: restore SIGINT's default so Python installs its KeyboardInterrupt handler.

    A shell running a job in the background (`cmd &`) starts it with SIGINT ignored, and an
    ignored signal stays ignored across exec: the Ctrl-C tests would then test nothing.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def graded_responder(body: dict) -> str:
    """Deterministic in the request seed: perfect, accepted-but-imperfect, or rejected."""
    seed = body["seed"]
    user = body["messages"][-1]["content"]
    if seed % 3 == 0:
        return f"ANSWER: {user} holds because of {seed}"
    if seed % 3 == 1:
        return f"ANSWER: a b c a b c a b c because {seed}"  # repeated trigrams: score < 1
    return f"I do not know {seed}"


def write_spec(
    path: Path,
    url: str,
    n_prompts: int,
    keep: str = "first",
    budget: int = 3,
    batch_size: int = 4,
    concurrency: int = 4,
    extra_validators: str = "",
) -> Path:
    prompts = "\n".join(f'  - "question number {i}"' for i in range(n_prompts))
    path.write_text(
        f"""name: toy
prompts:
{prompts}
teacher:
  endpoint: {{url: "{url}", model: fake, max_concurrency: {concurrency}, max_retries: 1, timeout_s: 5}}
  system_prompt: Start with ANSWER.
  few_shot: [{{user: "why?", assistant: "ANSWER: it holds because it does"}}]
  decoding: {{temperature: 0.7, max_tokens: 64, seed: 0}}
  samples_per_prompt: {budget}
  keep: {keep}
  batch_size: {batch_size}
validators:
  - {{type: regex, must_match: ["^ANSWER:", "because"]}}
{extra_validators}
student: {{model: tiny}}
"""
    )
    return path


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def _expected_attempts(spec, keep: str) -> int:
    """Attempts the rules imply for graded_responder, computed independently of the teacher."""
    from distiller.teacher import attempt_seed

    total = 0
    for p in spec.prompts:
        for i in range(spec.teacher.samples_per_prompt):
            total += 1
            s = attempt_seed(spec.teacher.decoding.seed, p.text, i) % 3
            if (keep == "first" and s in (0, 1)) or (keep == "best" and s == 0):
                break
    return total


def test_first_mode_records_every_attempt_and_resumes(tmp_path):
    with FakeOpenAI(responder=graded_responder) as srv:
        spec = load_spec(write_spec(tmp_path / "spec.yaml", srv.url, n_prompts=12))
        store = tmp_path / "out" / "samples.jsonl"
        s1 = run_teacher(spec, store, progress=False)
        recs = _lines(store)
        assert len(recs) == s1.samples == _expected_attempts(spec, "first")
        assert len(srv.requests) == s1.samples
        assert len({r["id"] for r in recs}) == len(recs)
        # every prompt stops at its first accepted sample, so accepted = prompts with one
        kept = select_kept(recs, "first")
        assert s1.prompts_kept == len(kept) == s1.accepted
        assert s1.prompts_kept + s1.prompts_exhausted == 12
        for r in recs:
            assert r["accepted"] == (r["seed"] % 3 in (0, 1))
            assert r["accepted"] or r["reasons"]  # a rejection says why
            assert r["messages"][0] == {"role": "system", "content": "Start with ANSWER."}
            assert r["messages"][-1] == {"role": "user", "content": r["prompt"]}
            assert r["teacher"]["config"] == s1.config and "api_key" not in json.dumps(r)
        rejected = s1.samples - s1.accepted
        assert rejected > 0
        assert s1.rejection_reasons == {"regex:^ANSWER:": rejected, "regex:because": rejected}
        assert s1.acceptance_rate == pytest.approx(s1.accepted / s1.samples)
        # rerun: nothing to do, nothing duplicated
        s2 = run_teacher(spec, store, progress=False)
        assert s2.samples == 0 and s2.resumed == s1.samples and s2.prompts_kept == s1.prompts_kept
        assert len(_lines(store)) == len(recs) and len(srv.requests) == s1.samples


def test_best_mode_spends_budget_until_perfect_and_keeps_best(tmp_path):
    with FakeOpenAI(responder=graded_responder) as srv:
        # batch_size 1: attempts go one at a time, so a perfect score stops a prompt at once
        spec = load_spec(
            write_spec(tmp_path / "spec.yaml", srv.url, n_prompts=10, keep="best", batch_size=1)
        )
        store = tmp_path / "samples.jsonl"
        summary = run_teacher(spec, store, progress=False)
    recs = _lines(store)
    assert len(recs) == _expected_attempts(spec, "best")
    by_prompt: dict[str, list[dict]] = {}
    for r in recs:
        by_prompt.setdefault(r["prompt_id"], []).append(r)
    kept = SampleStore(store, readonly=True).kept("best", config=summary.config)
    for pid, rs in by_prompt.items():
        accepted = [r for r in rs if r["accepted"]]
        if accepted:
            best = max(r["score"] for r in accepted)
            assert kept[pid]["score"] == best
        else:
            assert pid not in kept
    assert any(r["score"] == 1.0 for r in kept.values())
    assert any(r["accepted"] and r["score"] < 1.0 for r in recs)


def test_request_errors_are_not_recorded_and_all_failing_is_an_error(tmp_path):
    def flaky(body: dict) -> str:
        return graded_responder(body)

    with FakeOpenAI(responder=flaky) as srv:
        spec = load_spec(write_spec(tmp_path / "spec.yaml", srv.url, n_prompts=4, budget=1))
        # the first request fails permanently (400 x2 = the per-attempt give-up limit)
        srv.push({"status": 400}, *[{}] * 3, {"status": 400})
        summary = run_teacher(spec, tmp_path / "a.jsonl", progress=False, limit=4)
        assert summary.errors == 2 and "HTTP 400" in summary.error_examples[0]
        assert summary.samples == 3  # the failing prompt has no record, to be retried next run
        srv.push(*[{"status": 400}] * 4)
        with pytest.raises(UserError, match="failed every request"):
            run_teacher(spec, tmp_path / "b.jsonl", progress=False)


def test_local_backend_teacher_on_tiny_model(tmp_path):
    model_dir = build_tiny_model_dir(tmp_path / "tiny")
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(
        f"""name: toy_local
prompts: ["hello world", "a quorum", "the fox", "the dog", "forty-two"]
teacher:
  model: {model_dir}
  system_prompt: be brief
  decoding: {{temperature: 1.0, max_tokens: 8, seed: 1}}
  samples_per_prompt: 2
  batch_size: 4
validators:
  - {{type: regex, must_not_match: ["^ZZZ"]}}
"""
    )
    spec = load_spec(spec_path)
    summary = run_teacher(spec, tmp_path / "out" / "samples.jsonl", progress=False)
    recs = _lines(tmp_path / "out" / "samples.jsonl")
    assert summary.samples == len(recs) and {r["teacher"]["backend"] for r in recs} == {"local"}
    # Whatever a random model samples: an answer cut at max_tokens is rejected as truncated, one
    # that ended by itself is shorter; a prompt gets a second attempt only after a rejection.
    for r in recs:
        if r["finish_reason"] == "length":
            assert r["tokens"]["completion"] == 8 and not r["accepted"]
            assert "truncated" in r["failed_checks"]
        else:
            assert r["finish_reason"] == "stop" and r["tokens"]["completion"] <= 8
    attempts = Counter(r["prompt_id"] for r in recs)
    for r in recs:
        if r["sample_index"] == 0:
            assert attempts[r["prompt_id"]] == (1 if r["accepted"] else 2)
    assert summary.completion_tokens == sum(r["tokens"]["completion"] for r in recs)
    assert summary.tokens_per_s > 0


def test_an_interrupt_mid_batch_keeps_the_sequences_already_finished(tmp_path):
    """The whole prompt set is one batch (as in the shipped spec): Ctrl-C after some sequences
    finished keeps exactly those, and a rerun generates only the rest."""
    from distiller.backends.local import LocalBackend

    class InterruptAfter:
        def __init__(self, inner, n):
            self.inner, self.n, self.seen = inner, n, 0

        def fingerprint(self):
            return self.inner.fingerprint()

        def complete(self, reqs, on_done=None):
            def done(i, c):
                # Delivered while the batch is still generating: no batch has ended yet.
                assert self.inner.stats.sequences == 0
                on_done(i, c)
                self.seen += 1
                if self.seen == self.n:
                    raise KeyboardInterrupt

            return self.inner.complete(reqs, on_done=done)

        def close(self):
            self.inner.close()

    model_dir = build_tiny_model_dir(tmp_path / "tiny")
    spec_path = tmp_path / "spec.yaml"
    prompts = [f"prompt number {i}" for i in range(6)]
    spec_path.write_text(
        f"name: toy_batch\nprompts: {json.dumps(prompts)}\n"
        f"teacher: {{model: {model_dir}, batch_size: 6, decoding: {{temperature: 0, max_tokens: 4}}}}\n"
    )
    spec = load_spec(spec_path)
    store = tmp_path / "samples.jsonl"
    with pytest.raises(TeacherInterrupted) as info:
        run_teacher(
            spec, store, backend=InterruptAfter(LocalBackend(str(model_dir)), 2), progress=False
        )
    assert info.value.summary.samples == 2 == len(_lines(store))
    again = run_teacher(spec, store, progress=False)
    assert again.resumed == 2 and again.samples == 4 and len(_lines(store)) == 6


# -- killing the teacher process ---------------------------------------------------------------


def _teach_cmd(spec: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "distiller.cli", "teach", str(spec), "--out", str(out)]


def _wait_for_lines(path: Path, n: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_bytes().count(b"\n") >= n:
            return
        if proc.poll() is not None:
            pytest.fail(f"teacher exited early ({proc.returncode}): {proc.stderr.read()}")
        time.sleep(0.01)
    pytest.fail("teacher wrote no records in time")


def _assert_same_as_clean(tmp_path: Path, spec_path: Path, store: Path) -> None:
    clean = tmp_path / "clean" / "samples.jsonl"  # an uninterrupted run of the same spec
    run_teacher(load_spec(spec_path), clean, progress=False)
    got, want = _lines(store), _lines(clean)
    counts = Counter((r["prompt_id"], r["sample_index"]) for r in got)
    assert max(counts.values()) == 1  # nothing duplicated
    assert set(counts) == {(r["prompt_id"], r["sample_index"]) for r in want}  # nothing lost
    assert {r["id"]: r["completion"] for r in got} == {r["id"]: r["completion"] for r in want}


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_killed_teacher_resumes_exactly(tmp_path, sig):
    with FakeOpenAI(responder=graded_responder, delay_s=0.04) as srv:
        spec_path = write_spec(
            tmp_path / "spec.yaml", srv.url, n_prompts=40, batch_size=4, concurrency=2
        )
        out = tmp_path / "run"
        store = out / "samples.jsonl"
        proc = subprocess.Popen(
            _teach_cmd(spec_path, out),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=default_sigint,  # as from a terminal, even if our parent ignores SIGINT
        )
        _wait_for_lines(store, 6, proc)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        partial = store.read_bytes()
        n_partial = partial.count(b"\n")
        if sig == signal.SIGINT:
            assert proc.returncode == 130, err
            assert "interrupted" in err
            assert partial.endswith(b"\n")  # clean stop: no torn record
            assert all(json.loads(x) for x in partial.splitlines())
        else:
            assert proc.returncode == -signal.SIGKILL
        assert 6 <= n_partial < _expected_attempts(load_spec(spec_path), "first")
        # rerun to completion
        rerun = subprocess.run(
            [*_teach_cmd(spec_path, out), "--no-progress"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert rerun.returncode == 0, rerun.stderr
        assert f"{n_partial} already done" in rerun.stdout
        _assert_same_as_clean(tmp_path, spec_path, store)


def test_interrupt_in_process_raises_with_summary(tmp_path):
    class InterruptingBackend:
        def __init__(self, inner):
            self.inner, self.calls = inner, 0

        def fingerprint(self):
            return self.inner.fingerprint()

        def complete(self, reqs, on_done=None):
            self.calls += 1
            if self.calls == 3:
                raise KeyboardInterrupt
            return self.inner.complete(reqs, on_done=on_done)

        def close(self):
            self.inner.close()

    from distiller.backends import make_backend

    with FakeOpenAI(responder=graded_responder) as srv:
        spec = load_spec(write_spec(tmp_path / "spec.yaml", srv.url, n_prompts=20, batch_size=2))
        be = InterruptingBackend(make_backend(spec.teacher))
        store = tmp_path / "samples.jsonl"
        with pytest.raises(TeacherInterrupted) as info:
            run_teacher(spec, store, backend=be, progress=False)
        s = info.value.summary
        assert s.interrupted and s.samples == 4 == len(_lines(store))
        assert isinstance(info.value, KeyboardInterrupt)
        # the store was closed (lock released): a rerun can open it and finish
        s2 = run_teacher(spec, store, progress=False)
        assert s2.resumed == 4 and s2.samples + 4 == _expected_attempts(spec, "first")


def test_cli_errors_are_one_line(tmp_path):
    bad = subprocess.run(
        [sys.executable, "-m", "distiller.cli", "teach", str(tmp_path / "missing.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "distiller teach: error:" in bad.stderr
    assert "Traceback" not in bad.stderr
    env = {**os.environ, "TOY_KEY": "sk-should-not-print"}
    with FakeOpenAI(api_key="other") as srv:
        spec_path = write_spec(tmp_path / "spec.yaml", srv.url, n_prompts=2)
        text = spec_path.read_text().replace("model: fake,", "model: fake, api_key_env: TOY_KEY,")
        spec_path.write_text(text)
        proc = subprocess.run(
            [*_teach_cmd(spec_path, tmp_path / "o"), "--no-progress"],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
    assert proc.returncode == 2 and "HTTP 401" in proc.stderr and "Traceback" not in proc.stderr
    assert "sk-should-not-print" not in proc.stderr + proc.stdout


def test_duplicate_prompt_texts_are_refused(tmp_path):
    from types import SimpleNamespace

    spec = load_spec(write_spec(tmp_path / "spec.yaml", "http://127.0.0.1:9", n_prompts=2))
    dup = SimpleNamespace(**{**spec.__dict__, "prompts": (spec.prompts[0], spec.prompts[0])})
    with pytest.raises(UserError, match="same text"):
        run_teacher(dup, tmp_path / "s.jsonl", progress=False)
