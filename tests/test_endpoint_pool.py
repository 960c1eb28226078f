"""A teacher behind several OpenAI-compatible servers: work spread over them with bounded
concurrency each, dead servers taken out of the rotation, nothing lost or duplicated.

Real ``mlx_lm.server`` processes serving a tiny model where a real server can show it (work
spread, a process killed mid-run, an unreachable URL); tests/fake_openai.py where a failure has
to be injected (500s, hangs, 429, refused credentials)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from fake_openai import FakeOpenAI
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mlx_server import MlxServer, free_port

from distiller.backends import BackendError, CompletionRequest
from distiller.backends.openai_compat import OpenAICompatBackend, chat_url
from distiller.decoding import Decoding
from distiller.errors import SpecError
from distiller.spec import load_spec
from distiller.teacher import run_teacher

REPO = Path(__file__).resolve().parents[1]


def write_spec(
    path: Path,
    urls: list[str],
    n_prompts: int,
    concurrency: int = 2,
    max_retries: int = 1,
    timeout_s: float = 30,
    batch_size: int = 4,
    model: str = "default_model",
) -> Path:
    prompts = "\n".join(f'  - "question number {i}"' for i in range(n_prompts))
    listed = ", ".join(f'"{u}"' for u in urls)
    path.write_text(
        f"""name: fleet
prompts:
{prompts}
teacher:
  endpoint:
    urls: [{listed}]
    model: {model}
    max_concurrency: {concurrency}
    max_retries: {max_retries}
    timeout_s: {timeout_s}
  decoding: {{temperature: 0.0, max_tokens: 8}}
  batch_size: {batch_size}
student: {{model: tiny}}
"""
    )
    return path


def read_records(path: Path) -> list[dict]:
    """The store's complete records, also while a writer is appending (a torn tail skipped)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_bytes().split(b"\n")[:-1]:
        with contextlib.suppress(ValueError):  # a torn last line: being written
            out.append(json.loads(line))
    return out


def assert_each_prompt_once(records: list[dict], n_prompts: int) -> None:
    per_attempt = Counter((r["prompt_id"], r["sample_index"]) for r in records)
    assert len(per_attempt) == n_prompts and set(per_attempt.values()) == {1}
    assert len({r["id"] for r in records}) == len(records) == n_prompts


def _req(text: str) -> CompletionRequest:
    return CompletionRequest([{"role": "user", "content": text}], Decoding(max_tokens=8, seed=1))


def _backend(urls: list[str], **kw) -> OpenAICompatBackend:
    kw.setdefault("backoff_base_s", 0.01)
    kw.setdefault("timeout_s", 5.0)
    return OpenAICompatBackend(urls, "teacher-x", **kw)


# ------------------------------------------------------------------------- real servers


def test_work_is_spread_and_a_server_killed_mid_run_loses_nothing(tmp_path, tiny_model_dir):
    n = 32
    with MlxServer(tiny_model_dir) as a, MlxServer(tiny_model_dir) as b:
        spec = load_spec(write_spec(tmp_path / "s.yaml", [a.url, b.url], n, batch_size=4))
        store = tmp_path / "samples.jsonl"
        killed_at: list[int] = []
        done = threading.Event()

        def kill_b_once_it_served() -> None:
            # SIGKILL b as soon as it has answered something: the rest of the run is after.
            while not done.is_set():
                recs = read_records(store)
                if len(recs) >= 4 and any(r["endpoint"].startswith(b.url) for r in recs):
                    b.kill()
                    killed_at.append(len(recs))
                    return
                time.sleep(0.005)

        killer = threading.Thread(target=kill_b_once_it_served)
        killer.start()
        try:
            summary = run_teacher(spec, store, progress=False)
        finally:
            done.set()
            killer.join()
        assert killed_at and killed_at[0] <= n - 12, "the kill must come mid-run"
        assert b.proc.returncode == -9
        records = read_records(store)
        assert_each_prompt_once(records, n)
        # (The tiny random model runs into max_tokens: samples, recorded, though not accepted.)
        assert summary.samples == n and summary.errors == 0
        served = Counter(chat_url(a.url if r["endpoint"].startswith(a.url) else b.url)
                         for r in records)  # fmt: skip
        assert served[chat_url(a.url)] > 0 and served[chat_url(b.url)] > 0  # both got work
        # After the kill a answers everything (the last batches started after it).
        assert all(r["endpoint"] == chat_url(a.url) for r in records[-8:])
        assert any(chat_url(b.url) in note and "out of rotation" in note for note in summary.notes)

        # Samples belong to the model, not to the replica: another fleet resumes the store.
        other = load_spec(
            write_spec(tmp_path / "s2.yaml", [a.url, f"http://127.0.0.1:{free_port()}/v1"], n)
        )
        again = run_teacher(other, store, progress=False)
        assert again.resumed == n and again.samples == 0
        assert read_records(store) == records


def test_an_unreachable_url_among_good_ones_still_completes(tmp_path, tiny_model_dir):
    dead = f"http://127.0.0.1:{free_port()}/v1"
    n = 8
    with MlxServer(tiny_model_dir) as good:
        # The dead one first: the first requests go there; max_retries 0 still fails over.
        spec = load_spec(write_spec(tmp_path / "s.yaml", [dead, good.url], n, max_retries=0))
        store = tmp_path / "samples.jsonl"
        summary = run_teacher(spec, store, progress=False)
    records = read_records(store)
    assert_each_prompt_once(records, n)
    assert summary.errors == 0 and {r["endpoint"] for r in records} == {chat_url(good.url)}
    assert any(chat_url(dead) in note and "connection error" in note for note in summary.notes)


# ------------------------------------------------------------------- injected failures


def test_concurrency_is_bounded_per_server_and_both_are_used():
    with FakeOpenAI(delay_s=0.1) as a, FakeOpenAI(delay_s=0.1) as b:
        be = _backend([a.url, b.url], max_concurrency=2)
        out = be.complete([_req(f"q{i}") for i in range(12)])
        be.close()
    assert [c.text for c in out] == [f"echo: q{i} (seed=1)" for i in range(12)]
    assert a.max_in_flight == 2 and b.max_in_flight == 2  # reached on each, never exceeded
    assert len(a.requests) + len(b.requests) == 12
    assert {c.extra["endpoint"] for c in out} == {chat_url(a.url), chat_url(b.url)}


def test_a_server_answering_500_leaves_the_rotation(tmp_path):
    with FakeOpenAI() as bad, FakeOpenAI() as good:
        bad.push(*[{"status": 500}] * 200)
        be = _backend([bad.url, good.url], max_concurrency=2, max_retries=3, cooldown_s=600)
        out = be.complete([_req(f"q{i}") for i in range(24)])
        be.close()
    assert all(c.ok and c.extra["endpoint"] == chat_url(good.url) for c in out)
    # Out after 2 failures in a row; at most its 2 slots were in flight when that happened.
    assert len(bad.requests) <= 3
    (note,) = be.notes()
    assert chat_url(bad.url) in note and "HTTP 500" in note


def test_a_server_is_tried_again_after_its_cooldown_and_rejoins():
    with FakeOpenAI() as flaky, FakeOpenAI() as good:
        flaky.push({"status": 503}, {"status": 503})  # then it recovers
        # One slot each: flaky takes one request at a time until its second 503 puts it out.
        be = _backend([flaky.url, good.url], max_concurrency=1, cooldown_s=0.3)
        first = be.complete([_req(f"a{i}") for i in range(6)])
        assert all(c.ok for c in first) and len(flaky.requests) == 2
        time.sleep(0.5)  # past its cooldown: back in the rotation, as good as the other
        second = be.complete([_req(f"b{i}") for i in range(8)])
        be.close()
    assert all(c.ok for c in second)
    rejoined = [c for c in second if c.extra["endpoint"] == chat_url(flaky.url)]
    assert len(rejoined) >= 1 and len(flaky.requests) == 2 + len(rejoined)


def test_a_hanging_server_times_out_and_the_work_goes_elsewhere():
    with FakeOpenAI(delay_s=5.0) as hung, FakeOpenAI() as good:
        be = _backend([hung.url, good.url], timeout_s=0.3, max_concurrency=2, cooldown_s=600)
        out = be.complete([_req(f"q{i}") for i in range(10)])
        be.close()
    assert all(c.ok and c.extra["endpoint"] == chat_url(good.url) for c in out)
    assert len(hung.requests) <= 3
    assert "timeout" in be.notes()[0]


def test_429_fails_over_at_once_instead_of_waiting():
    with FakeOpenAI() as busy, FakeOpenAI() as free:
        busy.push({"status": 429, "retry_after": "600"})
        be = _backend([busy.url, free.url], max_concurrency=1)
        (c,) = be.complete([_req("x")])  # waiting out Retry-After would take 10 minutes
        be.close()
    assert c.ok and c.extra["endpoint"] == chat_url(free.url)
    assert len(busy.requests) == 1 and len(free.requests) == 1


def test_refused_credentials_retire_one_server_and_all_of_them_stop_the_run(monkeypatch):
    monkeypatch.setenv("DISTILLER_POOL_KEY", "sk-pool-secret")
    with FakeOpenAI(api_key="another") as refusing, FakeOpenAI() as open_:
        be = _backend(
            [refusing.url, open_.url], api_key_env="DISTILLER_POOL_KEY", max_concurrency=2
        )
        out = be.complete([_req(f"q{i}") for i in range(8)])
        assert all(c.ok and c.extra["endpoint"] == chat_url(open_.url) for c in out)
        # One 401 retires it for the run: only what was in flight then reached it.
        assert 1 <= len(refusing.requests) <= 2
        assert "out for good" in be.notes()[0] and "sk-pool-secret" not in be.notes()[0]
        be.close()
    with FakeOpenAI(api_key="x") as r1, FakeOpenAI(api_key="y") as r2:
        be = _backend([r1.url, r2.url], api_key_env="DISTILLER_POOL_KEY")
        with pytest.raises(BackendError, match="HTTP 401") as info:
            be.complete([_req("q")])
        be.close()
    assert "sk-pool-secret" not in str(info.value)


def test_all_servers_dead_is_one_clear_error_line(tmp_path):
    urls = [f"http://127.0.0.1:{free_port()}/v1" for _ in range(2)]
    spec = write_spec(tmp_path / "s.yaml", urls, 4, max_retries=1)
    proc = subprocess.run(
        [sys.executable, "-m", "distiller.cli", "teach", str(spec), "--no-progress",
         "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=120,  # a hang fails here
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("distiller teach: error: teacher backend")
    assert all(chat_url(u) in lines[0] for u in urls) and "connection error" in lines[0]
    assert read_records(tmp_path / "o" / "samples.jsonl") == []


# ------------------------------------------------------------------------------- spec


def spec_error(tmp_path: Path, endpoint: str) -> SpecError:
    path = tmp_path / "bad.yaml"
    path.write_text(f"prompts: [a]\nstudent: {{model: s}}\nteacher:\n  endpoint: {endpoint}\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert "\n" not in str(info.value)
    return info.value


@pytest.mark.parametrize(
    "endpoint, key, fragment",
    [
        ("{urls: [], model: m}", "teacher.endpoint.urls", "a non-empty list"),
        ("{urls: 'http://a:1/v1', model: m}", "teacher.endpoint.urls", "a non-empty list"),
        (
            "{url: 'http://a:1', urls: ['http://b:1'], model: m}",
            "teacher.endpoint.urls",
            "not both",
        ),
        ("{model: m}", "teacher.endpoint.url", "required"),
        (
            "{urls: ['http://a:1', 'localhost:8000'], model: m}",
            "teacher.endpoint.urls[1]",
            "http://",
        ),
        ("{urls: ['ftp://a/v1'], model: m}", "teacher.endpoint.urls[0]", "http://"),
        ("{urls: ['http://'], model: m}", "teacher.endpoint.urls[0]", "with a host"),
        ("{urls: ['http://a:port/v1'], model: m}", "teacher.endpoint.urls[0]", "with a host"),
        ("{urls: ['http://a:1', 7], model: m}", "teacher.endpoint.urls[1]", "got 7"),
        ("{url: 'http://a b:1', model: m}", "teacher.endpoint.url", "http://"),
        (
            "{urls: ['http://a:1/v1', 'http://a:1/'], model: m}",
            "teacher.endpoint.urls[1]",
            "it is urls[0]",
        ),
        (
            "{urls: ['http://a:1'], model: m, cooldown_s: -1}",
            "teacher.endpoint.cooldown_s",
            "[0, inf]",
        ),
    ],
)
def test_endpoint_spec_errors_name_the_key(tmp_path, endpoint, key, fragment):
    err = spec_error(tmp_path, endpoint)
    assert err.key == key and fragment in err.expected, err
    assert err.line == 4


def test_url_and_urls_parse_to_one_list(tmp_path):
    def endpoint(text: str):
        path = tmp_path / "s.yaml"
        path.write_text(f"prompts: [a]\nstudent: {{model: s}}\nteacher:\n  endpoint: {text}\n")
        return load_spec(path).teacher.endpoint

    one = endpoint("{url: 'http://h:1/v1', model: m}")
    assert one.urls == ("http://h:1/v1",) and one.url == "http://h:1/v1"
    many = endpoint("{urls: ['http://a:1/v1', 'https://b.example/v1'], model: m, cooldown_s: 5}")
    assert many.urls == ("http://a:1/v1", "https://b.example/v1") and many.cooldown_s == 5
    # One server keeps its old identity (stores made with `url:` resume); a fleet is its model.
    assert OpenAICompatBackend.from_endpoint(one).fingerprint() == {
        "backend": "openai_compat", "url": "http://h:1/v1/chat/completions", "model": "m",
    }  # fmt: skip
    assert OpenAICompatBackend.from_endpoint(many).fingerprint() == {
        "backend": "openai_compat", "model": "m",
    }  # fmt: skip


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.text(min_size=1, max_size=30)
    | st.from_regex(r"https?://[a-z0-9.:\[\]-]{0,12}(/v1)?", fullmatch=True)
)
def test_any_url_is_accepted_as_a_host_url_or_refused_naming_it(tmp_path, value):
    path = tmp_path / "h.yaml"
    doc = json.dumps(value)  # a YAML double-quoted scalar
    path.write_text(
        f"prompts: [a]\nstudent: {{model: s}}\nteacher:\n  endpoint: {{model: m, urls: [{doc}]}}\n"
    )
    try:
        spec = load_spec(path)
    except SpecError as err:
        assert err.key in ("teacher.endpoint.urls[0]", "(yaml)") and "\n" not in str(err)
        return
    from urllib.parse import urlsplit

    (url,) = spec.teacher.endpoint.urls
    parts = urlsplit(url)
    assert parts.scheme in ("http", "https") and parts.hostname
    assert chat_url(url).endswith("/chat/completions")


def test_the_readme_fleet_block_is_a_valid_teacher(tmp_path):
    import re

    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text[text.index("### A teacher on several servers") :]
    block = re.search(r"^```yaml\n(.*?)^```$", section, re.M | re.S).group(1)
    path = tmp_path / "fleet.yaml"
    path.write_text("prompts: [a]\nstudent: {model: s}\n" + block)
    ep = load_spec(path).teacher.endpoint
    assert len(ep.urls) == 2 and ep.url == ep.urls[0]
    assert (ep.max_concurrency, ep.max_retries, ep.timeout_s, ep.cooldown_s) == (4, 3, 120, 30)
