"""The optimizer step (``make_train_step``), validation loss and the learning-rate schedule."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_map

from distiller import blas
from distiller.device import on_cpu
from distiller.errors import UserError
from distiller.spec import TrainSpec
from distiller.train import batches as B
from distiller.train import distributed as D
from distiller.train import parallel as P


def to_mx(batch: dict[str, Any]) -> dict[str, mx.array]:
    """Arrays for the step; a hand-made {inputs, targets, mask} batch gets its ``sel`` keys."""
    if "sel" not in batch:
        batch = {**batch, **B.select(np.asarray(batch["mask"]))}
    # lengths only feed the tokens/s count; keeping them out of the step avoids recompiles.
    return {
        k: v if isinstance(v, mx.array) else mx.array(v) for k, v in batch.items() if k != "lengths"
    }


def make_train_step(
    model: nn.Module,
    optimizer: optim.Optimizer,
    loss_fn: Callable,
    *,
    compile: bool = True,
    grad_accumulation: int = 1,
    grad_clip: float | None = None,
    workers: int | None = None,
    split: Callable[[dict, int], list[dict]] = B.split_rows,
    group: mx.distributed.Group | None = None,
) -> Callable[..., mx.array]:
    """``step(*microbatches) -> loss``: forward, backward and one optimizer update.

    Gradients are taken only for the model's trainable parameters (LoRA matrices, or every
    weight for full fine-tuning). With ``compile`` the update is ``mx.compile``d over (model,
    optimizer, RNG) state. Pass ``grad_accumulation`` micro-batches per call to accumulate
    their mean gradient before the single update.

    ``workers`` > 1 (default: one per core on the CPU, see ``distiller.train.parallel``) cuts
    each micro-batch with ``split`` into shards whose gradients are computed at the same time
    on separate CPU streams, then averaged with the loss's own weights (its supervised token
    count), which gives the whole batch's loss and gradient. ``loss_fn(model, batch)`` returns
    ``(loss, weight)`` with ``loss`` a mean over ``weight`` units.

    ``group`` (``distiller.train.distributed``): ranks in other processes or hosts, each
    passing its own slice of the global batch. The same weighted mean then runs over every
    rank's shards (one ``all_sum`` per micro-batch), so each rank makes the update of the whole
    global batch and the ranks' weights stay identical. None: the ranks this process was
    launched with, which is this process alone without ``mlx.launch``.
    """
    loss_and_grad = nn.value_and_grad(model, loss_fn)
    if not optimizer.state:
        optimizer.init(model.trainable_parameters())
    n_workers = P.worker_count(workers)
    group = group or D.world()
    # One fused compiled update needs the whole batch's gradient in this process.
    fused = n_workers == 1 and group.size() == 1
    state = [model.state, optimizer.state, mx.random.state]
    maybe_compile = partial(mx.compile, inputs=state, outputs=state) if compile else (lambda f: f)

    def clip(grads):
        return optim.clip_grad_norm(grads, grad_clip)[0] if grad_clip else grads

    def one(batch):
        (loss, _), grads = loss_and_grad(model, batch)
        optimizer.update(model, clip(grads))
        return loss

    def grad_only(batch):
        (loss, weight), grads = loss_and_grad(model, batch)
        return loss, weight, grads

    def combine(shards, counted=True):
        if len(shards) == 1 and group.size() == 1:
            return shards[0][0], shards[0][2]
        # The batch mean is the shards' means weighted by their counts, over this process's
        # streams and then over the ranks; an all-masked batch (total 0) gives loss 0 and zero
        # gradients, as one whole-batch call would.
        weights = [w.astype(mx.float32) * (1.0 if counted else 0.0) for _, w, _ in shards]
        sums = {
            "weight": sum(weights),
            "loss": sum(loss * w for (loss, _, _), w in zip(shards, weights, strict=True)),
            "grads": tree_map(
                lambda *gs: sum(g * w for g, w in zip(gs, weights, strict=True)),
                *[g for _, _, g in shards],
            ),
        }
        sums = D.sum_across(sums, group)
        total = mx.maximum(sums["weight"], 1)
        return sums["loss"] / total, tree_map(lambda g: g / total, sums["grads"])

    def apply(grads):
        optimizer.update(model, clip(grads))

    def on_stream(stream):
        def grad_on_stream(batch):
            with mx.stream(stream):
                return grad_only(batch)

        return maybe_compile(grad_on_stream)

    one = maybe_compile(one)
    if n_workers == 1:
        grad_on, apply = [maybe_compile(grad_only)], maybe_compile(apply)
    else:
        # Only each shard's forward and backward is compiled: compiling the combine and the
        # update as well made the sharded step slower (compare with scripts/bench_train.py).
        grad_on = [on_stream(s) for s in P.worker_streams(n_workers)]
        if on_cpu():
            P.keep_freed_memory()

    def grads_of(parts: list[dict]) -> list:
        return [grad_on[i](to_mx(part)) for i, part in enumerate(parts)]

    def run(microbatches: list[list[dict]], counted: bool) -> mx.array:
        """One update from micro-batches, each already cut into its shards."""
        if grad_accumulation == 1:
            if fused:
                loss = one(to_mx(microbatches[0][0]))
            else:
                loss, grads = combine(grads_of(microbatches[0]), counted)
                apply(grads)
            mx.eval(loss, state)
            return loss
        total, acc = mx.array(0.0), None
        for parts in microbatches:
            loss, grads = combine(grads_of(parts), counted)
            acc = grads if acc is None else tree_map(mx.add, acc, grads)
            total = total + loss
            mx.eval(total, acc)
        apply(tree_map(lambda g: g / grad_accumulation, acc))
        loss = total / grad_accumulation
        mx.eval(loss, state)
        return loss

    def step(*microbatches: dict[str, Any], counted: bool = True) -> mx.array:
        """``counted=False``: this rank has no rows of the global batch; it computes on the
        ones given, joins the ranks' sum with weight 0 and makes the same update."""
        if len(microbatches) != grad_accumulation:
            raise ValueError(f"expected {grad_accumulation} micro-batches, got {len(microbatches)}")
        if n_workers == 1:
            return run([[b] for b in microbatches], counted)
        sharded = [split(b, n_workers) for b in microbatches]
        # The shards' BLAS calls share the cores (a batch may have fewer rows than workers).
        per_call = max(1, P.cpu_cores() // max(len(parts) for parts in sharded))
        with blas.threads(per_call):
            return run(sharded, counted)

    return step


def evaluate(
    model: nn.Module,
    loss_fn: Callable,
    batches: list[dict],
    group: mx.distributed.Group | None = None,
) -> float:
    """Token-weighted mean loss over the validation batches. With several ranks each scores
    every ``size``-th batch and the sums are shared, so all ranks get the same figure (and make
    the same early-stopping decision)."""
    group = group or D.world()
    model.eval()
    total, weight = 0.0, 0.0
    for b in batches[group.rank() :: group.size()]:
        loss, ntoks = loss_fn(model, to_mx(b))
        mx.eval(loss, ntoks)
        total += loss.item() * max(ntoks.item(), 1)
        weight += max(ntoks.item(), 1)
    model.train()
    if group.size() > 1:
        sums = D.sum_across({"total": mx.array(total), "weight": mx.array(weight)}, group)
        total, weight = sums["total"].item(), sums["weight"].item()
    return total / weight if weight else float("nan")


def build_schedule(train: TrainSpec, total_steps: int) -> Callable:
    """The learning rate per step: ``train.schedule`` after ``train.warmup_steps`` of linear
    warmup (cosine decays to a tenth of the peak, linear to 0)."""
    lr = float(train.learning_rate)
    warm = max(0, min(int(train.warmup_steps), total_steps - 1))
    rest = max(1, total_steps - warm)
    if train.schedule == "constant":
        main = lambda _: mx.array(lr)  # noqa: E731
    elif train.schedule == "linear":
        main = optim.linear_schedule(lr, 0.0, rest)
    elif train.schedule == "cosine":
        main = optim.cosine_decay(lr, rest, end=lr * 0.1)
    else:
        raise UserError(
            f"student.train.schedule must be cosine, linear or constant, got {train.schedule!r}"
        )
    if not warm:
        return main
    return optim.join_schedules([optim.linear_schedule(lr / warm, lr, warm), main], [warm])
