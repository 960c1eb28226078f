"""distiller.fast_ops agrees with the stock MLX ops it replaces, values and gradients."""

from __future__ import annotations

import distiller  # noqa: F401  (must precede mlx: it loads the fast BLAS)

# isort: split
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from mlx_lm.models.base import scaled_dot_product_attention as stock_sdpa

from distiller import fast_ops as F

pytestmark = pytest.mark.skipif(not F.enabled(), reason="the fast path is for the CPU backend")

finite = st.floats(-80, 80, allow_nan=False, width=32)


@settings(max_examples=60, deadline=None)
@given(arrays(np.float32, st.integers(1, 300), elements=finite))
def test_exp_matches_mx_exp(x):
    got, want = np.array(F.exp(mx.array(x))), np.array(mx.exp(mx.array(x)))
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=0)


@settings(max_examples=60, deadline=None)
@given(
    # width >= 2: mlx 0.32's own nn.log_softmax segfaults on a size-1 axis on CPU
    arrays(np.float32, st.tuples(st.integers(1, 5), st.integers(2, 40)), elements=finite),
    st.booleans(),
)
def test_logsumexp_softmax_log_softmax_match(x, mask_first):
    if mask_first:
        x[:, 0] = -np.inf  # a masked position, as causal / padding masks make
    a = mx.array(x)
    np.testing.assert_allclose(
        np.array(F.logsumexp(a)), np.array(mx.logsumexp(a, axis=-1)), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(
        np.array(F.softmax(a)), np.array(mx.softmax(a, axis=-1, precise=True)), atol=1e-6
    )
    np.testing.assert_allclose(
        np.array(F.log_softmax(a)), np.array(nn.log_softmax(a)), rtol=1e-5, atol=1e-5
    )


def test_logsumexp_of_an_all_masked_row_is_minus_inf_not_nan():
    out = F.logsumexp(mx.array([[-np.inf, -np.inf], [0.0, 0.0]], mx.float32))
    assert out[0].item() == -np.inf
    assert out[1].item() == pytest.approx(np.log(2.0))


def test_cross_entropy_and_its_gradient_match_nn_losses():
    rng = np.random.default_rng(0)
    logits = mx.array(rng.normal(0, 3, (6, 50)).astype(np.float32))
    targets = mx.array(rng.integers(0, 50, 6).astype(np.int32))
    np.testing.assert_allclose(
        np.array(F.cross_entropy(logits, targets)),
        np.array(nn.losses.cross_entropy(logits, targets)),
        rtol=1e-5,
    )
    g_fast = mx.grad(lambda z: F.cross_entropy(z, targets).sum())(logits)
    g_stock = mx.grad(lambda z: nn.losses.cross_entropy(z, targets).sum())(logits)
    np.testing.assert_allclose(np.array(g_fast), np.array(g_stock), atol=1e-6)


def test_swiglu_and_its_gradient_match_silu():
    rng = np.random.default_rng(1)
    g, x = (mx.array(rng.normal(0, 4, (3, 7, 33)).astype(np.float32)) for _ in range(2))
    np.testing.assert_allclose(
        np.array(F.swiglu(g, x)), np.array(nn.silu(g) * x), rtol=1e-5, atol=1e-6
    )
    d_fast = mx.grad(lambda a: F.swiglu(a, x).sum())(g)
    d_stock = mx.grad(lambda a: (nn.silu(a) * x).sum())(g)
    np.testing.assert_allclose(np.array(d_fast), np.array(d_stock), rtol=1e-4, atol=1e-5)


def test_swiglu_gradient_is_finite_where_the_power_overflows():
    gate = mx.array([-200.0, -90.0, 0.0, 90.0, 200.0])
    x = mx.ones(5)
    d_gate, d_x = mx.grad(lambda a, b: F.swiglu(a, b).sum(), argnums=(0, 1))(gate, x)
    d_stock = mx.grad(lambda a: (nn.silu(a) * x).sum())(gate)
    assert np.isfinite(np.array(d_gate)).all() and np.isfinite(np.array(d_x)).all()
    np.testing.assert_allclose(np.array(d_gate), np.array(d_stock), atol=1e-6)


def _qkv(rng, batch, heads, kv_heads, q_len, k_len, dim=8):
    def make(h, n):
        return mx.array(rng.normal(0, 1, (batch, h, n, dim)).astype(np.float32))

    return make(heads, q_len), make(kv_heads, k_len), make(kv_heads, k_len)


def _masks(rng, batch, heads, q_len, k_len):
    """The mask layouts mlx-lm hands to attention: none, "causal", (L, S) additive,
    (B, 1, L, S) boolean (left-padded batches), (B, H, L, S) boolean."""
    yield None
    yield "causal"
    yield mx.array(np.triu(np.full((q_len, k_len), -1e9, np.float32), k_len - q_len + 1))
    pad = rng.integers(0, k_len, batch)
    keep = np.arange(k_len)[None, :] >= pad[:, None]
    causal = np.tril(np.ones((q_len, k_len), bool), k_len - q_len)
    yield mx.array(keep[:, None, None, :] & causal[None, None])
    yield mx.array(np.broadcast_to(keep[:, None, None, :] & causal, (batch, heads, q_len, k_len)))


@pytest.mark.parametrize("heads,kv_heads", [(6, 2), (4, 4), (3, 1)])
@pytest.mark.parametrize("q_len,k_len", [(5, 5), (1, 9), (3, 7)])
def test_attention_matches_stock_sdpa(heads, kv_heads, q_len, k_len):
    rng = np.random.default_rng(heads * 100 + q_len * 10 + k_len)
    q, k, v = _qkv(rng, 2, heads, kv_heads, q_len, k_len)
    for mask in _masks(rng, 2, heads, q_len, k_len):
        got = F.attention(q, k, v, None, scale=0.3, mask=mask)
        want = stock_sdpa(q, k, v, None, scale=0.3, mask=mask)
        np.testing.assert_allclose(np.array(got), np.array(want), atol=2e-5, err_msg=str(mask))


def test_attention_gradients_match_stock_sdpa():
    rng = np.random.default_rng(7)
    q, k, v = _qkv(rng, 2, 6, 2, 5, 5)

    def loss(fn):
        return lambda q, k, v: (fn(q, k, v, None, scale=0.3, mask="causal") ** 2).sum()

    got = mx.grad(loss(F.attention), argnums=(0, 1, 2))(q, k, v)
    want = mx.grad(loss(stock_sdpa), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(np.array(g), np.array(w), atol=1e-4)


def test_patched_model_gives_the_stock_logits(tiny_model_dir, monkeypatch):
    from distiller.models import load_model

    model, tok = load_model(str(tiny_model_dir))
    module = __import__(type(model).__module__, fromlist=["x"])
    assert module.scaled_dot_product_attention is F.attention
    assert module.swiglu is F.swiglu
    ids = mx.array([tok.encode("The quick brown fox jumps over the lazy dog.")])
    fast = model(ids)
    monkeypatch.setenv("DISTILLER_FAST_OPS", "0")  # the patched names fall back to stock ops
    assert not F.enabled()
    stock = model(ids)
    np.testing.assert_allclose(np.array(fast), np.array(stock), atol=1e-4)
    assert (np.array(fast).argmax(-1) == np.array(stock).argmax(-1)).all()
