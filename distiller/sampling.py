"""Turning logits into tokens: samplers and logits processors, one per sequence.

A seeded sampler owns its PRNG key, so a sequence's draws depend only on its seed and its
logits, never on which other sequences share its batch. Nucleus (top-p) sampling does not sort
the vocabulary: the nucleus almost always lies among the few hundred most likely tokens, so it is
found among those (a partial sort) and the draw is made among them. A row whose nucleus might
reach past the candidates takes the full-vocabulary path. Both give exactly the nucleus that
``mlx_lm.sample_utils.apply_top_p`` keeps; on a CPU a full sort of the vocabulary per row and
step is a large share of a teacher's batched decode step.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import Any

import mlx.core as mx

from distiller import fast_ops

Sampler = Callable[[mx.array], mx.array]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]

# Candidate counts searched for the nucleus, in turn, before the whole vocabulary is sorted.
NUCLEUS_CANDIDATES = (256, 4096)


class KeyedSampler:
    """Temperature + nucleus sampling for one sequence, drawing from its own PRNG key.

    Calling it samples every row of ``logprobs`` (one per call in a batch of one); within a
    batch, ``sample_rows`` draws for many keyed samplers at once.
    """

    def __init__(self, temperature: float, top_p: float, seed: int):
        self.temperature = temperature
        self.top_p = top_p
        self.key = mx.random.key(seed)

    def next_key(self) -> mx.array:
        self.key, sub = mx.random.split(self.key)
        return sub

    def __call__(self, logprobs: mx.array) -> mx.array:
        return sample_rows([self] * logprobs.shape[0], logprobs)


def make_sampler(temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None) -> Sampler:
    """A sampler for one sequence. Greedy at temperature 0; with a seed it owns its PRNG key."""
    from mlx_lm.sample_utils import greedy_sampler
    from mlx_lm.sample_utils import make_sampler as mlx_make_sampler

    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if temperature == 0:
        return greedy_sampler
    if seed is None:
        return mlx_make_sampler(temp=temperature, top_p=top_p if top_p < 1 else 0.0)
    return KeyedSampler(temperature, top_p, seed)


def nucleus_candidates(
    logits: mx.array, top_p: float, candidates: int
) -> tuple[mx.array, mx.array, mx.array, mx.array]:
    """The nucleus of each row of ``logits``, searched among its ``candidates`` likeliest tokens.

    Returns ``(logits, token ids, in_nucleus, complete)`` of the candidates, likeliest first,
    each (rows, k), the last (rows,). The nucleus is the likeliest tokens up to and including
    the one at which the probability mass reaches ``top_p``, plus any token tied with it (the
    rule of ``mlx_lm.sample_utils.apply_top_p``). A row is ``complete`` when its whole nucleus
    is among the candidates; for the others, ``in_nucleus`` is meaningless.
    """
    vocab = logits.shape[-1]
    k = min(candidates, vocab)
    ids = mx.argpartition(-logits, kth=k - 1, axis=-1)[:, :k]
    values = mx.take_along_axis(logits, ids, axis=-1)
    order = mx.argsort(-values, axis=-1)
    values = mx.take_along_axis(values, order, axis=-1)
    ids = mx.take_along_axis(ids, order, axis=-1)
    probs = mx.exp(values - fast_ops.logsumexp(logits, axis=-1, keepdims=True))
    mass_before = mx.cumsum(probs, axis=-1) - probs
    kept = (mass_before < top_p).sum(axis=-1, keepdims=True)
    threshold = mx.take_along_axis(values, kept - 1, axis=-1)
    in_nucleus = values >= threshold
    if k == vocab:
        complete = mx.ones(kept.shape[:1], dtype=mx.bool_)
    else:  # incomplete: the nucleus fills every candidate, or a tie at the cut continues past
        complete = (kept[:, 0] < k) & (values[:, -1] < threshold[:, 0])
    return values, ids, in_nucleus, complete


def sample_rows(samplers: Sequence[Sampler], logits: mx.array) -> mx.array:
    """One token per row of ``logits`` (rows, vocab), row ``i`` drawn by ``samplers[i]``.

    Keyed samplers with the same settings are served together: one candidate search for all
    rows, then each row's draw from its own key; rows whose nucleus is wider than the
    candidates are searched again among more. Greedy rows take the argmax; any other sampler
    gets the row's log-probabilities.
    """
    from mlx_lm.sample_utils import greedy_sampler

    first = samplers[0]
    if all(s is greedy_sampler for s in samplers):
        return mx.argmax(logits, axis=-1)
    same = all(
        isinstance(s, KeyedSampler)
        and s.temperature == first.temperature
        and s.top_p == first.top_p
        for s in samplers
    )
    if not same:
        logprobs = fast_ops.log_softmax(logits)
        if all(s is first for s in samplers):
            return first(logprobs)
        return mx.concatenate([s(logprobs[i : i + 1]) for i, s in enumerate(samplers)], axis=0)

    keys = [s.next_key() for s in samplers]
    vocab = logits.shape[-1]
    tiers = (*(c for c in NUCLEUS_CANDIDATES if c < vocab), vocab) if first.top_p < 1 else (vocab,)
    tokens: list[int] = [0] * len(samplers)
    rows = list(range(len(samplers)))
    for k in tiers:
        part = logits if len(rows) == len(samplers) else logits[mx.array(rows)]
        drawn, complete = _draw_in_nucleus(
            part, [keys[r] for r in rows], first.top_p, first.temperature, k
        )
        left = []
        for r, token, ok in zip(rows, drawn.tolist(), complete.tolist(), strict=True):
            if ok:
                tokens[r] = token
            else:
                left.append(r)
        if not (rows := left):
            break
    return mx.array(tokens)


def _draw_in_nucleus(
    logits: mx.array, keys: list[mx.array], top_p: float, temperature: float, k: int
) -> tuple[mx.array, mx.array]:
    """(one token per row, whether its nucleus was complete) drawing among ``k`` candidates."""
    if k == logits.shape[-1] and top_p >= 1:  # the whole vocabulary is the nucleus
        values, ids, complete = logits, None, mx.ones(logits.shape[:1], dtype=mx.bool_)
    else:
        values, ids, in_nucleus, complete = nucleus_candidates(logits, top_p, k)
    # Gumbel-max: argmax(logit / T + Gumbel noise) is a draw from softmax(logit / T).
    noise = mx.stack([mx.random.gumbel(shape=(values.shape[-1],), key=key) for key in keys])
    scores = values * (1.0 / temperature) + noise
    if ids is None:
        return mx.argmax(scores, axis=-1), complete
    choice = mx.argmax(mx.where(in_nucleus, scores, -mx.inf), axis=-1, keepdims=True)
    return mx.take_along_axis(ids, choice, axis=-1)[:, 0], complete


# -- logits processors -------------------------------------------------------------------------


def no_repeat_ngram_processor(n: int, exempt: Collection[int] = ()) -> LogitsProcessor:
    """Forbid any token that would complete an ``n``-gram already in this generation.

    A small model decoding greedily tends to copy a sentence into every later section; this
    makes the copy impossible (the prompt is not counted: restating it is fine). Tokens in
    ``exempt`` are never banned: a line break after a phrase that was said before is layout,
    not a copy, and banning it leaves the model only end-of-text, cutting answers short.
    The processor keeps per-sequence state, so make one per sequence.
    """
    if n < 2:
        raise ValueError(f"no_repeat_ngram must be >= 2, got {n}")
    generated: list[int] = []
    followers: dict[tuple[int, ...], set[int]] = {}
    context_start: int | None = None
    exempt = frozenset(exempt)

    def process(tokens: mx.array, logits: mx.array) -> mx.array:
        nonlocal context_start
        # ``tokens`` is the context so far; its last token is the one just sampled (on the
        # first call, the prompt's last token, which is not part of the generation).
        if context_start is None:
            context_start = tokens.size
        else:
            generated.append(int(tokens[-1].item()))
            if len(generated) >= n:
                gram = tuple(generated[-n:])
                if gram[-1] not in exempt:
                    followers.setdefault(gram[:-1], set()).add(gram[-1])
        if len(generated) < n - 1:
            return logits
        banned = followers.get(tuple(generated[-(n - 1) :]))
        if not banned:
            return logits
        return logits.at[:, mx.array(sorted(banned))].add(float("-inf"))

    return process


def whitespace_token_ids(tokenizer: Any) -> frozenset[int]:
    """Ids of the tokens that spell line breaks and spaces (what ``no_repeat_ngram`` exempts)."""
    ids: set[int] = set()
    for text in ("\n", "\n\n", "\n\n\n", " ", "  ", " \n", "\t"):
        for i in tokenizer.encode(text, add_special_tokens=False):
            if not tokenizer.decode([i]).strip():
                ids.add(i)
    return frozenset(ids)


def make_logits_processors(
    no_repeat_ngram: int = 0,
    repetition_penalty: float | None = None,
    exempt: Collection[int] = (),
) -> list[LogitsProcessor]:
    """Fresh processors for one sequence (empty when no penalty is asked for)."""
    from mlx_lm.sample_utils import make_logits_processors as mlx_logits_processors

    processors: list[LogitsProcessor] = []
    if repetition_penalty is not None and repetition_penalty != 1.0:
        processors += mlx_logits_processors(repetition_penalty=repetition_penalty)
    if no_repeat_ngram:
        processors.append(no_repeat_ngram_processor(no_repeat_ngram, exempt))
    return processors
