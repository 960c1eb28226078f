"""Read, check and tokenize chat / preference data, and cut it into length-sorted, padded batches.

The training files are checked once, where they are read: ``read_chat_rows`` and
``read_pair_rows`` refuse anything but their row format (``CHAT_ROW``, ``PAIR_ROW``) in one line
naming the file, the line and what was there, so tokenizing never meets a malformed row.

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

# What a row must be, as the messages say it.
CHAT_ROW = '{"messages": [{"role", "content"}, ..., {"role": "assistant", "content"}]}'
PAIR_ROW = '{"prompt": text or [{"role", "content"}, ...], "chosen": text, "rejected": text}'
ROLES = ("system", "user", "assistant")
# A line of only these is blank (skipped); any other character is for the JSON parser to judge.
_JSON_SPACE = " \t\r"

Message = dict[str, str]


@dataclass
class Example:
    tokens: list[int]
    offset: int  # index of the first supervised token (prompt tokens come before it)


@dataclass(frozen=True)
class ChatRow:
    where: str  # "file:line", for messages about the row after it was read
    messages: tuple[Message, ...]


@dataclass(frozen=True)
class PairRow:
    where: str
    prompt: tuple[Message, ...]
    chosen: str
    rejected: str


class _Shape(Exception):
    """What is wrong with a row's shape; the reader adds the file, the line and the format."""


def describe(value: Any) -> str:
    """A JSON value as a refusal shows it: short, and in JSON's words."""
    if isinstance(value, dict):
        keys = ", ".join(json.dumps(k) for k in list(value)[:4])
        more = ", ..." if len(value) > 4 else ""
        return f"an object with keys {keys}{more}" if value else "an empty object"
    if isinstance(value, list):
        return f"a list of {len(value)}" if value else "an empty list"
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False)
        if not _encodable(text):  # keep an unpaired surrogate escaped: it cannot be printed
            text = json.dumps(value)
        shown = text if len(text) <= 40 else text[:36] + '..."'
        return f"the string {shown}"
    if isinstance(value, int | float):
        text = repr(value)
        return f"the number {text if len(text) <= 24 else text[:20] + '...'}"
    return type(value).__name__


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def read_jsonl(path: str | Path) -> list[tuple[int, Any]]:
    """(line number, value) for every non-blank line of a JSONL file: line numbers are the
    file's own (blank lines count), so an editor's "go to line" lands on the row."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except IsADirectoryError:
        raise UserError(
            f"{path}: a directory, expected a JSONL file (one JSON object per line)"
        ) from None
    except FileNotFoundError:
        raise UserError(f"{path}: not found") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read: {exc.strerror or exc}") from None
    rows = []
    # Split on b"\n" only: U+2028 and other characters str.splitlines() breaks at are valid
    # inside a JSON string, and an editor does not count them as lines either.
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        try:
            line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            raise UserError(
                f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at column "
                f"{exc.start + 1})"
            ) from None
        if not line.strip(_JSON_SPACE):
            continue
        try:
            rows.append((lineno, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
        except (ValueError, RecursionError) as exc:  # an over-long integer, too deep nesting
            reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
            raise UserError(f"{path}:{lineno}: not a JSON value we can read ({reason})") from None
    return rows


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise _Shape(f"{what}: {describe(value)}")
    if not _encodable(value):  # an unpaired surrogate escape such as "\ud800": not text
        raise _Shape(f"{what}: a string with an unpaired surrogate escape")
    return value


def _messages(value: Any, what: str) -> tuple[Message, ...]:
    if not isinstance(value, list) or not value:
        raise _Shape(f"{what}: {describe(value)}")
    out = []
    for i, m in enumerate(value):
        here = f"{what}[{i}]"
        if not isinstance(m, dict):
            raise _Shape(f"{here}: {describe(m)}")
        for key in ("role", "content"):
            if key not in m:
                raise _Shape(f"{here} without {json.dumps(key)}")
        role = _text(m["role"], f"{here}.role")
        if role not in ROLES:
            raise _Shape(f"{here}.role: {describe(role)} (roles: {', '.join(ROLES)})")
        out.append({"role": role, "content": _text(m["content"], f"{here}.content")})
    return tuple(out)


def _object(value: Any, keys: tuple[str, ...]) -> dict:
    if not isinstance(value, dict):
        raise _Shape(describe(value))
    missing = [json.dumps(k) for k in keys if k not in value]
    if missing:
        raise _Shape(f"{describe(value)} (no {', '.join(missing)})")
    return value


def _chat_row(where: str, value: Any) -> ChatRow:
    messages = _messages(_object(value, ("messages",))["messages"], "messages")
    if messages[-1]["role"] != "assistant":
        raise _Shape(f"a last message with role {json.dumps(messages[-1]['role'])}")
    if len(messages) < 2:
        raise _Shape("an assistant message with nothing before it")
    return ChatRow(where, messages)


def _pair_row(where: str, value: Any) -> PairRow:
    row = _object(value, ("prompt", "chosen", "rejected"))
    prompt = row["prompt"]
    if isinstance(prompt, str):
        messages: tuple[Message, ...] = ({"role": "user", "content": _text(prompt, "prompt")},)
    else:
        messages = _messages(prompt, "prompt")
    return PairRow(
        where, messages, _text(row["chosen"], "chosen"), _text(row["rejected"], "rejected")
    )


def _read_rows(path: str | Path, fmt: str, check: Any) -> list:
    rows = []
    for lineno, value in read_jsonl(path):
        where = f"{path}:{lineno}"
        try:
            rows.append(check(where, value))
        except _Shape as exc:
            raise UserError(f"{where}: expected {fmt}, got {exc}") from None
    return rows


def read_chat_rows(path: str | Path) -> list[ChatRow]:
    """The conversations of a train.jsonl / valid.jsonl, each checked against ``CHAT_ROW``."""
    return _read_rows(path, CHAT_ROW, _chat_row)


def read_pair_rows(path: str | Path) -> list[PairRow]:
    """The preference pairs of a pairs_*.jsonl, each checked against ``PAIR_ROW``."""
    return _read_rows(path, PAIR_ROW, _pair_row)


def encode_chat(
    tokenizer: Any, messages: list[Message] | tuple[Message, ...], max_seq_length: int
) -> Example:
    """Tokens of a whole conversation; loss only on the final assistant turn.

    ``messages`` have the shape ``read_chat_rows`` checks; what the model's chat template itself
    refuses (a role it does not know, say) is a ``UserError`` too.
    """
    messages = list(messages)
    if len(messages) < 2 or messages[-1].get("role") != "assistant":
        raise UserError("a training conversation must end with an assistant message answering one")
    try:
        full = tokenizer.apply_chat_template(messages, return_dict=False)
        prompt = tokenizer.apply_chat_template(
            messages[:-1], add_generation_prompt=True, return_dict=False
        )
    except Exception as exc:  # jinja2's TemplateError, or what a template's code raises
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"the model's chat template refused the conversation: {reason}") from None
    return Example(list(full[:max_seq_length]), min(len(prompt), max_seq_length))


def encode_chat_rows(rows: list[ChatRow], tokenizer: Any, max_seq_length: int) -> list[Example]:
    return [_encode(row.where, tokenizer, row.messages, max_seq_length) for row in rows]


def encode_pair_rows(
    rows: list[PairRow], tokenizer: Any, max_seq_length: int
) -> list[tuple[Example, Example]]:
    """(chosen, rejected) examples: the prompt's messages, then each answer as the assistant's."""
    return [
        (
            _encode(row.where, tokenizer, (*row.prompt, _answer(row.chosen)), max_seq_length),
            _encode(row.where, tokenizer, (*row.prompt, _answer(row.rejected)), max_seq_length),
        )
        for row in rows
    ]


def _answer(text: str) -> Message:
    return {"role": "assistant", "content": text}


def _encode(
    where: str, tokenizer: Any, messages: tuple[Message, ...], max_seq_length: int
) -> Example:
    try:
        return encode_chat(tokenizer, messages, max_seq_length)
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None


def load_chat_examples(path: str | Path, tokenizer: Any, max_seq_length: int) -> list[Example]:
    return encode_chat_rows(read_chat_rows(path), tokenizer, max_seq_length)


def load_pair_examples(
    path: str | Path, tokenizer: Any, max_seq_length: int
) -> list[tuple[Example, Example]]:
    """DPO pairs (``PAIR_ROW``; the prompt is a text or a list of messages)."""
    return encode_pair_rows(read_pair_rows(path), tokenizer, max_seq_length)


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
