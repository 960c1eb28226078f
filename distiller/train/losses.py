"""Training losses: masked cross-entropy, logit distillation divergences, hidden-state MSE, DPO.

Every loss takes a ``mask`` (1.0 where a token is supervised, i.e. an assistant token, 0.0 on
prompt and padding) and averages over supervised tokens only, so prompt tokens never pull the
student. Shapes: logits (B, L, V), targets/mask (B, L).
"""

from __future__ import annotations

import math
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

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
    beta = {"kl": 0.0, "reverse_kl": 1.0, "jsd": 0.5}[divergence]
    return logprob_divergence(log_p, log_q, beta) * (t * t)


def logprob_divergence(log_p: mx.array, log_q: mx.array, beta: float) -> mx.array:
    """Generalized Jensen-Shannon divergence JSD(beta) between two distributions given as
    log-probabilities over the last axis (teacher ``log_p``, student ``log_q``), summed there.

    GKD (Agarwal et al. 2024) in TRL's convention: with the mixture M = beta*P + (1-beta)*Q,
    JSD(beta) = beta*KL(P||M) + (1-beta)*KL(Q||M); beta = 0 is forward KL(P||Q) and beta = 1
    reverse KL(Q||P) exactly (the mixture form vanishes at both ends, so they are special
    cases, as in TRL); beta = 0.5 is the symmetric Jensen-Shannon divergence.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if beta == 0.0:
        return (F.exp(log_p) * (log_p - log_q)).sum(-1)
    if beta == 1.0:
        return (F.exp(log_q) * (log_q - log_p)).sum(-1)
    # log of the mixture, computed stably from the two log-probabilities.
    log_m = mx.logaddexp(log_p + math.log(beta), log_q + math.log(1.0 - beta))
    kl_p = (F.exp(log_p) * (log_p - log_m)).sum(-1)
    kl_q = (F.exp(log_q) * (log_q - log_m)).sum(-1)
    return beta * kl_p + (1.0 - beta) * kl_q


def generalized_jsd(
    teacher_logits: mx.array, student_logits: mx.array, beta: float, temperature: float = 1.0
) -> mx.array:
    """Per-token JSD(beta) (``logprob_divergence``) at ``temperature``, times T^2 as
    ``token_divergence`` does: the gkd route's loss."""
    t = float(temperature)
    log_p = F.log_softmax(teacher_logits.astype(mx.float32) / t, axis=-1)
    log_q = F.log_softmax(student_logits.astype(mx.float32) / t, axis=-1)
    return logprob_divergence(log_p, log_q, beta) * (t * t)


# A log-probability standing for "no mass": finite, so 0 * (a - b) stays 0 (never inf - inf)
# in values and gradients, and exp() of it is exactly 0 in float32.
_NO_MASS = -1.0e4
MISSING_MASS = ("tail", "renormalize")


def topk_divergence(
    student_logits: mx.array,
    teacher_indices: mx.array,
    teacher_logprobs: mx.array,
    teacher_log_tail: mx.array,
    *,
    temperature: float = 1.0,
    divergence: str = "kl",
    missing: str = "tail",
) -> mx.array:
    """Per-token divergence to a teacher known only by its top-k (a ``logit_cache`` entry).

    ``teacher_indices`` (N, k) and ``teacher_logprobs`` (N, k) are the teacher's k likeliest
    tokens and their log-probabilities at ``temperature``; ``teacher_log_tail`` (N,) is the log
    of the probability left outside them. ``missing`` says what happens to that mass:
    ``tail``: both distributions become k + 1 buckets, the k tokens and one holding everything
    else (the student's mass outside the teacher's top-k summed into it). Merging outcomes
    never increases an f-divergence, so this is a lower bound of the full-vocabulary one, equal
    to it when k is the vocabulary. ``renormalize``: both are restricted to the k tokens and
    renormalized there (the tail dropped; not a bound, equal to the full loss when k = V).
    """
    if missing not in MISSING_MASS:
        raise ValueError(f"missing must be one of {MISSING_MASS}, got {missing!r}")
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    t = float(temperature)
    beta = {"kl": 0.0, "reverse_kl": 1.0, "jsd": 0.5}[divergence]
    log_q_all = F.log_softmax(student_logits.astype(mx.float32) / t, axis=-1)
    idx = teacher_indices.astype(mx.int32)
    log_q = mx.take_along_axis(log_q_all, idx, axis=-1)
    log_p = teacher_logprobs.astype(mx.float32)
    if missing == "renormalize":
        log_p = log_p - mx.logsumexp(log_p, axis=-1, keepdims=True)
        log_q = log_q - mx.logsumexp(log_q, axis=-1, keepdims=True)
    else:
        # The student's tail: its log-probabilities with the teacher's top-k knocked out.
        outside = mx.put_along_axis(log_q_all, idx, mx.array(2 * _NO_MASS, mx.float32), axis=-1)
        log_q_tail = mx.maximum(mx.logsumexp(outside, axis=-1, keepdims=True), _NO_MASS)
        log_p_tail = mx.maximum(teacher_log_tail.astype(mx.float32)[..., None], _NO_MASS)
        log_p = mx.concatenate([log_p, log_p_tail], axis=-1)
        log_q = mx.concatenate([log_q, log_q_tail], axis=-1)
    return logprob_divergence(log_p, log_q, beta) * (t * t)


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


def preference_stats(
    policy_chosen: Any,
    policy_rejected: Any,
    reference_chosen: Any,
    reference_rejected: Any,
    beta: float,
) -> dict[str, float]:
    """DPO's diagnostics, as TRL logs them, means over pairs of sequence log-probabilities:
    ``reward_chosen`` = beta * (policy - reference) of the chosen answer, ``reward_rejected``
    the same of the rejected one, ``reward_margin`` their difference (what the loss pushes up)
    and ``preference_accuracy`` the fraction of pairs whose margin is above 0 (a tie, as at the
    start where policy == reference, is not a preference)."""
    pc, pr, rc, rr = (np.asarray(x, np.float64) for x in (
        policy_chosen, policy_rejected, reference_chosen, reference_rejected
    ))  # fmt: skip
    if not len(pc):
        raise ValueError("preference_stats needs at least one pair")
    chosen, rejected = beta * (pc - rc), beta * (pr - rr)
    margin = chosen - rejected
    return {
        "reward_chosen": float(chosen.mean()),
        "reward_rejected": float(rejected.mean()),
        "reward_margin": float(margin.mean()),
        "preference_accuracy": float((margin > 0).mean()),
    }
