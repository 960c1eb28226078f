"""A teacher behind OpenAI-compatible ``/v1/chat/completions`` endpoints: one server, or several
replicas of one model (a vLLM fleet).

Works with vLLM, llama.cpp server, Ollama, mlx_lm.server and hosted APIs. Each server has at
most ``max_concurrency`` requests in flight; ``distiller.backends.pool`` decides which server
an attempt goes to and takes failing ones out of the rotation. 429, 5xx, timeouts and
connection errors are retried, on another server first; a retry on a server already tried
waits an exponential backoff with full jitter, and a ``Retry-After`` header (seconds or an HTTP
date) sets the minimum wait. The API key is read from the environment variable the spec names,
sent only in the Authorization header, and scrubbed from every error message.
"""

from __future__ import annotations

import email.utils
import json
import os
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from datetime import UTC, datetime
from typing import Any

import httpx

from distiller.backends import BackendError, Completion, CompletionRequest
from distiller.backends import pool as P
from distiller.errors import UserError
from distiller.spec import EndpointSpec

RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
FATAL_STATUS = frozenset({401, 403, 404})  # no request will succeed: stop the run


def chat_url(url: str) -> str:
    """Accept a server root, a ``/v1`` base URL or the full chat completions URL."""
    url = url.strip().rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    if url.endswith("/v1"):
        return url + "/chat/completions"
    return url + "/v1/chat/completions"


def endpoint_fingerprint(urls: list[str] | tuple[str, ...], model: str) -> dict:
    """Which teacher a set of servers is, for store and cache keys (no secrets)."""
    if len(urls) > 1:
        # Replicas of one model: the samples are the model's, whichever replica answered,
        # so adding or dropping a server keeps a run resuming.
        return {"backend": "openai_compat", "model": model}
    return {"backend": "openai_compat", "url": chat_url(urls[0]), "model": model}


def completions_url(chat: str) -> str:
    """The legacy ``/completions`` URL beside a chat completions one (teacher-forced scoring:
    chat requests cannot put the answer's first tokens in the context)."""
    return chat[: -len("/chat/completions")] + "/completions"


def _parse_chat(resp: httpx.Response) -> Completion:
    try:
        data = resp.json()
        choice = data["choices"][0]
        text = choice["message"]["content"]
        if text is None:
            text = ""
        usage = data.get("usage") or {}
        return Completion(
            text=str(text),
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            finish_reason=str(choice.get("finish_reason") or ""),
        )
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        snippet = resp.text[:200].replace("\n", " ")
        return Completion(
            finish_reason="error",
            error=f"malformed response ({type(exc).__name__}: {exc}): {snippet}",
        )


def _parse_top_logprobs(resp: httpx.Response) -> Completion:
    try:
        entries = resp.json()["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
        if not isinstance(entries, list):
            raise TypeError("top_logprobs is not a list")
    except (ValueError, KeyError, IndexError, TypeError):
        return Completion(
            finish_reason="error",
            error=(
                "the reply has no choices[0].logprobs.content[0].top_logprobs (does the server "
                "support logprobs on /completions?)"
            ),
        )
    return Completion(finish_reason="stop", extra={"top_logprobs": entries})


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP date; None if absent
    or unparseable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    now_dt = datetime.fromtimestamp(time.time() if now is None else now, tz=UTC)
    return max(0.0, (when - now_dt).total_seconds())


class OpenAICompatBackend:
    """Chat completions over HTTP with bounded concurrency and retries."""

    def __init__(
        self,
        url: str | list[str] | tuple[str, ...],
        model: str,
        api_key_env: str | None = None,
        timeout_s: float = EndpointSpec.timeout_s,
        max_concurrency: int = EndpointSpec.max_concurrency,
        max_retries: int = EndpointSpec.max_retries,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 30.0,
        max_retry_after_s: float = 300.0,
        rng: random.Random | None = None,
        cooldown_s: float = EndpointSpec.cooldown_s,
    ):
        if max_concurrency < 1:
            raise UserError(f"teacher.endpoint.max_concurrency must be >= 1, got {max_concurrency}")
        if max_retries < 0:
            raise UserError(f"teacher.endpoint.max_retries must be >= 0, got {max_retries}")
        urls = [url] if isinstance(url, str) else list(url)
        if not urls:
            raise UserError("teacher.endpoint.urls: expected at least one URL")
        self.urls = [chat_url(u) for u in urls]
        self.url = self.urls[0]
        self.model = model
        self.api_key_env = api_key_env
        self.timeout_s = float(timeout_s)
        self.max_concurrency = int(max_concurrency)
        self.max_retries = int(max_retries)
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.max_retry_after_s = max_retry_after_s
        self._rng = rng or random.Random()
        self._rng_lock = threading.Lock()
        self._key: str | None = None
        if api_key_env:
            key = os.environ.get(api_key_env)
            if not key:
                raise UserError(
                    f"teacher.endpoint.api_key_env: environment variable {api_key_env} is not set"
                )
            self._key = key
        self._stop = threading.Event()  # set on close/interrupt: cut backoff sleeps short
        self.pool = P.EndpointPool(self.urls, self.max_concurrency, cooldown_s=cooldown_s)
        n = self.pool.capacity  # httpx's own connection limit must not be the bottleneck
        self._client = httpx.Client(
            timeout=httpx.Timeout(self.timeout_s),
            limits=httpx.Limits(max_connections=n, max_keepalive_connections=n),
        )
        self.retries = 0  # attempts after a request's first, failovers included (tests)

    # -- identity / hygiene ----------------------------------------------------------------

    def fingerprint(self) -> dict:
        return endpoint_fingerprint(self.urls, self.model)

    def notes(self) -> list[str]:
        """A line per server that failed during this backend's life (for run summaries)."""
        return [self._redact(n) for n in self.pool.notes()]

    def __repr__(self) -> str:
        # Never show the key; only say where it comes from.
        where = f"url={self.url!r}" if len(self.urls) == 1 else f"urls={self.urls!r}"
        return (
            f"OpenAICompatBackend({where}, model={self.model!r}, "
            f"api_key_env={self.api_key_env!r}, max_concurrency={self.max_concurrency})"
        )

    def _redact(self, text: str) -> str:
        if self._key:
            text = text.replace(self._key, "***")
        return text

    def close(self) -> None:
        self._stop.set()
        self.pool.wake()
        self._client.close()

    # -- requests --------------------------------------------------------------------------

    @classmethod
    def from_endpoint(cls, endpoint: EndpointSpec, **kwargs: Any) -> OpenAICompatBackend:
        """The backend for a spec's ``teacher.endpoint`` (the spec holds the one set of
        defaults); ``kwargs`` set the retry pacing (tests)."""
        return cls(
            url=list(endpoint.urls),
            model=endpoint.model,
            api_key_env=endpoint.api_key_env,
            timeout_s=endpoint.timeout_s,
            max_concurrency=endpoint.max_concurrency,
            max_retries=endpoint.max_retries,
            cooldown_s=endpoint.cooldown_s,
            **kwargs,
        )

    def _payload(self, req: CompletionRequest) -> dict:
        d = req.decoding
        body = {
            "model": self.model,
            "messages": req.messages,
            "max_tokens": d.max_tokens,
            "temperature": d.temperature,
            "top_p": d.top_p,
            "stream": False,
        }
        if d.seed is not None:
            body["seed"] = d.seed
        if d.stop:
            body["stop"] = list(d.stop)
        if d.no_repeat_ngram:
            # Refused at spec load; a caller building requests by hand gets told, not ignored.
            raise BackendError("no_repeat_ngram has no OpenAI chat API equivalent")
        if d.repetition_penalty is not None:
            # Not in OpenAI's API, but vLLM, mlx_lm.server and others accept it as an extension.
            body["repetition_penalty"] = d.repetition_penalty
        if d.json_schema is not None:
            # OpenAI's structured outputs (vLLM and llama.cpp servers take the same field);
            # strict: the server constrains decoding to the schema, as a local model does.
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {
                    "name": "response",
                    "schema": json.loads(d.json_schema),
                    "strict": True,
                },
            }
        return body

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        with self._rng_lock:
            jitter = self._rng.random()
        # Full jitter spreads out clients that failed together; Retry-After is a floor.
        delay = min(self.backoff_max_s, self.backoff_base_s * (2**attempt)) * jitter
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.max_retry_after_s))
        return delay

    def _headers(self) -> dict:
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        return headers

    def _send(self, payload: dict, chat: bool) -> Completion:
        """One request through the pool, retried and failed over until it is answered or
        every server's attempts are spent. ``chat``: to ``/chat/completions`` (else the
        legacy ``/completions`` beside it, parsed for ``top_logprobs``)."""
        tries: dict[str, int] = {}  # attempts this request made on each server
        last: dict[str, str] = {}  # and the last error each gave it
        waits: dict[str, float | None] = {}  # a server's Retry-After for this request
        parse = _parse_chat if chat else _parse_top_logprobs
        while True:
            try:
                server = self.pool.acquire(tries, self.max_retries + 1, self._stop)
            except P.PoolStopped:
                return Completion(finish_reason="error", error="interrupted")
            except P.PoolExhausted as exc:
                raise BackendError(self._redact(str(exc))) from None
            if server is None:
                return Completion(finish_reason="error", error=self._gave_up(tries, last))
            url, n = server.url, tries.get(server.url, 0)
            if sum(tries.values()):
                with self._rng_lock:
                    self.retries += 1
            # A retry on a server this request already tried backs off; a failover does not.
            if n and self._stop.wait(self._backoff(n - 1, waits.get(url))):
                self.pool.release(server, None)
                return Completion(finish_reason="error", error="interrupted")
            tries[url] = n + 1
            target = url if chat else completions_url(url)
            outcome, error, retry_after, done = self._attempt(target, payload, parse)
            self.pool.release(server, outcome, error, retry_after)
            if done is not None:
                if done.ok:
                    done.extra["endpoint"] = url
                return done
            last[url], waits[url] = error, retry_after

    def _attempt(
        self, url: str, payload: dict, parse: Callable[[httpx.Response], Completion]
    ) -> tuple[str, str, float | None, Completion | None]:
        """One POST: (what it says about the server, error, Retry-After, the completion if
        this request is finished: answered, or failed in a way no retry fixes)."""
        try:
            resp = self._client.post(url, json=payload, headers=self._headers())
        except httpx.TransportError as exc:  # connect/read errors and timeouts
            kind = "timeout" if isinstance(exc, httpx.TimeoutException) else "connection error"
            error = self._redact(f"{kind}: {type(exc).__name__}: {exc}")
            # Nothing listens (or the host is unreachable): no point in a second try soon.
            dead = isinstance(exc, httpx.ConnectError)
            return (P.UNREACHABLE if dead else P.FAILED), error, None, None
        if resp.status_code == 200:
            done = parse(resp)
            if done.error is not None:  # the one place a parsed reply's error is scrubbed
                done.error = self._redact(done.error)
            return P.OK, "", None, done
        body = resp.text[:300].replace("\n", " ")
        error = self._redact(f"HTTP {resp.status_code}: {body}")
        if resp.status_code in FATAL_STATUS:
            return P.BROKEN, error, None, None
        if resp.status_code not in RETRY_STATUS:
            return P.OK, error, None, Completion(finish_reason="error", error=error)
        retry_after = parse_retry_after(resp.headers.get("retry-after"))
        # 429 and 409/425 say "later"; 408 and 5xx say the server is in trouble.
        outcome = P.FAILED if resp.status_code == 408 or resp.status_code >= 500 else P.BUSY
        return outcome, error, retry_after, None

    def _gave_up(self, tries: dict[str, int], last: dict[str, str]) -> str:
        if len(self.urls) == 1:
            n = tries.get(self.url, 0)
            return f"{self.url}: gave up after {n} attempts; last: {last.get(self.url)}"
        where = "; ".join(f"{u}: {last[u]}" for u in self.urls if u in last)
        return (
            f"gave up after {sum(tries.values())} attempts on {len(tries)} of "
            f"{len(self.urls)} servers; last errors: {where}"
        )

    def complete(
        self,
        requests: list[CompletionRequest],
        on_done: Callable[[int, Completion], object] | None = None,
    ) -> list[Completion]:
        """Complete all requests, ``max_concurrency`` at a time per server; results in request
        order, each successful one with ``extra["endpoint"]``, the server that answered it.

        Raises ``BackendError`` when every server fails in a way no retry can fix (401/403/404).
        On Ctrl-C the pending requests are cancelled and in-flight ones are abandoned.
        """
        return self._fan_out([self._payload(r) for r in requests], True, on_done)

    def top_logprobs(self, prompts: list[str], top_k: int) -> list[list[dict]]:
        """The server's ``top_k`` likeliest next tokens after each prompt text, teacher-forced:
        one ``/completions`` request per prompt (``max_tokens: 1``, greedy, ``logprobs``),
        spread over the pool like chat requests. Each entry is ``{"token", "id"?, "logprob"}``
        as the server names it. A prompt that cannot be scored after every retry raises
        ``BackendError``: a teacher-logit cache has no room for holes."""
        payloads = [
            {
                "model": self.model,
                "prompt": p,
                "max_tokens": 1,
                "temperature": 0.0,
                "logprobs": True,
                "top_logprobs": top_k,
            }
            for p in prompts
        ]
        out = []
        for c in self._fan_out(payloads, False, None):
            if not c.ok:
                raise BackendError(f"no top_logprobs from the server: {c.error}")
            out.append(c.extra["top_logprobs"])
        return out

    def _fan_out(
        self,
        payloads: list[dict],
        chat: bool,
        on_done: Callable[[int, Completion], object] | None,
    ) -> list[Completion]:
        if not payloads:
            return []
        pool = ThreadPoolExecutor(max_workers=min(self.pool.capacity, len(payloads)))
        futures = {pool.submit(self._send, p, chat): i for i, p in enumerate(payloads)}
        try:
            results: list[Completion | None] = [None] * len(payloads)
            for f in as_completed(futures):
                i = futures[f]
                results[i] = f.result()
                if on_done is not None:
                    on_done(i, results[i])
            return [c for c in results if c is not None]
        except BaseException:
            self._stop.set()  # wake sleeping retries so the workers exit promptly
            self.pool.wake()
            for f in futures:
                f.cancel()
            raise
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
