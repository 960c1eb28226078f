"""File size per quant type of ``distiller export --format gguf``, and decode speed in llama.cpp
next to MLX's, on the embedded SmolLM2-135M-Instruct (the README's "Export to GGUF" table).

llama.cpp runs through llama-cpp-python (the optional ``[llamacpp]`` extra); without it only the
sizes and MLX's speed are printed. Decode tok/s is timed from the first generated token to the
last (prefill excluded), greedy, on the same chat prompt for both engines.

    .venv/bin/python scripts/bench_export_gguf.py [--tokens 64] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import distiller  # noqa: F401  (must precede mlx: it loads the fast BLAS)
from distiller.models import load_model, resolve_model
from distiller.models.export_gguf import QUANT_TYPES, export_gguf

MODEL = "smollm2-135m-instruct"
QUESTION = "Explain what a quorum is in a distributed system."


def mlx_decode_tps(model_dir: Path, tokens: int) -> float:
    from mlx_lm import stream_generate

    model, tokenizer = load_model(model_dir)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}], add_generation_prompt=True
    )
    responses = list(stream_generate(model, tokenizer, prompt, max_tokens=tokens))
    return float(responses[-1].generation_tps)


def llamacpp_decode_tps(path: Path, prompt: str, tokens: int, threads: int) -> float:
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=1024, n_threads=threads, verbose=False)
    ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
    first = None
    count = 0
    for _ in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        count += 1
        if first is None:
            first = time.perf_counter()
        if count >= tokens:
            break
    return (count - 1) / (time.perf_counter() - first)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    try:
        import llama_cpp  # noqa: F401

        have_llamacpp = True
    except ImportError:
        have_llamacpp = False

    source = resolve_model(MODEL)
    _, tokenizer = load_model(source)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}], add_generation_prompt=True, tokenize=False
    )
    rows = [
        {
            "engine": "mlx",
            "quant": "f32 (MLX dir)",
            "mb": round(sum(p.stat().st_size for p in source.iterdir()) / 1e6, 1),
            "decode_tok_s": round(mlx_decode_tps(source, args.tokens), 1),
        }
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for quant in QUANT_TYPES:
            report = export_gguf(source, Path(tmp) / f"{MODEL}-{quant}.gguf", quant, progress=False)
            row = {
                "engine": "llama.cpp",
                "quant": quant,
                "mb": round(report.bytes_written / 1e6, 1),
                "export_s": round(report.seconds, 1),
            }
            if have_llamacpp:
                tps = llamacpp_decode_tps(report.path, prompt, args.tokens, args.threads)
                row["decode_tok_s"] = round(tps, 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("| engine | weights | size (MB) | decode tok/s |")
    print("|---|---|---:|---:|")
    for row in rows:
        print(
            f"| {row['engine']} | {row['quant']} | {row['mb']} | {row.get('decode_tok_s', '-')} |"
        )


if __name__ == "__main__":
    main()
