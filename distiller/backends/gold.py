"""The gold teacher (``teacher: {gold: true}``): every prompt is answered with its own answer.

The answer is the prompt's ``reference`` (a string; the first of a list; a JSON object written
as JSON), else its ``label``. The samples go through the teacher stage like a model's
(validated, recorded, resumable), so training on them is supervised fine-tuning on gold;
nothing is generated.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

from distiller.backends import Completion, CompletionRequest
from distiller.spec import Prompt


def gold_answer(prompt: Prompt) -> str | None:
    """The prompt's gold answer: its reference, else its label, else None. A reference is a
    string, a list of accepted strings (the first is the answer: extractive QA writes the span
    as the passage does first) or a JSON object (extraction: written as JSON, keys in order)."""
    ref = prompt.reference
    if isinstance(ref, list) and ref and isinstance(ref[0], str):
        ref = ref[0]
    if isinstance(ref, str) and ref.strip():
        return ref
    if isinstance(ref, dict):
        return json.dumps(ref, ensure_ascii=False)
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
