"""Record llama.cpp's tokenization and logits on the ORIGINAL SmolLM2 GGUF as test reference data.

The converted MLX model is checked against these numbers (tests/test_gguf_reference.py), so
they must come from an independent implementation: llama.cpp via llama-cpp-python, run on the
Q4_1 GGUF exactly as shipped. This script does not import distiller, and llama-cpp-python
compiles llama.cpp on install, so keep it out of the project venv.

Regenerate (takes a while the first time, llama.cpp compiles; the run itself takes seconds):

    python3 -m venv /tmp/llamacpp-venv
    /tmp/llamacpp-venv/bin/pip install llama-cpp-python numpy
    .venv/bin/distiller models pull smollm2-135m-instruct     # puts the GGUF in the cache
    /tmp/llamacpp-venv/bin/python scripts/record_llamacpp_reference.py

Output: fixtures/reference/llamacpp_logits.npz (compressed, ~1 MB) holding, per prompt i:
``ids_i`` (token ids, llama.cpp tokenization with special tokens parsed, no BOS), ``top1_i``
(argmax per position), ``sub_i`` (float16 logits at the fixed ``subset`` of vocab ids per
position), ``topk_ids_i`` / ``topk_i`` (each position's top-32 ids and float16 logits), and for
the chat prompt ``greedy_ids`` (llama.cpp's greedy continuation). ``prompts`` and ``meta`` are
JSON strings.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np

GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SUBSET_SIZE = 2048
TOP_K = 32
GREEDY_TOKENS = 32

SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

PROMPTS = [
    "The capital of France is",
    (
        f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n"
        "What is a quorum in a distributed system?<|im_end|>\n<|im_start|>assistant\n"
    ),
    "Café déjà vu: naïve façades in Zürich cost 1234,56 € — ¿por qué? Ελληνικά, русский, 日本語の文章、中文句子。🙂🚀",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n\n# 10 first values:",
    "  Multiple   spaces,\ttabs\n\nand blank lines; numbers 3.14159 2024-11-24 0xFF 1e-5.",
    (
        "<|im_start|>user\nList three trade-offs of caching.<|im_end|>\n"
        "<|im_start|>assistant\n1. Staleness: cached data can be out of date."
    ),
]


def default_gguf() -> Path:
    home = os.environ.get("DISTILLER_HOME") or str(Path.home() / ".cache" / "distiller")
    return Path(home) / "downloads" / "smollm2-135m-instruct.gguf"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--gguf", type=Path, default=default_gguf(), help="the original GGUF (sha256-checked)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent.parent
        / "fixtures"
        / "reference"
        / "llamacpp_logits.npz",
    )
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import llama_cpp

    digest = hashlib.sha256(args.gguf.read_bytes()).hexdigest()
    if digest != GGUF_SHA256:
        raise SystemExit(f"{args.gguf}: sha256 {digest}, expected {GGUF_SHA256}")

    llm = llama_cpp.Llama(
        str(args.gguf),
        n_ctx=1024,
        n_batch=512,
        logits_all=True,
        n_threads=args.threads,
        verbose=False,
    )
    vocab = llm.n_vocab()
    subset = np.sort(np.random.default_rng(0).choice(vocab, SUBSET_SIZE, replace=False)).astype(
        np.int32
    )
    out: dict[str, np.ndarray] = {"subset": subset}
    start = time.perf_counter()
    for i, prompt in enumerate(PROMPTS):
        ids = llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
        llm.reset()
        llm.eval(ids)
        logits = np.array(llm.scores[: len(ids)], dtype=np.float32)
        top = np.argsort(-logits, axis=-1)[:, :TOP_K].astype(np.int32)
        out[f"ids_{i}"] = np.array(ids, dtype=np.int32)
        out[f"top1_{i}"] = top[:, 0].copy()
        out[f"sub_{i}"] = logits[:, subset].astype(np.float16)
        out[f"topk_ids_{i}"] = top
        out[f"topk_{i}"] = np.take_along_axis(logits, top, axis=-1).astype(np.float16)
        print(f"prompt {i}: {len(ids)} tokens")

    # llama.cpp's own greedy continuation of the chat prompt.
    ids = list(out["ids_1"])
    llm.reset()
    greedy = []
    for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        if token == llm.token_eos() or len(greedy) >= GREEDY_TOKENS:
            break
        greedy.append(token)
    out["greedy_ids"] = np.array(greedy, dtype=np.int32)
    print("greedy:", llm.detokenize(greedy).decode("utf-8", "replace"))

    out["prompts"] = np.array(json.dumps(PROMPTS, ensure_ascii=False))
    out["meta"] = np.array(
        json.dumps(
            {
                "engine": f"llama-cpp-python {llama_cpp.__version__}",
                "gguf_sha256": digest,
                "threads": args.threads,
                "subset_seed": 0,
                "top_k": TOP_K,
                "recorded": time.strftime("%Y-%m-%d"),
                "seconds": round(time.perf_counter() - start, 2),
            }
        )
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
