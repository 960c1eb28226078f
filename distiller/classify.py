"""Classification by label ranking: every label scored as the assistant's answer, calibrated.

For a prompt (its chat messages) and labels ``y_1 .. y_L``:

- ``raw[y]``: the mean log-probability of the tokens the chat template adds for an assistant
  message holding exactly ``y`` (the label, then the end-of-turn tokens: the tokens SFT trains
  on), given the prompt. Mean, not sum, so a label of more tokens is not penalised for its
  length.
- ``prior[y]``: the mean of ``raw[y]`` over content-free prompts ("N/A", "", "[MASK]" put
  through the same prompts template and chat template). A model that favours one label whatever
  the input shows that preference here; subtracting it is contextual calibration (Zhao et al.,
  2021, "Calibrate Before Use"), in the log domain.
- ``calibrated[y] = raw[y] - prior[y] + bias[y]`` (without calibration the prior is 0); ``bias``
  is an optional per-label constant from the spec.
- ``probabilities = softmax(calibrated)``, ``prediction = argmax`` (a tie goes to the label
  listed first), ``margin`` = top-1 minus top-2 probability, in [0, 1].

Scoring is batched: a batch of prompts is prefilled once into one left-padded KV cache, the
cache is repeated once per label, and every label's answer tokens are scored in one more
forward pass, so the prompt is computed once, not once per label (``score_labels``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass
class LabelRanking:
    """One prompt's ranking: the prediction and every figure behind it, keyed by label."""

    prediction: str
    raw: dict[str, float]
    prior: dict[str, float]
    calibrated: dict[str, float]
    probabilities: dict[str, float]
    margin: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ScoringStats:
    """What one scoring call computed: rows (prompt x label), tokens run through the model."""

    rows: int = 0
    tokens: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


# ---------------------------------------------------------------------------------------------
# The arithmetic


def softmax(scores: np.ndarray) -> np.ndarray:
    """Row-wise softmax of a (n, L) float array (shifted by the row maximum: no overflow)."""
    shifted = scores - scores.max(axis=-1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=-1, keepdims=True)


def rank(
    raw: np.ndarray,
    labels: Sequence[str],
    prior: np.ndarray | None = None,
    bias: np.ndarray | None = None,
) -> list[LabelRanking]:
    """Rankings from raw scores ``raw`` (n prompts x L labels), an optional prior (L,) to
    subtract and an optional bias (L,) to add (see the module docstring)."""
    raw = np.asarray(raw, dtype=np.float64)
    if raw.ndim != 2 or raw.shape[1] != len(labels):
        raise ValueError(f"raw scores of shape {raw.shape} for {len(labels)} labels")
    prior_v = np.zeros(len(labels)) if prior is None else np.asarray(prior, np.float64)
    bias_v = np.zeros(len(labels)) if bias is None else np.asarray(bias, np.float64)
    calibrated = raw - prior_v + bias_v
    probs = softmax(calibrated)
    top2 = np.sort(probs, axis=-1)[:, ::-1][:, :2] if len(labels) > 1 else None
    out = []
    for i in range(raw.shape[0]):
        margin = float(top2[i, 0] - top2[i, 1]) if top2 is not None else 1.0
        out.append(
            LabelRanking(
                prediction=labels[int(np.argmax(calibrated[i]))],
                raw=dict(zip(labels, map(float, raw[i]), strict=True)),
                prior=dict(zip(labels, map(float, prior_v), strict=True)),
                calibrated=dict(zip(labels, map(float, calibrated[i]), strict=True)),
                probabilities=dict(zip(labels, map(float, probs[i]), strict=True)),
                margin=min(1.0, max(0.0, margin)),
            )
        )
    return out


# ---------------------------------------------------------------------------------------------
# Scoring with a model


def answer_examples(tokenizer: Any, messages: list[dict], labels: Sequence[str]) -> list[Any]:
    """One training-style ``Example`` per label: ``messages`` then the label as the assistant's
    answer, supervised on the answer tokens only (``distiller.train.batches.encode_chat``)."""
    from distiller.train.batches import encode_chat

    return [
        encode_chat(tokenizer, [*messages, {"role": "assistant", "content": y}], 1 << 30)
        for y in labels
    ]


def _answers(
    tokenizer: Any, messages: list[dict], labels: Sequence[str]
) -> tuple[list[int], list[list[int]]]:
    """(prompt tokens, each label's answer tokens) of one conversation."""
    examples = answer_examples(tokenizer, messages, labels)
    prompt = examples[0].tokens[: examples[0].offset]
    for e, y in zip(examples, labels, strict=True):
        if e.tokens[: e.offset] != prompt or e.offset == len(e.tokens):
            raise ValueError(
                f"the chat template renders the prompt differently before the answer {y!r}: "
                "labels cannot share the prompt's scoring"
            )
    return prompt, [e.tokens[e.offset :] for e in examples]


def _log_softmax(logits: Any) -> Any:
    import mlx.core as mx

    logits = logits.astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def _score_with_prompt_cache(
    model: Any, prompts: list[list[int]], answers: list[list[list[int]]]
) -> np.ndarray:
    """Mean answer log-probabilities (B, L): the B prompts prefilled once (left-padded, one
    batched KV cache), the cache repeated per label, then every answer's tokens in one pass."""
    import mlx.core as mx
    from mlx_lm.models.cache import BatchKVCache

    from distiller.train.students import split_model

    n_labels = len(answers[0])
    width = max(len(p) for p in prompts)
    pads = [width - len(p) for p in prompts]
    x = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        x[i, pads[i] :] = p
    cache = [BatchKVCache(pads) for _ in model.layers]
    parts = split_model(model)
    if parts is not None:
        backbone, head = parts
        last = head(backbone(mx.array(x), cache=cache)[:, -1, :])
    else:
        last = model(mx.array(x), cache=cache)[:, -1, :]
    rows = [i for i in range(len(prompts)) for _ in range(n_labels)]
    flat = [a for per_prompt in answers for a in per_prompt]
    first = mx.array([a[0] for a in flat])
    total = mx.take_along_axis(_log_softmax(last)[mx.array(rows)], first[:, None], axis=-1)[:, 0]
    tail_len = max(len(a) for a in flat) - 1
    if tail_len:
        # Each row feeds its answer but the last token and scores the next ones; right padding
        # comes after every real token, so causal attention keeps it out of the scores.
        inputs = np.zeros((len(flat), tail_len), np.int32)
        targets = np.zeros((len(flat), tail_len), np.int32)
        mask = np.zeros((len(flat), tail_len), np.float32)
        for r, a in enumerate(flat):
            inputs[r, : len(a) - 1] = a[:-1]
            targets[r, : len(a) - 1] = a[1:]
            mask[r, : len(a) - 1] = 1.0
        for c in cache:
            c.filter(mx.array(rows))
        logits = model(mx.array(inputs), cache=cache)
        logp = mx.take_along_axis(_log_softmax(logits), mx.array(targets)[..., None], axis=-1)
        total = total + (logp[..., 0] * mx.array(mask)).sum(axis=-1)
    lengths = np.array([len(a) for a in flat], np.float64)
    mean = np.array(total, dtype=np.float64) / lengths
    return mean.reshape(len(prompts), n_labels)


def _score_whole_sequences(model: Any, examples: list[Any], n_labels: int) -> np.ndarray:
    """Mean answer log-probabilities (B, L): every (prompt, label) row whole, in one pass (the
    path for models whose cache is not a plain KV cache)."""
    import mlx.core as mx

    from distiller.train import losses
    from distiller.train.batches import collate
    from distiller.train.routes import selected_logits, selected_targets

    batch = {k: mx.array(v) for k, v in collate(examples).items()}
    logp = losses.token_logprobs(selected_logits(model, batch), selected_targets(batch))
    mask = batch["sel_mask"]
    mean = (batch["sel_rows"] @ (logp * mask)) / (batch["sel_rows"] @ mask)
    return np.array(mean, dtype=np.float64).reshape(-1, n_labels)


def _plain_kv_cache(model: Any) -> bool:
    """Whether every layer of ``model`` caches plain keys and values (no sliding window, no
    recurrent state): then a batched, left-padded KV cache serves it."""
    from mlx_lm.models.cache import KVCache, make_prompt_cache

    return hasattr(model, "layers") and all(type(c) is KVCache for c in make_prompt_cache(model))


def score_labels(
    model: Any,
    tokenizer: Any,
    conversations: Sequence[list[dict]],
    labels: Sequence[str],
    *,
    batch_size: int = 8,
    progress: Callable[[int], object] | None = None,
    stats: ScoringStats | None = None,
) -> np.ndarray:
    """Raw scores (n conversations x L labels): mean answer-token log-probabilities, all labels
    of ``batch_size`` conversations at once.

    Models with a plain KV cache (llama and most others) prefill each prompt once and score
    every label from its cache; others run every (prompt, label) row whole. Both compute the same figures (tested against one forward per label).
    """
    if not labels:
        raise ValueError("no labels to score")
    cached = _plain_kv_cache(model)
    out = np.zeros((len(conversations), len(labels)), np.float64)
    start = time.perf_counter()
    for lo in range(0, len(conversations), batch_size):
        chunk = conversations[lo : lo + batch_size]
        if cached:
            pairs = [_answers(tokenizer, msgs, labels) for msgs in chunk]
            prompts, answers = [p for p, _ in pairs], [a for _, a in pairs]
            out[lo : lo + len(chunk)] = _score_with_prompt_cache(model, prompts, answers)
            tokens = sum(len(p) for p in prompts) + sum(len(x) - 1 for a in answers for x in a)
        else:
            examples = [e for msgs in chunk for e in answer_examples(tokenizer, msgs, labels)]
            out[lo : lo + len(chunk)] = _score_whole_sequences(model, examples, len(labels))
            tokens = sum(len(e.tokens) for e in examples)
        if stats is not None:
            stats.rows += len(chunk) * len(labels)
            stats.tokens += tokens
        if progress is not None:
            progress(len(chunk))
    if stats is not None:
        stats.seconds += time.perf_counter() - start
    return out


def rank_labels(
    model: Any,
    tokenizer: Any,
    conversations: Sequence[list[dict]],
    labels: Sequence[str],
    *,
    content_free: Sequence[list[dict]] = (),
    calibrate: bool = True,
    bias: dict[str, float] | None = None,
    batch_size: int = 8,
    progress: Callable[[int], object] | None = None,
    stats: ScoringStats | None = None,
) -> list[LabelRanking]:
    """The calibrated ranking of ``labels`` for each conversation; ``content_free`` are the
    conversations whose mean score is the prior (required when ``calibrate``)."""
    if calibrate and not content_free:
        raise ValueError("calibration needs at least one content-free conversation")
    unknown = sorted(set(bias or {}) - set(labels))
    if unknown:
        raise ValueError(f"bias for labels that are not ranked: {', '.join(unknown)}")
    raw = score_labels(
        model, tokenizer, conversations, labels, batch_size=batch_size, progress=progress,
        stats=stats,
    )  # fmt: skip
    prior = None
    if calibrate:
        null = score_labels(
            model, tokenizer, content_free, labels, batch_size=batch_size, stats=stats
        )
        prior = null.mean(axis=0)
    bias_v = np.array([float((bias or {}).get(y, 0.0)) for y in labels])
    return rank(raw, labels, prior, bias_v)


# ---------------------------------------------------------------------------------------------
# In an evaluation (``distiller.evaluate``, ``eval.classify: {decoder: ranking}``)


def rank_for_evaluation(
    model: Any,
    tokenizer: Any,
    classify: Any,
    conversations: Sequence[list[dict]],
    content_free: Sequence[list[dict]],
    prompt_lengths: Sequence[int],
    *,
    batch_size: int = 8,
    progress: Callable[[int], object] | None = None,
) -> tuple[list[LabelRanking], Any]:
    """Rank ``classify.labels`` (a ``ClassifySpec``) for each conversation; returns the
    rankings and, for the evaluation's bookkeeping, ``Generations`` whose texts are the
    predictions (no token generated; the stats count the tokens scored as prefill)."""
    from distiller.generate import Generation, Generations, GenerationStats

    stats = ScoringStats()
    rankings = rank_labels(
        model,
        tokenizer,
        conversations,
        classify.labels,
        content_free=content_free if classify.calibrate else (),
        calibrate=classify.calibrate,
        bias=classify.bias,
        batch_size=batch_size,
        progress=progress,
        stats=stats,
    )
    gens = Generations(
        [
            Generation(r.prediction, n, 0, "stop")
            for r, n in zip(rankings, prompt_lengths, strict=True)
        ],
        GenerationStats(
            sequences=len(rankings),
            prompt_tokens=stats.tokens,
            prompt_time=stats.seconds,
            wall_time=stats.seconds,
        ),
    )
    return rankings, gens


def ranking_record(ranking: LabelRanking) -> dict[str, Any]:
    """The fields an evaluation record gets from its ranking."""
    return {
        "prediction": ranking.prediction,
        "probabilities": ranking.probabilities,
        "margin": ranking.margin,
        "scores": ranking.calibrated,
        "raw_scores": ranking.raw,
        "prior": ranking.prior,
    }


def uncalibrated_prediction(raw_scores: dict[str, float], labels: Sequence[str]) -> str:
    """The label with the highest raw score (no prior, no bias; a tie goes to the first)."""
    return max(labels, key=lambda y: (raw_scores[y], -labels.index(y)))
