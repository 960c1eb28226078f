"""A crash-safe, resumable store of teacher samples: one JSON line per attempt.

Every record is written with a single ``write`` followed by ``fsync``, so after a crash the
file holds whole records plus at most one torn last line. A writer opening the store cuts
that torn tail away (and says so in ``notes``); a rerun then skips exactly the ids already
present, so nothing is lost and nothing is written twice. One writer at a time: the writer
holds an exclusive ``flock`` (released by the OS even on SIGKILL).

Record fields (written by ``distiller.teacher``): id, prompt_id, prompt (bare user text),
sample_index, messages (what the teacher saw), completion, accepted, reasons, score, verdict,
teacher (identity, no secrets; ``teacher["config"]`` hashes identity + scaffold + decoding),
tokens {prompt, completion}, finish_reason, created; and endpoint (the server that answered)
for a teacher behind HTTP endpoints.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from distiller.errors import UserError
from distiller.hashing import stable_hash


def config_hash(obj: Any) -> str:
    """Short ``stable_hash`` of a JSON-able value: sample ids and teacher configs."""
    return stable_hash(obj, 16)


def sample_id(prompt_text: str, teacher_config: str, sample_index: int) -> str:
    """The id of one attempt: the same prompt, teacher setup and index always map to it."""
    return config_hash(["sample", prompt_text, teacher_config, int(sample_index)])


def select_kept(records: Iterable[dict], keep: str = "first") -> dict[str, dict]:
    """For each prompt_id, the kept accepted record: the lowest sample_index ("first") or the
    highest score, ties to the lowest sample_index ("best"). Derived from the records alone,
    so it is the same however many runs wrote them."""
    if keep not in ("first", "best"):
        raise ValueError(f"keep must be 'first' or 'best', got {keep!r}")
    kept: dict[str, dict] = {}
    for r in records:
        if not r.get("accepted"):
            continue
        cur = kept.get(r["prompt_id"])
        if cur is None:
            kept[r["prompt_id"]] = r
            continue
        if keep == "first":
            better = r["sample_index"] < cur["sample_index"]
        else:
            better = (r.get("score") or 0.0, -r["sample_index"]) > (
                cur.get("score") or 0.0,
                -cur["sample_index"],
            )
        if better:
            kept[r["prompt_id"]] = r
    return kept


class SampleStore:
    """Append-only JSONL sample store. ``readonly=True`` neither locks nor repairs the file."""

    def __init__(self, path: str | Path, readonly: bool = False):
        self.path = Path(path)
        self.readonly = readonly
        self.notes: list[str] = []
        self._fd: int | None = None
        self._ids: set[str] = set()
        self._count = 0
        if not readonly:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
            self._lock()
            self._repair_tail()
        for rec in self.records():
            self._ids.add(rec["id"])
            self._count += 1

    # -- opening ---------------------------------------------------------------------------

    def _lock(self) -> None:
        try:
            import fcntl
        except ImportError:  # Windows: no advisory lock, single writer by convention
            return
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            self._fd = None
            raise UserError(f"{self.path}: another process is writing this sample store") from None

    def _repair_tail(self) -> None:
        """Cut a torn last line (a kill mid-write, or a crash before the data hit the disk)."""
        with open(self.path, "rb") as f:
            data = f.read()
        size = len(data)
        if size == 0:
            return
        # Start of the last line: after the newline that ends the previous record.
        body = data[:-1] if data.endswith(b"\n") else data
        start = body.rfind(b"\n") + 1
        last = data[start:]
        # A complete last line still must parse (a crash can leave zero-filled blocks).
        if last.endswith(b"\n") and _parses(last):
            return
        os.ftruncate(self._fd, start)
        os.fsync(self._fd)
        self.notes.append(
            f"{self.path}: removed a torn last line ({size - start} bytes, "
            "an interrupted write); its sample will be generated again"
        )

    # -- reading ---------------------------------------------------------------------------

    def records(self) -> Iterator[dict]:
        """All complete records, in file order. A torn last line (readonly view) is skipped."""
        for _, rec in self.numbered_records():
            yield rec

    def numbered_records(self) -> Iterator[tuple[int, dict]]:
        """``(line, record)`` for every complete record: ``line`` counts the file's lines, blank
        ones included, so errors about a record can name where it is."""
        if not self.path.exists():
            return
        with open(self.path, "rb") as f:
            lines = f.read().split(b"\n")
        lines.pop()  # after the final newline: b"" unless the last write was torn
        for n, raw in enumerate(lines, 1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
            except (ValueError, RecursionError) as exc:
                if n == len(lines) and self.readonly:
                    break  # a torn-then-newline tail a writer would cut; skip it when reading
                if isinstance(exc, UnicodeDecodeError):
                    exc = f"byte 0x{raw[exc.start]:02x} is not UTF-8"
                elif isinstance(exc, RecursionError):
                    exc = "nested too deeply"
                raise UserError(
                    f"{self.path}:{n}: expected one JSON record per line ({exc}); "
                    "the file was edited or corrupted"
                ) from None
            if not isinstance(rec, dict) or not isinstance(rec.get("id"), str) or not rec["id"]:
                raise UserError(f"{self.path}:{n}: expected a JSON object with an 'id' string")
            yield n, rec

    def done_ids(self) -> set[str]:
        return set(self._ids)

    def __contains__(self, record_id: str) -> bool:
        return record_id in self._ids

    def __len__(self) -> int:
        return self._count

    def accepted(self) -> list[dict]:
        return [r for r in self.records() if r.get("accepted")]

    def kept(self, keep: str = "first", config: str | None = None) -> dict[str, dict]:
        """prompt_id -> the kept sample (see ``select_kept``); only records of teacher setup
        ``config`` (``record["teacher"]["config"]``) when given."""
        recs = self.records()
        if config is not None:
            recs = (r for r in recs if (r.get("teacher") or {}).get("config") == config)
        return select_kept(recs, keep)

    # -- writing ---------------------------------------------------------------------------

    def append(self, record: dict) -> None:
        """Write one record durably (one write + fsync). Its id must be new."""
        if self._fd is None:
            raise ValueError(f"{self.path}: store is closed or read-only")
        rid = record.get("id")
        if not rid:
            raise ValueError("record needs an 'id'")
        if rid in self._ids:
            raise ValueError(f"{self.path}: duplicate record id {rid}")
        data = (json.dumps(record, ensure_ascii=False, default=str) + "\n").encode("utf-8")
        view = memoryview(data)
        while view:  # a regular file takes it in one go; loop only for pathological cases
            n = os.write(self._fd, view)
            view = view[n:]
        os.fsync(self._fd)
        self._ids.add(rid)
        self._count += 1

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # also releases the flock
            self._fd = None

    def __enter__(self) -> SampleStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


def _parses(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except (ValueError, RecursionError):
        return False
