"""A teacher behind any OpenAI-compatible ``/v1/chat/completions`` endpoint.

Works with vLLM, llama.cpp server, Ollama, mlx_lm.server and hosted APIs. Requests run on a
bounded thread pool (``max_concurrency`` in flight at most). 429, 5xx, timeouts and connection
errors are retried with exponential backoff and full jitter; a ``Retry-After`` header (seconds
or an HTTP date) sets the minimum wait. The API key is read from the environment variable the
spec names, sent only in the Authorization header, and scrubbed from every error message.
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
        url: str,
        model: str,
        api_key_env: str | None = None,
        timeout_s: float = EndpointSpec.timeout_s,
        max_concurrency: int = EndpointSpec.max_concurrency,
        max_retries: int = EndpointSpec.max_retries,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 30.0,
        max_retry_after_s: float = 300.0,
        rng: random.Random | None = None,
    ):
        if max_concurrency < 1:
            raise UserError(f"teacher.endpoint.max_concurrency must be >= 1, got {max_concurrency}")
        if max_retries < 0:
            raise UserError(f"teacher.endpoint.max_retries must be >= 0, got {max_retries}")
        self.url = chat_url(url)
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
        self._client = httpx.Client(timeout=httpx.Timeout(self.timeout_s))
        self.retries = 0  # total retries made (observability, tests)

    # -- identity / hygiene ----------------------------------------------------------------

    def fingerprint(self) -> dict:
        return {"backend": "openai_compat", "url": self.url, "model": self.model}

    def __repr__(self) -> str:
        # Never show the key; only say where it comes from.
        return (
            f"OpenAICompatBackend(url={self.url!r}, model={self.model!r}, "
            f"api_key_env={self.api_key_env!r}, max_concurrency={self.max_concurrency})"
        )

    def _redact(self, text: str) -> str:
        if self._key:
            text = text.replace(self._key, "***")
        return text

    def close(self) -> None:
        self._stop.set()
        self._client.close()

    # -- requests --------------------------------------------------------------------------

    @classmethod
    def from_endpoint(cls, endpoint: EndpointSpec, **kwargs: Any) -> OpenAICompatBackend:
        """The backend for a spec's ``teacher.endpoint`` (the spec holds the one set of
        defaults); ``kwargs`` set the retry pacing (tests)."""
        return cls(
            url=endpoint.url,
            model=endpoint.model,
            api_key_env=endpoint.api_key_env,
            timeout_s=endpoint.timeout_s,
            max_concurrency=endpoint.max_concurrency,
            max_retries=endpoint.max_retries,
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

    def _one(self, req: CompletionRequest) -> Completion:
        last_error = "no attempt made"
        for attempt in range(self.max_retries + 1):
            if self._stop.is_set():
                return Completion(finish_reason="error", error="interrupted")
            retry_after = None
            try:
                resp = self._client.post(self.url, json=self._payload(req), headers=self._headers())
            except httpx.TransportError as exc:  # connect/read errors and timeouts
                kind = "timeout" if isinstance(exc, httpx.TimeoutException) else "connection error"
                last_error = f"{kind}: {type(exc).__name__}: {exc}"
            else:
                if resp.status_code == 200:
                    return self._parse(resp)
                body = resp.text[:300].replace("\n", " ")
                last_error = f"HTTP {resp.status_code}: {body}"
                if resp.status_code in FATAL_STATUS:
                    raise BackendError(self._redact(f"{self.url}: {last_error}"))
                if resp.status_code not in RETRY_STATUS:
                    return Completion(finish_reason="error", error=self._redact(last_error))
                retry_after = parse_retry_after(resp.headers.get("retry-after"))
            if attempt < self.max_retries:
                self.retries += 1
                if self._stop.wait(self._backoff(attempt, retry_after)):
                    return Completion(finish_reason="error", error="interrupted")
        return Completion(
            finish_reason="error",
            error=self._redact(
                f"{self.url}: gave up after {self.max_retries + 1} attempts; last: {last_error}"
            ),
        )

    def _parse(self, resp: httpx.Response) -> Completion:
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
                error=self._redact(f"malformed response ({type(exc).__name__}: {exc}): {snippet}"),
            )

    def complete(
        self,
        requests: list[CompletionRequest],
        on_done: Callable[[int, Completion], object] | None = None,
    ) -> list[Completion]:
        """Complete all requests, ``max_concurrency`` at a time; results in request order.

        Raises ``BackendError`` for failures no retry can fix (401/403/404). On Ctrl-C the
        pending requests are cancelled and in-flight ones are abandoned.
        """
        if not requests:
            return []
        pool = ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(requests)))
        futures = {pool.submit(self._one, r): i for i, r in enumerate(requests)}
        try:
            results: list[Completion | None] = [None] * len(requests)
            for f in as_completed(futures):
                i = futures[f]
                results[i] = f.result()
                if on_done is not None:
                    on_done(i, results[i])
            return [c for c in results if c is not None]
        except BaseException:
            self._stop.set()  # wake sleeping retries so the workers exit promptly
            for f in futures:
                f.cancel()
            raise
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
