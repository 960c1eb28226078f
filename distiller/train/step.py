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

from distiller.errors import UserError
from distiller.train import batches as B


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
) -> Callable[..., mx.array]:
    """``step(*microbatches) -> loss``: forward, backward and one optimizer update.

    Gradients are taken only for the model's trainable parameters (LoRA matrices, or every
    weight for full fine-tuning). With ``compile`` the whole update is one ``mx.compile``d
    graph over (model, optimizer, RNG) state. Pass ``grad_accumulation`` micro-batches per call
    to accumulate their mean gradient before the single update.
    """
    loss_and_grad = nn.value_and_grad(model, loss_fn)
    if not optimizer.state:
        optimizer.init(model.trainable_parameters())

    def clip(grads):
        return optim.clip_grad_norm(grads, grad_clip)[0] if grad_clip else grads

    def one(batch):
        (loss, ntoks), grads = loss_and_grad(model, batch)
        optimizer.update(model, clip(grads))
        return loss, ntoks

    def grad_only(batch):
        (loss, ntoks), grads = loss_and_grad(model, batch)
        return loss, ntoks, grads

    def apply(grads):
        optimizer.update(model, clip(grads))

    state = [model.state, optimizer.state, mx.random.state]
    if compile:
        one = partial(mx.compile, inputs=state, outputs=state)(one)
        grad_only = partial(mx.compile, inputs=state, outputs=state)(grad_only)

    def step(*microbatches: dict[str, Any]) -> mx.array:
        if len(microbatches) != grad_accumulation:
            raise ValueError(f"expected {grad_accumulation} micro-batches, got {len(microbatches)}")
        if grad_accumulation == 1:
            loss, _ = one(to_mx(microbatches[0]))
            mx.eval(loss, state)
            return loss
        total, acc = mx.array(0.0), None
        for b in microbatches:
            loss, _, grads = grad_only(to_mx(b))
            acc = grads if acc is None else tree_map(mx.add, acc, grads)
            total = total + loss
            mx.eval(total, acc)
        apply(tree_map(lambda g: g / grad_accumulation, acc))
        loss = total / grad_accumulation
        mx.eval(loss, state)
        return loss

    return step


def evaluate(model: nn.Module, loss_fn: Callable, batches: list[dict], max_batches: int) -> float:
    """Token-weighted mean loss over (up to ``max_batches``) validation batches."""
    model.eval()
    total, weight = 0.0, 0.0
    for b in batches[: max_batches if max_batches > 0 else None]:
        loss, ntoks = loss_fn(model, to_mx(b))
        mx.eval(loss, ntoks)
        total += loss.item() * max(ntoks.item(), 1)
        weight += max(ntoks.item(), 1)
    model.train()
    return total / weight if weight else float("nan")


def build_schedule(cfg: Any, total_steps: int) -> Callable:
    lr = float(cfg.learning_rate)
    warm = max(0, min(int(cfg.warmup_steps), total_steps - 1))
    rest = max(1, total_steps - warm)
    if cfg.schedule == "constant":
        main = lambda _: mx.array(lr)  # noqa: E731
    elif cfg.schedule == "linear":
        main = optim.linear_schedule(lr, 0.0, rest)
    elif cfg.schedule == "cosine":
        main = optim.cosine_decay(lr, rest, end=lr * 0.1)
    else:
        raise UserError(
            f"student.train.schedule must be cosine, linear or constant, got {cfg.schedule!r}"
        )
    if not warm:
        return main
    return optim.join_schedules([optim.linear_schedule(lr / warm, lr, warm), main], [warm])
