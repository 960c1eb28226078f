"""Losses against straightforward numpy implementations, and their defining properties."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distiller.train import losses as L


def _np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _np_kl(p_logits, q_logits, t):
    lp, lq = _np_log_softmax(p_logits / t), _np_log_softmax(q_logits / t)
    return (np.exp(lp) * (lp - lq)).sum(-1) * t * t


def _rand(shape, seed, scale=3.0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32) * scale


def test_masked_cross_entropy_matches_numpy_and_ignores_prompt_tokens():
    logits = _rand((2, 5, 11), 0)
    targets = np.random.default_rng(1).integers(0, 11, (2, 5)).astype(np.int32)
    mask = np.array([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]], np.float32)
    loss, n = L.masked_cross_entropy(mx.array(logits), mx.array(targets), mx.array(mask))
    lp = _np_log_softmax(logits)
    nll = -np.take_along_axis(lp, targets[..., None], -1)[..., 0]
    assert n.item() == 5
    assert loss.item() == pytest.approx((nll * mask).sum() / mask.sum(), rel=1e-5)
    # changing a masked (prompt) position's logits or target changes nothing
    logits2, targets2 = logits.copy(), targets.copy()
    logits2[0, 0] += 100.0
    targets2[1, 0] = (targets2[1, 0] + 1) % 11
    loss2, _ = L.masked_cross_entropy(mx.array(logits2), mx.array(targets2), mx.array(mask))
    assert loss2.item() == pytest.approx(loss.item(), rel=1e-6)


def test_all_masked_batch_is_zero_not_nan():
    loss, n = L.masked_cross_entropy(
        mx.zeros((1, 3, 4)), mx.zeros((1, 3), mx.int32), mx.zeros((1, 3))
    )
    assert loss.item() == 0.0 and n.item() == 0


@pytest.mark.parametrize("t", [1.0, 2.0, 4.0])
def test_kl_matches_numpy_with_t_squared_scaling(t):
    p, q = _rand((3, 4, 13), 2), _rand((3, 4, 13), 3)
    got = np.array(L.token_divergence(mx.array(p), mx.array(q), t, "kl"))
    np.testing.assert_allclose(got, _np_kl(p, q, t), rtol=1e-4, atol=1e-5)
    # reverse KL is KL with the roles swapped
    rev = np.array(L.token_divergence(mx.array(p), mx.array(q), t, "reverse_kl"))
    np.testing.assert_allclose(rev, _np_kl(q, p, t), rtol=1e-4, atol=1e-5)


def test_t_squared_scaling_explicitly():
    p, q = _rand((1, 2, 7), 4), _rand((1, 2, 7), 5)
    unscaled = _np_kl(p, q, 3.0) / 9.0  # plain KL of the softened distributions
    got = np.array(L.token_divergence(mx.array(p), mx.array(q), 3.0, "kl"))
    np.testing.assert_allclose(got, 9.0 * unscaled, rtol=1e-4)


logit_arrays = st.integers(0, 10_000).map(lambda s: (_rand((2, 3, 9), s), _rand((2, 3, 9), s + 1)))


@settings(max_examples=40, deadline=None)
@given(pq=logit_arrays, t=st.floats(0.5, 5.0), div=st.sampled_from(L.DIVERGENCES))
def test_divergences_nonnegative_and_zero_iff_equal(pq, t, div):
    p, q = pq
    d = np.array(L.token_divergence(mx.array(p), mx.array(q), t, div))
    assert (d >= -1e-5).all()
    same = np.array(L.token_divergence(mx.array(p), mx.array(p), t, div))
    np.testing.assert_allclose(same, 0.0, atol=1e-5)
    # distinct distributions -> strictly positive
    assert (d > 1e-7).all()


@settings(max_examples=40, deadline=None)
@given(pq=logit_arrays)
def test_jsd_symmetric_and_bounded_by_ln2(pq):
    p, q = pq
    a = np.array(L.token_divergence(mx.array(p), mx.array(q), 1.0, "jsd"))
    b = np.array(L.token_divergence(mx.array(q), mx.array(p), 1.0, "jsd"))
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert (a <= math.log(2) + 1e-5).all()
    # near-disjoint distributions approach ln 2
    far_p = np.full((1, 1, 4), -50.0, np.float32)
    far_q = far_p.copy()
    far_p[..., 0], far_q[..., 1] = 50.0, 50.0
    j = L.token_divergence(mx.array(far_p), mx.array(far_q), 1.0, "jsd").item()
    assert j == pytest.approx(math.log(2), rel=1e-4)


def test_masked_divergence_ignores_masked_tokens():
    p, q = _rand((1, 4, 6), 7), _rand((1, 4, 6), 8)
    mask = mx.array([[0.0, 1.0, 1.0, 0.0]])
    full = np.array(L.token_divergence(mx.array(p), mx.array(q), 2.0, "kl"))[0]
    got = L.masked_divergence(mx.array(p), mx.array(q), mask, 2.0, "kl").item()
    assert got == pytest.approx(full[1:3].mean(), rel=1e-5)


def test_hidden_mse_and_combined_loss():
    hs = [mx.array(_rand((1, 3, 4), 9)), mx.array(_rand((1, 3, 4), 10))]
    ht = [mx.array(_rand((1, 3, 4), 11)), mx.array(_rand((1, 3, 4), 12))]
    mask = mx.array([[1.0, 1.0, 0.0]])
    want = np.mean(
        [
            ((np.array(a) - np.array(b)) ** 2).mean(-1)[0, :2].mean()
            for a, b in zip(hs, ht, strict=True)
        ]
    )
    assert L.hidden_mse(hs, ht, mask).item() == pytest.approx(want, rel=1e-5)

    s, t = mx.array(_rand((1, 3, 8), 13)), mx.array(_rand((1, 3, 8), 14))
    y = mx.array([[1, 2, 3]])
    total, _ = L.logit_kd_loss(
        s,
        t,
        y,
        mask,
        alpha=0.3,
        beta=0.5,
        gamma=2.0,
        temperature=2.0,
        student_hidden=hs,
        teacher_hidden=ht,
    )
    ce, _ = L.masked_cross_entropy(s, y, mask)
    kd = L.masked_divergence(t, s, mask, 2.0, "kl")
    assert total.item() == pytest.approx(0.3 * ce.item() + 0.5 * kd.item() + 2.0 * want, rel=1e-5)


def test_dpo_loss_matches_formula_and_prefers_chosen():
    pc, pr = mx.array([-5.0, -3.0]), mx.array([-6.0, -2.0])
    rc, rr = mx.array([-5.5, -3.0]), mx.array([-5.5, -3.0])
    loss, margin = L.dpo_loss(pc, pr, rc, rr, beta=0.5)
    m = np.array([(-5 + 5.5) - (-6 + 5.5), (-3 + 3) - (-2 + 3)])
    want = np.mean(np.log1p(np.exp(-0.5 * m)))
    assert loss.item() == pytest.approx(want, rel=1e-5)
    assert margin.item() == pytest.approx(0.5 * m.mean(), rel=1e-5)
    # at the reference point the loss is ln 2
    l0, _ = L.dpo_loss(rc, rr, rc, rr, beta=0.1)
    assert l0.item() == pytest.approx(math.log(2), rel=1e-6)


def test_sequence_logprobs_sum_over_supervised_tokens():
    logits = _rand((2, 3, 5), 15)
    y = np.array([[1, 2, 3], [0, 4, 1]], np.int32)
    mask = np.array([[0, 1, 1], [1, 1, 0]], np.float32)
    got = np.array(L.sequence_logprobs(mx.array(logits), mx.array(y), mx.array(mask)))
    lp = np.take_along_axis(_np_log_softmax(logits), y[..., None], -1)[..., 0]
    np.testing.assert_allclose(got, (lp * mask).sum(-1), rtol=1e-5)
