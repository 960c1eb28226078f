"""Text generation with any MLX model: batched (throughput) and single-stream (latency).

Batched generation runs mlx-lm's ``BatchGenerator`` (continuous batching with a batched KV
cache): up to ``batch_size`` sequences decode together, each stops at its own EOS, and a
finished slot is refilled with the next prompt. Sampling is reproducible per sequence: with a
seed every sequence draws from its own PRNG key, so a prompt's sample does not depend on which
other prompts share its batch. ``temperature == 0`` is greedy.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import mlx.core as mx

from distiller import fast_ops
from distiller.decoding import GREEDY, Decoding, add_decoding_arguments, decoding_from_args
from distiller.sampling import (
    LogitsProcessor,
    Sampler,
    make_logits_processors,
    make_sampler,
    sample_rows,
    whitespace_token_ids,
)


@dataclass
class Generation:
    """One generated completion.

    ``generation_tokens`` counts every token the model produced, including a final stop
    token (it cost a decode step); ``tokens`` and ``text`` exclude the stop token. A generation
    ended by a stop string keeps every token in ``tokens``; its ``text`` ends before the string.
    ``elapsed_s`` is the time from the start of the call until this sequence finished.
    ``prompt_tps`` / ``generation_tps`` are per-sequence only on the single-stream path;
    in a batch they are the batch aggregates (see ``GenerationStats``).
    """

    text: str
    prompt_tokens: int
    generation_tokens: int
    finish_reason: str  # "stop" (EOS or a stop string) or "length" (max_tokens)
    tokens: list[int] = field(default_factory=list)
    elapsed_s: float = 0.0
    prompt_tps: float = 0.0
    generation_tps: float = 0.0
    peak_memory_gb: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class GenerationStats:
    """Aggregate throughput of one generate call (or several, summed with ``+=``).

    prompt_tps: prefill tokens / prefill time. decode_tps: generated tokens / time inside
    decode steps. generation_tps: generated tokens / (wall time - prefill time), what
    ``mlx_lm.batch_generate`` reports. peak_memory_gb: MLX's process-wide high-water mark
    (``mx.get_peak_memory``) at the end of the call.
    """

    sequences: int = 0
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0  # of prompt_tokens, served from a shared-prefix KV cache
    prompt_time: float = 0.0
    generation_tokens: int = 0
    decode_time: float = 0.0
    wall_time: float = 0.0
    peak_memory_gb: float = 0.0

    @property
    def prompt_tps(self) -> float:
        """Prompt tokens actually computed per second of prefill (cache hits not counted)."""
        computed = self.prompt_tokens - self.cached_prompt_tokens
        return computed / self.prompt_time if self.prompt_time > 0 else 0.0

    @property
    def decode_tps(self) -> float:
        return self.generation_tokens / self.decode_time if self.decode_time > 0 else 0.0

    @property
    def generation_tps(self) -> float:
        gen_time = self.wall_time - self.prompt_time
        return self.generation_tokens / gen_time if gen_time > 0 else 0.0

    def __iadd__(self, other: GenerationStats) -> GenerationStats:
        self.sequences += other.sequences
        self.prompt_tokens += other.prompt_tokens
        self.cached_prompt_tokens += other.cached_prompt_tokens
        self.prompt_time += other.prompt_time
        self.generation_tokens += other.generation_tokens
        self.decode_time += other.decode_time
        self.wall_time += other.wall_time
        self.peak_memory_gb = max(self.peak_memory_gb, other.peak_memory_gb)
        return self

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(
            prompt_tps=self.prompt_tps,
            decode_tps=self.decode_tps,
            generation_tps=self.generation_tps,
        )
        return d

    def summary(self) -> str:
        return (
            f"prompt: {self.prompt_tokens} tok, {self.prompt_tps:.1f} tok/s | "
            f"generation: {self.generation_tokens} tok, {self.generation_tps:.1f} tok/s "
            f"(decode {self.decode_tps:.1f} tok/s) | peak memory {self.peak_memory_gb:.3f} GB"
        )


class Generations(list):
    """A list of ``Generation`` (in prompt order) that also carries the call's ``stats``."""

    stats: GenerationStats

    def __init__(self, items=(), stats: GenerationStats | None = None):
        super().__init__(items)
        self.stats = stats or GenerationStats()


# -- prompts -------------------------------------------------------------------------------


def build_messages(
    user: str, system: str | None = None, few_shot: Sequence[tuple[str, str]] = ()
) -> list[dict]:
    """Chat messages: optional system prompt, few-shot (user, assistant) turns, then the user."""
    messages: list[dict] = []
    if system:
        messages.append({"role": "system", "content": system})
    for shot_user, shot_assistant in few_shot:
        messages.append({"role": "user", "content": shot_user})
        messages.append({"role": "assistant", "content": shot_assistant})
    messages.append({"role": "user", "content": user})
    return messages


def chat_prompt(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of ``messages`` rendered with the tokenizer's chat template."""
    if not getattr(tokenizer, "chat_template", None) and not getattr(
        tokenizer, "has_chat_template", False
    ):
        raise ValueError("this tokenizer has no chat template; pass token ids instead")
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=True
    )
    # transformers may hand back a BatchEncoding-like dict depending on version.
    if isinstance(ids, dict):
        ids = ids["input_ids"]
    return list(ids)


def _seeds(seed: int | None, n: int) -> list[int | None]:
    """Distinct, stable per-position seeds derived from one run seed (None: unseeded)."""
    if seed is None:
        return [None] * n
    return [(seed * 1_000_003 + i) % (2**63) for i in range(n)]


class StopStrings:
    """Where a generation meets one of its stop strings (OpenAI's ``stop``).

    ``hit`` is checked after every token on the decoded tail only: a string of L characters
    spans at most L tokens, plus one straddling its start. ``text`` ends before the first one.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()):
        self.strings = tuple(x for x in stop if x)
        self.tokenizer = tokenizer
        self.window = max((len(x) for x in self.strings), default=0) + 1

    def hit(self, tokens: Sequence[int]) -> bool:
        if not self.strings:
            return False
        tail = self.tokenizer.decode(list(tokens[-self.window :]))
        return any(x in tail for x in self.strings)

    def text(self, tokens: Sequence[int]) -> str:
        """The decoded text, ending before the first stop string."""
        text = self.tokenizer.decode(list(tokens))
        cuts = [i for i in (text.find(x) for x in self.strings) if i >= 0]
        return text[: min(cuts)] if cuts else text


class SequenceState:
    """One sequence's bookkeeping, the same on every generation path: append a sampled token,
    decide whether (and why) the sequence has finished, and build its ``Generation``.

    A sequence finishes at an end-of-sequence token ("stop"; the token is counted as generated
    but not kept), at a stop string ("stop"; every token is kept, the text is cut), or at
    ``max_tokens`` kept tokens ("length").
    """

    __slots__ = ("eos", "finish_reason", "max_tokens", "produced", "prompt_tokens", "stops",
                 "tokens")  # fmt: skip

    def __init__(
        self, prompt_tokens: int, max_tokens: int, eos: Collection[int], stops: StopStrings
    ):
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.eos = eos
        self.stops = stops
        self.tokens: list[int] = []
        self.produced = 0
        self.finish_reason: str | None = None

    def add(self, token: int) -> str | None:
        """Record one sampled token; returns the finish reason once the sequence is done."""
        if self.finish_reason is not None:
            raise RuntimeError("token added to a finished sequence")
        self.produced += 1
        if token in self.eos:
            self.finish_reason = "stop"
        else:
            self.tokens.append(token)
            if self.stops.hit(self.tokens):
                self.finish_reason = "stop"
            elif len(self.tokens) >= self.max_tokens:
                self.finish_reason = "length"
        return self.finish_reason

    def result(self, start: float, **figures: float) -> Generation:
        if self.finish_reason is None:
            raise RuntimeError("result() of an unfinished sequence")
        return Generation(
            # Decoded in one go on every path: a streaming detokenizer may drop a leading
            # space, and all paths must return identical text.
            text=self.stops.text(self.tokens),
            prompt_tokens=self.prompt_tokens,
            generation_tokens=self.produced,
            finish_reason=self.finish_reason,
            tokens=self.tokens,
            elapsed_s=time.perf_counter() - start,
            **figures,
        )


def _new_sequences(
    tokenizer: Any, prompts: Sequence[Sequence[int]], decoding: Decoding
) -> list[SequenceState]:
    eos = frozenset(tokenizer.eos_token_ids)
    stops = StopStrings(tokenizer, decoding.stop)
    return [SequenceState(len(p), decoding.max_tokens, eos, stops) for p in prompts]


def _processors(tokenizer: Any, decoding: Decoding, n: int) -> list[list[LogitsProcessor]] | None:
    """Fresh logits processors per sequence (they keep per-sequence state), or None."""
    if not decoding.shapes_logits:
        return None
    exempt = whitespace_token_ids(tokenizer) if decoding.no_repeat_ngram else ()
    shaping = [
        make_logits_processors(decoding.no_repeat_ngram, decoding.repetition_penalty, exempt)
        for _ in range(n)
    ]
    if decoding.json_schema is None:
        return shaping
    from distiller.constrain import json_schema_processor

    # The schema has the last word: shaping runs inside it, on the tokens the schema allows.
    return [[json_schema_processor(tokenizer, decoding.json_schema, s)] for s in shaping]


def _check_prompts(prompts: Sequence[Sequence[int]]) -> None:
    if any(len(p) == 0 for p in prompts):
        raise ValueError("empty prompt")


# -- batched generation --------------------------------------------------------------------


def generate_batch(
    model: Any,
    tokenizer: Any,
    prompts: list[list[int]],
    decoding: Decoding = GREEDY,
    *,
    seeds: Sequence[int | None] | None = None,
    batch_size: int = 16,
    progress: Callable[[int], object] | None = None,
    on_finish: Callable[[int, Generation], object] | None = None,
    on_tokens: Callable[[int, list[int]], object] | None = None,
    reset_peak_memory: bool = False,
    min_shared_prefix: int = 64,
) -> Generations:
    """Generate a completion for every prompt (token ids), up to ``batch_size`` at a time.

    When all prompts start with the same ``min_shared_prefix`` or more tokens (a teacher's system
    prompt and few-shot examples), that prefix is prefilled once and its KV cache shared by
    every sequence, instead of being recomputed per sequence.

    Per-prompt seeds are derived from ``decoding.seed`` and the prompt's position, unless
    ``seeds`` gives one per prompt. ``progress(n)`` is called with the number of sequences
    that just finished (``tqdm.update`` fits); ``on_finish(i, generation)`` with each finished
    sequence as soon as it is done (so a caller can save it before the batch ends);
    ``on_tokens(i, tokens)`` after every step with sequence ``i``'s kept tokens so far (the ones
    its text is decoded from: for streaming). Returns the generations in prompt order, with
    ``.stats``.
    """
    from mlx_lm.generate import BatchGenerator

    if not prompts:
        return Generations()
    _check_prompts(prompts)
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    if seeds is None:
        seeds = _seeds(decoding.seed, len(prompts))
    elif len(seeds) != len(prompts):
        raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts")
    unseeded = decoding.greedy or all(s is None for s in seeds)
    if unseeded:
        samplers = None  # one shared sampler: a single batched sampling call per step
        shared = make_sampler(decoding.temperature, decoding.top_p)
    else:
        samplers = [make_sampler(decoding.temperature, decoding.top_p, s) for s in seeds]
        shared = None
    sequences = _new_sequences(tokenizer, prompts, decoding)
    processors = _processors(tokenizer, decoding, len(prompts))

    if reset_peak_memory:
        mx.reset_peak_memory()
    start = time.perf_counter()
    if len(prompts) == 1:
        # One sequence (a lone server request): the single-stream path and its compiled decode
        # step are faster than a batch of one, and give the same tokens.
        return _single_as_batch(model, tokenizer, prompts[0], decoding, seeds[0], start,
                                progress=progress, on_finish=on_finish, on_tokens=on_tokens)  # fmt: skip
    if use_shared_prefix(model, prompts, min_shared_prefix):
        return _generate_with_shared_prefix(
            model,
            prompts,
            sequences,
            samplers=samplers or [shared] * len(prompts),
            processors=processors,
            batch_size=batch_size,
            progress=progress,
            on_finish=on_finish,
            on_tokens=on_tokens,
            start=start,
        )
    gen = BatchGenerator(
        model,
        max_tokens=decoding.max_tokens,
        stop_tokens=[[t] for t in sorted(tokenizer.eos_token_ids)],
        sampler=shared,
        completion_batch_size=batch_size,
        prefill_batch_size=batch_size,
    )
    results: list[Generation | None] = [None] * len(prompts)
    try:
        prefix_len, caches, prefix_time = _prefill_shared_prefix(model, prompts, min_shared_prefix)
        uids = gen.insert(
            [p[prefix_len:] for p in prompts],
            [decoding.max_tokens] * len(prompts),
            caches=caches,
            samplers=samplers,
            logits_processors=processors,
        )
        index = {uid: i for i, uid in enumerate(uids)}
        with gen.stats() as bstats:
            while responses := gen.next_generated():
                finished = 0
                ours = []  # finished here (a stop string) while the generator would go on
                for r in responses:
                    i = index[r.uid]
                    reason = sequences[i].add(r.token)
                    if on_tokens is not None:
                        on_tokens(i, sequences[i].tokens)
                    if reason is None and r.finish_reason is not None:
                        raise RuntimeError(
                            f"BatchGenerator ended a sequence ({r.finish_reason}) that the "
                            "bookkeeping had not"
                        )
                    if reason is not None:
                        if r.finish_reason is None:
                            ours.append(r.uid)
                        results[i] = sequences[i].result(start)
                        if on_finish is not None:
                            on_finish(i, results[i])
                        finished += 1
                if ours:
                    gen.remove(ours)
                if finished and progress is not None:
                    progress(finished)
    finally:
        gen.close()

    return _collect(
        prompts,
        results,
        prefix_len=prefix_len,
        prompt_time=bstats.prompt_time + prefix_time,
        generation_tokens=sum(s.produced for s in sequences),
        decode_time=bstats.decode_time,
        start=start,
    )


def _single_as_batch(
    model: Any,
    tokenizer: Any,
    prompt: list[int],
    decoding: Decoding,
    seed: int | None,
    start: float,
    *,
    progress: Callable[[int], object] | None,
    on_finish: Callable[[int, Generation], object] | None,
    on_tokens: Callable[[int, list[int]], object] | None,
) -> Generations:
    g = _stream_one(
        model, tokenizer, prompt, decoding, seed,
        on_tokens=None if on_tokens is None else (lambda kept: on_tokens(0, kept)),
    )  # fmt: skip
    if on_finish is not None:
        on_finish(0, g)
    if progress is not None:
        progress(1)
    return _collect(
        [prompt],
        [g],
        prefix_len=0,
        prompt_time=g.prompt_tokens / g.prompt_tps if g.prompt_tps else 0.0,
        generation_tokens=g.generation_tokens,
        decode_time=g.generation_tokens / g.generation_tps if g.generation_tps else 0.0,
        start=start,
    )


def _collect(
    prompts: list[list[int]],
    results: list[Generation | None],
    *,
    prefix_len: int,
    prompt_time: float,
    generation_tokens: int,
    decode_time: float,
    start: float,
) -> Generations:
    """The finished generations in prompt order, with the run's stats on each and on the list."""
    stats = GenerationStats(
        sequences=len(prompts),
        prompt_tokens=sum(len(p) for p in prompts),
        cached_prompt_tokens=prefix_len * (len(prompts) - 1) if prefix_len else 0,
        prompt_time=prompt_time,
        generation_tokens=generation_tokens,
        decode_time=decode_time,
        wall_time=time.perf_counter() - start,
        peak_memory_gb=mx.get_peak_memory() / 1e9,
    )
    out = Generations([], stats)
    for g in results:
        if g is None:
            raise RuntimeError("a sequence ended without a finish reason")
        g.prompt_tps, g.generation_tps = stats.prompt_tps, stats.generation_tps
        g.peak_memory_gb = stats.peak_memory_gb
        out.append(g)
    return out


def shared_prefix_length(prompts: Sequence[Sequence[int]]) -> int:
    """Length of the longest common prefix of all prompts, leaving each at least one token."""
    if len(prompts) < 2:
        return 0
    limit = min(len(p) for p in prompts) - 1
    first = prompts[0]
    n = 0
    while n < limit and all(p[n] == first[n] for p in prompts):
        n += 1
    return n


def use_shared_prefix(model: Any, prompts: Sequence[Sequence[int]], min_length: int) -> bool:
    """Whether to decode with one shared prefix cache (``distiller.shared_prefix``): the prompts
    share ``min_length`` or more leading tokens, the model's attention supports it, and MLX
    runs on the CPU (where it is faster; elsewhere the copied caches are used)."""
    from distiller import shared_prefix

    return (
        fast_ops.enabled()
        and shared_prefix_length(prompts) >= max(min_length, 1)
        and shared_prefix.supported(model)
    )


def _generate_with_shared_prefix(
    model: Any,
    prompts: list[list[int]],
    sequences: list[SequenceState],
    *,
    samplers: list[Sampler],
    processors: list[list[LogitsProcessor]] | None,
    batch_size: int,
    progress: Callable[[int], object] | None,
    on_finish: Callable[[int, Generation], object] | None,
    on_tokens: Callable[[int, list[int]], object] | None,
    start: float,
) -> Generations:
    """Static batches of up to ``batch_size`` sequences over one prefilled shared prefix.

    A sequence leaves its batch when it finishes (the caches drop its row), so late steps cost
    only what is still running.
    """
    from distiller.shared_prefix import prefix_caches

    prefix_len = shared_prefix_length(prompts)
    prefix_cache, prompt_time = _prefill_prefix(model, prompts[0][:prefix_len])
    results: list[Generation | None] = [None] * len(prompts)
    decode_time = 0.0
    for first in range(0, len(prompts), batch_size):
        rows = list(range(first, min(first + batch_size, len(prompts))))
        suffixes = [prompts[i][prefix_len:] for i in rows]
        width = max(len(x) for x in suffixes)
        padding = [width - len(x) for x in suffixes]
        cache = prefix_caches(prefix_cache, padding)
        padded = mx.array([[0] * p + x for p, x in zip(padding, suffixes, strict=True)])

        t0 = time.perf_counter()
        for j in range(0, width, 512):  # chunked, to bound activation memory
            logits = model(padded[:, j : j + 512], cache=cache)[:, -1, :]
        mx.eval(logits)
        prompt_time += time.perf_counter() - t0

        t0 = time.perf_counter()
        while rows:
            if processors is not None:
                shaped = []
                for k, i in enumerate(rows):
                    row = logits[k : k + 1]
                    context = mx.array(prompts[i] + sequences[i].tokens)
                    for process in processors[i]:
                        row = process(context, row)
                    shaped.append(row)
                logits = mx.concatenate(shaped, axis=0)
            sampled = sample_rows([samplers[i] for i in rows], logits)
            keep = []
            for k, (i, token) in enumerate(zip(rows, sampled.tolist(), strict=True)):
                finished = sequences[i].add(token) is not None
                if on_tokens is not None:
                    on_tokens(i, sequences[i].tokens)
                if not finished:
                    keep.append(k)
                else:
                    results[i] = sequences[i].result(start)
                    if on_finish is not None:
                        on_finish(i, results[i])
            if len(keep) < len(rows):
                if progress is not None:
                    progress(len(rows) - len(keep))
                rows = [rows[k] for k in keep]
                if not rows:
                    break
                for c in cache:
                    c.filter(keep)
            step = mx.array([[sequences[i].tokens[-1]] for i in rows])
            logits = model(step, cache=cache)[:, -1, :]
        decode_time += time.perf_counter() - t0

    return _collect(
        prompts,
        results,
        prefix_len=prefix_len,
        prompt_time=prompt_time,
        generation_tokens=sum(s.produced for s in sequences),
        decode_time=decode_time,
        start=start,
    )


def _prefill_prefix(model: Any, prefix: list[int]) -> tuple[list, float]:
    """(a single-sequence KV cache holding ``prefix``, seconds spent)."""
    from mlx_lm.models.cache import make_prompt_cache

    start = time.perf_counter()
    cache = make_prompt_cache(model)
    step = 512  # prefill in chunks, as mlx-lm does, to bound activation memory
    for i in range(0, len(prefix), step):
        model(mx.array(prefix[i : i + step])[None], cache=cache)
        mx.eval([c.state for c in cache])
    return cache, time.perf_counter() - start


def _prefill_shared_prefix(
    model: Any, prompts: list[list[int]], min_length: int
) -> tuple[int, list | None, float]:
    """(prefix length, one KV cache per prompt holding the prefix, seconds spent) or (0, None, 0)."""
    import copy

    n = shared_prefix_length(prompts)
    if n < max(min_length, 1):
        return 0, None, 0.0
    start = time.perf_counter()
    cache, _ = _prefill_prefix(model, prompts[0][:n])
    caches = [copy.deepcopy(cache) for _ in prompts]
    return n, caches, time.perf_counter() - start


# -- single stream -------------------------------------------------------------------------


def generate_one(
    model: Any,
    tokenizer: Any,
    prompt: list[int],
    decoding: Decoding = GREEDY,
    *,
    on_text: Callable[[str], object] | None = None,
    reset_peak_memory: bool = False,
) -> Generation:
    """Generate one completion on the single-stream path (what a latency number means).

    ``on_text`` receives each decoded text segment as it is produced (for streaming output;
    with ``stop`` strings, the stream may run a few characters past where the text is cut).
    The returned ``Generation`` carries this prompt's prefill and decode tok/s. With the same
    ``decoding``, its tokens are those of the batched paths (position 0's seed).
    """
    _check_prompts([prompt])
    if reset_peak_memory:
        mx.reset_peak_memory()
    return _stream_one(
        model, tokenizer, prompt, decoding, _seeds(decoding.seed, 1)[0], on_text=on_text
    )


def _stream_one(
    model: Any,
    tokenizer: Any,
    prompt: list[int],
    decoding: Decoding,
    seed: int | None,
    *,
    on_text: Callable[[str], object] | None = None,
    on_tokens: Callable[[list[int]], object] | None = None,
) -> Generation:
    """One sequence through ``mlx_lm.stream_generate`` (prefill, then one token per step)."""
    from mlx_lm.generate import stream_generate

    from distiller.decode_step import compiled_decoder

    sampler = make_sampler(decoding.temperature, decoding.top_p, seed)
    (processors,) = _processors(tokenizer, decoding, 1) or [None]
    (sequence,) = _new_sequences(tokenizer, [prompt], decoding)
    start = time.perf_counter()
    last = None
    for last in stream_generate(
        # One token at a time: the compiled decode step where the architecture allows (its
        # logits are the model's; distiller/decode_step.py says why it is faster on the CPU).
        compiled_decoder(model),
        tokenizer,
        prompt,
        max_tokens=decoding.max_tokens,
        sampler=sampler,
        logits_processors=processors,
    ):
        if last.text and on_text is not None:
            on_text(last.text)
        done = sequence.add(last.token) is not None
        if on_tokens is not None:
            on_tokens(sequence.tokens)
        if done:
            break
    if last is None or sequence.finish_reason is None:
        raise RuntimeError("stream_generate ended before the sequence finished")
    return sequence.result(
        start,
        prompt_tps=last.prompt_tps,
        generation_tps=last.generation_tps,
        peak_memory_gb=mx.get_peak_memory() / 1e9,
    )


# -- CLI -----------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        required=True,
        help="model name from the registry (e.g. smollm2-135m-instruct) or a model directory",
    )
    parser.add_argument("--prompt", required=True, help="user message ('-' reads stdin)")
    parser.add_argument("--system", default=None, help="optional system prompt")
    add_decoding_arguments(parser, GREEDY)


def run_cli(args: argparse.Namespace) -> int:
    from distiller.models import load_model

    decoding = decoding_from_args(args)
    user = sys.stdin.read() if args.prompt == "-" else args.prompt
    model, tokenizer = load_model(args.model)
    prompt = chat_prompt(tokenizer, build_messages(user, args.system))

    def echo(text: str) -> None:
        print(text, end="", flush=True)

    g = generate_one(model, tokenizer, prompt, decoding, on_text=echo, reset_peak_memory=True)
    print()
    print(
        f"[{g.prompt_tokens} prompt tok, {g.prompt_tps:.1f} tok/s | "
        f"{g.generation_tokens} generated tok, {g.generation_tps:.1f} tok/s | "
        f"peak memory {g.peak_memory_gb:.3f} GB | finish: {g.finish_reason}]",
        file=sys.stderr,
    )
    return 0
