"""The gold teacher (``teacher: {gold: true}``): every prompt is answered with its own answer.

The answer is the prompt's ``reference`` when it is a string, else its ``label``. The samples
go through the teacher stage like a model's (validated, recorded, resumable), so training on
them is supervised fine-tuning on gold; nothing is generated.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from distiller.backends import Completion, CompletionRequest
from distiller.spec import Prompt


def gold_answer(prompt: Prompt) -> str | None:
    """The prompt's gold answer: its reference (a string), else its label, else None."""
    if isinstance(prompt.reference, str) and prompt.reference.strip():
        return prompt.reference
    return prompt.label


class GoldBackend:
    """Answers a request with the gold answer of the prompt whose text is its last user turn."""

    def __init__(self, prompts: Sequence[Prompt]):
        self._answers = {p.text: gold_answer(p) for p in prompts}

    def fingerprint(self) -> dict:
        return {"backend": "gold"}

    def complete(
        self,
        requests: list[CompletionRequest],
        on_done: Callable[[int, Completion], object] | None = None,
    ) -> list[Completion]:
        out = []
        for i, req in enumerate(requests):
            user = next((m["content"] for m in reversed(req.messages) if m["role"] == "user"), None)
            answer = self._answers.get(user) if isinstance(user, str) else None
            if answer is None:
                c = Completion(finish_reason="error", error="no gold answer for this prompt")
            else:
                c = Completion(text=answer, finish_reason="stop")
            out.append(c)
            if on_done is not None:
                on_done(i, c)
        return out

    def close(self) -> None:
        pass
