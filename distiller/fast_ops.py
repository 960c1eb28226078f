"""exp-based ops (softmax, logsumexp, SiLU, attention) that are fast on MLX's CPU backend.

With the PyPI ``mlx[cpu]`` wheel on x86-64, ``mx.exp`` takes a scalar path while
``mx.power(2, x)`` is vectorized and agrees with it to about one ulp. A small model's step is
full of exponentials: SiLU over every MLP activation, the attention softmax, the vocabulary
softmax of the loss. So ``exp(x)`` is computed there as ``2 ** (x * log2(e))`` (the README has
the measured effect; ``scripts/bench_train.py`` re-measures it).

On Metal and CUDA the stock ops (and the fused attention kernel) are the fast ones, so every
function here falls back to them. ``DISTILLER_FAST_OPS=0`` turns the CPU path off, to compare.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import scaled_dot_product_attention as stock

LOG2E = 1.0 / math.log(2.0)
_NEG = -1e30  # an additive "minus infinity" that keeps fully masked rows finite


def enabled() -> bool:
    """True when the CPU-fast path is in use: MLX runs on the CPU and it is not switched off."""
    return (
        mx.default_device().type == mx.DeviceType.cpu
        and os.environ.get("DISTILLER_FAST_OPS", "1") != "0"
    )


def exp(x: mx.array) -> mx.array:
    if not enabled():
        return mx.exp(x)
    return mx.power(2.0, x * LOG2E)


def logsumexp(x: mx.array, axis: int = -1, keepdims: bool = False) -> mx.array:
    if not enabled():
        return mx.logsumexp(x, axis=axis, keepdims=keepdims)
    m = mx.stop_gradient(x.max(axis=axis, keepdims=True))
    m = mx.where(mx.isinf(m), 0.0, m)  # an all -inf row gives -inf, not nan
    out = mx.log(exp(x - m).sum(axis=axis, keepdims=True)) + m
    return out if keepdims else out.squeeze(axis)


def log_softmax(x: mx.array, axis: int = -1) -> mx.array:
    return x - logsumexp(x, axis=axis, keepdims=True)


def softmax(x: mx.array, axis: int = -1) -> mx.array:
    if not enabled():
        return mx.softmax(x, axis=axis, precise=True)
    m = mx.stop_gradient(x.max(axis=axis, keepdims=True))
    e = exp(x - m)
    return e * mx.reciprocal(e.sum(axis=axis, keepdims=True))


def cross_entropy(logits: mx.array, targets: mx.array) -> mx.array:
    """Per-position ``-log softmax(logits)[target]`` (what ``nn.losses.cross_entropy`` gives)."""
    picked = mx.take_along_axis(logits, targets[..., None], axis=-1).squeeze(-1)
    return logsumexp(logits, axis=-1) - picked


def _sigmoid(x: mx.array) -> mx.array:
    # 1 / (1 + 2**(-x log2 e)): the power overflows to inf for x < -88 and the result is
    # then exactly 0, as it should be; only the derivative needs care (below).
    return mx.reciprocal(1.0 + mx.power(2.0, x * -LOG2E))


@mx.custom_function
def _swiglu_cpu(gate: mx.array, x: mx.array) -> mx.array:
    return gate * _sigmoid(gate) * x


@_swiglu_cpu.vjp
def _swiglu_cpu_vjp(primals, cotangent, output):
    # Written in terms of the sigmoid s: autodiff through 1/(1 + inf) would give 0 * inf = nan.
    gate, x = primals
    s = _sigmoid(gate)
    silu = gate * s
    return cotangent * x * (s + silu * (1.0 - s)), cotangent * silu


def swiglu(gate: mx.array, x: mx.array) -> mx.array:
    """``silu(gate) * x``, the gated MLP of llama-family models."""
    if not enabled():
        return nn.silu(gate) * x
    return _swiglu_cpu(gate, x)


def _grouped_mask(mask: mx.array, kv_heads: int, rep: int) -> mx.array | None:
    """``mask`` reshaped to broadcast over scores laid out (B, kv_heads, rep, L, S), or None
    when its layout is not one we know (the caller then uses the stock kernel)."""
    if mask.ndim == 2:
        return mask
    if mask.ndim == 4 and mask.shape[1] == 1:
        return mask.reshape(mask.shape[0], 1, 1, *mask.shape[-2:])
    if mask.ndim == 4 and mask.shape[1] == kv_heads * rep:
        return mask.reshape(mask.shape[0], kv_heads, rep, *mask.shape[-2:])
    return None


def attention(
    queries: mx.array,
    keys: mx.array,
    values: mx.array,
    cache: Any,
    scale: float,
    mask: Any,
    sinks: mx.array | None = None,
) -> mx.array:
    """Drop-in for ``mlx_lm.models.base.scaled_dot_product_attention``.

    Grouped-query heads are folded into the query rows, (B, H, L, D) -> (B, H_kv, H/H_kv * L,
    D), so each key/value head is read once by one matmul instead of being repeated per query
    head; the softmax uses the fast ``exp``. Anything unusual (attention sinks, a quantized
    cache, an unknown mask layout, a non-CPU device) goes to the stock implementation.
    """
    attend = getattr(cache, "attend", None)
    if attend is not None:  # a shared-prefix cache computes its two-part attention itself
        return attend(queries, keys, values, scale, mask)
    B, H, L, D = queries.shape
    kv_heads, S = keys.shape[1], keys.shape[2]
    if not enabled() or sinks is not None or hasattr(cache, "bits") or H % kv_heads:
        return stock(queries, keys, values, cache, scale=scale, mask=mask, sinks=sinks)
    rep = H // kv_heads
    if isinstance(mask, str):
        if mask != "causal":
            return stock(queries, keys, values, cache, scale=scale, mask=mask, sinks=sinks)
        # queries are the last L positions of the S keys
        grouped = mx.arange(S - L, S)[:, None] >= mx.arange(S)[None]
    elif mask is not None:
        grouped = _grouped_mask(mask, kv_heads, rep)
        if grouped is None:
            return stock(queries, keys, values, cache, scale=scale, mask=mask, sinks=sinks)
    else:
        grouped = None
    q = (queries * scale).reshape(B, kv_heads, rep * L, D)
    scores = (q @ keys.swapaxes(-1, -2)).reshape(B, kv_heads, rep, L, S)
    if grouped is not None:
        if grouped.dtype == mx.bool_:
            scores = mx.where(grouped, scores, mx.array(_NEG, scores.dtype))
        else:
            scores = scores + grouped
    probs = softmax(scores, axis=-1).reshape(B, kv_heads, rep * L, S)
    return (probs @ values).reshape(B, H, L, D)


_PATCHES = {"swiglu": swiglu, "scaled_dot_product_attention": attention}


def patch_model(model: nn.Module) -> bool:
    """Point the model's module (an ``mlx_lm.models.*`` file) at the ops above.

    mlx-lm model files call module-level ``swiglu`` / ``scaled_dot_product_attention``; we swap
    those names, which every model of that architecture shares. The replacements check the
    device on each call, so a patched module stays correct on any device. Returns whether
    anything was swapped (False for architectures that use neither name).
    """
    module = sys.modules.get(type(model).__module__)
    if module is None or os.environ.get("DISTILLER_FAST_OPS", "1") == "0":
        return False
    swapped = False
    for name, replacement in _PATCHES.items():
        current = getattr(module, name, None)
        if current is not None and current is not replacement:
            setattr(module, name, replacement)
            swapped = True
    return swapped or is_patched(model)


def is_patched(model: nn.Module, name: str | None = None) -> bool:
    """Whether the model's module calls our op ``name`` (any of them when None)."""
    module = sys.modules.get(type(model).__module__)
    names = [name] if name is not None else list(_PATCHES)
    return module is not None and any(getattr(module, n, None) is _PATCHES[n] for n in names)
