"""Single-stream greedy decode (tokens/s) through ``distiller.generate.generate_one``, the path
``distiller generate``, ``eval --latency`` and the server take; scripts/bench_decode_torch.py
runs the same prompt in PyTorch.

  .venv/bin/python scripts/bench_decode.py [--model smollm2-135m-instruct] [--tokens 64]

Greedy, ``--tokens`` tokens (the stop token is ignored so every run decodes the same count);
the figure is ``Generation.generation_tps`` (prefill excluded), median of ``--rounds``.
"""

from __future__ import annotations

import argparse
import os
import statistics

import distiller  # noqa: F401  (before mlx: optimized BLAS)

PROMPT = "Explain quorum in distributed systems in two sentences."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--compare-compiled",
        action="store_true",
        help="alternate runs with the compiled decode step on and off (DISTILLER_COMPILE_DECODE)",
    )
    args = ap.parse_args()

    from distiller import blas
    from distiller.decoding import Decoding
    from distiller.generate import build_messages, chat_prompt, generate_one
    from distiller.models import load_model

    model, tok = load_model(args.model)
    tok._eos_token_ids = set()  # decode exactly --tokens tokens, as the torch run does
    prompt = chat_prompt(tok, build_messages(PROMPT))
    decoding = Decoding(max_tokens=args.tokens)
    generate_one(model, tok, prompt, decoding.replace(max_tokens=4))  # warm up
    if args.compare_compiled:
        both: dict[str, list[float]] = {"0": [], "1": []}
        for _ in range(args.rounds):
            for flag, rates in both.items():
                os.environ["DISTILLER_COMPILE_DECODE"] = flag  # read on every call
                rates.append(generate_one(model, tok, prompt, decoding).generation_tps)
        off, on = (statistics.median(both[k]) for k in ("0", "1"))
        print(
            f"uncompiled {off:.1f} tok/s, compiled {on:.1f} tok/s (x{on / off:.2f}; medians of "
            f"{args.rounds} alternated runs) | BLAS "
            f"{os.path.basename(blas.resolved_cblas_library() or '?')} | load "
            f"{os.getloadavg()[0]:.2f}"
        )
        return
    rates = [generate_one(model, tok, prompt, decoding).generation_tps for _ in range(args.rounds)]
    print(
        f"distiller BLAS {os.path.basename(blas.resolved_cblas_library() or '?')} | prompt "
        f"{len(prompt)} tok | decode {statistics.median(rates):.1f} tok/s (median of "
        f"{args.rounds}: "
        + ", ".join(f"{r:.1f}" for r in rates)
        + f") | load {os.getloadavg()[0]:.2f}"
    )


if __name__ == "__main__":
    main()
