"""Checkpoints that survive SIGKILL, metrics files, and Ctrl-C handling.

A checkpoint is valid only once ``checkpoint/state.json`` (written last, atomically) names its
step, so a kill at any moment leaves either the previous or the new checkpoint, never a mix.
Likewise the run's result: ``train_result.json`` is removed when a run starts and written when
it ends, so the adapter beside it is a finished run's only while it is there.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import signal
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from distiller.errors import UserError
from distiller.files import atomic_write
from distiller.hashing import stable_hash
from distiller.train import lora as LR

RESULT_FILE = "train_result.json"


def ckpt_dir(out_dir: Path) -> Path:
    return out_dir / "checkpoint"


def unfinished(out_dir: str | Path) -> bool:
    """An adapter dir of a ``distiller train`` run that has not ended (killed, interrupted, or
    still going): it holds a checkpoint but no ``train_result.json``."""
    out_dir = Path(out_dir)
    return ckpt_dir(out_dir).is_dir() and not (out_dir / RESULT_FILE).exists()


def read_state(out_dir: Path) -> dict | None:
    """The last checkpoint's ``state.json`` (None when there is none); a damaged one is refused."""
    path = ckpt_dir(out_dir) / "state.json"
    if not path.exists():
        return None
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # not UTF-8, not JSON, unreadable
        raise _damaged(out_dir, f"{path.name}: {exc}") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise _damaged(out_dir, f"{path.name} names no step")
    return state


def _damaged(out_dir: Path, reason: str) -> UserError:
    return UserError(
        f"{ckpt_dir(out_dir)}: damaged checkpoint ({reason}); use --no-resume to start over"
    )


def save_checkpoint(out_dir: Path, step: int, model, optimizer, extra: dict) -> None:
    d = ckpt_dir(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    LR.atomic_save_safetensors(d / f"step-{step}.weights.safetensors", LR.trainable_weights(model))
    LR.atomic_save_safetensors(
        d / f"step-{step}.optimizer.safetensors", dict(tree_flatten(optimizer.state))
    )
    state = {"step": step, **extra}
    atomic_write(d / "state.json", json.dumps(state) + "\n")
    # Older checkpoints are garbage only once state.json points at the new one.
    for f in d.glob("step-*.safetensors"):
        if not f.name.startswith(f"step-{step}."):
            f.unlink(missing_ok=True)


def load_checkpoint(out_dir: Path, model, optimizer) -> dict | None:
    d = ckpt_dir(out_dir)
    state = read_state(out_dir)
    if state is None:
        return None
    step = state["step"]
    try:
        weights = mx.load(str(d / f"step-{step}.weights.safetensors"))
        opt_state = mx.load(str(d / f"step-{step}.optimizer.safetensors"))
        model.load_weights(list(weights.items()), strict=False)
    except (OSError, ValueError, RuntimeError) as exc:  # missing, truncated, other shapes
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise _damaged(out_dir, f"step {step}: {reason}") from None
    optimizer.state = tree_unflatten(list(opt_state.items()))
    mx.eval(model.parameters(), optimizer.state)
    return state


def write_metrics(out_dir: Path, rows: list[dict]) -> None:
    atomic_write(out_dir / "metrics.json", json.dumps(rows, indent=1) + "\n")
    cols = ["step", "train_loss", "val_loss", "lr", "tokens_per_s", "peak_memory_gb", "elapsed_s"]
    # Route-specific columns (dpo's rewards, gkd's on-policy counts) after these, as they come.
    cols += list(dict.fromkeys(k for r in rows for k in r if k not in cols))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    atomic_write(out_dir / "metrics.csv", buf.getvalue())


class StopFlag:
    """First Ctrl-C asks the loop to checkpoint and stop; a second one interrupts at once."""

    def __init__(self):
        self.set = False
        self._old = None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: no handler, plain KeyboardInterrupt
            self._old = None
        return self

    def _handle(self, *_):
        self.set = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def __exit__(self, *_):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def run_key(settings: Any, dataset_dir: Path) -> str:
    """Key of a run: its training settings (``stable_hash``able) and every dataset file's bytes.
    A checkpoint carries it, and only a run with the same key may continue from it."""
    data = hashlib.sha256()
    for f in sorted(dataset_dir.glob("*.jsonl")):
        if not f.is_file():
            continue
        data.update(f.name.encode())
        try:
            data.update(f.read_bytes())
        except OSError as exc:
            raise UserError(f"{f}: cannot read: {exc.strerror or exc}") from None
    return stable_hash([settings, data.hexdigest()], 16)
