"""KV cache and attention for a batch of prompts that share a long prefix.

A teacher's prompts all start with the same scaffold (system prompt and few-shot examples,
hundreds of tokens). Copying the prefix's KV cache into every sequence
makes each decode step read it once per sequence, as many small matmuls; on a CPU that
dominates the step. Here the prefix is stored once and attention is computed in two parts
("cascade" attention): every query of the batch against the shared prefix in one matmul per
KV head, each sequence against its own suffix, and the two merged exactly through their
softmax normalisers (the README has the measured effect).

The cache speaks mlx-lm's cache protocol (``offset``, ``make_mask``, ``update_and_fetch``);
the attention runs in ``fast_ops.attention``, which hands a call over to ``attend`` when it
gets this cache.
"""

from __future__ import annotations

import mlx.core as mx

from distiller import fast_ops

_NEG = -1e30  # finite: a fully masked query row (left padding) must not produce NaN


class SharedPrefixCache:
    """One layer's cache: the prefix's keys/values once, each sequence's suffix after it.

    Suffixes are left-padded to a common length; ``padding[i]`` pad slots lead sequence i.
    Positions (for RoPE) continue from the prefix: the first real suffix token is at
    ``prefix_length`` in every sequence.
    """

    step = 256  # suffix buffer growth, in tokens

    def __init__(self, prefix_keys: mx.array, prefix_values: mx.array, padding: list[int]):
        if prefix_keys.shape[0] != 1:
            raise ValueError("the prefix cache must hold one sequence")
        self.prefix_keys = prefix_keys[0]  # (kv_heads, P, D)
        self.prefix_values = prefix_values[0]
        self.prefix_length = prefix_keys.shape[2]
        self.padding = mx.array(padding, dtype=mx.int32)
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.length = 0  # suffix slots filled (padding included)

    @property
    def offset(self) -> mx.array:
        """Position of the next token of each sequence."""
        return self.prefix_length - self.padding + self.length

    def make_mask(self, n: int, return_array: bool = False, window_size: int | None = None):
        """(B, 1, n, length + n) bool: causal over the suffix, pad slots hidden.

        The prefix needs no mask: every suffix token may see all of it.
        """
        if window_size is not None:
            raise ValueError("sliding-window attention is not supported with a shared prefix")
        total = self.length + n
        keys = mx.arange(total)
        queries = mx.arange(self.length, total)
        causal = keys[None, :] <= queries[:, None]  # (n, total)
        real = keys[None, :] >= self.padding[:, None]  # (B, total)
        return (causal[None] & real[:, None])[:, None]

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        batch, heads, n, dim = keys.shape
        end = self.length + n
        if self.keys is None or end > self.keys.shape[2]:
            grow = -(-n // self.step) * self.step
            fresh_k = mx.zeros((batch, heads, grow, dim), keys.dtype)
            fresh_v = mx.zeros((batch, heads, grow, values.shape[3]), values.dtype)
            if self.keys is None:
                self.keys, self.values = fresh_k, fresh_v
            else:
                self.keys = mx.concatenate([self.keys[..., : self.length, :], fresh_k], axis=2)
                self.values = mx.concatenate([self.values[..., : self.length, :], fresh_v], axis=2)
        self.keys[..., self.length : end, :] = keys
        self.values[..., self.length : end, :] = values
        self.length = end
        return self.keys[..., :end, :], self.values[..., :end, :]

    def filter(self, keep: list[int]) -> None:
        """Keep only these sequences (by position in the batch), e.g. after others finished."""
        index = mx.array(keep, dtype=mx.int32)
        self.padding = self.padding[index]
        if self.keys is not None:
            self.keys, self.values = self.keys[index], self.values[index]

    def attend(
        self, queries: mx.array, keys: mx.array, values: mx.array, scale: float, mask: mx.array
    ) -> mx.array:
        """softmax([q·prefix, q·suffix]) · [prefix values, suffix values], in two parts."""
        batch, heads, n, dim = queries.shape
        kv_heads = self.prefix_keys.shape[0]
        rows = heads // kv_heads * n  # query rows per KV head and sequence
        q = (queries * scale).reshape(batch, kv_heads, rows, dim)

        # The whole batch against the prefix: one (B*rows x D) @ (D x P) matmul per KV head.
        qp = q.transpose(1, 0, 2, 3).reshape(kv_heads, batch * rows, dim)
        sp = qp @ self.prefix_keys.swapaxes(-1, -2)
        mp = sp.max(axis=-1, keepdims=True)
        ep = fast_ops.exp(sp - mp)
        lp, op = ep.sum(axis=-1, keepdims=True), ep @ self.prefix_values

        def per_sequence(x: mx.array) -> mx.array:  # (KV, B*rows, k) -> (B, KV, rows, k)
            return x.reshape(kv_heads, batch, rows, -1).transpose(1, 0, 2, 3)

        mp, lp, op = per_sequence(mp), per_sequence(lp), per_sequence(op)

        # Each sequence against its own suffix.
        ss = (q @ keys.swapaxes(-1, -2)).reshape(batch, kv_heads, rows // n, n, -1)
        ss = mx.where(mask[:, :, None], ss, mx.array(_NEG, ss.dtype))
        ss = ss.reshape(batch, kv_heads, rows, -1)
        ms = ss.max(axis=-1, keepdims=True)
        es = fast_ops.exp(ss - ms)
        ls, os_ = es.sum(axis=-1, keepdims=True), es @ values

        # Merge the two partial softmaxes on a common scale.
        m = mx.maximum(mp, ms)
        wp, ws = fast_ops.exp(mp - m), fast_ops.exp(ms - m)
        out = (op * wp + os_ * ws) / (lp * wp + ls * ws)
        return out.reshape(batch, heads, n, dim).astype(queries.dtype)


def prefix_caches(prefix_cache: list, padding: list[int]) -> list[SharedPrefixCache]:
    """One ``SharedPrefixCache`` per layer from a prefilled single-sequence mlx-lm cache."""
    return [
        SharedPrefixCache(c.keys[..., : c.offset, :], c.values[..., : c.offset, :], padding)
        for c in prefix_cache
    ]


def supported(model) -> bool:
    """Whether ``model``'s attention goes through ``fast_ops.attention`` (which knows this
    cache) and its cache layers are plain KV caches."""
    from mlx_lm.models.cache import KVCache, make_prompt_cache

    return fast_ops.is_patched(model, "scaled_dot_product_attention") and all(
        type(c) is KVCache for c in make_prompt_cache(model)
    )
