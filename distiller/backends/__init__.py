"""Teacher backends: one small interface over a local MLX model and any OpenAI-compatible server.

A backend turns a list of chat requests into a list of completions, in order. Failures of one
request (a timeout after all retries, a 4xx) come back as a ``Completion`` with ``error`` set,
so a batch never loses the answers that did arrive; the caller decides what an error means.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from distiller.decoding import GREEDY, Decoding

if TYPE_CHECKING:
    from distiller.spec import TeacherSpec


@dataclass(frozen=True)
class CompletionRequest:
    """One chat completion to make, decoded as ``decoding`` says. Its ``seed`` is this
    request's own (used as it is), so sampling is reproducible where the backend supports it."""

    messages: list[dict]
    decoding: Decoding = GREEDY


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

    def complete(
        self,
        requests: list[CompletionRequest],
        on_done: Callable[[int, Completion], object] | None = None,
    ) -> list[Completion]:
        """Completions in request order. ``on_done(i, completion)`` is called for each request
        as soon as its completion is known, so callers can keep finished work if the call is
        interrupted before it returns."""
        ...

    def fingerprint(self) -> dict: ...

    def close(self) -> None: ...


def make_backend(teacher: TeacherSpec) -> Backend:
    """The backend a spec's ``teacher`` section asks for: ``endpoint`` (HTTP) or ``model`` (local)."""
    if teacher.endpoint is not None:
        from distiller.backends.openai_compat import OpenAICompatBackend

        return OpenAICompatBackend.from_endpoint(teacher.endpoint)
    if not teacher.model:
        from distiller.errors import UserError

        raise UserError("teacher: set either 'model' (a local model) or 'endpoint' (a server)")
    from distiller.backends.local import LocalBackend

    return LocalBackend(teacher.model, batch_size=teacher.batch_size)


__all__ = [
    "Backend",
    "BackendError",
    "Completion",
    "CompletionRequest",
    "make_backend",
]
