"""Per-route loss functions: sft / seq-kd (masked CE), logit-kd (live or cached teacher), dpo,
gkd.

Each is ``loss_fn(model, batch) -> (loss, n_tokens)``. Logits are computed only at the
supervised positions ``batch["sel"]`` (see ``batches.select``).
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from distiller.spec import KDSpec
from distiller.train import losses as L
from distiller.train import students as S


def selected_logits(
    model: nn.Module, batch: dict[str, mx.array], hidden: mx.array | None = None
) -> mx.array:
    """Logits (N, V) at the supervised positions ``batch["sel"]`` only.

    For llama-style models the head runs on the gathered hidden states, which skips the
    vocabulary projection + softmax for prompt and padding tokens (most of a short-answer
    batch). ``hidden``: the backbone output, when the caller already has it.
    """
    parts = S.split_model(model)
    if parts is None:
        logits = model(batch["inputs"])
        return logits.reshape(-1, logits.shape[-1])[batch["sel"]]
    backbone, head = parts
    h = backbone(batch["inputs"]) if hidden is None else hidden
    return head(h.reshape(-1, h.shape[-1])[batch["sel"]])


def selected_targets(batch: dict[str, mx.array]) -> mx.array:
    return batch["targets"].reshape(-1)[batch["sel"]]


def sft_loss(model: nn.Module, batch: dict[str, mx.array]) -> tuple[mx.array, mx.array]:
    """Masked next-token cross-entropy on the assistant tokens (sft and seq-kd)."""
    logits = selected_logits(model, batch)
    return L.masked_cross_entropy(logits, selected_targets(batch), batch["sel_mask"])


def make_kd_loss(teacher: nn.Module, kd: KDSpec, layer_map: dict[int, int]) -> Callable:
    """The logit-kd loss (``student.kd``); ``layer_map`` pairs student blocks with teacher
    blocks for the hidden-state term (empty: no hidden-state term)."""
    s_ids = sorted(layer_map)
    t_ids = [layer_map[i] for i in s_ids]
    use_hidden = bool(kd.gamma) and bool(s_ids)

    def kd_loss(model, batch):
        if use_hidden:
            hs, s_hidden = S.forward_with_hidden(model, batch["inputs"], s_ids)
            ht, t_hidden = S.forward_with_hidden(teacher, batch["inputs"], t_ids)
            s_logits = selected_logits(model, batch, hs)
            t_logits = selected_logits(teacher, batch, ht)
            t_hidden = [mx.stop_gradient(h) for h in t_hidden]
        else:
            s_logits, s_hidden = selected_logits(model, batch), []
            t_logits, t_hidden = selected_logits(teacher, batch), []
        return L.logit_kd_loss(
            s_logits,
            mx.stop_gradient(t_logits),
            selected_targets(batch),
            batch["sel_mask"],
            alpha=kd.alpha,
            beta=kd.beta,
            gamma=kd.gamma if use_hidden else 0.0,
            temperature=kd.temperature,
            divergence=kd.divergence,
            student_hidden=s_hidden,
            teacher_hidden=t_hidden,
            hidden_mask=batch["mask"],
        )

    return kd_loss


def make_cached_kd_loss(kd: KDSpec) -> Callable:
    """The logit-kd loss against cached teacher top-k entries (``logit_cache.attach`` puts
    them in the batch as ``t_indices`` / ``t_logprobs`` / ``t_log_tail``): no teacher forward."""
    cache = kd.cache
    assert cache is not None

    def cached_kd_loss(model, batch):
        s_logits = selected_logits(model, batch)
        mask = batch["sel_mask"]
        ce, ntoks = L.masked_cross_entropy(s_logits, selected_targets(batch), mask)
        loss = kd.alpha * ce
        if kd.beta:
            d = L.topk_divergence(
                s_logits,
                batch["t_indices"],
                batch["t_logprobs"],
                batch["t_log_tail"],
                temperature=kd.temperature,
                divergence=kd.divergence,
                missing=cache.missing,
            )
            loss = loss + kd.beta * (d * mask).sum() / mx.maximum(ntoks, 1)
        return loss, ntoks

    return cached_kd_loss


def make_gkd_loss(teacher: nn.Module, kd: KDSpec) -> Callable:
    """The gkd loss: generalized JSD(``kd.jsd_beta``) at ``kd.temperature`` between teacher and
    student at every answer token, whoever wrote the answer (the data or the student)."""

    def gkd_loss(model, batch):
        s_logits = selected_logits(model, batch)
        t_logits = mx.stop_gradient(selected_logits(teacher, batch))
        d = L.generalized_jsd(t_logits, s_logits, kd.jsd_beta, kd.temperature)
        mask = batch["sel_mask"]
        ntoks = mask.sum()
        return (d * mask).sum() / mx.maximum(ntoks, 1), ntoks

    return gkd_loss


def pair_logprobs(model: nn.Module, batch: dict[str, mx.array]) -> mx.array:
    """Summed answer log-probabilities per sequence (2B,): chosen rows, then rejected rows."""
    logp = L.token_logprobs(selected_logits(model, batch), selected_targets(batch))
    return batch["sel_rows"] @ (logp * batch["sel_mask"])


def preference_stats(
    model: nn.Module, batches: list[dict[str, mx.array]], beta: float
) -> dict[str, float]:
    """``losses.preference_stats`` of the model on pair batches (with ``ref_chosen`` and
    ``ref_rejected``): mean rewards, reward margin and preference accuracy over their pairs."""
    parts: list[list[np.ndarray]] = [[], [], [], []]
    for b in batches:
        lp = np.array(pair_logprobs(model, b))
        n = lp.shape[0] // 2
        for part, x in zip(
            parts, (lp[:n], lp[n:], b["ref_chosen"], b["ref_rejected"]), strict=True
        ):
            part.append(np.asarray(x))
    return L.preference_stats(*(np.concatenate(p) for p in parts), beta)


def make_dpo_loss(beta: float) -> Callable:
    def dpo(model, batch):
        lp = pair_logprobs(model, batch)
        n = lp.shape[0] // 2
        loss, _ = L.dpo_loss(lp[:n], lp[n:], batch["ref_chosen"], batch["ref_rejected"], beta)
        return loss, mx.array(n, mx.float32)  # a mean over pairs

    return dpo
