"""The HTTP routes of ``distiller serve``: OpenAI-compatible chat completions and model list,
label ranking (``/v1/classify``), validation, health, metrics, the side-by-side page and the
report page.

Requests are read and checked here (size, JSON, fields, limits), each failure a 4xx with an
OpenAI-style error body (``{"error": {"message", "type", "param", "code"}}``) that names what
was wrong; model work goes to the model's worker (``distiller.serve.batching``).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from distiller.decoding import Decoding
from distiller.generate import Generation, chat_prompt
from distiller.serve.batching import CallJob, GenerateJob, ModelWorker
from distiller.serve.telemetry import Telemetry
from distiller.spec.schema import Prompt

log = logging.getLogger("distiller.serve")

PAGE_DIR = Path(__file__).parent / "page"
ROLES = ("system", "user", "assistant")
MAX_STOP = 4  # OpenAI's limit on stop sequences


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the server."""

    max_body_bytes: int = 1 << 20
    max_tokens: int = 256  # the most tokens a completion may ask for (and what it gets unasked)
    max_prompt_tokens: int = 4096
    max_concurrency: int = 32  # requests doing model work at once (queued or running)
    max_messages: int = 256


@dataclass
class ServeState:
    """Everything the routes share: the workers, the spec's validator and classifier, limits."""

    workers: dict[str, ModelWorker]
    limits: Limits = field(default_factory=Limits)
    api_key: str | None = None
    spec: Any = None  # a TaskSpec, for verdicts and classification
    validator: Any = None
    report_path: Path | None = None
    plots_dir: Path | None = None
    telemetry: Telemetry = field(default_factory=Telemetry)
    in_flight: int = 0
    created: int = field(default_factory=lambda: int(time.time()))
    priors: dict[str, Any] = field(default_factory=dict)  # model -> content-free mean scores
    # Models prompted as the pipeline prompts its teacher: the spec's system prompt and
    # few-shot turns go before a conversation that brings no system message of its own.
    scaffolded: frozenset[str] = frozenset()

    def scaffold(self, name: str, messages: list[dict[str, str]]) -> list[dict[str, str]]:
        if name not in self.scaffolded or any(m["role"] == "system" for m in messages):
            return messages
        from distiller.generate import build_messages

        teacher = self.spec.teacher
        return [*build_messages("", teacher.system_prompt, teacher.few_shot)[:-1], *messages]


class ApiError(Exception):
    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        kind = {
            401: "authentication_error",
            404: "not_found_error",
            413: "request_too_large",
            429: "rate_limit_error",
        }.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return JSONResponse(
            {
                "error": {
                    "message": self.message,
                    "type": kind,
                    "param": self.param,
                    "code": self.code,
                }
            },
            status_code=self.status,
        )


# ---------------------------------------------------------------------------------------------
# Reading requests


async def read_json(request: Request, limits: Limits) -> dict[str, Any]:
    """The request body as a JSON object, refused (413) past ``max_body_bytes`` before it is
    all read, and (400) when it is not a JSON object."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limits.max_body_bytes:
        raise ApiError(
            413,
            f"request body of {declared} bytes; this server takes at most {limits.max_body_bytes}",
        )
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limits.max_body_bytes:
            raise ApiError(413, f"request body over {limits.max_body_bytes} bytes")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    return data


def _number(data: dict, name: str) -> float | None:
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ApiError(400, f"{name}: expected a number, got {json.dumps(value)[:40]}", param=name)
    return float(value)


def _integer(data: dict, name: str) -> int | None:
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(
            400, f"{name}: expected an integer, got {json.dumps(value)[:40]}", param=name
        )
    return value


def _worker(state: ServeState, data: dict) -> ModelWorker:
    name = data.get("model")
    if not isinstance(name, str) or not name:
        raise ApiError(400, "model: expected the name of a served model", param="model")
    if name not in state.workers:
        served = ", ".join(state.workers)
        raise ApiError(
            404,
            f"model {name!r} is not served here (served: {served})",
            param="model",
            code="model_not_found",
        )
    return state.workers[name]


def _content(message: dict, i: int) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts: text only
        parts = []
        for part in content:
            if not (
                isinstance(part, dict)
                and part.get("type") == "text"
                and isinstance(part.get("text"), str)
            ):
                raise ApiError(
                    400, f"messages[{i}].content: only text parts are supported", param="messages"
                )
            parts.append(part["text"])
        return "".join(parts)
    raise ApiError(400, f"messages[{i}].content: expected a string or text parts", param="messages")


def read_messages(value: Any, limits: Limits) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise ApiError(
            400, "messages: expected a non-empty list of {role, content}", param="messages"
        )
    if len(value) > limits.max_messages:
        raise ApiError(
            400, f"messages: at most {limits.max_messages}, got {len(value)}", param="messages"
        )
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ApiError(
                400, f"messages[{i}]: expected a role among {', '.join(ROLES)}", param="messages"
            )
        out.append({"role": m["role"], "content": _content(m, i)})
    return out


def read_decoding(data: dict, limits: Limits) -> Decoding:
    """OpenAI's sampling fields as a ``Decoding``. Omitted ``temperature`` is greedy (0), not
    OpenAI's 1: a served student is usually compared deterministically."""
    if data.get("n", 1) != 1:
        raise ApiError(400, "n: only 1 completion per request is supported", param="n")
    max_tokens = _integer(data, "max_completion_tokens")
    if max_tokens is None:
        max_tokens = _integer(data, "max_tokens")
    if max_tokens is None:
        max_tokens = limits.max_tokens
    elif max_tokens > limits.max_tokens:
        raise ApiError(
            400,
            f"max_tokens: at most {limits.max_tokens} on this server, got {max_tokens}",
            param="max_tokens",
        )
    stop = data.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if (
        not isinstance(stop, list)
        or not all(isinstance(s, str) and s for s in stop)
        or len(stop) > MAX_STOP
    ):
        raise ApiError(
            400, f"stop: expected a string or up to {MAX_STOP} non-empty strings", param="stop"
        )
    schema = None
    fmt = data.get("response_format")
    if fmt is not None:
        if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_schema"):
            raise ApiError(
                400,
                "response_format: expected {type: text} or {type: json_schema, json_schema: {schema}}",
                param="response_format",
            )
        if fmt["type"] == "json_schema":
            inner = fmt.get("json_schema")
            if not isinstance(inner, dict) or not isinstance(inner.get("schema"), dict):
                raise ApiError(
                    400,
                    "response_format.json_schema.schema: expected a JSON Schema object",
                    param="response_format",
                )
            schema = inner["schema"]
    fields = {
        "temperature": _number(data, "temperature"),
        "top_p": _number(data, "top_p"),
        "max_tokens": max_tokens,
        "seed": _integer(data, "seed"),
        "stop": tuple(stop),
        "json_schema": schema,
    }
    try:
        return Decoding().replace(**fields)
    except ValueError as exc:  # Decoding.problems(): each phrase names its field
        raise ApiError(400, str(exc)) from None


# ---------------------------------------------------------------------------------------------
# Responses


def request_prompt(messages: list[dict[str, str]]) -> Prompt | None:
    """The prompt a completion answers, as validators take it (``evaluate`` passes each eval
    prompt): the conversation's last user message, before any scaffold. A ``span`` answer must
    come from it; None when the conversation has no user turn."""
    text = next((m["content"] for m in reversed(messages) if m["role"] == "user"), None)
    return None if text is None else Prompt(id="request", text=text)


def _extras(
    state: ServeState,
    generation: Generation,
    seconds: float,
    first_text_s: float | None,
    prompt: Prompt | None,
) -> dict[str, Any]:
    """What distiller adds to a completion (ignored by OpenAI clients): timing and the verdict
    on the answer to ``prompt``."""
    decode_s = seconds - first_text_s if first_text_s is not None else seconds
    tokens = generation.generation_tokens
    out: dict[str, Any] = {
        "latency_s": round(seconds, 4),
        "first_token_s": round(first_text_s, 4) if first_text_s is not None else None,
        "tokens_per_s": round(tokens / decode_s, 2) if decode_s > 0 else None,
        "verdict": None,
    }
    if state.validator is not None:
        out["verdict"] = state.validator(generation.text, prompt).to_dict()
    return out


def _usage(generation: Generation) -> dict[str, int]:
    return {
        "prompt_tokens": generation.prompt_tokens,
        "completion_tokens": generation.generation_tokens,
        "total_tokens": generation.prompt_tokens + generation.generation_tokens,
    }


def _chunk(
    cid: str, created: int, model: str, delta: dict, finish: str | None = None, **extra: Any
) -> str:
    body = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
        **extra,
    }
    return f"data: {json.dumps(body)}\n\n"


class StreamText:
    """The text handed to a streaming client, always a prefix of the final text: held back
    before a stop string (generation notices one a token late), by the length of the longest
    stop string (one may be forming), and from an incomplete UTF-8 character on."""

    def __init__(self, stop: tuple[str, ...]) -> None:
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=0)
        self.sent = ""

    def update(self, text: str) -> str:
        """The new piece to send, given the whole text so far."""
        safe = len(text) - self.hold
        for s in (*self.stop, "\ufffd"):
            at = text.find(s)
            if at >= 0:
                safe = min(safe, at)
        return self._take(text[: max(0, safe)])

    def finish(self, final: str) -> str:
        return self._take(final)

    def _take(self, text: str) -> str:
        if len(text) <= len(self.sent) or not text.startswith(self.sent):
            return ""  # nothing new, or a decoding that changed its past: wait for the end
        piece, self.sent = text[len(self.sent) :], text
        return piece


class _Slot:
    """A streamed request's place in ``in_flight``, given back once: when the stream ends, or
    when the response is dropped before its stream ever started (a client gone at once)."""

    def __init__(self, state: ServeState) -> None:
        self.state: ServeState | None = state

    def release(self) -> None:
        if self.state is not None:
            self.state.in_flight -= 1
            self.state = None

    def __del__(self) -> None:
        self.release()


# ---------------------------------------------------------------------------------------------
# The app


def create_app(state: ServeState) -> FastAPI:
    app = FastAPI(title="distiller serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.serve = state

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Response:
        """API key, telemetry, and the last line of defence: an unexpected error is one log
        line and a 500, never a traceback in the log."""
        start = time.perf_counter()
        path = request.url.path
        if state.api_key is not None and (path.startswith("/v1/") or path == "/metrics"):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {state.api_key}".encode()):
                response: Response = ApiError(
                    401, "missing or wrong API key (Authorization: Bearer KEY)"
                ).response()
                state.telemetry.http(path, 401, time.perf_counter() - start)
                return response
        try:
            response = await call_next(request)
        except Exception as exc:
            log.error(
                "%s %s failed: %s: %s",
                request.method,
                path,
                type(exc).__name__,
                str(exc).splitlines()[0] if str(exc) else "",
            )
            response = ApiError(500, f"internal error: {type(exc).__name__}").response()
        # Counted by route template (/report/plots/{name}), never by raw path: a client
        # inventing paths must not grow the table.
        matched = request.scope.get("route")
        route = getattr(matched, "path", None) or "other"
        state.telemetry.http(route, response.status_code, time.perf_counter() - start)
        return response

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "models": list(state.workers)}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {"id": name, "object": "model", "created": state.created, "owned_by": "distiller"}
                for name in state.workers
            ],
        }

    @app.get("/metrics")
    async def metrics() -> dict[str, Any]:
        out = state.telemetry.snapshot()
        out["in_flight"] = state.in_flight
        for name, w in state.workers.items():
            out["models"].setdefault(name, {"completions": 0, "completion_tokens": 0})
            out["models"][name]["worker"] = vars(w.stats)
        return out

    def _admit() -> None:
        if state.in_flight >= state.limits.max_concurrency:
            raise ApiError(
                429,
                f"busy: {state.in_flight} requests in flight, at most {state.limits.max_concurrency}; retry shortly",
            )
        state.in_flight += 1

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        data = await read_json(request, state.limits)
        worker = _worker(state, data)
        asked = read_messages(data.get("messages"), state.limits)
        asked_prompt = request_prompt(asked)
        messages = state.scaffold(worker.name, asked)
        decoding = read_decoding(data, state.limits)
        stream = data.get("stream", False)
        if not isinstance(stream, bool):
            raise ApiError(400, "stream: expected true or false", param="stream")
        try:
            prompt = await run_in_threadpool(chat_prompt, worker.tokenizer, messages)
        except Exception as exc:  # the chat template refused the conversation
            raise ApiError(
                400, f"messages: the chat template refused them: {exc}", param="messages"
            ) from None
        if len(prompt) > state.limits.max_prompt_tokens:
            raise ApiError(
                400,
                f"messages: {len(prompt)} prompt tokens; at most {state.limits.max_prompt_tokens}",
                param="messages",
            )
        _admit()
        cid, created, start = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), time.perf_counter()
        if stream:
            options = data.get("stream_options") or {}
            usage = isinstance(options, dict) and options.get("include_usage") is True
            slot = _Slot(state)
            return StreamingResponse(
                _stream(
                    state, worker, prompt, decoding, cid, created, start, usage, slot, asked_prompt
                ),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        job = GenerateJob(prompt, decoding)
        try:
            generation: Generation = await asyncio.wrap_future(worker.submit(job))
        except asyncio.CancelledError:
            job.cancelled.set()
            raise
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None
        finally:
            state.in_flight -= 1
        seconds = time.perf_counter() - start
        state.telemetry.model(worker.name, seconds, generation.generation_tokens)
        return JSONResponse(
            {
                "id": cid,
                "object": "chat.completion",
                "created": created,
                "model": worker.name,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": generation.text},
                        "finish_reason": generation.finish_reason,
                        "logprobs": None,
                    }
                ],
                "usage": _usage(generation),
                "distiller": _extras(state, generation, seconds, None, asked_prompt),
            }
        )

    async def _stream(
        state: ServeState,
        worker: ModelWorker,
        prompt: list[int],
        decoding: Decoding,
        cid: str,
        created: int,
        start: float,
        include_usage: bool,
        slot: _Slot,
        asked: Prompt | None,
    ) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        segments: asyncio.Queue[str | None] = asyncio.Queue()
        job = GenerateJob(
            prompt, decoding, on_text=lambda s: loop.call_soon_threadsafe(segments.put_nowait, s)
        )
        future = worker.submit(job)
        future.add_done_callback(lambda _f: loop.call_soon_threadsafe(segments.put_nowait, None))
        text = StreamText(decoding.stop)  # fed the whole text so far
        first_text_s = None
        try:
            yield _chunk(cid, created, worker.name, {"role": "assistant", "content": ""})
            while (segment := await segments.get()) is not None:
                if first_text_s is None:
                    first_text_s = time.perf_counter() - start
                if piece := text.update(segment):
                    yield _chunk(cid, created, worker.name, {"content": piece})
            try:
                generation: Generation = future.result()
            except Exception as exc:
                log.error("stream on %s failed: %s: %s", worker.name, type(exc).__name__, exc)
                yield f"data: {json.dumps({'error': {'message': f'generation failed: {exc}', 'type': 'server_error'}})}\n\n"
                return
            if piece := text.finish(generation.text):
                yield _chunk(cid, created, worker.name, {"content": piece})
            seconds = time.perf_counter() - start
            state.telemetry.model(worker.name, seconds, generation.generation_tokens)
            extra = {"distiller": _extras(state, generation, seconds, first_text_s, asked)}
            yield _chunk(cid, created, worker.name, {}, generation.finish_reason, **extra)
            if include_usage:
                yield f"data: {json.dumps({'id': cid, 'object': 'chat.completion.chunk', 'created': created, 'model': worker.name, 'choices': [], 'usage': _usage(generation)})}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            job.cancelled.set()  # a client gone mid-stream stops the generation at its next token
            slot.release()

    @app.post("/v1/validate")
    async def validate(request: Request) -> dict[str, Any]:
        data = await read_json(request, state.limits)
        if state.validator is None:
            raise ApiError(400, "no validators here: start the server with --spec")
        if not isinstance(data.get("text"), str):
            raise ApiError(400, "text: expected the answer to validate", param="text")
        return state.validator(data["text"], _validate_prompt(data)).to_dict()

    @app.post("/v1/classify")
    async def classify(request: Request) -> dict[str, Any]:
        data = await read_json(request, state.limits)
        classify_spec = getattr(getattr(state.spec, "eval", None), "classify", None)
        if classify_spec is None or classify_spec.decoder != "ranking":
            raise ApiError(
                400,
                "no label ranking here: start the server with --spec of a task whose eval.classify ranks labels",
            )
        worker = _worker(state, data)
        conversations = _classify_inputs(data, state.limits)
        _admit()
        job = CallJob(lambda model, tok: _rank(state, worker.name, model, tok, conversations))
        start = time.perf_counter()
        try:
            rankings = await asyncio.wrap_future(worker.submit(job))
        except asyncio.CancelledError:
            job.cancelled.set()
            raise
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None
        finally:
            state.in_flight -= 1
        state.telemetry.model(worker.name, time.perf_counter() - start, 0)
        return {
            "object": "list",
            "model": worker.name,
            "labels": list(classify_spec.labels),
            "calibrated": classify_spec.calibrate,
            "data": [{"index": i, **r.to_dict()} for i, r in enumerate(rankings)],
        }

    @app.get("/")
    async def page() -> FileResponse:
        return FileResponse(PAGE_DIR / "index.html", media_type="text/html")

    @app.get("/page/{name}")
    async def page_file(name: str) -> FileResponse:
        path = PAGE_DIR / name
        if "/" in name or name.startswith(".") or not path.is_file():
            raise ApiError(404, f"no page file {name!r}")
        return FileResponse(path)

    @app.get("/report")
    async def report() -> HTMLResponse:
        from distiller.serve.report_page import report_html

        return HTMLResponse(
            await run_in_threadpool(report_html, state.report_path, state.plots_dir)
        )

    @app.get("/report/plots/{name}")
    async def report_plot(name: str) -> FileResponse:
        if state.plots_dir is None or "/" in name or not name.endswith(".png"):
            raise ApiError(404, f"no plot {name!r}")
        path = state.plots_dir / name
        if not path.is_file():
            raise ApiError(404, f"no plot {name!r}")
        return FileResponse(path, media_type="image/png")

    return app


def _validate_prompt(data: dict) -> Prompt | None:
    """``/v1/validate``'s optional ``prompt`` (the user prompt the text answers) and ``fields``
    (the prompt's fields, as in a prompts file: a ``span`` answer must come from
    ``fields[<its field>]`` when given, else from the prompt)."""
    prompt, fields = data.get("prompt"), data.get("fields")
    if prompt is not None and not isinstance(prompt, str):
        raise ApiError(400, "prompt: expected the user prompt the text answers", param="prompt")
    if fields is not None and not (
        isinstance(fields, dict) and all(isinstance(v, str) for v in fields.values())
    ):
        raise ApiError(
            400, "fields: expected a mapping of field name -> text (the prompt's fields)",
            param="fields",
        )  # fmt: skip
    if prompt is None and fields is None:
        return None
    return Prompt(id="request", text=prompt or "", meta=dict(fields or {}))


def _classify_inputs(data: dict, limits: Limits) -> list[list[dict[str, str]]]:
    """``input`` (a user text or a list of them) or ``messages`` (one conversation)."""
    from distiller.generate import build_messages

    if "messages" in data:
        return [read_messages(data["messages"], limits)]
    value = data.get("input")
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise ApiError(
            400, "input: expected a text or a non-empty list of texts (or messages)", param="input"
        )
    if len(texts) > limits.max_messages:
        raise ApiError(
            400, f"input: at most {limits.max_messages} texts, got {len(texts)}", param="input"
        )
    return [build_messages(t) for t in texts]


def _rank(state: ServeState, name: str, model: Any, tokenizer: Any, conversations: list) -> list:
    """Calibrated label rankings; runs on the model's worker thread. The prior (mean score of
    the content-free prompts) depends only on the model and the spec: computed once."""
    from distiller.classify import rank, score_labels
    from distiller.generate import build_messages

    spec = state.spec.eval.classify
    labels = list(spec.labels)
    if spec.calibrate and name not in state.priors:
        null = score_labels(
            model, tokenizer, [build_messages(t) for t in spec.content_free], labels
        )
        state.priors[name] = null.mean(axis=0)
    raw = score_labels(model, tokenizer, conversations, labels)
    bias = [float(spec.bias.get(y, 0.0)) for y in labels]
    return rank(raw, labels, state.priors.get(name) if spec.calibrate else None, bias)
