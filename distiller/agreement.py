"""Agreement with the teacher, teacher-forced on its own held-out answers.

For each held-out prompt the teacher's answer (its evaluation output) is fed to both models
after each one's own rendering of the prompt (the teacher may wear a scaffold, the student sees
the bare prompt); at every answer position the two next-token distributions are compared:

- top-1 agreement: the share of answer tokens where both models' most likely token is the same;
- KL(teacher || student) in nats per answer token, at temperature 1 (forward KL, the quantity
  logit-KD minimises);
- perplexity of each model on those answers: exp of the mean negative log-likelihood per token.

The answers end with the end-of-turn token, so how each model stops counts too.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx

from distiller.files import atomic_write
from distiller.hashing import stable_hash


@dataclass(frozen=True)
class Agreement:
    """A student's agreement with its teacher on the teacher's answers to some prompts."""

    sequences: int
    tokens: int
    top1_agreement: float
    kl_to_teacher: float  # mean KL(teacher || student), nats per answer token
    student_perplexity: float
    teacher_perplexity: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def answer_log_probs(model: Any, prompt_ids: Sequence[int], answer_ids: Sequence[int]) -> mx.array:
    """Log-probabilities (answer length, vocab) of the next token at each answer position,
    teacher-forced on ``prompt_ids + answer_ids``."""
    ids = mx.array([*prompt_ids, *answer_ids])[None]
    logits = model(ids)[0, len(prompt_ids) - 1 : -1].astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def answer_ids(tokenizer: Any, answer: str) -> list[int]:
    """The answer's tokens as the model would emit them, then the end of the turn."""
    ids = list(tokenizer.encode(answer, add_special_tokens=False))
    eos = getattr(tokenizer, "eos_token_id", None)
    return ids + ([eos] if eos is not None else [])


def teacher_agreement(
    student: Any,
    teacher: Any,
    student_prompts: Sequence[Sequence[int]],
    teacher_prompts: Sequence[Sequence[int]],
    answers: Sequence[Sequence[int]],
) -> Agreement:
    """Agreement of ``student`` with ``teacher`` on ``answers`` (token ids, one per prompt),
    each model prompted with its own rendering of the same prompt."""
    if not (len(student_prompts) == len(teacher_prompts) == len(answers)):
        raise ValueError("one student prompt, one teacher prompt and one answer per prompt")
    totals = [0.0, 0.0, 0.0, 0.0]  # agreeing tokens, KL, student NLL, teacher NLL
    tokens = 0
    for s_ids, t_ids, a_ids in zip(student_prompts, teacher_prompts, answers, strict=True):
        if not a_ids:
            continue
        log_q = answer_log_probs(student, s_ids, a_ids)
        log_p = answer_log_probs(teacher, t_ids, a_ids)
        target = mx.array(list(a_ids))[:, None]
        figures = mx.stack(
            [
                (mx.argmax(log_q, axis=-1) == mx.argmax(log_p, axis=-1)).sum().astype(mx.float32),
                (mx.exp(log_p) * (log_p - log_q)).sum(),
                -mx.take_along_axis(log_q, target, axis=-1).sum(),
                -mx.take_along_axis(log_p, target, axis=-1).sum(),
            ]
        ).tolist()
        totals = [a + b for a, b in zip(totals, figures, strict=True)]
        tokens += len(a_ids)
    if tokens == 0:
        raise ValueError("no answer tokens to compare on")
    agree, kl, nll_s, nll_t = totals
    return Agreement(
        sequences=sum(1 for a in answers if a),
        tokens=tokens,
        top1_agreement=agree / tokens,
        kl_to_teacher=max(0.0, kl / tokens),  # exact arithmetic is >= 0; float error is not
        student_perplexity=math.exp(nll_s / tokens),
        teacher_perplexity=math.exp(nll_t / tokens),
    )


def cached_teacher_agreement(
    cache_dir: Path,
    key_inputs: Any,
    compute: Any,
) -> dict[str, Any]:
    """``compute()`` (an ``Agreement``) as a dict, cached in ``cache_dir`` under a hash of
    ``key_inputs`` (the two evaluations' keys say which models answered which prompts)."""
    path = Path(cache_dir) / f"agreement-{stable_hash(key_inputs)[:16]}.json"
    if path.exists():
        return json.loads(path.read_text())
    figures = compute().to_dict()
    atomic_write(path, json.dumps(figures, indent=2) + "\n", durable=False)
    return figures


def agreement_with_teacher(
    spec: Any,
    prompts: Sequence[Any],
    teacher_records: Sequence[dict[str, Any]],
    student: tuple[Any, Any],
    teacher: tuple[Any, Any],
    student_style: str,
    teacher_style: str = "scaffold",
) -> Agreement:
    """``teacher_agreement`` on the prompts the teacher answered in ``teacher_records`` (its
    evaluation), each model prompted as it is evaluated (``evaluate.render_messages``)."""
    from distiller.evaluate import render_messages
    from distiller.generate import chat_prompt

    (s_model, s_tok), (t_model, t_tok) = student, teacher
    answered = {r["id"]: r["output"] for r in teacher_records}
    chosen = [p for p in prompts if p.id in answered]
    return teacher_agreement(
        s_model,
        t_model,
        [chat_prompt(s_tok, render_messages(spec, p, student_style)) for p in chosen],
        [chat_prompt(t_tok, render_messages(spec, p, teacher_style)) for p in chosen],
        [answer_ids(t_tok, answered[p.id]) for p in chosen],
    )
