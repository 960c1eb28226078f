"""Throughput check: distiller.generate.generate_batch vs mlx_lm.batch_generate on one model.

    .venv/bin/python tests/bench_generate.py MODEL_DIR [--batch 16] [--max-tokens 64]

Prints prefill / decode tok/s and peak memory for both, on the same prompts, same process.
"""

from __future__ import annotations

import argparse

import distiller  # noqa: F401  (before mlx: fast BLAS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("model")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()

    import mlx.core as mx
    from mlx_lm import batch_generate

    from distiller.decoding import Decoding
    from distiller.generate import build_messages, chat_prompt, generate_batch, generate_one
    from distiller.models import load_model

    model, tok = load_model(args.model)
    decoding = Decoding(max_tokens=args.max_tokens)
    topics = ["quorum", "leader election", "idempotency", "backpressure", "consistent hashing",
              "vector clocks", "two-phase commit", "gossip protocols"]  # fmt: skip
    prompts = [
        chat_prompt(tok, build_messages(f"Explain {topics[i % len(topics)]} in two sentences."))
        for i in range(args.batch)
    ]
    generate_batch(model, tok, prompts[:2], Decoding(max_tokens=4))  # warm-up
    mx.reset_peak_memory()
    ours = generate_batch(model, tok, prompts, decoding, batch_size=args.batch)
    print(f"distiller generate_batch  b={args.batch}: {ours.stats.summary()}")
    mx.reset_peak_memory()
    ref = batch_generate(model, tok, prompts, max_tokens=args.max_tokens,
                         completion_batch_size=args.batch, prefill_batch_size=args.batch)  # fmt: skip
    s = ref.stats
    print(
        f"mlx_lm batch_generate    b={args.batch}: prompt {s.prompt_tokens} tok, "
        f"{s.prompt_tps:.1f} tok/s | generation {s.generation_tokens} tok, "
        f"{s.generation_tps:.1f} tok/s | peak memory {s.peak_memory:.3f} GB"
    )
    one = generate_one(model, tok, prompts[0], decoding)
    print(
        f"distiller generate_one   b=1: prompt {one.prompt_tokens} tok, {one.prompt_tps:.1f} tok/s"
        f" | generation {one.generation_tokens} tok, {one.generation_tps:.1f} tok/s"
    )


if __name__ == "__main__":
    main()
