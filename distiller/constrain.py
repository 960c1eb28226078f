"""JSON-Schema-constrained decoding: at every step only tokens that keep the output a prefix of
a JSON value the schema accepts can be sampled, and once the value is complete the sequence
ends (end-of-sequence is the only token left). Nothing is repaired afterwards.

llguidance does the grammar work (why this library: the README's "Constrained decoding"): the
schema compiles to a grammar, and at each step the matcher computes the bitmask of allowed
tokens over the tokenizer's vocabulary, which the processor applies to the logits. A schema is
compiled once per (tokenizer, schema); each sequence gets a copy of the compiled matcher.

Layout: object keys come in the schema's ``properties`` order; between tokens of the JSON a
model may write up to ``WHITESPACE_MAX`` spaces and line breaks, enough for the indentation it
writes unconstrained (forcing a compact layout on a model that indents makes it stumble into
worse values), bounded so that a weak model cannot pad forever. Nothing may precede or follow
the value.

A constrained output is complete when the generation ends with ``finish_reason == "stop"``;
one that runs out of ``max_tokens`` is an unfinished prefix. Bound a schema's strings and
arrays (``maxLength``, ``maxItems``) to make completion within a token budget certain.
"""

from __future__ import annotations

import functools
import json
import threading
import weakref
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import mlx.core as mx
import numpy as np

from distiller.sampling import LogitsProcessor

__all__ = [
    "JSON_LAYOUT",
    "WHITESPACE_MAX",
    "canonical_schema",
    "json_schema_processor",
    "schema_problem",
]

# The most whitespace characters between two tokens of the JSON.
WHITESPACE_MAX = 16
# llguidance's JSON compile options (the layout described above).
JSON_LAYOUT = {"whitespace_flexible": False, "whitespace_pattern": f"[ \\n]{{0,{WHITESPACE_MAX}}}"}

# Compiled schemas kept per tokenizer; a process rarely uses more than a few.
_SCHEMAS_PER_TOKENIZER = 32


def canonical_schema(schema: str | Mapping[str, Any]) -> str:
    """``schema`` (JSON text or a mapping) as compact JSON text: equal schemas give equal text.

    Key order is kept, not sorted: the order of ``properties`` is the order keys are written
    in, so two schemas that differ in it constrain differently. Raises ``ValueError`` when the
    text is not JSON or the schema is not a mapping.
    """
    value = json.loads(schema) if isinstance(schema, str) else schema
    if not isinstance(value, Mapping):
        raise ValueError(f"a JSON schema object (a mapping), got {type(value).__name__}")
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


@functools.lru_cache(maxsize=256)
def schema_problem(text: str) -> str | None:
    """What the schema ``text`` should be, as a phrase that follows "expected", or None when it
    is a valid JSON Schema that llguidance compiles (checked without a tokenizer)."""
    from llguidance import LLMatcher

    from distiller.validators import ParamError, check_params

    try:
        value = json.loads(text)
    except ValueError as exc:
        return f"JSON text ({exc})"
    if not isinstance(value, dict):
        return f"a JSON schema object (a mapping), got {type(value).__name__}"
    try:  # the json_schema validator's own check: the schema the output is later judged by
        check_params("json_schema", {"schema": value})
    except ParamError as exc:
        where = exc.key.removeprefix("schema").lstrip(".")
        if not where:
            return exc.expected
        detail = exc.expected.removesuffix(" (not a valid JSON schema)")
        return f"a valid JSON Schema (at {where}: {detail})"
    try:
        grammar = LLMatcher.grammar_from_json_schema(text, overrides=JSON_LAYOUT)
        error = LLMatcher.validate_grammar(grammar)
    except ValueError as exc:
        error = str(exc)
    if error:
        return f"a schema that constrained decoding supports (llguidance: {error.strip()})"
    return None


def json_schema_processor(
    tokenizer: Any, schema: str, shaping: Sequence[LogitsProcessor] = ()
) -> LogitsProcessor:
    """A fresh logits processor for one sequence that keeps it inside ``schema`` (JSON text).

    ``shaping`` processors (repetition penalty, n-gram ban) run on the constrained logits; on a
    step where they would ban every token the schema allows, the schema's choice stands without
    them (a required key or separator must be written even if it repeats).
    """
    grammar = _compiled(tokenizer, schema)
    return _JsonSchemaProcessor(grammar, list(shaping))


# -- compilation cache ---------------------------------------------------------------------


class _Grammar:
    """One schema compiled for one tokenizer: the matcher every sequence starts from a copy of."""

    def __init__(self, matcher: Any, eos: tuple[int, ...], vocab: int):
        self.matcher, self.eos, self.vocab = matcher, eos, vocab


class _TokenizerCache:
    """llguidance's view of one tokenizer (costly to build) and the schemas compiled for it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.tokenizers: dict[tuple[int, ...], Any] = {}
        self.grammars: OrderedDict[tuple[tuple[int, ...], str], _Grammar] = OrderedDict()


_caches: weakref.WeakKeyDictionary[Any, _TokenizerCache] = weakref.WeakKeyDictionary()
_caches_lock = threading.Lock()


def _hf_tokenizer(tokenizer: Any) -> Any:
    """The Hugging Face fast tokenizer inside ``tokenizer`` (mlx-lm's wrapper, or a wrapper of
    it), which llguidance reads the vocabulary from."""
    from transformers import PreTrainedTokenizerFast

    inner = tokenizer
    for _ in range(4):
        if isinstance(inner, PreTrainedTokenizerFast):
            return inner
        inner = getattr(inner, "_tokenizer", None)
    raise TypeError(
        "JSON-schema constraints need a Hugging Face fast tokenizer (tokenizer.json); "
        f"got {type(tokenizer).__name__}"
    )


def _compiled(tokenizer: Any, schema: str) -> _Grammar:
    import llguidance
    import llguidance.hf

    problem = schema_problem(schema)
    if problem is not None:
        raise ValueError(f"json_schema: {problem}")
    hf = _hf_tokenizer(tokenizer)
    eos = tuple(sorted(tokenizer.eos_token_ids))
    with _caches_lock:
        cache = _caches.get(hf)
        if cache is None:
            cache = _caches[hf] = _TokenizerCache()
    with cache.lock:
        grammar = cache.grammars.get((eos, schema))
        if grammar is not None:
            cache.grammars.move_to_end((eos, schema))
            return grammar
        ll_tokenizer = cache.tokenizers.get(eos)
        if ll_tokenizer is None:
            ll_tokenizer = llguidance.hf.from_tokenizer(hf, eos_token=list(eos))
            cache.tokenizers[eos] = ll_tokenizer
        text = llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_LAYOUT)
        matcher = llguidance.LLMatcher(ll_tokenizer, text, log_level=0)
        if matcher.is_error():
            raise ValueError(f"json_schema: does not compile ({matcher.get_error()})")
        grammar = _Grammar(matcher, eos, ll_tokenizer.vocab_size)
        cache.grammars[(eos, schema)] = grammar
        if len(cache.grammars) > _SCHEMAS_PER_TOKENIZER:
            cache.grammars.popitem(last=False)
        return grammar


# -- the processor -------------------------------------------------------------------------


class _JsonSchemaProcessor:
    """mlx-lm calls it once per decode step with the context so far (prompt + generated
    tokens, the last one just sampled; on the first call, the prompt) and the step's logits
    (1, model vocab). It feeds the sampled token to its matcher, then masks the logits."""

    def __init__(self, grammar: _Grammar, shaping: list[LogitsProcessor]):
        self.matcher = grammar.matcher.deep_copy()
        self.eos = frozenset(grammar.eos)
        self.eos_ids = np.array(grammar.eos, dtype=np.int64)
        self.vocab = grammar.vocab
        self.shaping = shaping
        self.started = False
        self.ended = False

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        if self.started and not self.ended:
            token = int(tokens[-1].item())
            if token in self.eos:
                # The sequence is over; mlx-lm computes one step past its end and drops it.
                self.ended = True
            elif not self.matcher.consume_token(token):
                raise RuntimeError(
                    f"token {token} leaves the JSON schema: {self.matcher.get_error()}"
                )
        self.started = True
        if self.ended:
            return logits
        allowed = mx.array(self._allowed(logits.shape[-1]))
        masked = mx.where(allowed, logits, mx.array(-mx.inf, dtype=logits.dtype))
        if not self.shaping:
            return masked
        shaped = masked
        for process in self.shaping:
            shaped = process(tokens, shaped)
        return shaped if mx.any(shaped > -mx.inf).item() else masked

    def _allowed(self, width: int) -> np.ndarray:
        """Which of the model's ``width`` token ids may come next. Ids past the tokenizer's
        vocabulary (a model's padded embedding rows) never may."""
        allowed = np.zeros(width, dtype=np.bool_)
        if self.matcher.is_stopped():  # the value is complete and nothing may follow it: end
            allowed[self.eos_ids[self.eos_ids < width]] = True
        else:
            bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
            n = min(width, self.vocab)
            allowed[:n] = np.unpackbits(bits, count=n, bitorder="little").view(np.bool_)
        if not allowed.any():
            raise RuntimeError(
                "no token of the model's vocabulary continues the JSON here "
                f"({self.matcher.get_error() or 'the grammar allows only ids past it'})"
            )
        return allowed
