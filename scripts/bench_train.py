"""LoRA training throughput (tokens/s) of the distiller train step on a fixed batch.

Default workload: SmolLM2-135M shape (30 layers, d=576, GQA 9/3, vocab 49152, tied), float32
on CPU, batch 4 x 128 tokens, LoRA r=8 on all 7 projections, loss on every token. With
--model it loads real weights (speed does not depend on the weight values; without --model the
same architecture is built with random weights so the benchmark needs no download).

  .venv/bin/python scripts/bench_train.py                   # the trainer's step (compiled)
  .venv/bin/python scripts/bench_train.py --no-compile      # plain step, for comparison
  .venv/bin/python scripts/bench_train.py --workers 1       # one CPU stream (no data parallel)
  .venv/bin/python scripts/bench_train.py --supervised 0.5  # half the tokens are (masked) prompt
  DISTILLER_FAST_OPS=0 .venv/bin/python scripts/bench_train.py  # stock mx.exp-based ops

tokens/s counts every token of the batch (B x L), supervised or not.
"""

from __future__ import annotations

import argparse
import statistics
import time

import distiller  # noqa: F401  (loads the fast BLAS before mlx)

# isort: split
import mlx.core as mx
import mlx.optimizers as optim
import numpy as np

from distiller.train import parallel as P

SMOLLM2_135M = {
    "model_type": "llama",
    "hidden_size": 576,
    "num_hidden_layers": 30,
    "intermediate_size": 1536,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "rms_norm_eps": 1e-5,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
    "rope_theta": 100000.0,
    "max_position_embeddings": 8192,
}


def build_model(model: str | None):
    if model:
        from distiller.models import load_model

        return load_model(model)[0]
    from mlx_lm.models import llama

    from distiller import fast_ops

    m = llama.Model(llama.ModelArgs.from_dict(SMOLLM2_135M))
    m.set_dtype(mx.float32)
    mx.eval(m.parameters())
    fast_ops.patch_model(m)  # as distiller.models.load_model does
    return m


def fixed_batch(
    batch_size: int, seq_len: int, vocab: int, seed: int = 0, supervised: float = 1.0
) -> dict:
    """Random tokens; the last ``supervised`` fraction of each row carries the loss (the
    answer), the rest is prompt (masked)."""
    rng = np.random.default_rng(seed)
    toks = rng.integers(0, vocab, size=(batch_size, seq_len + 1), dtype=np.int32)
    mask = np.zeros((batch_size, seq_len), np.float32)
    mask[:, seq_len - round(seq_len * supervised) :] = 1.0
    return {
        "inputs": toks[:, :-1],
        "targets": toks[:, 1:],
        "mask": mask,
        "lengths": np.full((batch_size,), seq_len, np.int32),
    }


def build_step(
    model, rank: int = 8, compile: bool = True, lr: float = 1e-4, workers: int | None = None
):
    """The exact step the trainer runs: LoRA on all 7 projections, AdamW, masked CE."""
    from distiller.spec import LoraSpec
    from distiller.train import lora as LR
    from distiller.train.routes import sft_loss
    from distiller.train.step import make_train_step

    cfg = LR.adapter_config(model, LoraSpec(rank=rank, alpha=2 * rank), False, "bench")
    LR.prepare_trainable(model, cfg)
    model.train()
    return make_train_step(
        model, optim.AdamW(learning_rate=lr), sft_loss, compile=compile, workers=workers
    )


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", help="model name or dir (default: random SmolLM2-135M-shaped model)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-compile", action="store_true", help="run the step without mx.compile")
    p.add_argument(
        "--workers",
        type=int,
        help="parallel CPU shards per step (default: one per core on the CPU; 1 = one stream)",
    )
    p.add_argument(
        "--supervised",
        type=float,
        default=1.0,
        help="fraction of each row that is answer (has loss); 1.0 = loss on every token",
    )
    args = p.parse_args()

    model = build_model(args.model)
    step = build_step(model, args.rank, compile=not args.no_compile, workers=args.workers)
    batch = fixed_batch(
        args.batch_size, args.seq_len, model.args.vocab_size, supervised=args.supervised
    )
    for _ in range(args.warmup):
        step(batch)
    times = []
    for _ in range(args.steps):
        tic = time.perf_counter()
        loss = step(batch)
        times.append(time.perf_counter() - tic)
    toks = args.batch_size * args.seq_len
    med = statistics.median(times)
    print(
        f"compile={not args.no_compile} workers={P.worker_count(args.workers)} "
        f"batch={args.batch_size}x{args.seq_len} r={args.rank} "
        f"supervised={args.supervised}: "
        f"median step {med * 1000:.0f} ms, {toks / med:.1f} tok/s "
        f"(best {toks / min(times):.1f}, mean {toks * len(times) / sum(times):.1f}); "
        f"loss {loss.item():.3f}; peak mem {mx.get_peak_memory() / 2**30:.2f} GiB"
    )


if __name__ == "__main__":
    main()
