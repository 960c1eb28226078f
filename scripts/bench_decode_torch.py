"""Reference single-stream greedy decode (tokens/s) in PyTorch + transformers on the same model
directory and prompt as scripts/bench_decode.py, so distiller's figure can be put next to it.

torch is deliberately NOT a project dependency: run it from its own venv, e.g.

  python3 -m venv /work/torchenv
  /work/torchenv/bin/pip install torch --index-url https://download.pytorch.org/whl/cpu transformers
  /work/torchenv/bin/python scripts/bench_decode_torch.py ~/.cache/distiller/models/smollm2-135m-instruct

Float32, ``model.generate(do_sample=False)`` with a KV cache, one sequence. tok/s counts the
generated tokens over the time after the first one (prefill excluded), the way distiller's
``generation_tps`` does: a run of N tokens is timed once with max_new_tokens=N and once with 1.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

PROMPT = "Explain quorum in distributed systems in two sentences."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("model", help="a model directory (config.json + safetensors + tokenizer)")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    ids = tok.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True, return_tensors="pt"
    )
    if not isinstance(ids, torch.Tensor):
        ids = ids["input_ids"]

    def run(n: int) -> tuple[float, int]:
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=tok.eos_token_id,
            )
        return time.perf_counter() - start, out.shape[1] - ids.shape[1]

    run(4)  # warm up
    rates = []
    for _ in range(args.rounds):
        first, _ = run(1)
        total, n = run(args.tokens)
        rates.append((n - 1) / (total - first))
    print(
        f"torch {torch.__version__} threads {torch.get_num_threads()} | prompt {ids.shape[1]} "
        f"tok | decode {statistics.median(rates):.1f} tok/s (median of {args.rounds}: "
        + ", ".join(f"{r:.1f}" for r in rates)
        + f") | load {os.getloadavg()[0]:.2f}"
    )


if __name__ == "__main__":
    main()
