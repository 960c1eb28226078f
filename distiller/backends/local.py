"""A local MLX model as a teacher: requests are rendered with its chat template and generated
in batches by ``distiller.generate.generate_batch``."""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from distiller.backends import Completion, CompletionRequest
from distiller.decoding import Decoding

if TYPE_CHECKING:
    from distiller.generate import Generation


class LocalBackend:
    """Teacher backed by an MLX model loaded in this process.

    ``model`` is a registry name or a model directory; pass ``loaded=(model, tokenizer)`` to
    reuse an already loaded model (tests, notebooks). Loading is lazy: nothing happens until
    the first ``complete``.
    """

    def __init__(self, model: str, batch_size: int = 16, loaded: tuple | None = None):
        self.model_name = str(model)
        self.batch_size = batch_size
        self._loaded = loaded
        self.stats = None  # GenerationStats summed over all calls

    def _model(self) -> tuple[Any, Any]:
        if self._loaded is None:
            from distiller.models import load_model

            self._loaded = load_model(self.model_name)
        return self._loaded

    def fingerprint(self) -> dict:
        return {"backend": "local", "model": self.model_name}

    def complete(
        self,
        requests: list[CompletionRequest],
        on_done: Callable[[int, Completion], object] | None = None,
    ) -> list[Completion]:
        from distiller.generate import GenerationStats, chat_prompt, generate_batch

        model, tokenizer = self._model()
        out: list[Completion | None] = [None] * len(requests)
        # generate_batch decodes one way per call: group the requests that differ only in seed.
        groups: dict[tuple[Decoding, bool], list[tuple[int, list[int]]]] = defaultdict(list)
        for i, req in enumerate(requests):
            try:
                prompt = chat_prompt(tokenizer, req.messages)
            except Exception as exc:  # a malformed conversation fails only its own request
                out[i] = Completion(finish_reason="error", error=f"chat template: {exc}")
                if on_done is not None:
                    on_done(i, out[i])
                continue
            key = (dataclasses.replace(req.decoding, seed=None), req.decoding.seed is None)
            groups[key].append((i, prompt))
        if self.stats is None:
            self.stats = GenerationStats()
        for (decoding, unseeded), items in groups.items():
            idx = [i for i, _ in items]

            def finished(k: int, g: Generation, idx: list[int] = idx) -> None:
                out[idx[k]] = Completion(
                    text=g.text,
                    prompt_tokens=g.prompt_tokens,
                    completion_tokens=g.generation_tokens,
                    finish_reason=g.finish_reason,
                )
                if on_done is not None:
                    on_done(idx[k], out[idx[k]])

            gens = generate_batch(
                model,
                tokenizer,
                [p for _, p in items],
                decoding,
                seeds=None if unseeded else [requests[i].decoding.seed for i in idx],
                batch_size=self.batch_size,
                on_finish=finished,
            )
            self.stats += gens.stats
        return [c for c in out if c is not None]

    def close(self) -> None:
        self._loaded = None

    def __repr__(self) -> str:
        return f"LocalBackend(model={self.model_name!r}, batch_size={self.batch_size})"
