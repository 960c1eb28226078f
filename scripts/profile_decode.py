"""Where a single-stream decode step's time goes, on this machine, now.

    .venv/bin/python scripts/profile_decode.py [--model smollm2-135m-instruct] [--steps 32]
        [--rounds 3] [--threads 1]

Prints one line per measurement (median over ``--rounds`` rounds of ``--steps`` steps, alternated
so a busy machine's load falls on every variant alike) and the machine's load and BLAS:

- machine: one-thread memory read bandwidth, float32 GEMM GFLOP/s, the bandwidth bound
  (weight bytes / bandwidth) for one token;
- the step: ops in one decode step's graph, the cost of one tiny op (MLX CPU dispatch), every
  weight matmul of a step alone (the BLAS part), the LM head alone, the forward without the
  head, and the whole step (forward + argmax + host sync);
- around the step: the greedy sampler, the logits processors (repetition penalty and
  no-repeat n-gram), detokenization, ``mx.async_eval`` pipelining (what ``mlx_lm``'s
  ``stream_generate`` does) and ``distiller.generate.generate_one`` end to end;
- levers: the compiled decode step (``distiller.decode_step``; its op count too), BLAS threads
  1 vs 2.

Run it with another BLAS to compare (``DISTILLER_BLAS=/path/libmkl_rt.so.2``; README "Decode
speed").
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections import Counter

import distiller  # noqa: F401  (before mlx: optimized BLAS)


def median_time(fn, reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="BLAS threads (default: as is)")
    args = ap.parse_args()

    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm.models.cache import make_prompt_cache

    from distiller import blas, fast_ops
    from distiller.decode_step import compiled_decoder
    from distiller.decoding import Decoding
    from distiller.doctor import measure_bandwidth, measure_gemm
    from distiller.generate import build_messages, chat_prompt, generate_one
    from distiller.sampling import make_logits_processors, make_sampler

    if args.threads is not None:
        blas.threads(args.threads).__enter__()  # for the whole run
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    print(f"BLAS {blas.resolved_cblas_library()} threads {blas.get_threads()}")
    bw = measure_bandwidth()
    gemm = measure_gemm()
    model, tok = load(args.model)
    weight_bytes = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    print(
        f"memory read {bw:.1f} GB/s (one thread) | GEMM mlx {gemm.mlx_gflops:.0f} "
        f"numpy {gemm.numpy_gflops:.0f} GFLOP/s"
    )
    print(
        f"weights {weight_bytes / 1e6:.0f} MB -> bandwidth bound {bw * 1e9 / weight_bytes:.1f} "
        f"tok/s"
    )

    prompt = chat_prompt(tok, build_messages("Explain quorum in two sentences."))
    cache = make_prompt_cache(model)
    logits = model(mx.array(prompt)[None], cache=cache)
    mx.eval(logits, [c.state for c in cache])
    token = mx.array([[int(mx.argmax(logits[0, -1]))]])

    def rewind(fn):
        """``fn`` on the prefilled cache, which is then put back (so steps do not pile up)."""

        def run():
            offsets = [c.offset for c in cache]
            fn()
            for c, o in zip(cache, offsets, strict=True):
                c.offset = o

        return run

    figures: dict[str, list[float]] = {}

    def record(name: str, fn, per: int = 1) -> None:
        figures.setdefault(name, []).append(median_time(fn, args.steps) / per)

    # Ops in one step's graph: the nodes of the graph from the (evaluated) cache to the logits.
    out = model(token, cache=cache)
    for c in cache:
        c.offset -= 1
    dot = os.path.join(os.environ.get("TMPDIR", "/tmp"), "decode_step.dot")
    mx.export_to_dot(dot, out)
    with open(dot) as f:
        kinds = Counter(
            line.split('label ="')[1].split('"')[0] for line in f if "shape=rectangle" in line
        )
    os.unlink(dot)
    mx.eval(out)  # the cache's buffers too, so the next graph starts from evaluated arrays
    fast_out = compiled_decoder(model)(token, cache=cache)
    for c in cache:
        c.offset -= 1
    mx.export_to_dot(dot, fast_out)
    with open(dot) as f:
        compiled_ops = sum(1 for line in f if "shape=rectangle" in line)
    os.unlink(dot)
    mx.eval(fast_out)
    del out, fast_out  # no stale graph may keep the cache's old buffers alive

    # Every weight matmul of a step, alone (x @ W.T for each Linear and the tied head).
    linears = [m for _, m in model.named_modules() if isinstance(m, nn.Linear)]
    head_w = model.model.embed_tokens.weight if model.args.tie_word_embeddings else None
    xs = {w: mx.random.normal((1, w)) for w in {m.weight.shape[1] for m in linears}}
    mx.eval(list(xs.values()))

    def matmuls():
        outs = [xs[m.weight.shape[1]] @ m.weight.T for m in linears]
        if head_w is not None:
            outs.append(xs[head_w.shape[1]] @ head_w.T)
        mx.eval(outs)

    hidden = mx.random.normal((1, 1, model.args.hidden_size))
    mx.eval(hidden)
    head = (
        (lambda: mx.eval(model.model.embed_tokens.as_linear(hidden)))
        if head_w is not None
        else (lambda: mx.eval(model.lm_head(hidden)))
    )
    tiny = mx.zeros((1, model.args.hidden_size))
    mx.eval(tiny)

    def chain():
        y = tiny
        for _ in range(100):
            y = y + 1.0
        mx.eval(y)

    def step():
        mx.eval(mx.argmax(model(token, cache=cache)[:, -1, :], axis=-1))

    def body():
        mx.eval(model.model(token, cache=cache))

    # distiller.decode_step: each layer's fixed-shape parts compiled (what generate_one runs).
    fast = compiled_decoder(model)

    def step_compiled():
        mx.eval(mx.argmax(fast(token, cache=cache)[:, -1, :], axis=-1))

    # Around the step.
    logits1 = model(token, cache=cache)[:, -1, :]
    for c in cache:
        c.offset -= 1
    mx.eval(logits1)
    greedy = make_sampler(0.0, 1.0)
    history = mx.array(prompt + [int(token.item())] * 64)
    processors = make_logits_processors(3, 1.1, ())

    def shaped():
        row = logits1
        for p in processors:
            row = p(history, row)
        mx.eval(greedy(row))

    detok = tok.detokenizer
    pieces = [int(t) for t in prompt[:64]]

    def detokenize():
        detok.reset()
        for t in pieces:
            detok.add_token(t)
            detok.last_segment  # noqa: B018  (the property does the work)

    def pipelined():
        y = token
        nxt = mx.argmax(model(y, cache=cache)[:, -1, :], axis=-1)[:, None]
        mx.async_eval(nxt)
        for _ in range(7):
            y, nxt = nxt, mx.argmax(model(nxt, cache=cache)[:, -1, :], axis=-1)[:, None]
            mx.async_eval(nxt)
            y.item()
        nxt.item()

    for _ in range(args.rounds):
        record("one tiny op (100 chained adds, eval)", chain, per=100)
        record(f"{len(linears) + (head_w is not None)} weight matmuls alone", matmuls)
        record("LM head alone", head)
        record("forward without head", rewind(body))
        record("whole step: forward + argmax + sync", rewind(step))
        record("whole step, compiled decode step (decode_step.py)", rewind(step_compiled))
        record("8 steps pipelined with async_eval, per step", rewind(pipelined), per=8)
        record("greedy sampler on logits", lambda: mx.eval(greedy(logits1)))
        record("logits processors + sampler", shaped)
        record("detokenize one token", detokenize, per=len(pieces))
        if args.threads is None and blas.get_threads() not in (None, 1):
            with blas.threads(1):
                record("whole step, BLAS threads 1", rewind(step))

    print(
        f"ops in one decode step's graph: {sum(kinds.values())} (fast ops: "
        f"{fast_ops.is_patched(model)}): " + ", ".join(f"{k} {n}" for k, n in kinds.most_common())
    )
    print(f"ops in one compiled decode step's graph: {compiled_ops}")
    for name, values in figures.items():
        print(f"{statistics.median(values) * 1e3:9.3f} ms  {name}")
    step_s = statistics.median(figures["whole step: forward + argmax + sync"])
    print(
        f"whole step: {1 / step_s:.1f} tok/s, {weight_bytes / bw / 1e9 / step_s:.0%} of the "
        "bandwidth bound"
    )

    decoding = Decoding(max_tokens=args.steps)
    rates = []
    for _ in range(args.rounds):
        rates.append(generate_one(model, tok, prompt, decoding).generation_tps)
    print(
        f"generate_one: {statistics.median(rates):.1f} tok/s (median of {args.rounds}, "
        f"{args.steps} tokens)"
    )
    print(f"load average {os.getloadavg()[0]:.2f} at the end")


def load(name: str):
    from distiller.models import load_model

    return load_model(name)


if __name__ == "__main__":
    main()
