"""One worker thread per served model, with a small batching queue in front of it.

MLX is not thread-safe, so everything that touches a model (generation, label scoring) runs on
that model's one worker thread. Requests arriving while the worker is busy wait in its queue;
when it is free it takes the oldest job and, if that job is a completion, every queued
completion with the same decoding settings (seeds aside: each sequence samples with its own),
up to ``max_batch``, streamed or not, and runs them as one ``generate_batch``. A streamed one is
handed its text after every token (``on_tokens``); the others get theirs when they finish.

Each job carries its own prompt, decoding and result future; the batched path gives every
sequence its own state, sampler and KV-cache row, so nothing of one request reaches another.
A streamed job whose client went away is no longer decoded or sent; when every job of a batch
has gone, the batch stops.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from distiller.decoding import Decoding
from distiller.generate import Generation, _seeds, generate_batch


class Cancelled(Exception):
    """Raised inside a streamed generation whose client went away: the worker drops the job."""


@dataclass
class GenerateJob:
    """One chat completion: prompt token ids and decoding. A streamed one has ``on_text``,
    called after every token with the text so far (on the worker thread)."""

    prompt: list[int]
    decoding: Decoding
    on_text: Callable[[str], object] | None = None
    future: Future = field(default_factory=Future)
    cancelled: threading.Event = field(default_factory=threading.Event)
    queued_at: float = field(default_factory=time.perf_counter)

    @property
    def batch_key(self) -> Decoding:
        # Jobs batch together when they decode alike; seeds differ per sequence anyway.
        return dataclasses.replace(self.decoding, seed=None)


@dataclass
class CallJob:
    """Any other model work (label scoring): ``fn(model, tokenizer)`` on the worker thread."""

    fn: Callable[[Any, Any], Any]
    future: Future = field(default_factory=Future)
    cancelled: threading.Event = field(default_factory=threading.Event)


Job = GenerateJob | CallJob


@dataclass
class WorkerStats:
    batches: int = 0
    batched_sequences: int = 0
    largest_batch: int = 0
    streams: int = 0
    calls: int = 0


class ModelWorker:
    """The queue and the one thread that run every job of one loaded model."""

    def __init__(self, name: str, model: Any, tokenizer: Any, *, max_batch: int = 8) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.name = name
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.stats = WorkerStats()
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._held: list[Job] = []  # taken from the queue but left for a later batch
        self._thread = threading.Thread(target=self._run, name=f"model-{name}", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> Future:
        self._queue.put(job)
        return job.future

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    # -- the worker thread ------------------------------------------------------------------

    def _next(self) -> Job | None:
        if self._held:
            return self._held.pop(0)
        return self._queue.get()

    def _drain(self) -> None:
        """Move everything queued right now into ``_held`` (keeping arrival order)."""
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if job is None:  # close() while jobs wait: finish them first, then stop
                self._queue.put(None)
                return
            self._held.append(job)

    def _run(self) -> None:
        while (job := self._next()) is not None:
            if job.cancelled.is_set():
                job.future.cancel()
                continue
            try:
                if isinstance(job, CallJob):
                    self.stats.calls += 1
                    job.future.set_result(job.fn(self.model, self.tokenizer))
                else:
                    self._batch(job)
            except Cancelled:
                job.future.cancel()
            except BaseException as exc:  # the request that caused it gets the error
                if not job.future.done():
                    job.future.set_exception(exc)

    def _batch(self, first: GenerateJob) -> None:
        self._drain()
        jobs = [first]
        for other in list(self._held):
            if len(jobs) >= self.max_batch:
                break
            if (
                isinstance(other, GenerateJob)
                and other.batch_key == first.batch_key
                and not other.cancelled.is_set()
            ):
                jobs.append(other)
                self._held.remove(other)
        self.stats.batches += 1
        self.stats.batched_sequences += len(jobs)
        self.stats.largest_batch = max(self.stats.largest_batch, len(jobs))
        self.stats.streams += sum(j.on_text is not None for j in jobs)
        # Position 0's seed of each job's own run seed: what generate_one would draw with, so
        # a seeded request samples the same text whichever batch it lands in.
        seeds = [_seeds(j.decoding.seed, 1)[0] for j in jobs]

        def finished(i: int, generation: Generation) -> None:
            if not jobs[i].future.done():
                jobs[i].future.set_result(generation)

        def tokens(i: int, kept: list[int]) -> None:
            job = jobs[i]
            if job.on_text is not None and not job.cancelled.is_set():
                # Decoded whole, as the final text is (a streaming detokenizer may differ).
                job.on_text(self.tokenizer.decode(list(kept)))
            if all(j.cancelled.is_set() for j in jobs):
                raise Cancelled  # every client went away: stop decoding for nobody

        try:
            generate_batch(
                self.model,
                self.tokenizer,
                [j.prompt for j in jobs],
                first.batch_key,
                seeds=seeds,
                batch_size=len(jobs),
                on_finish=finished,
                on_tokens=tokens,
            )
        except Cancelled:
            for j in jobs:
                j.future.cancel()
        except BaseException as exc:
            for j in jobs:
                if not j.future.done():
                    j.future.set_exception(exc)
