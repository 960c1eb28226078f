"""distiller.sampling: the candidate nucleus is the nucleus, and draws follow its distribution."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import distiller  # noqa: F401  (optimized BLAS before mlx.core)
from distiller import sampling
from distiller.sampling import KeyedSampler, nucleus_candidates, sample_rows


def _kept(logits: np.ndarray, top_p: float, candidates: int) -> tuple[set[int], bool]:
    _, ids, in_nucleus, complete = nucleus_candidates(mx.array(logits[None]), top_p, candidates)
    kept = {int(i) for i, k in zip(np.array(ids[0]), np.array(in_nucleus[0]), strict=True) if k}
    return kept, bool(complete[0].item())


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(-8, 8), min_size=2, max_size=40),
    st.floats(0.05, 0.99),
    st.integers(1, 40),
)
def test_nucleus_is_the_smallest_top_set_reaching_top_p(raw, top_p, candidates):
    # Integer logits make ties common: tokens tied at the cut are all kept.
    logits = np.array(raw, dtype=np.float32)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    kept, complete = _kept(logits, top_p, len(raw))
    assert complete
    cut = min(logits[i] for i in kept)
    assert kept == {i for i, v in enumerate(logits) if v >= cut}  # a top set, ties included
    assert probs[logits >= cut].sum() >= top_p - 1e-5  # reaches top_p ...
    assert probs[logits > cut].sum() < top_p + 1e-5  # ... and the cut token was needed
    partial, partial_complete = _kept(logits, top_p, candidates)
    if partial_complete:  # fewer candidates find the same nucleus, or say they could not
        assert partial == kept
    else:  # ... which happens only when the nucleus (ties included) fills them all
        assert len(kept) >= candidates


def test_nucleus_equals_mlx_lm_top_p_on_continuous_logits():
    from mlx_lm.sample_utils import apply_top_p

    rng = np.random.default_rng(0)
    for scale in (1.0, 3.0, 6.0):
        logits = mx.array(rng.normal(size=(8, 5000)).astype(np.float32) * scale)
        reference = np.isfinite(np.array(apply_top_p(logits - mx.logsumexp(logits, -1, True), 0.9)))
        for candidates in (64, 5000):
            _, ids, in_nucleus, complete = nucleus_candidates(logits, 0.9, candidates)
            for row in range(8):
                if not complete[row].item():
                    continue
                ours = {
                    int(i)
                    for i, k in zip(np.array(ids[row]), np.array(in_nucleus[row]), strict=True)
                    if k
                }
                assert ours == set(np.flatnonzero(reference[row]).tolist())


def test_draws_follow_the_tempered_nucleus(monkeypatch):
    # Few candidates, so that the second tier and the full-vocabulary path are taken too.
    monkeypatch.setattr(sampling, "NUCLEUS_CANDIDATES", (2, 4))
    rng = np.random.default_rng(1)
    logits = rng.normal(size=16).astype(np.float32) * 2
    top_p, temperature, n = 0.8, 0.7, 6000
    order = np.argsort(-logits)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    kept = order[: int(np.searchsorted(np.cumsum(probs[order]), top_p) + 1)]
    expected = np.zeros(16)
    expected[kept] = np.exp(logits[kept] / temperature)
    expected /= expected.sum()

    samplers = [KeyedSampler(temperature, top_p, seed) for seed in range(n)]
    drawn = np.array(sample_rows(samplers, mx.array(np.tile(logits, (n, 1)))))
    observed = np.bincount(drawn, minlength=16) / n
    assert set(np.flatnonzero(observed)) <= set(kept.tolist())
    # 6000 draws: the standard error of each frequency is at most 0.0065.
    assert np.abs(observed - expected).max() < 0.03, (observed, expected)


def test_a_rows_draw_depends_only_on_its_own_seed():
    rng = np.random.default_rng(2)
    logits = mx.array(rng.normal(size=(3, 300)).astype(np.float32) * 3)
    together = sample_rows([KeyedSampler(0.8, 0.9, s) for s in (7, 8, 9)], logits).tolist()
    alone = [
        sample_rows([KeyedSampler(0.8, 0.9, s)], logits[i : i + 1]).item()
        for i, s in enumerate((7, 8, 9))
    ]
    assert together == alone


@pytest.mark.parametrize("top_p", [1.0, 0.5])
def test_a_keyed_sampler_called_alone_matches_sample_rows(top_p):
    logits = mx.array(np.random.default_rng(3).normal(size=(1, 100)).astype(np.float32))
    assert KeyedSampler(1.0, top_p, 5)(logits).item() == (
        sample_rows([KeyedSampler(1.0, top_p, 5)], logits).item()
    )
