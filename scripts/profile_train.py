"""Where a LoRA training step's time goes, on scripts/bench_train.py's workload.

Times each part of the step on one CPU stream (median of ``--reps`` after a warm-up), each part
run on its own and evaluated, so the parts can be compared with the whole step:

  backbone forward     embeddings -> 30 blocks -> norm (no head)
  head + CE forward    the tied 49,152-wide head and the cross-entropy, on the backbone's output
  forward              both, as the loss function runs them
  forward + backward   ``value_and_grad`` of the loss w.r.t. the LoRA weights
  head + CE fwd+bwd    the loss over the vocabulary and its gradient w.r.t. the hidden states
  optimizer            one AdamW update of the LoRA weights from fixed gradients
  step (1 stream)      the trainer's compiled step, ``workers=1``
  step (N streams)     the trainer's step as it runs by default (one shard per core)

  .venv/bin/python scripts/profile_train.py            # batch 4 x 128, r=8, all 7 projections
  .venv/bin/python scripts/profile_train.py --reps 5

The parts overlap (forward is backbone + head; forward + backward includes the forward), so
they do not sum to the step; what they show is each part's share.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import distiller  # noqa: F401  (loads the fast BLAS before mlx)

# isort: split
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_map

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_train  # the same model, batch and step


def median_s(fn, reps: int) -> float:
    fn()  # warm up
    times = []
    for _ in range(reps):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return statistics.median(times)


def main() -> None:
    from distiller.train import students as S
    from distiller.train.losses import masked_cross_entropy
    from distiller.train.routes import sft_loss
    from distiller.train.step import to_mx

    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", help="model name or dir (default: random SmolLM2-135M shape)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()

    model = bench_train.build_model(args.model)
    # One stream first: the phases are timed on it (the sharded step is timed last).
    step1 = bench_train.build_step(model, args.rank, workers=1)
    raw = bench_train.fixed_batch(args.batch_size, args.seq_len, model.args.vocab_size)
    batch = to_mx(raw)
    backbone, head = S.split_model(model)
    targets = batch["targets"].reshape(-1)[batch["sel"]]
    mask = batch["sel_mask"]
    hidden = backbone(batch["inputs"])
    mx.eval(hidden)
    h_sel = hidden.reshape(-1, hidden.shape[-1])[batch["sel"]]
    mx.eval(h_sel)

    def head_loss(h):
        return masked_cross_entropy(head(h), targets, mask)[0]

    head_grad = mx.value_and_grad(head_loss)
    loss_and_grad = nn.value_and_grad(model, sft_loss)
    (_, _), grads = loss_and_grad(model, batch)
    mx.eval(grads)
    opt = optim.AdamW(learning_rate=1e-4)
    opt.init(model.trainable_parameters())
    tiny = tree_map(lambda g: g * 1e-9, grads)  # keeps the weights where they are
    mx.eval(tiny)

    parts = {
        "backbone forward": lambda: mx.eval(backbone(batch["inputs"])),
        "head + CE forward": lambda: mx.eval(head_loss(h_sel)),
        "forward": lambda: mx.eval(sft_loss(model, batch)),
        "forward + backward": lambda: mx.eval(loss_and_grad(model, batch)),
        "head + CE fwd+bwd": lambda: mx.eval(head_grad(h_sel)),
        "optimizer": lambda: (opt.update(model, tiny), mx.eval(model.parameters(), opt.state)),
        "step (1 stream)": lambda: step1(raw),
    }
    times = {name: median_s(fn, args.reps) for name, fn in parts.items()}
    # The default step: shards on one stream per core (a fresh model, as the trainer builds it).
    model_n = bench_train.build_model(args.model)
    step_n = bench_train.build_step(model_n, args.rank)
    times["step (default workers)"] = median_s(lambda: step_n(raw), args.reps)

    toks = args.batch_size * args.seq_len
    whole = times["step (1 stream)"]
    print(f"batch {args.batch_size}x{args.seq_len}, r={args.rank}, median of {args.reps}:")
    for name, s in times.items():
        print(f"  {name:<24} {s * 1000:8.0f} ms  {s / whole:6.0%} of a 1-stream step  "
              f"{toks / s:8.1f} tok/s")  # fmt: skip


if __name__ == "__main__":
    main()
