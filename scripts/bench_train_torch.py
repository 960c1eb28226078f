"""Reference LoRA training throughput (tokens/s) in PyTorch + PEFT, same workload as
scripts/bench_train.py, so the MLX trainer's figure can be put next to it on the same machine.

Workload (mirrors bench_train.py's default): a randomly initialised llama with SmolLM2-135M's
shape (30 layers, d=576, GQA 9/3, vocab 49152, tied embeddings, rope_theta 1e5), float32 on
CPU, batch 4 x 128 random tokens (numpy default_rng(0)), PEFT LoRA r=8, alpha=2r, dropout 0 on
all 7 projections, AdamW lr 1e-4, cross-entropy on every token (inputs toks[:, :-1], targets
toks[:, 1:], computed here from the logits, not by HF's internal label shift). Attention uses
transformers' "sdpa" implementation (its default; torch.nn.functional.scaled_dot_product_attention).

torch is deliberately NOT a project dependency: this is a reference measurement only. Run it
with any venv that has torch, transformers and peft, e.g.

  python -m venv /tmp/torchref && /tmp/torchref/bin/pip install torch==2.13.0 transformers peft numpy
  /tmp/torchref/bin/python scripts/bench_train_torch.py               # 2 threads
  /tmp/torchref/bin/python scripts/bench_train_torch.py --threads 1

tokens/s counts every token of the batch (B x L). Peak RSS is the whole process's resident
memory high-water mark (model, optimizer state, activations, the torch runtime), so it is not
directly comparable with MLX's peak allocator figure.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

LORA_KEYS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_model(rank: int) -> torch.nn.Module:
    config = LlamaConfig(
        hidden_size=576,
        num_hidden_layers=30,
        intermediate_size=1536,
        num_attention_heads=9,
        num_key_value_heads=3,
        rms_norm_eps=1e-5,
        vocab_size=49152,
        tie_word_embeddings=True,
        rope_theta=100000.0,
        max_position_embeddings=8192,
        use_cache=False,  # training: no KV cache to build
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float32)
    lora = LoraConfig(
        r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=LORA_KEYS, bias="none"
    )
    model = get_peft_model(model, lora)
    model.train()
    return model


def fixed_batch(batch_size: int, seq_len: int, vocab: int, seed: int = 0):
    """Same random tokens as bench_train.fixed_batch (numpy default_rng(seed))."""
    rng = np.random.default_rng(seed)
    toks = rng.integers(0, vocab, size=(batch_size, seq_len + 1), dtype=np.int32)
    toks = torch.from_numpy(toks.astype(np.int64))
    return toks[:, :-1].contiguous(), toks[:, 1:].contiguous()


def make_step(model: torch.nn.Module, lr: float = 1e-4):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)

    def step(inputs: torch.Tensor, targets: torch.Tensor) -> float:
        logits = model(input_ids=inputs).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    return step


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    model = build_model(args.rank)
    attn = model.config._attn_implementation
    step = make_step(model)
    inputs, targets = fixed_batch(args.batch_size, args.seq_len, model.config.vocab_size)
    for _ in range(args.warmup):
        step(inputs, targets)
    times = []
    for _ in range(args.steps):
        tic = time.perf_counter()
        loss = step(inputs, targets)
        times.append(time.perf_counter() - tic)
    toks = args.batch_size * args.seq_len
    med = statistics.median(times)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    print(
        f"torch {torch.__version__} threads={args.threads} attn={attn} "
        f"batch={args.batch_size}x{args.seq_len} r={args.rank}: "
        f"median step {med * 1000:.0f} ms, {toks / med:.1f} tok/s "
        f"(best {toks / min(times):.1f}, mean {toks * len(times) / sum(times):.1f}); "
        f"loss {loss:.3f}; peak RSS {peak_rss:.2f} GiB"
    )


if __name__ == "__main__":
    main()
