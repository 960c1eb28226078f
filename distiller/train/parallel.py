"""Data-parallel training steps across the cores of a CPU.

MLX's CPU backend runs a stream's ops one after another on that stream's own thread; only BLAS
calls use more cores. On a small model much of a LoRA step is elementwise work (softmax, SiLU,
norms, the loss over the vocabulary) that then keeps one core busy and the others idle. So on
the CPU a batch is cut into row shards, each shard's forward and backward run on its own stream
(its own thread), each BLAS call takes one core, and the shards' gradients are combined before
one optimizer update: the same update as the whole batch, computed on every core.

``scripts/bench_train.py`` (``--workers 1`` for one stream) measures what it gains; the README
has the figures. On Metal and CUDA the device is already parallel: one worker.
"""

from __future__ import annotations

import ctypes
import os
import sys

import mlx.core as mx

_streams: list[mx.Stream] = []


def cpu_cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def worker_count(requested: int | None = None) -> int:
    """How many shards a step runs at once: ``requested``, or one per core on the CPU and one
    on a GPU."""
    if requested is not None:
        if requested < 1:
            raise ValueError(f"workers must be >= 1, got {requested}")
        return requested
    return cpu_cores() if mx.default_device().type == mx.DeviceType.cpu else 1


def worker_streams(n: int) -> list[mx.Stream]:
    """``n`` CPU streams, the default one first. Streams (and their threads) live as long as
    the process, so they are made once and shared by every step that asks."""
    if not _streams:
        _streams.append(mx.default_stream(mx.cpu))
    while len(_streams) < n:
        _streams.append(mx.new_stream(mx.cpu))
    return _streams[:n]


_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4
_kept = False


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse instead of returning it to the OS.

    MLX's CPU allocator takes every buffer from malloc. Buffers above malloc's mmap threshold
    (the vocabulary logits, the MLP activations) are mapped fresh and unmapped on free, so
    every step pays page faults and zero-filling (kernel time in ``clear_page``) for them
    again. Serving large blocks from the heap and not trimming it makes later steps reuse the
    same pages. The cost is that the process keeps its peak heap until it exits. Returns
    whether the setting took (glibc only; elsewhere it does nothing).
    """
    global _kept
    if _kept:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl has no mallopt)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    _kept = bool(
        mallopt(_M_MMAP_MAX, 0)
        and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
        and mallopt(_M_TOP_PAD, 64 << 20)
    )
    return _kept
