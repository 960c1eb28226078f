"""A compiled single-token decode step for llama-family models on MLX's CPU backend.

A decode step of SmolLM2-135M is ~4,700 MLX ops (30 layers of norms, RoPE, reshapes, scalar
broadcasts, the fast SiLU and softmax; ``scripts/profile_decode.py`` counts them), and on the
CPU each op is dispatched on its own: per-op overhead, not reading the weights, is much of a
step. The attention-free parts of a layer have fixed shapes at one token, so they compile:
``mx.compile`` fuses their elementwise work into a few kernels. Each compiled piece runs from one
layer's attention output to the next layer's queries/keys/values (the o-projection, residuals,
MLP, the next input norm, q/k/v projections and RoPE, with the position passed as an array so
the trace does not change with it). Only the KV-cache update and the attention itself, whose
shapes grow with the sequence, stay uncompiled.

``compiled_decoder(model)`` wraps a model: calls with one token of one sequence take the
compiled path, anything else (prefill, batches, an unsupported cache or architecture) the model
itself, so the wrapper can stand in for the model everywhere (``mlx_lm.stream_generate``
included). Its logits are the model's (tested: greedy tokens identical).
``DISTILLER_COMPILE_DECODE=0`` turns it off, to compare.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from distiller import fast_ops

# mlx_lm model files whose blocks are llama's: input_layernorm -> self_attn(q/k/v/o_proj, rope)
# -> residual -> post_attention_layernorm -> mlp -> residual, and whose model is embed_tokens ->
# layers -> norm -> tied or separate head.
_ARCHITECTURES = ("mlx_lm.models.llama",)


def enabled() -> bool:
    return fast_ops.enabled() and os.environ.get("DISTILLER_COMPILE_DECODE", "1") != "0"


def supported(model: Any) -> bool:
    """Whether ``model`` has the structure the compiled step assumes."""
    if type(model).__module__ not in _ARCHITECTURES:
        return False
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not layers or getattr(inner, "swa_idx", None) is not None:
        return False
    for layer in layers:
        attn = getattr(layer, "self_attn", None)
        if attn is None or not all(
            isinstance(getattr(attn, n, None), nn.Linear)  # not quantized, not LoRA
            for n in ("q_proj", "k_proj", "v_proj", "o_proj")
        ):
            return False
    tables = [_rope_table(layer.self_attn.rope) for layer in layers]
    first = tables[0]
    return first is not None and all(t is not None and mx.array_equal(t, first) for t in tables)


def _rope_table(rope: Any) -> mx.array | None:
    """The inverse frequencies of a plain ``nn.RoPE`` (computed as MLX's CPU RoPE computes them,
    so rotations match it exactly), or None for a RoPE this module does not rebuild."""
    if type(rope) is not nn.RoPE or rope.traditional or rope.scale != 1.0 or rope.dims % 2:
        return None
    half = rope.dims // 2
    return mx.exp(-mx.arange(0.0, half) * (math.log(rope.base) / half))


def _rotate(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """RoPE (the non-traditional, half-split layout) with the position's cos/sin given."""
    half = cos.shape[-1]
    x1, x2, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
    return mx.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos, rest], axis=-1)


def _qkv(layer: Any, h: mx.array, cos: mx.array, sin: mx.array) -> tuple[mx.array, ...]:
    """The layer's queries, keys and values (B=1, L=1: so (1, heads * d) reshapes straight to
    (1, heads, 1, d) with no transpose) of the hidden state ``h`` of shape (1, hidden)."""
    attn = layer.self_attn
    x = layer.input_layernorm(h)
    q = attn.q_proj(x).reshape(1, attn.n_heads, 1, -1)
    k = attn.k_proj(x).reshape(1, attn.n_kv_heads, 1, -1)
    v = attn.v_proj(x).reshape(1, attn.n_kv_heads, 1, -1)
    return _rotate(q, cos, sin), _rotate(k, cos, sin), v


def _finish(layer: Any, h: mx.array, attended: mx.array) -> mx.array:
    """The rest of ``layer`` after attention: o-projection, residual, MLP, residual."""
    h = h + layer.self_attn.o_proj(attended.reshape(1, -1))
    return h + layer.mlp(layer.post_attention_layernorm(h))


class CompiledDecoder:
    """``model`` with a compiled path for one token of one sequence (see the module doc)."""

    def __init__(self, model: Any):
        self.model = model
        # The attention the model's own file calls (distiller.fast_ops' when patched), so both
        # paths compute the same thing.
        self._attend = sys.modules[type(model).__module__].scaled_dot_product_attention
        inner = model.model
        layers = inner.layers
        self._layers = layers

        self._inv_freq = _rope_table(layers[0].self_attn.rope)

        def first(h, cos, sin):
            return _qkv(layers[0], h, cos, sin)

        def between(i):
            def fn(h, attended, cos, sin):
                h = _finish(layers[i], h, attended)
                return (h, *_qkv(layers[i + 1], h, cos, sin))

            return fn

        def last(h, attended):
            h = inner.norm(_finish(layers[-1], h, attended))
            if model.args.tie_word_embeddings:
                return inner.embed_tokens.as_linear(h)
            return model.lm_head(h)

        # Each piece reads its weights as implicit inputs (``inputs=``), not as constants baked
        # into the trace, so weights changed after compiling (training, LoRA fusing) are seen.
        # Only its own layers' weights: the tree is walked on every call.
        head = inner.embed_tokens if model.args.tie_word_embeddings else model.lm_head
        self._first = mx.compile(first, inputs=[layers[0].state])
        self._between = [
            mx.compile(between(i), inputs=[layers[i].state, layers[i + 1].state])
            for i in range(len(layers) - 1)
        ]
        self._last = mx.compile(last, inputs=[layers[-1].state, inner.norm.state, head.state])

    def __getattr__(self, name: str) -> Any:  # layers, make_cache, args, ...: the model's
        return getattr(self.model, name)

    def __call__(self, inputs: mx.array, cache: Any = None, **kwargs: Any) -> mx.array:
        if not self._fits(inputs, cache, kwargs):
            return self.model(inputs, cache=cache, **kwargs)
        theta = float(cache[0].offset) * self._inv_freq  # once per step, shared by every layer
        cos, sin = mx.cos(theta), mx.sin(theta)
        h = self.model.model.embed_tokens(inputs[0])
        q, k, v = self._first(h, cos, sin)
        for i, layer in enumerate(self._layers):
            attn = layer.self_attn
            keys, values = cache[i].update_and_fetch(k, v)
            attended = self._attend(q, keys, values, cache=cache[i], scale=attn.scale, mask=None)
            if i + 1 < len(self._layers):
                h, q, k, v = self._between[i](h, attended, cos, sin)
        return self._last(h, attended)[None]  # (1, 1, vocab), as the model gives

    def _fits(self, inputs: mx.array, cache: Any, kwargs: dict) -> bool:
        from mlx_lm.models.cache import KVCache

        return (
            inputs.shape == (1, 1)
            and not kwargs
            and cache is not None
            and len(cache) == len(self._layers)
            and all(type(c) is KVCache for c in cache)
            and len({c.offset for c in cache}) == 1
        )


def compiled_decoder(model: Any) -> Any:
    """``model`` wrapped with the compiled decode step where it applies, else ``model``.

    The wrapper is built once per model and kept on it (tracing costs a few hundred ms).
    """
    if isinstance(model, CompiledDecoder) or not enabled() or not supported(model):
        return model
    wrapped = model.__dict__.get("_distiller_compiled_decoder")
    if wrapped is None:
        wrapped = CompiledDecoder(model)
        object.__setattr__(model, "_distiller_compiled_decoder", wrapped)
    return wrapped
