"""Teacher backends: one small interface over a local MLX model and any OpenAI-compatible server.

A backend turns a list of chat requests into a list of completions, in order. Failures of one
request (a timeout after all retries, a 4xx) come back as a ``Completion`` with ``error`` set,
so a batch never loses the answers that did arrive; the caller decides what an error means.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable


@dataclass(frozen=True)
class CompletionRequest:
    """One chat completion to make. ``seed`` makes sampling reproducible where supported."""

    messages: list[dict]
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    no_repeat_ngram: int = 0  # local backends only (no chat-API equivalent)
    repetition_penalty: float | None = None
    stop: tuple[str, ...] = ()  # end the completion at any of these strings


@dataclass
class Completion:
    """What came back for one request. ``error`` is None on success (then ``text`` is valid)."""

    text: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = ""  # "stop" | "length" | "error" | whatever the server said
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict:
        return asdict(self)


class BackendError(RuntimeError):
    """The backend cannot serve requests at all (bad credentials, unreachable, bad model)."""


@runtime_checkable
class Backend(Protocol):
    """Anything that completes chat requests. ``fingerprint`` identifies the teacher (no secrets)."""

    def complete(self, requests: list[CompletionRequest]) -> list[Completion]: ...

    def fingerprint(self) -> dict: ...

    def close(self) -> None: ...


def make_backend(teacher_spec: Any) -> Backend:
    """The backend a spec's ``teacher`` section asks for: ``endpoint`` (HTTP) or ``model`` (local)."""
    endpoint = getattr(teacher_spec, "endpoint", None)
    if endpoint is not None:
        from distiller.backends.openai_compat import OpenAICompatBackend

        return OpenAICompatBackend(
            url=endpoint.url,
            model=endpoint.model,
            api_key_env=getattr(endpoint, "api_key_env", None),
            timeout_s=getattr(endpoint, "timeout_s", 60.0),
            max_concurrency=getattr(endpoint, "max_concurrency", 4),
            max_retries=getattr(endpoint, "max_retries", 5),
        )
    model = getattr(teacher_spec, "model", None)
    if not model:
        from distiller.errors import UserError

        raise UserError("teacher: set either 'model' (a local model) or 'endpoint' (a server)")
    from distiller.backends.local import LocalBackend

    return LocalBackend(model, batch_size=getattr(teacher_spec, "batch_size", 16) or 16)


__all__ = [
    "Backend",
    "BackendError",
    "Completion",
    "CompletionRequest",
    "make_backend",
]
