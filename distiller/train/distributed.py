"""Data-parallel training across processes and hosts with ``mlx.distributed``.

``mlx.launch -n 2 -- distiller train SPEC ...`` (or ``--hostfile hosts.json`` for several
machines) starts one ``distiller train`` per rank; each joins the group MLX's launcher set up
(the ring backend over TCP, or MPI). Every rank holds the same weights and reads its own slice
of each global batch (``shard``); the step sums the ranks' token-weighted gradients
(``sum_across``, on ``mlx.nn.average_gradients``) so the update is the one a single process
would make on the whole batch. Rank 0 alone writes checkpoints, adapters, metrics and logs;
every rank resumes from the same checkpoint. Without a launcher the group is this process alone
and every helper here is a no-op.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_map

from distiller.errors import UserError
from distiller.hashing import stable_hash

T = TypeVar("T")

_group: list[mx.distributed.Group] = []


def world() -> mx.distributed.Group:
    """The ranks this process trains with: the group ``mlx.launch`` (or ``mpirun``) set up, or
    a group of one. Joined once per process."""
    if _group:
        return _group[0]
    hostfile = os.environ.get("MLX_HOSTFILE")
    launched_ring = False
    if hostfile:
        try:
            launched_ring = bool(Path(hostfile).read_text(encoding="utf-8").strip())
        except OSError as exc:
            raise UserError(f"MLX_HOSTFILE={hostfile}: cannot read: {exc.strerror}") from None
        if not launched_ring:  # `mlx.launch -n 1` hands an empty host list: one rank
            os.environ.pop("MLX_HOSTFILE")
    try:
        # Under mlx.launch's ring backend a group that fails to form must stop the run, not
        # fall back to a group of one: every rank would then train alone and write to --out.
        group = mx.distributed.init(strict=launched_ring)
    except RuntimeError as exc:
        raise UserError(
            f"cannot join the distributed group (MLX_HOSTFILE={hostfile}, "
            f"MLX_RANK={os.environ.get('MLX_RANK')}): {exc}"
        ) from None
    _group.append(group)
    return group


def is_main(group: mx.distributed.Group) -> bool:
    """Rank 0: the one that writes files and logs."""
    return group.rank() == 0


def shard(indices: list[int], group: mx.distributed.Group) -> tuple[list[int], bool]:
    """This rank's rows of a global batch (contiguous slices whose sizes differ by at most one,
    the cut ``batches.split_rows`` makes between CPU streams), and whether it has any.

    A batch with fewer rows than ranks (the short last one of an epoch) leaves some ranks
    none; those compute on the batch's first row and the step counts them with weight 0, since
    every rank must join each step's ``all_sum``."""
    if group.size() == 1:
        return indices, True
    mine = np.array_split(np.asarray(indices), group.size())[group.rank()].tolist()
    return (mine, True) if mine else (indices[:1], False)


def check_batch_size(batch_size: int, group: mx.distributed.Group, where: str) -> None:
    """Every rank needs at least one row of every batch."""
    if batch_size < group.size():
        raise UserError(
            f"{where}: batch_size {batch_size} is smaller than the {group.size()} ranks; "
            "each rank needs at least one row of every batch (raise batch_size or use fewer ranks)"
        )


def sum_across(tree: Any, group: mx.distributed.Group) -> Any:
    """Element-wise sum of ``tree`` (same structure on every rank) over the ranks.

    ``nn.average_gradients`` packs the many small LoRA matrices into few large ``all_sum``
    calls; it returns the mean, so the sum is the mean times the size (exact for powers of 2).
    """
    n = group.size()
    if n == 1:
        return tree
    return tree_map(lambda x: x * n, nn.average_gradients(tree, group))


def total(value: float, group: mx.distributed.Group) -> float:
    """A host number summed over the ranks (token counts, generated tokens)."""
    if group.size() == 1:
        return value
    return mx.distributed.all_sum(mx.array(float(value), mx.float32), group=group).item()


def any_rank(flag: bool, group: mx.distributed.Group) -> bool:
    """Whether ``flag`` is set on some rank (Ctrl-C reaches the ranks at different steps; they
    must stop at the same one)."""
    return total(1.0 if flag else 0.0, group) > 0 if group.size() > 1 else flag


def barrier(group: mx.distributed.Group) -> None:
    if group.size() > 1:
        mx.eval(mx.distributed.all_sum(mx.array(0.0), group=group))


def main_first(fn: Callable[[], T], group: mx.distributed.Group) -> T:
    """Run ``fn`` on rank 0, then on the others: for steps that build files the others reuse
    (a layer-dropped student, the teacher-logit cache), so they are built once, not raced."""
    if is_main(group):
        out = fn()
        barrier(group)
        return out
    barrier(group)
    return fn()


def check_same(values: list[str], what: str, group: mx.distributed.Group) -> None:
    """Refuse to train when the ranks disagree on ``values`` (their data, their checkpoint):
    each would otherwise compute a different run and their sum would mean nothing."""
    if group.size() == 1:
        return
    digest = np.frombuffer(bytes.fromhex(stable_hash(values, 32)), np.int32)
    every = np.array(mx.distributed.all_gather(mx.array(digest), group=group)).reshape(-1, 4)
    differ = [r for r in range(len(every)) if not np.array_equal(every[r], every[0])]
    if differ:
        raise UserError(
            f"rank {differ[0]} of {group.size()} sees a different {what} than rank 0; every "
            "rank must read the same dataset and the same --out (a shared filesystem, or "
            "identical copies at the same path)"
        )
