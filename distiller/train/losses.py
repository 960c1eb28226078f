"""Training losses: masked cross-entropy, logit distillation divergences, hidden-state MSE, DPO.

Every loss takes a ``mask`` (1.0 where a token is supervised, i.e. an assistant token, 0.0 on
prompt and padding) and averages over supervised tokens only, so prompt tokens never pull the
student. Shapes: logits (B, L, V), targets/mask (B, L).
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from distiller import fast_ops as F

DIVERGENCES = ("kl", "reverse_kl", "jsd")


def _masked_mean(per_token: mx.array, mask: mx.array) -> tuple[mx.array, mx.array]:
    ntoks = mask.sum()
    # max(.., 1) keeps an all-masked batch at loss 0 instead of NaN.
    return (per_token * mask).sum() / mx.maximum(ntoks, 1), ntoks


def masked_cross_entropy(
    logits: mx.array, targets: mx.array, mask: mx.array
) -> tuple[mx.array, mx.array]:
    """Mean next-token cross-entropy over supervised tokens; returns (loss, n_tokens)."""
    ce = F.cross_entropy(logits.astype(mx.float32), targets)
    return _masked_mean(ce, mask)


def token_divergence(
    teacher_logits: mx.array,
    student_logits: mx.array,
    temperature: float = 1.0,
    divergence: str = "kl",
) -> mx.array:
    """Per-token divergence between teacher and student distributions at ``temperature``.

    kl: KL(teacher || student) (forward, mean-seeking); reverse_kl: KL(student || teacher)
    (mode-seeking); jsd: Jensen-Shannon, symmetric and bounded by ln 2. Multiplied by T^2 so
    gradient magnitudes stay comparable across temperatures (Hinton et al. 2015).
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    t = float(temperature)
    log_p = F.log_softmax(teacher_logits.astype(mx.float32) / t, axis=-1)
    log_q = F.log_softmax(student_logits.astype(mx.float32) / t, axis=-1)
    if divergence == "kl":
        d = (F.exp(log_p) * (log_p - log_q)).sum(-1)
    elif divergence == "reverse_kl":
        d = (F.exp(log_q) * (log_q - log_p)).sum(-1)
    else:
        p, q = F.exp(log_p), F.exp(log_q)
        # log of the mixture, computed stably from the two log-probabilities.
        log_m = mx.logaddexp(log_p, log_q) - math.log(2.0)
        d = 0.5 * (p * (log_p - log_m)).sum(-1) + 0.5 * (q * (log_q - log_m)).sum(-1)
    return d * (t * t)


def masked_divergence(
    teacher_logits: mx.array,
    student_logits: mx.array,
    mask: mx.array,
    temperature: float = 1.0,
    divergence: str = "kl",
) -> mx.array:
    d = token_divergence(teacher_logits, student_logits, temperature, divergence)
    return _masked_mean(d, mask)[0]


def hidden_mse(
    student_hidden: list[mx.array], teacher_hidden: list[mx.array], mask: mx.array
) -> mx.array:
    """Mean over mapped layer pairs of the per-token mean squared error of hidden states."""
    if not student_hidden:
        return mx.array(0.0)
    total = mx.array(0.0)
    for hs, ht in zip(student_hidden, teacher_hidden, strict=True):
        per_tok = ((hs.astype(mx.float32) - ht.astype(mx.float32)) ** 2).mean(-1)
        total = total + _masked_mean(per_tok, mask)[0]
    return total / len(student_hidden)


def logit_kd_loss(
    student_logits: mx.array,
    teacher_logits: mx.array,
    targets: mx.array,
    mask: mx.array,
    *,
    alpha: float,
    beta: float,
    gamma: float = 0.0,
    temperature: float = 1.0,
    divergence: str = "kl",
    student_hidden: list[mx.array] | None = None,
    teacher_hidden: list[mx.array] | None = None,
    hidden_mask: mx.array | None = None,
) -> tuple[mx.array, mx.array]:
    """alpha * CE(student, data) + beta * divergence(teacher, student) + gamma * hidden MSE.

    ``hidden_mask`` masks the hidden states when they are laid out differently from the logits
    (e.g. logits gathered at supervised positions, hidden states still (B, L, D)).
    """
    ce, ntoks = masked_cross_entropy(student_logits, targets, mask)
    loss = alpha * ce
    if beta:
        loss = loss + beta * masked_divergence(
            teacher_logits, student_logits, mask, temperature, divergence
        )
    if gamma:
        hmask = mask if hidden_mask is None else hidden_mask
        loss = loss + gamma * hidden_mse(student_hidden or [], teacher_hidden or [], hmask)
    return loss, ntoks


def token_logprobs(logits: mx.array, targets: mx.array) -> mx.array:
    """log p(target) per position."""
    return -F.cross_entropy(logits.astype(mx.float32), targets)


def sequence_logprobs(logits: mx.array, targets: mx.array, mask: mx.array) -> mx.array:
    """Sum of log p(target) over the supervised tokens of each sequence: shape (B,)."""
    return (token_logprobs(logits, targets) * mask).sum(-1)


def dpo_loss(
    policy_chosen: mx.array,
    policy_rejected: mx.array,
    reference_chosen: mx.array,
    reference_rejected: mx.array,
    beta: float = 0.1,
) -> tuple[mx.array, mx.array]:
    """Direct Preference Optimization (Rafailov et al. 2023) on sequence log-probabilities.

    Returns (mean loss, mean reward margin). The margin is a diagnostic: it should grow.
    """
    margin = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)
    loss = -nn.log_sigmoid(beta * margin)
    return loss.mean(), (beta * margin).mean()
