"""OpenAI-compatible backend against a real HTTP server on loopback (tests/fake_openai.py)."""

from __future__ import annotations

import email.utils
import logging
import socket
import time
from types import SimpleNamespace

import pytest
from fake_openai import FakeOpenAI

from distiller.backends import BackendError, CompletionRequest, make_backend
from distiller.backends.openai_compat import OpenAICompatBackend, chat_url, parse_retry_after
from distiller.decoding import Decoding
from distiller.errors import UserError
from distiller.spec import EndpointSpec

SECRET = "sk-test-Zq8vN3-very-secret-value"


def _req(text: str, seed: int | None = None) -> CompletionRequest:
    return CompletionRequest(
        [{"role": "user", "content": text}], Decoding(max_tokens=32, temperature=0.7, seed=seed)
    )


def _backend(srv: FakeOpenAI, **kw) -> OpenAICompatBackend:
    kw.setdefault("backoff_base_s", 0.01)
    kw.setdefault("timeout_s", 5.0)
    return OpenAICompatBackend(srv.url, "teacher-x", **kw)


def test_chat_url_forms():
    assert chat_url("http://h:1") == "http://h:1/v1/chat/completions"
    assert chat_url("http://h:1/v1/") == "http://h:1/v1/chat/completions"
    assert chat_url("http://h:1/v1/chat/completions") == "http://h:1/v1/chat/completions"


def test_parse_retry_after():
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("0.5") == 0.5
    assert parse_retry_after("-4") == 0.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    now = 1_700_000_000.0
    date = email.utils.formatdate(now + 7, usegmt=True)
    assert parse_retry_after(date, now=now) == pytest.approx(7.0, abs=1.0)
    assert parse_retry_after(email.utils.formatdate(now - 60, usegmt=True), now=now) == 0.0


def test_completes_in_order_with_payload_and_auth(monkeypatch):
    monkeypatch.setenv("DISTILLER_TEST_KEY", SECRET)
    with FakeOpenAI(api_key=SECRET) as srv:
        be = _backend(srv, api_key_env="DISTILLER_TEST_KEY", max_concurrency=3)
        reqs = [_req(f"q{i}", seed=100 + i) for i in range(7)]
        out = be.complete(reqs)
        be.close()
    assert [c.text for c in out] == [f"echo: q{i} (seed={100 + i})" for i in range(7)]
    assert all(c.ok and c.finish_reason == "stop" for c in out)
    assert out[0].prompt_tokens == 1 and out[0].completion_tokens == 3
    body = srv.requests[0]
    assert body["model"] == "teacher-x"
    assert body["max_tokens"] == 32 and body["temperature"] == 0.7 and body["top_p"] == 1.0
    assert set(srv.auth_headers) == {f"Bearer {SECRET}"}
    assert "repetition_penalty" not in body and "stop" not in body  # only sent when asked for


def test_stop_strings_are_sent():
    with FakeOpenAI() as srv:
        be = _backend(srv)
        (c,) = be.complete(
            [CompletionRequest([{"role": "user", "content": "q"}], Decoding(stop=("\n\n",)))]
        )
        assert c.ok and srv.requests[0]["stop"] == ["\n\n"]
        be.close()


def test_repetition_penalty_is_sent_and_no_repeat_ngram_refused():
    with FakeOpenAI() as srv:
        be = _backend(srv)
        req = CompletionRequest(
            [{"role": "user", "content": "q"}], Decoding(repetition_penalty=1.2)
        )
        (c,) = be.complete([req])
        assert c.ok and srv.requests[0]["repetition_penalty"] == 1.2
        with pytest.raises(BackendError, match="no_repeat_ngram"):
            be.complete(
                [CompletionRequest([{"role": "user", "content": "q"}], Decoding(no_repeat_ngram=3))]
            )
        be.close()


def test_429_honours_retry_after_seconds():
    with FakeOpenAI() as srv:
        srv.push({"status": 429, "retry_after": "1"})
        be = _backend(srv, max_concurrency=1)
        (c,) = be.complete([_req("x")])
    assert c.ok and c.text.startswith("echo: x")
    assert len(srv.requests) == 2 and be.retries == 1
    # backoff alone would wait <= 0.01 s: the gap is Retry-After's doing
    assert srv.arrivals[1] - srv.arrivals[0] >= 0.95


def test_429_honours_retry_after_http_date():
    with FakeOpenAI() as srv:
        # an HTTP date has 1 s resolution: 3 s ahead means a wait of more than 2 s, so the
        # request may reach the server up to 1 s late (a loaded machine) and still wait >= 1 s
        srv.push(
            {"status": 429, "retry_after": email.utils.formatdate(time.time() + 3, usegmt=True)}
        )
        be = _backend(srv, max_concurrency=1)
        (c,) = be.complete([_req("x")])
    assert c.ok
    assert srv.arrivals[1] - srv.arrivals[0] >= 0.95


def test_5xx_retried_with_exponential_backoff():
    with FakeOpenAI() as srv:
        srv.push({"status": 500}, {"status": 503}, {"status": 502})
        be = _backend(srv, max_concurrency=1, max_retries=3, backoff_base_s=0.1)
        be._rng.random = lambda: 1.0  # no jitter: delays are exactly 0.1, 0.2, 0.4
        (c,) = be.complete([_req("x")])
    assert c.ok and be.retries == 3 and len(srv.requests) == 4
    gaps = [b - a for a, b in zip(srv.arrivals, srv.arrivals[1:], strict=False)]
    for gap, expected in zip(gaps, [0.1, 0.2, 0.4], strict=True):
        assert expected * 0.9 <= gap < expected + 0.25


def test_gives_up_after_max_retries_with_clear_error():
    with FakeOpenAI() as srv:
        srv.push(*[{"status": 500}] * 3)
        be = _backend(srv, max_concurrency=1, max_retries=2)
        (c,) = be.complete([_req("x")])
    assert not c.ok and c.finish_reason == "error"
    assert "gave up after 3 attempts" in c.error and "HTTP 500" in c.error
    assert len(srv.requests) == 3


def test_client_error_not_retried():
    with FakeOpenAI() as srv:
        srv.push({"status": 400})
        be = _backend(srv, max_retries=4)
        (c,) = be.complete([_req("x")])
    assert not c.ok and "HTTP 400" in c.error and len(srv.requests) == 1


def test_timeout_is_retried_then_reported():
    with FakeOpenAI() as srv:
        srv.push({"delay": 1.0})
        be = _backend(srv, timeout_s=0.3, max_retries=1, max_concurrency=1)
        (ok,) = be.complete([_req("slow once")])
        assert ok.ok and len(srv.requests) == 2
        srv.push({"delay": 1.0}, {"delay": 1.0})
        (bad,) = be.complete([_req("always slow")])
    assert not bad.ok and "timeout" in bad.error and "gave up after 2 attempts" in bad.error


def test_connection_refused_is_retried_then_reported():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    be = OpenAICompatBackend(f"http://127.0.0.1:{port}", "m", max_retries=2, backoff_base_s=0.01)
    (c,) = be.complete([_req("x")])
    assert not c.ok and "connection error" in c.error and be.retries == 2


def test_concurrency_is_bounded():
    with FakeOpenAI(delay_s=0.15) as srv:
        be = _backend(srv, max_concurrency=3)
        out = be.complete([_req(f"q{i}") for i in range(12)])
    assert all(c.ok for c in out)
    assert srv.max_in_flight == 3  # reached, never exceeded


def test_api_key_never_leaks(monkeypatch, caplog, capfd):
    monkeypatch.setenv("DISTILLER_TEST_KEY", SECRET)
    caplog.set_level(logging.DEBUG)
    with FakeOpenAI(api_key="the-right-key") as srv:
        be = _backend(srv, api_key_env="DISTILLER_TEST_KEY", max_retries=1)
        with pytest.raises(BackendError) as info:
            be.complete([_req("x"), _req("y")])
    # the server echoed the bad credentials back; our error must not carry them
    assert "invalid credentials" in str(info.value) and "***" in str(info.value)
    # a retried-then-failed request must not leak it either
    be2 = OpenAICompatBackend(
        "http://127.0.0.1:9/",
        "m",
        api_key_env="DISTILLER_TEST_KEY",
        max_retries=1,
        backoff_base_s=0.01,
    )
    (c,) = be2.complete([_req("x")])
    out, err = capfd.readouterr()
    texts = [str(info.value), repr(info.value), repr(be), str(be.fingerprint()), c.error, repr(be2)]
    texts += [caplog.text, out, err]
    for text in texts:
        assert SECRET not in text
    assert "DISTILLER_TEST_KEY" in repr(be)


def test_missing_key_env_is_a_user_error(monkeypatch):
    monkeypatch.delenv("DISTILLER_NO_SUCH_KEY", raising=False)
    with pytest.raises(UserError, match="DISTILLER_NO_SUCH_KEY is not set"):
        OpenAICompatBackend("http://127.0.0.1:9", "m", api_key_env="DISTILLER_NO_SUCH_KEY")


def test_make_backend_from_spec():
    endpoint = EndpointSpec(
        urls=("http://127.0.0.1:9/v1",), model="big", timeout_s=3, max_concurrency=2, max_retries=1
    )
    be = make_backend(SimpleNamespace(model=None, endpoint=endpoint, batch_size=8))
    assert isinstance(be, OpenAICompatBackend)
    assert be.max_concurrency == 2 and be.timeout_s == 3 and be.max_retries == 1
    assert be.fingerprint() == {
        "backend": "openai_compat",
        "url": "http://127.0.0.1:9/v1/chat/completions",
        "model": "big",
    }
    with pytest.raises(UserError):
        make_backend(SimpleNamespace(model=None, endpoint=None))
