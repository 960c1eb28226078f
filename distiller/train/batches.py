"""Tokenize chat / preference data and cut it into length-sorted, padded batches.

A batch is a dict of int32/float32 arrays (numpy until it reaches the step): ``inputs`` and
``targets`` (B, L) with L a multiple of ``pad_to`` (few distinct shapes keep ``mx.compile``
from recompiling), and ``mask`` (B, L) = 1.0 on supervised (assistant) target tokens only.

Order is a pure function of (seed, step): batch ``k`` of the run is batch ``k % n`` of epoch
``k // n``'s permutation, so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from distiller.errors import UserError


@dataclass
class Example:
    tokens: list[int]
    offset: int  # index of the first supervised token (prompt tokens come before it)


def read_jsonl(path: str | Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
    return rows


def encode_chat(tokenizer: Any, messages: list[dict], max_seq_length: int) -> Example:
    """Tokens of a whole conversation; loss only on the final assistant turn."""
    if not messages or messages[-1].get("role") != "assistant":
        raise UserError("a training conversation must end with an assistant message")
    full = tokenizer.apply_chat_template(messages, return_dict=False)
    prompt = tokenizer.apply_chat_template(
        messages[:-1], add_generation_prompt=True, return_dict=False
    )
    return Example(list(full[:max_seq_length]), min(len(prompt), max_seq_length))


def load_chat_examples(path: str | Path, tokenizer: Any, max_seq_length: int) -> list[Example]:
    out = []
    for lineno, row in enumerate(read_jsonl(path), 1):
        if "messages" not in row:
            raise UserError(f"{path}:{lineno}: expected a 'messages' list")
        try:
            out.append(encode_chat(tokenizer, row["messages"], max_seq_length))
        except UserError as exc:
            raise UserError(f"{path}:{lineno}: {exc}") from None
    return out


def load_pair_examples(
    path: str | Path, tokenizer: Any, max_seq_length: int
) -> list[tuple[Example, Example]]:
    """DPO pairs {"prompt", "chosen", "rejected"} (prompt: text or a list of messages)."""
    out = []
    for lineno, row in enumerate(read_jsonl(path), 1):
        missing = [k for k in ("prompt", "chosen", "rejected") if k not in row]
        if missing:
            raise UserError(f"{path}:{lineno}: missing {', '.join(missing)}")
        prompt = row["prompt"]
        msgs = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        pair = tuple(
            encode_chat(
                tokenizer, [*msgs, {"role": "assistant", "content": row[k]}], max_seq_length
            )
            for k in ("chosen", "rejected")
        )
        out.append(pair)
    return out


def _pad_len(n: int, pad_to: int) -> int:
    return max(pad_to, pad_to * ((n + pad_to - 1) // pad_to))


def collate(examples: list[Example], pad_to: int = 32) -> dict[str, np.ndarray]:
    """Right-pad to a common length; causal attention keeps padding from touching real tokens."""
    width = _pad_len(max(len(e.tokens) - 1 for e in examples), pad_to)
    inputs = np.zeros((len(examples), width), np.int32)
    targets = np.zeros((len(examples), width), np.int32)
    mask = np.zeros((len(examples), width), np.float32)
    lengths = np.zeros((len(examples),), np.int32)
    for i, e in enumerate(examples):
        toks = np.asarray(e.tokens, np.int32)
        n = len(toks) - 1
        inputs[i, :n] = toks[:-1]
        targets[i, :n] = toks[1:]
        # target position j predicts token j+1, which is supervised iff j+1 >= offset.
        mask[i, max(e.offset - 1, 0) : n] = 1.0
        lengths[i] = n
    return {
        "inputs": inputs,
        "targets": targets,
        "mask": mask,
        "lengths": lengths,
        **select(mask),
    }


def bucket(n: int, minimum: int = 32) -> int:
    """Round ``n`` up to a multiple of max(minimum, 2**(bits(n) - 3)): at most
    max(minimum, n / 4) padding rows and few distinct shapes (each costs a recompile)."""
    if n <= minimum:
        return minimum
    step = max(minimum, 1 << max(0, n.bit_length() - 3))
    return step * ((n + step - 1) // step)


def select(mask: np.ndarray, pad_to: int | None = None) -> dict[str, np.ndarray]:
    """Flat indices of the supervised positions, so the vocabulary projection and softmax
    (the costliest part of a small model's step) run only where a loss is taken.

    ``sel`` (N,) indexes the flattened (B*L) positions, padded (to a ``bucket`` size, or a
    multiple of ``pad_to``) with
    position 0 and ``sel_mask`` 0; ``sel_rows`` (B, N) maps each selected position to its row
    (for per-sequence sums, e.g. DPO log-probabilities).
    """
    flat = np.flatnonzero(mask.reshape(-1) > 0).astype(np.int32)
    width = _pad_len(len(flat), pad_to) if pad_to else bucket(len(flat))
    sel = np.zeros(width, np.int32)
    sel[: len(flat)] = flat
    sel_mask = np.zeros(width, np.float32)
    sel_mask[: len(flat)] = 1.0
    rows = np.zeros((mask.shape[0], width), np.float32)
    rows[flat // mask.shape[1], np.arange(len(flat))] = 1.0
    return {"sel": sel, "sel_mask": sel_mask, "sel_rows": rows}


def collate_pairs(pairs: list[tuple[Example, Example]], pad_to: int = 32) -> dict[str, np.ndarray]:
    """Chosen rows first, then rejected rows, in one batch of 2B sequences (one forward pass)."""
    return collate([p[0] for p in pairs] + [p[1] for p in pairs], pad_to)


_ROW_KEYS = ("inputs", "targets", "mask", "lengths")


def _take_rows(batch: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
    part = {k: np.asarray(batch[k])[rows] for k in _ROW_KEYS if k in batch}
    return {**part, **select(part["mask"])}


def split_rows(batch: dict[str, np.ndarray], parts: int) -> list[dict[str, np.ndarray]]:
    """Cut a batch of independent rows into up to ``parts`` row shards (sizes differ by at most
    one), each with its own selection of supervised positions."""
    n = len(batch["inputs"])
    return [_take_rows(batch, rows) for rows in np.array_split(np.arange(n), min(parts, n))]


def split_pairs(batch: dict[str, np.ndarray], parts: int) -> list[dict[str, np.ndarray]]:
    """Shards of a preference batch (chosen rows, then rejected rows): each shard keeps its
    pairs together, chosen first, with their reference log-probabilities."""
    pairs = len(batch["inputs"]) // 2
    out = []
    for idx in np.array_split(np.arange(pairs), min(parts, pairs)):
        part = _take_rows(batch, np.concatenate([idx, idx + pairs]))
        for key in ("ref_chosen", "ref_rejected"):
            if key in batch:
                part[key] = np.asarray(batch[key])[idx]
        out.append(part)
    return out


def make_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Index groups of similar length (sorted, then chunked), so padding is small."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    bs = max(1, min(batch_size, len(order)))
    return [order[i : i + bs] for i in range(0, len(order), bs)]


def batch_for_step(batches: list[list[int]], step: int, seed: int) -> list[int]:
    """Indices of the batch used at 0-based ``step``: deterministic in (seed, step)."""
    epoch, pos = divmod(step, len(batches))
    perm = np.random.default_rng([seed, epoch]).permutation(len(batches))
    return batches[perm[pos]]


def token_count(batch: dict[str, np.ndarray]) -> int:
    """Real (non-padding) input tokens in a batch: what tokens/s counts."""
    return int(batch["lengths"].sum())
