"""A teacher-logit cache: the teacher's top-k log-probabilities at every supervised position of
the training data, computed once and reused by every epoch and every rerun, so logit KD with
``student.kd.cache`` never runs the teacher forward in a training step.

Format. The examples (in file order) are cut into shards of ``rows_per_shard`` rows. A shard
is one ``.npz`` file named by the hash of what determines its content: the teacher's
fingerprint, k, the temperature and the shard's token ids and answer offsets. It holds, for
every supervised position of its rows in order (the positions ``batches.collate`` masks in):
  indices  (N, k) int32    the teacher's k likeliest next tokens
  logprobs (N, k) float16  their log-probabilities at the temperature
  log_tail (N,)   float32  log of the mass outside them (kept exact: it can be tiny)
  counts   (R,)   int32    supervised positions per row
so a position costs ``6 k + 4`` bytes (``bytes_per_token``).

Crash safety. Each shard is written whole with ``atomic_write`` (temp file, fsync, rename): a
killed build leaves whole shards and at most a temp file, which the next build removes. A
build skips the shards already on disk, so a resumed build computes exactly the missing ones:
nothing lost, nothing written twice. A shard is content-addressed, so a change of teacher, k,
temperature or data never reuses a stale one (it simply computes new shards beside it).
"""

from __future__ import annotations

import io
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from distiller import fast_ops as F
from distiller.files import atomic_write
from distiller.hashing import stable_hash
from distiller.train import batches as B

CACHE_DIR_NAME = "teacher_logits"
FORMAT_VERSION = 1
# The tail's log-mass when the top-k hold everything (k = vocabulary): finite, see losses.
NO_MASS = -1.0e4


def bytes_per_token(top_k: int) -> int:
    """Bytes one cached position takes: k int32 indices, k float16 values, one float32 tail."""
    return top_k * (4 + 2) + 4


def teacher_fingerprint(model_dir: str | Path) -> str:
    """Identity of a local teacher's weights: its config and the name, size and modification
    time of each weight file (cheap, and changes whenever the weights are rewritten)."""
    d = Path(model_dir)
    files = sorted(d.glob("*.safetensors"))
    parts: list[Any] = [(d / "config.json").read_text() if (d / "config.json").exists() else ""]
    for f in files:
        st = f.stat()
        parts.append([f.name, st.st_size, st.st_mtime_ns])
    return stable_hash(parts, 16)


def supervised_count(example: B.Example) -> int:
    """How many positions of ``example`` carry a loss (``batches.collate``'s mask)."""
    n = len(example.tokens) - 1
    return max(0, n - max(example.offset - 1, 0))


@dataclass
class TeacherTopK:
    """The cached teacher entries of every example: row ``i`` is ``indices[starts[i]:
    starts[i + 1]]`` (and the same slice of ``logprobs`` / ``log_tail``)."""

    indices: np.ndarray
    logprobs: np.ndarray
    log_tail: np.ndarray
    starts: np.ndarray
    top_k: int
    temperature: float

    def rows(self, idx: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The entries of rows ``idx`` concatenated in that order (a batch's ``sel`` order)."""
        spans = [np.arange(self.starts[i], self.starts[i + 1]) for i in idx]
        take = np.concatenate(spans) if spans else np.zeros(0, np.int64)
        return self.indices[take], self.logprobs[take], self.log_tail[take]


@dataclass(frozen=True)
class BuildReport:
    shards: int
    computed: int  # shards computed by this build (the rest were on disk)
    positions: int
    bytes_on_disk: int
    top_k: int

    @property
    def bytes_per_position(self) -> float:
        return self.bytes_on_disk / max(self.positions, 1)


def shard_key(
    fingerprint: str, top_k: int, temperature: float, examples: Sequence[B.Example]
) -> str:
    rows = [[list(map(int, e.tokens)), int(e.offset)] for e in examples]
    return stable_hash(["logit-cache", FORMAT_VERSION, fingerprint, top_k, temperature, rows], 24)


def teacher_topk(
    teacher: nn.Module, batch: dict[str, Any], top_k: int, temperature: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The teacher's top-k log-probabilities at the batch's supervised positions (``sel``)."""
    from distiller.train.routes import selected_logits

    b = {k: mx.array(v) for k, v in batch.items() if k != "lengths"}
    n = int(np.asarray(batch["sel_mask"]).sum())
    idx, vals, tail = topk_entries(selected_logits(teacher, b)[:n], top_k, temperature)
    mx.eval(idx, vals, tail)
    return np.array(idx, np.int32), np.array(vals).astype(np.float16), np.array(tail, np.float32)


def topk_entries(
    logits: mx.array, top_k: int, temperature: float = 1.0
) -> tuple[mx.array, mx.array, mx.array]:
    """(indices, log-probabilities, log tail mass) of the k likeliest tokens of each row of
    ``logits`` (N, V) at ``temperature``, in float32: what a cache shard stores."""
    logp = F.log_softmax(logits.astype(mx.float32) / float(temperature), axis=-1)
    k = min(top_k, logp.shape[-1])
    idx = mx.argpartition(-logp, k - 1, axis=-1)[:, :k]
    vals = mx.take_along_axis(logp, idx, axis=-1)
    order = mx.argsort(-vals, axis=-1)  # likeliest first: easier to read, same content
    idx, vals = mx.take_along_axis(idx, order, axis=-1), mx.take_along_axis(vals, order, axis=-1)
    outside = mx.put_along_axis(logp, idx, mx.array(2 * NO_MASS, mx.float32), axis=-1)
    tail = mx.maximum(mx.logsumexp(outside, axis=-1), NO_MASS)
    return idx, vals, tail


ScoreFn = Callable[[Sequence[B.Example]], tuple[np.ndarray, np.ndarray, np.ndarray]]


def local_scorer(
    teacher: nn.Module, top_k: int, temperature: float, batch_size: int = 8
) -> ScoreFn:
    """Scores examples with a local teacher model, ``batch_size`` rows per forward."""

    def score(examples: Sequence[B.Example]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        parts = []
        for i in range(0, len(examples), batch_size):
            chunk = list(examples[i : i + batch_size])
            parts.append(teacher_topk(teacher, B.collate(chunk), top_k, temperature))
        return tuple(np.concatenate([p[j] for p in parts]) for j in range(3))  # type: ignore[return-value]

    return score


def _remove_torn_writes(cache_dir: Path) -> None:
    for tmp in cache_dir.glob(".*.tmp"):  # what a killed atomic_write left
        tmp.unlink(missing_ok=True)


def _load_shard(path: Path) -> dict[str, np.ndarray] | None:
    try:
        with np.load(path) as z:
            return {k: z[k] for k in ("indices", "logprobs", "log_tail", "counts")}
    except (OSError, ValueError, KeyError):
        return None  # unreadable: computed again (atomic writes make this a foreign file)


def build_cache(
    examples: Sequence[B.Example],
    cache_dir: str | Path,
    score: ScoreFn,
    *,
    fingerprint: str,
    top_k: int,
    temperature: float,
    rows_per_shard: int = 64,
    log: Callable[[str], object] | None = None,
) -> tuple[TeacherTopK, BuildReport]:
    """The cache of ``examples``, computing (with ``score``) only the shards not on disk."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    _remove_torn_writes(cache_dir)
    shards, computed, size = [], 0, 0
    for start in range(0, len(examples), rows_per_shard):
        chunk = examples[start : start + rows_per_shard]
        path = cache_dir / f"{shard_key(fingerprint, top_k, temperature, chunk)}.npz"
        expected = [supervised_count(e) for e in chunk]
        shard = _load_shard(path) if path.exists() else None
        if shard is None or shard["counts"].tolist() != expected:
            idx, vals, tail = score(chunk)
            if len(idx) != sum(expected):
                raise ValueError(f"scorer gave {len(idx)} positions, expected {sum(expected)}")
            shard = {
                "indices": idx,
                "logprobs": vals,
                "log_tail": tail,
                "counts": np.asarray(expected, np.int32),
            }
            buf = io.BytesIO()
            np.savez(buf, **shard)
            atomic_write(path, buf.getvalue())
            computed += 1
        size += path.stat().st_size
        shards.append(shard)
    counts = np.concatenate([s["counts"] for s in shards]) if shards else np.zeros(0, np.int32)
    k = int(shards[0]["indices"].shape[1]) if shards else top_k
    cache = TeacherTopK(
        indices=_cat(shards, "indices", (0, k), np.int32),
        logprobs=_cat(shards, "logprobs", (0, k), np.float16),
        log_tail=_cat(shards, "log_tail", (0,), np.float32),
        starts=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        top_k=k,
        temperature=temperature,
    )
    report = BuildReport(len(shards), computed, int(counts.sum()), size, k)
    if log is not None:
        log(
            f"teacher-logit cache {cache_dir}: k={k}, {report.positions} positions in "
            f"{report.shards} shards ({report.computed} computed now), "
            f"{bytes_per_token(k)} bytes/token of arrays, "
            f"{report.bytes_per_position:.1f} bytes/token on disk"
        )
    return cache, report


def _cat(shards: list[dict], key: str, empty: tuple[int, ...], dtype: Any) -> np.ndarray:
    return np.concatenate([s[key] for s in shards]) if shards else np.zeros(empty, dtype)


# ---------------------------------------------------------------------------- batches


CACHE_KEYS = ("t_indices", "t_logprobs", "t_log_tail")


def attach(batch: dict[str, np.ndarray], cache: TeacherTopK, idx: Sequence[int]) -> dict:
    """``batch`` (from ``collate`` of rows ``idx``) with the rows' teacher entries laid out as
    its ``sel`` (padded like it; padding has ``sel_mask`` 0 and no loss)."""
    ind, lp, tail = cache.rows(idx)
    width = len(batch["sel"])
    n = len(ind)
    out = dict(batch)
    out["t_indices"] = np.zeros((width, cache.top_k), np.int32)
    out["t_logprobs"] = np.full((width, cache.top_k), NO_MASS, np.float16)
    out["t_log_tail"] = np.zeros((width,), np.float32)
    out["t_indices"][:n], out["t_logprobs"][:n], out["t_log_tail"][:n] = ind, lp, tail
    out["row_ids"] = np.asarray(idx, np.int64)
    return out


def split_cached_rows(cache: TeacherTopK) -> Callable[[dict, int], list[dict]]:
    """``split`` for ``make_train_step``: row shards that keep their rows' teacher entries."""

    def split(batch: dict, parts: int) -> list[dict]:
        ids = np.asarray(batch["row_ids"])
        plain = {k: v for k, v in batch.items() if k not in (*CACHE_KEYS, "row_ids")}
        out = []
        for rows in np.array_split(np.arange(len(ids)), min(parts, len(ids))):
            part = B.split_rows({k: np.asarray(plain[k])[rows] for k in B._ROW_KEYS}, 1)[0]
            out.append(attach(part, cache, ids[rows].tolist()))
        return [{k: v for k, v in p.items() if k != "row_ids"} for p in out]

    return split


def print_log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- served teacher


def endpoint_scorer(backend: Any, tokenizer: Any, top_k: int) -> ScoreFn:
    """Scores examples with OpenAI-compatible servers' ``top_logprobs`` (``mlx_lm.server``,
    vLLM, llama.cpp): the same cache, filled by a served teacher at temperature 1.

    Servers report log-probabilities of the tokens they generate, not of a given answer, so
    each supervised position is one teacher-forced ``/completions`` request: the text of the
    tokens before it as the prompt, ``max_tokens: 1``, ``top_logprobs: k`` (mlx_lm.server
    allows at most 11). ``backend`` is the teacher's ``OpenAICompatBackend``: a shard's
    requests go out together, ``max_concurrency`` per server across all of ``urls``, retried
    and failed over like the teacher's chat requests (a server that reuses prompt prefixes
    makes them cheaper).

    Tokenizer mismatch is refused, not aligned: the prompt text must encode back to exactly
    the student's tokens, and every token the server names must have the same id in the
    student's vocabulary; the first difference is a ``UserError`` naming it. The tail is what
    the k reported probabilities leave, 1 - sum.
    """
    from distiller.backends import BackendError
    from distiller.errors import UserError

    where = ", ".join(backend.urls)

    def context(tokens: list[int]) -> str:
        text = tokenizer.decode(tokens)
        if list(tokenizer.encode(text)) != tokens:
            raise UserError(
                f"{where}: a served teacher sees text, and the text of these {len(tokens)} "
                "tokens does not encode back to them; refusing rather than scoring another "
                "context"
            )
        return text

    def entry_ids(entries: list[dict]) -> tuple[list[int], list[float]]:
        ids, vals = [], []
        for e in entries[:top_k]:
            here = tokenizer.convert_tokens_to_ids(e.get("token"))
            if here != e.get("id"):
                raise UserError(
                    f"{where}: the server's tokenizer is not the student's: token "
                    f"{e.get('token')!r} is id {e.get('id')} there, {here} here; a served teacher "
                    "must share the student's vocabulary (refused, not aligned)"
                )
            ids.append(int(e["id"]))
            vals.append(float(e["logprob"]))
        if len(ids) != top_k:
            raise UserError(f"{where}: asked for {top_k} top_logprobs, got {len(ids)}")
        return ids, vals

    def score(examples: Sequence[B.Example]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        prompts = [
            context(list(e.tokens[: p + 1]))
            for e in examples
            for p in range(max(e.offset - 1, 0), len(e.tokens) - 1)
        ]
        try:
            replies = backend.top_logprobs(prompts, top_k)
        except BackendError as exc:
            raise UserError(f"{where}: {exc}") from None
        idx, vals = [], []
        for entries in replies:
            i, v = entry_ids(entries)
            order = np.argsort(-np.asarray(v), kind="stable")
            idx.append(np.asarray(i)[order])
            vals.append(np.asarray(v)[order])
        ind = np.asarray(idx, np.int32).reshape(-1, top_k)
        lp = np.asarray(vals, np.float64).reshape(-1, top_k)
        rest = 1.0 - np.exp(lp).sum(-1)
        tail = np.where(rest > 0, np.log(np.maximum(rest, 1e-300)), NO_MASS)
        return ind, lp.astype(np.float16), np.maximum(tail, NO_MASS).astype(np.float32)

    return score
