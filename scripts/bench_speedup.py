"""Single-stream speed of several models measured alternately in one sitting: the speed-up of a
student over its teacher as a ratio, which holds on a busy machine where seconds do not.

    .venv/bin/python scripts/bench_speedup.py runs/structured_cot/fuse/model \\
        runs/structured_cot_small/fuse/model --rounds 5

Each round runs every model once, in turn, on the same prompt: greedy, ``--tokens`` new tokens
(the end token ignored so every run decodes the same count), after one warm-up each. Decode is
``Generation.generation_tps`` (prefill excluded), prefill ``prompt_tps`` on a prompt of
``--prompt-tokens`` tokens. The table gives the median of the rounds per model and each model's
ratio to the first one.
"""

from __future__ import annotations

import argparse
import statistics

import distiller  # noqa: F401  (the fast BLAS before mlx)
from distiller.decoding import Decoding
from distiller.evaluate import count_parameters
from distiller.generate import generate_one
from distiller.models import load_model

PROMPT = (
    "Analyze this distributed-systems failure: a leader election flaps every few seconds "
    "because heartbeats share a saturated network link with bulk replication traffic."
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="model names or dirs; ratios are to the first")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    args = parser.parse_args()
    loaded = [load_model(m) for m in args.models]
    for _, tokenizer in loaded:
        tokenizer._eos_token_ids = set()  # decode exactly --tokens tokens every time
    tok = loaded[0][1]
    long_prompt = (tok.encode(PROMPT * 20))[: args.prompt_tokens]
    short_prompt = tok.encode(PROMPT)
    decoding = Decoding(temperature=0.0, max_tokens=args.tokens, stop=())
    decode: list[list[float]] = [[] for _ in loaded]
    prefill: list[list[float]] = [[] for _ in loaded]
    for model, tokenizer in loaded:  # warm-up
        generate_one(model, tokenizer, short_prompt, decoding)
    for _ in range(args.rounds):
        for i, (model, tokenizer) in enumerate(loaded):
            g = generate_one(model, tokenizer, short_prompt, decoding)
            decode[i].append(g.generation_tps)
            p = generate_one(model, tokenizer, long_prompt, decoding.replace(max_tokens=1))
            prefill[i].append(p.prompt_tps)
    base_d, base_p = statistics.median(decode[0]), statistics.median(prefill[0])
    print(
        "| model | params (M) | decode tok/s | decode speed-up | prefill tok/s | prefill speed-up |"
    )
    print("|---|---|---|---|---|---|")
    for name, (model, _), d, p in zip(args.models, loaded, decode, prefill, strict=True):
        dm, pm = statistics.median(d), statistics.median(p)
        print(
            f"| {name} | {count_parameters(model) / 1e6:.1f} | {dm:.1f} | {dm / base_d:.2f}× "
            f"| {pm:.0f} | {pm / base_p:.2f}× |"
        )
    print(f"({args.rounds} rounds, alternated; medians)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
