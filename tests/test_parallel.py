"""Data-parallel steps: shards of a batch, computed on separate CPU streams, give the update
of the whole batch."""

from __future__ import annotations

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mlx.utils import tree_flatten
from mlx_lm import load

from distiller import blas
from distiller.spec import LoraSpec
from distiller.train import batches as B
from distiller.train import make_train_step
from distiller.train import parallel as P
from distiller.train.lora import adapter_config, prepare_trainable
from distiller.train.routes import make_dpo_loss, sft_loss


def random_batch(rows: int, width: int, seed: int, vocab: int = 200) -> dict[str, np.ndarray]:
    """A collated batch whose rows have different prompt lengths, answer lengths and padding."""
    rng = np.random.default_rng(seed)
    examples = []
    for _ in range(rows):
        n = int(rng.integers(3, width + 1))
        offset = int(rng.integers(1, n))
        examples.append(B.Example(rng.integers(1, vocab, n + 1).tolist(), offset))
    return B.collate(examples, pad_to=8)


def supervised(batch: dict[str, np.ndarray]) -> list[tuple[int, int]]:
    """(input token, target token) at every supervised position, in order."""
    m = batch["mask"].reshape(-1) > 0
    inputs, targets = batch["inputs"].reshape(-1)[m], batch["targets"].reshape(-1)[m]
    return list(zip(inputs.tolist(), targets.tolist(), strict=True))


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 9), parts=st.integers(1, 5), seed=st.integers(0, 10**6))
def test_split_rows_partitions_the_batch(rows, parts, seed):
    batch = random_batch(rows, 12, seed)
    shards = B.split_rows(batch, parts)
    assert len(shards) == min(rows, parts)
    sizes = [len(s["inputs"]) for s in shards]
    assert max(sizes) - min(sizes) <= 1
    for key in ("inputs", "targets", "mask", "lengths"):
        assert np.array_equal(np.concatenate([s[key] for s in shards]), batch[key])
    # each shard's selection picks exactly its own supervised positions
    assert [t for s in shards for t in supervised(s)] == supervised(batch)
    for s in shards:
        sel = s["sel"][s["sel_mask"] > 0]
        assert np.array_equal(sel, np.flatnonzero(s["mask"].reshape(-1) > 0))


@settings(max_examples=60, deadline=None)
@given(pairs=st.integers(1, 6), parts=st.integers(1, 4), seed=st.integers(0, 10**6))
def test_split_pairs_keeps_each_pair_in_one_shard(pairs, parts, seed):
    batch = random_batch(2 * pairs, 12, seed)
    batch["ref_chosen"] = np.arange(pairs, dtype=np.float32)
    batch["ref_rejected"] = -np.arange(pairs, dtype=np.float32)
    shards = B.split_pairs(batch, parts)
    assert len(shards) == min(pairs, parts)
    seen = []
    for s in shards:
        k = len(s["ref_chosen"])
        assert len(s["inputs"]) == 2 * k
        for j, pair in enumerate(s["ref_chosen"].astype(int).tolist()):
            # chosen row j and rejected row k + j of the shard are rows i and pairs + i
            assert np.array_equal(s["inputs"][j], batch["inputs"][pair])
            assert np.array_equal(s["inputs"][k + j], batch["inputs"][pairs + pair])
            assert s["ref_rejected"][j] == -pair
        seen += s["ref_chosen"].astype(int).tolist()
    assert seen == list(range(pairs))


def lora_model(model_dir):
    model, _ = load(str(model_dir))
    mx.random.seed(7)  # the same LoRA initialisation for every copy
    prepare_trainable(model, adapter_config(model, LoraSpec(rank=4, alpha=8), False, "tiny"))
    model.train()
    return model


def trained(model_dir, batches, workers, loss_fn=sft_loss, split=B.split_rows, accum=1):
    model = lora_model(model_dir)
    step = make_train_step(
        model,
        optim.SGD(learning_rate=0.5),
        loss_fn,
        workers=workers,
        split=split,
        grad_accumulation=accum,
    )
    losses = [step(*group).item() for group in batches]
    return losses, dict(tree_flatten(model.trainable_parameters()))


def assert_same_training(a, b):
    """Same losses and weights up to float32 rounding: the shards sum in another order, which
    moves results by a few ulps on any CPU; the tolerances are orders of magnitude above that
    and far below what a wrongly weighted combination of the shards changes."""
    (losses_a, params_a), (losses_b, params_b) = a, b
    np.testing.assert_allclose(losses_a, losses_b, rtol=1e-4, atol=1e-5)
    assert params_a.keys() == params_b.keys()
    for name in params_a:
        np.testing.assert_allclose(
            np.array(params_a[name]), np.array(params_b[name]), rtol=1e-3, atol=2e-5, err_msg=name
        )


@pytest.mark.parametrize("workers", [2, 3])
def test_sharded_step_gives_the_whole_batch_update(tiny_model_dir, workers):
    batches = [(random_batch(5, 20, seed),) for seed in range(3)]
    one = trained(tiny_model_dir, batches, workers=1)
    sharded = trained(tiny_model_dir, batches, workers=workers)
    assert_same_training(one, sharded)
    # the updates did move the weights, by far more than the tolerance above
    initial = dict(tree_flatten(lora_model(tiny_model_dir).trainable_parameters()))
    moved = max(np.abs(np.array(one[1][k]) - np.array(initial[k])).max() for k in initial)
    assert moved > 1e-2


def test_sharded_step_with_gradient_accumulation(tiny_model_dir):
    batches = [(random_batch(4, 16, 2 * s), random_batch(3, 16, 2 * s + 1)) for s in range(2)]
    assert_same_training(
        trained(tiny_model_dir, batches, workers=1, accum=2),
        trained(tiny_model_dir, batches, workers=2, accum=2),
    )


def test_sharded_dpo_step_keeps_pairs_together(tiny_model_dir):
    def pair_batch(seed):
        b = random_batch(6, 16, seed)
        b["ref_chosen"] = np.full(3, -20.0, np.float32)
        b["ref_rejected"] = np.full(3, -25.0, np.float32)
        return (b,)

    batches = [pair_batch(s) for s in range(2)]
    dpo = make_dpo_loss(0.1)
    assert_same_training(
        trained(tiny_model_dir, batches, 1, dpo, B.split_pairs),
        trained(tiny_model_dir, batches, 2, dpo, B.split_pairs),
    )


def test_worker_count_defaults_to_one_per_core_on_cpu():
    assert P.worker_count(3) == 3
    with pytest.raises(ValueError):
        P.worker_count(0)
    expected = P.cpu_cores() if mx.default_device().type == mx.DeviceType.cpu else 1
    assert P.worker_count() == expected


def test_blas_threads_are_restored_after_the_block():
    before = blas.get_threads()
    with blas.threads(1) as controlled:
        if controlled:
            assert blas.get_threads() == 1
    assert blas.get_threads() == before
