"""Output validators: does a generated text follow the task's format?

A task lists validators in its spec (``validators: [{type: sections, headers: [...]}, ...]``);
``build_validator`` turns that list into one callable ``validator(text) -> Verdict``. The same
verdict serves three stages: rejection sampling of teacher outputs (``passed``, and ``score`` to
keep the best of N), dataset filtering, and the eval's format rate (``passed``, ``sections``).

Validator types and their params (defaults in brackets):

- ``sections``: ``headers`` (list, required), ``order`` [true], ``allow_preamble`` [true],
  ``case_sensitive`` [false]. A header counts only at the start of a line, optionally wrapped in
  Markdown (``## H``, ``**H**``, ``1. H``, ``- H``) and followed by ``:``, ``-`` or the end of the
  line; so ``Mechanism of the bug is ...`` in prose is not a header. Matching ignores case
  unless ``case_sensitive``: a small model writing ``Mechanism:`` still shows the structure, and
  the teacher prompt fixes the casing anyway. One check per header: present, once, in order,
  non-empty.
- ``distinct_sections``: ``headers`` [those of the ``sections`` validator], ``max_similarity``
  [0.6] (difflib ratio over normalized word sequences), ``min_sentence_words`` [5]. Fails when
  two sections read alike or share a sentence (the small-model failure of writing the same
  sentence under every header).
- ``length``: ``min_words``, ``max_words`` (whole text), ``section_min_words``,
  ``section_max_words`` (each section; ``headers`` as above).
- ``repetition``: ``ngram`` [4], ``max_ngram_count`` [3] (most frequent word n-gram),
  ``max_line_count`` [1] (identical non-empty lines), ``max_sentence_count`` [1] (identical
  sentences of >= ``min_sentence_words`` [5] words), ``min_unique_ratio`` [0.3] (distinct / total
  words, only for texts of >= 30 words). Catches degenerate loops.
- ``json_schema``: ``schema`` (inline mapping) or ``schema_file``; the text is JSON, or one
  fenced block (```` ```json ... ``` ````) with nothing else around it.
- ``label``: ``labels`` (list), ``case_sensitive`` [false]; surrounding whitespace, quotes and a
  final period are ignored.
- ``regex``: ``must_match`` / ``must_not_match`` (lists of patterns), ``ignore_case`` [false];
  patterns use ``re.MULTILINE``.
- ``span``: ``field`` [context] (the prompt field holding the passage), ``max_words`` [10]. The
  whole output is a short answer copied from the passage: at most ``max_words`` words, and after
  SQuAD normalization (``distiller.metrics.normalize_answer``: case, punctuation, articles,
  whitespace) its words occur consecutively in the passage's. It needs the prompt:
  ``validator(text, prompt)`` reads the passage from ``prompt.meta[field]`` (the prompt's own
  text when the field is absent, as for a few-shot example); without a prompt it fails.
"""

from __future__ import annotations

import difflib
import json
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

__all__ = [
    "VALIDATOR_TYPES",
    "Check",
    "ParamError",
    "Validator",
    "Verdict",
    "build_validator",
    "check_params",
    "extract_json",
    "find_sections",
    "is_span",
    "normalize_label",
    "similarity",
    "span_checks",
    "span_source",
    "split_sections",
    "split_sentences",
    "words",
]


# ---------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    reason: str = ""  # why it failed; empty when passed


@dataclass(frozen=True)
class Verdict:
    passed: bool
    checks: list[Check]
    sections: dict[str, bool]  # per-header compliance: present once, in order, non-empty
    score: float  # in [0, 1]: mostly the fraction of checks passed, for "keep best"

    @property
    def reasons(self) -> list[str]:
        return [c.reason for c in self.checks if not c.passed]

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "score": round(self.score, 6),
            "reasons": self.reasons,
            "sections": dict(self.sections),
            "checks": [
                {"name": c.name, "passed": c.passed, "reason": c.reason} for c in self.checks
            ],
        }


class ParamError(ValueError):
    """A validator param that does not validate; ``key`` is relative to the validator entry."""

    def __init__(self, key: str, expected: str, index: int | None = None):
        self.key, self.expected, self.index = key, expected, index
        super().__init__(f"{key}: {expected}")


# ---------------------------------------------------------------------------------------------
# Text helpers (public: the eval and dataset stages reuse them)

_WORD = re.compile(r"[A-Za-z0-9]+(?:['’][A-Za-z]+)*")


def words(text: str) -> list[str]:
    """Lower-cased word tokens (letters/digits; markup and punctuation dropped)."""
    return [w.lower() for w in _WORD.findall(text)]


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


def split_sentences(text: str) -> list[str]:
    """Rough sentence split on ., !, ? followed by whitespace, and on newlines."""
    return [s.strip() for s in _SENTENCE_END.split(text) if s and s.strip()]


def similarity(a: str, b: str) -> float:
    """difflib ratio of the two texts' word sequences: 1.0 identical, ~0 unrelated."""
    wa, wb = words(a), words(b)
    if not wa and not wb:
        return 1.0
    return difflib.SequenceMatcher(None, wa, wb, autojunk=False).ratio()


def _header_regex(headers: Sequence[str], case_sensitive: bool) -> re.Pattern[str]:
    # Longest first so "FIX" never shadows "FIXES".
    alts = "|".join(re.escape(h) for h in sorted(headers, key=len, reverse=True))
    mark = r"(?:\*\*|__|\*|_)?"
    pattern = (
        r"^[ \t]*(?:#{1,6}[ \t]*)?(?:(?:\d+[.)]|[-*+•])[ \t]+)?"  # '## ', '1. ', '- '
        + mark
        + rf"(?P<header>{alts})"
        + r"[ \t]*"
        + mark
        + r"[ \t]*(?:(?::|[-–—])[ \t]*"  # ':' or a dash ...
        + mark
        + r"|$)"  # ... or the end of the line
    )
    flags = re.MULTILINE | (0 if case_sensitive else re.IGNORECASE)
    return re.compile(pattern, flags)


@dataclass(frozen=True)
class Section:
    header: str  # canonical spelling, as given in ``headers``
    content: str  # stripped text up to the next header
    line: int  # 1-based line of the header


def find_sections(text: str, headers: Sequence[str], case_sensitive: bool = False) -> list[Section]:
    """Every header occurrence in document order, with the text that follows it.

    ``preamble`` text before the first header is not returned (see ``preamble``).
    """
    if not headers:
        return []
    canon = {(h if case_sensitive else h.casefold()): h for h in headers}
    matches = list(_header_regex(headers, case_sensitive).finditer(text))
    out = []
    for i, m in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        found = m.group("header")
        header = canon[found if case_sensitive else found.casefold()]
        out.append(Section(header, text[m.end() : end].strip(), text.count("\n", 0, m.start()) + 1))
    return out


def preamble(text: str, headers: Sequence[str], case_sensitive: bool = False) -> str:
    """The stripped text before the first header (all of it when there is no header)."""
    m = _header_regex(headers, case_sensitive).search(text) if headers else None
    return (text[: m.start()] if m else text).strip()


def split_sections(
    text: str, headers: Sequence[str], case_sensitive: bool = False
) -> dict[str, str]:
    """Map each header found to its content (first occurrence wins); absent headers are left out."""
    out: dict[str, str] = {}
    for s in find_sections(text, headers, case_sensitive):
        out.setdefault(s.header, s.content)
    return out


_FENCE = re.compile(
    r"\A\s*```[ \t]*(?:json|JSON)?[ \t]*\n(?P<body>.*?)\n?[ \t]*```\s*\Z", re.DOTALL
)


def extract_json(text: str) -> Any:
    """Parse ``text`` as JSON, or as a single ```json fenced block; raises ``ValueError``."""
    try:
        return json.loads(text)
    except ValueError as first:
        m = _FENCE.match(text)
        if m is None:
            raise first from None
        return json.loads(m.group("body"))


def _label_key(text: str, case_sensitive: bool) -> str:
    s = text.strip().strip("\"'`").strip()
    s = s.removesuffix(".").strip()
    return s if case_sensitive else s.casefold()


def normalize_label(text: str, labels: Sequence[str], case_sensitive: bool = False) -> str | None:
    """The label (canonical spelling) that ``text`` names, or None if it names none."""
    key = _label_key(text, case_sensitive)
    for label in labels:
        if _label_key(label, case_sensitive) == key:
            return label
    return None


# ---------------------------------------------------------------------------------------------
# Params: one schema per type, checked once (at spec load or build time), never per call

_Spec = tuple[type | tuple[type, ...], Any]  # (accepted types, default); default _REQ = required
_REQ = object()

_PARAMS: dict[str, dict[str, _Spec]] = {
    "sections": {
        "headers": (list, _REQ),
        "order": (bool, True),
        "allow_preamble": (bool, True),
        "case_sensitive": (bool, False),
    },
    "distinct_sections": {
        "headers": (list, None),
        "max_similarity": ((int, float), 0.6),
        "min_sentence_words": (int, 5),
        "case_sensitive": (bool, False),
    },
    "length": {
        "min_words": (int, None),
        "max_words": (int, None),
        "section_min_words": (int, None),
        "section_max_words": (int, None),
        "headers": (list, None),
        "case_sensitive": (bool, False),
    },
    "repetition": {
        "ngram": (int, 4),
        "max_ngram_count": (int, 3),
        "max_line_count": (int, 1),
        "max_sentence_count": (int, 1),
        "min_sentence_words": (int, 5),
        "min_unique_ratio": ((int, float), 0.3),
    },
    "json_schema": {"schema": (dict, None), "schema_file": (str, None)},
    "label": {"labels": (list, _REQ), "case_sensitive": (bool, False)},
    "regex": {
        "must_match": (list, []),
        "must_not_match": (list, []),
        "ignore_case": (bool, False),
    },
    "span": {"field": (str, "context"), "max_words": (int, 10)},
}

VALIDATOR_TYPES: tuple[str, ...] = tuple(_PARAMS)


def _type_name(t: type | tuple[type, ...]) -> str:
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string"}
    names |= {list: "a list", dict: "a mapping"}
    ts = t if isinstance(t, tuple) else (t,)
    return "a number" if set(ts) == {int, float} else " or ".join(names[x] for x in ts)


def _str_list(params: dict, key: str, *, nonempty: bool = True) -> list[str]:
    value = params[key]
    if not all(isinstance(v, str) and v.strip() for v in value):
        raise ParamError(key, "a list of non-empty strings")
    if nonempty and not value:
        raise ParamError(key, "a non-empty list")
    if len({v.casefold() for v in value}) != len(value):
        raise ParamError(key, "distinct entries (no duplicates)")
    return [v.strip() for v in value]


def check_params(type_: str, params: dict[str, Any]) -> dict[str, Any]:
    """Validate one validator's params; return them with defaults filled in.

    Raises ``ParamError`` naming the param (``type`` for an unknown type).
    """
    if type_ not in _PARAMS:
        hint = difflib.get_close_matches(type_, VALIDATOR_TYPES, n=1)
        more = f" (did you mean '{hint[0]}'?)" if hint else ""
        raise ParamError("type", f"one of {', '.join(VALIDATOR_TYPES)}; got '{type_}'{more}")
    schema = _PARAMS[type_]
    out: dict[str, Any] = {}
    for key in params:
        if key not in schema:
            hint = difflib.get_close_matches(key, list(schema), n=1)
            more = f" (did you mean '{hint[0]}'?)" if hint else ""
            raise ParamError(key, f"not a param of '{type_}'{more}; allowed: {', '.join(schema)}")
    for key, (types, default) in schema.items():
        if key not in params or params[key] is None:
            if default is _REQ:
                raise ParamError(key, f"required by '{type_}'")
            out[key] = list(default) if isinstance(default, list) else default
            continue
        value = params[key]
        ok = isinstance(value, types) and not (
            isinstance(value, bool) and bool not in _as_tuple(types)
        )
        if not ok:
            raise ParamError(key, f"{_type_name(types)}, got {value!r}")
        out[key] = value
    _check_semantics(type_, out)
    return out


def _as_tuple(t: type | tuple[type, ...]) -> tuple[type, ...]:
    return t if isinstance(t, tuple) else (t,)


def _check_semantics(type_: str, p: dict[str, Any]) -> None:
    for key in ("headers", "labels"):
        if p.get(key) is not None:
            p[key] = _str_list(p, key)
    for key, value in p.items():
        if isinstance(value, int) and not isinstance(value, bool) and value < 0:
            raise ParamError(key, f"a value >= 0, got {value}")
    if type_ == "distinct_sections" and not 0 < p["max_similarity"] <= 1:
        raise ParamError("max_similarity", f"a number in (0, 1], got {p['max_similarity']}")
    if type_ == "repetition":
        if p["ngram"] < 1:
            raise ParamError("ngram", f"an integer >= 1, got {p['ngram']}")
        for key in ("max_ngram_count", "max_line_count", "max_sentence_count"):
            if p[key] < 1:
                raise ParamError(key, f"an integer >= 1, got {p[key]}")
        if not 0 <= p["min_unique_ratio"] <= 1:
            raise ParamError("min_unique_ratio", f"a number in [0, 1], got {p['min_unique_ratio']}")
    if type_ == "length":
        limits = [
            p[k] for k in ("min_words", "max_words", "section_min_words", "section_max_words")
        ]
        if all(v is None for v in limits):
            raise ParamError(
                "min_words",
                "at least one of min_words, max_words, section_min_words, section_max_words",
            )
        for lo, hi in (("min_words", "max_words"), ("section_min_words", "section_max_words")):
            if p[lo] is not None and p[hi] is not None and p[lo] > p[hi]:
                raise ParamError(lo, f"<= {hi} ({p[hi]}), got {p[lo]}")
    if type_ == "json_schema":
        if (p["schema"] is None) == (p["schema_file"] is None):
            raise ParamError("schema", "exactly one of schema (inline) or schema_file")
        if p["schema_file"] is not None:
            _load_schema_file(p)
        else:
            _check_schema(p["schema"], None)
    if type_ == "span":
        if not p["field"].strip():
            raise ParamError("field", "a non-empty field name")
        if p["max_words"] < 1:
            raise ParamError("max_words", f"an integer >= 1, got {p['max_words']}")
    if type_ == "regex":
        if not p["must_match"] and not p["must_not_match"]:
            raise ParamError("must_match", "at least one pattern in must_match or must_not_match")
        for key in ("must_match", "must_not_match"):
            for i, pat in enumerate(p[key]):
                if not isinstance(pat, str):
                    raise ParamError(f"{key}[{i}]", f"a regex string, got {pat!r}")
                try:
                    re.compile(pat)
                except re.error as e:
                    raise ParamError(f"{key}[{i}]", f"a valid regex ({e})") from None


# ---------------------------------------------------------------------------------------------
# The checks, one function per type: (text, params) -> (checks, per-header compliance or None)

_CheckFn = Callable[[str], tuple[list[Check], dict[str, bool] | None]]


def _sections_fn(p: dict[str, Any]) -> _CheckFn:
    headers, order, cs = p["headers"], p["order"], p["case_sensitive"]
    rank = {h: i for i, h in enumerate(headers)}

    def run(text: str) -> tuple[list[Check], dict[str, bool]]:
        found = find_sections(text, headers, cs)
        counts = Counter(s.header for s in found)
        first = {}
        for pos, s in enumerate(found):
            first.setdefault(s.header, (pos, s))
        checks, compliance = [], {}
        for h in headers:
            reason = ""
            if h not in first:
                reason = f"missing header: {h}"
            elif counts[h] > 1:
                reason = f"repeated header: {h} ({counts[h]} times)"
            elif not first[h][1].content:
                reason = f"empty section: {h}"
            elif order:
                pos = first[h][0]
                before = [
                    o for o in headers if o in first and rank[o] > rank[h] and first[o][0] < pos
                ]
                after = [
                    o for o in headers if o in first and rank[o] < rank[h] and first[o][0] > pos
                ]
                if before or after:
                    other = before[0] if before else after[-1]
                    rel = "after" if before else "before"
                    reason = f"header out of order: {h} comes {rel} {other}"
            compliance[h] = not reason
            checks.append(Check(f"sections:{h}", not reason, reason))
        if not p["allow_preamble"]:
            pre = preamble(text, headers, cs)
            reason = f"text before the first header: {_clip(pre)!r}" if pre and found else ""
            checks.append(Check("sections:preamble", not reason, reason))
        return checks, compliance

    return run


def _section_contents(text: str, headers: list[str], cs: bool) -> dict[str, str]:
    return split_sections(text, headers, cs)


def _distinct_fn(p: dict[str, Any]) -> _CheckFn:
    headers, cs, limit = p["headers"], p["case_sensitive"], float(p["max_similarity"])
    min_words = p["min_sentence_words"]

    def run(text: str) -> tuple[list[Check], None]:
        sec = _section_contents(text, headers, cs)
        present = [h for h in headers if sec.get(h)]
        missing = [h for h in headers if h not in present]
        reason = f"missing or empty sections: {', '.join(missing)}" if missing else ""
        checks = [Check("distinct:non-empty", not reason, reason)]
        for a, b in combinations(present, 2):
            r = similarity(sec[a], sec[b])
            reason = (
                f"sections '{a}' and '{b}' are {r:.2f} similar (max {limit:g})" if r > limit else ""
            )
            checks.append(Check(f"distinct:{a}|{b}", not reason, reason))
        # A sentence reused under two headers is the observed small-model failure, even when the
        # rest of the sections differ enough to pass the ratio.
        seen: dict[tuple[str, ...], str] = {}
        shared = []
        for h in present:
            for s in split_sentences(sec[h]):
                key = tuple(words(s))
                if len(key) < min_words:
                    continue
                if key in seen and seen[key] != h:
                    shared.append((seen[key], h, s))
                seen.setdefault(key, h)
        reason = ""
        if shared:
            a, b, s = shared[0]
            reason = f"sentence repeated in '{a}' and '{b}': {_clip(s)!r}"
        checks.append(Check("distinct:sentences", not reason, reason))
        return checks, None

    return run


def _length_fn(p: dict[str, Any]) -> _CheckFn:
    lo, hi, slo, shi = (
        p["min_words"],
        p["max_words"],
        p["section_min_words"],
        p["section_max_words"],
    )
    headers, cs = p["headers"], p["case_sensitive"]

    def run(text: str) -> tuple[list[Check], None]:
        checks = []
        if lo is not None or hi is not None:
            n = len(words(text))
            reason = ""
            if lo is not None and n < lo:
                reason = f"too short: {n} words (min {lo})"
            elif hi is not None and n > hi:
                reason = f"too long: {n} words (max {hi})"
            checks.append(Check("length:words", not reason, reason))
        if slo is not None or shi is not None:
            sec = _section_contents(text, headers, cs)
            for h in headers:
                n = len(words(sec.get(h, "")))
                reason = ""
                if slo is not None and n < slo:
                    reason = f"section {h} too short: {n} words (min {slo})"
                elif shi is not None and n > shi:
                    reason = f"section {h} too long: {n} words (max {shi})"
                checks.append(Check(f"length:{h}", not reason, reason))
        return checks, None

    return run


_LABEL = re.compile(r"^[ \t#*_>\-\d.)]*[A-Za-z][\w \t'/&-]{0,40}?[*_]*:[*_]*[ \t]+")


def _strip_label(line: str) -> str:
    """Drop a leading ``LABEL:`` (a header) so equal bodies under different headers compare equal."""
    m = _LABEL.match(line)
    return line[m.end() :] if m and len(m.group(0).split()) <= 6 else line


def _repetition_fn(p: dict[str, Any]) -> _CheckFn:
    n, min_sw = p["ngram"], p["min_sentence_words"]

    def run(text: str) -> tuple[list[Check], None]:
        w = words(text)
        checks = []
        grams = Counter(tuple(w[i : i + n]) for i in range(len(w) - n + 1))
        gram, count = grams.most_common(1)[0] if grams else ((), 0)
        reason = ""
        if count > p["max_ngram_count"]:
            reason = (
                f"{n}-gram {' '.join(gram)!r} repeated {count} times (max {p['max_ngram_count']})"
            )
        checks.append(Check("repetition:ngrams", not reason, reason))

        bodies = [_strip_label(ln) for ln in text.splitlines()]
        lines = Counter(" ".join(ws) for b in bodies if (ws := words(b)))
        line, count = lines.most_common(1)[0] if lines else ("", 0)
        reason = ""
        if count > p["max_line_count"]:
            reason = f"line repeated {count} times (max {p['max_line_count']}): {_clip(line)!r}"
        checks.append(Check("repetition:lines", not reason, reason))

        sents = Counter(
            tuple(ws) for s in split_sentences("\n".join(bodies)) if len(ws := words(s)) >= min_sw
        )
        sent, count = sents.most_common(1)[0] if sents else ((), 0)
        reason = ""
        if count > p["max_sentence_count"]:
            reason = f"sentence repeated {count} times (max {p['max_sentence_count']}): {_clip(' '.join(sent))!r}"
        checks.append(Check("repetition:sentences", not reason, reason))

        reason = ""
        if len(w) >= 30:
            ratio = len(set(w)) / len(w)
            if ratio < p["min_unique_ratio"]:
                reason = f"only {ratio:.2f} of words are distinct (min {p['min_unique_ratio']:g})"
        checks.append(Check("repetition:vocabulary", not reason, reason))
        return checks, None

    return run


def _load_schema_file(p: dict[str, Any]) -> None:
    """Read ``schema_file`` into ``schema``. Problems inside the file are ``SpecError``s naming
    the file, the JSON path in it and its line (not only the spec line that names it)."""
    from distiller.spec.yamldoc import describe, read_doc

    path = Path(p["schema_file"])
    if not path.exists() and not path.is_symlink():
        raise ParamError("schema_file", f"an existing JSON/YAML schema file, got {path}")
    doc = read_doc(path, what="JSON schema file")  # parse errors name the file and line
    if not isinstance(doc.data, dict):
        raise doc.error("", f"a JSON schema object (a mapping), got {describe(doc.data)}")
    p["schema"] = doc.data
    _check_schema(doc.data, doc)


def _check_schema(schema: dict[str, Any], doc: Any) -> None:
    """A valid JSON schema, or an error naming the JSON path of the first problem in it: in
    the schema file ``doc`` (a ``spec.yamldoc.Doc``), else in the inline ``schema`` param."""
    import jsonschema

    def refuse(where: str, expected: str) -> Exception:
        if doc is not None:
            return doc.error(where, expected)
        return ParamError(f"schema.{where}" if where else "schema", expected)

    declared = schema.get("$schema")
    if declared is None:
        cls = jsonschema.validators.validator_for({})  # no $schema: the latest draft
    else:  # an unknown one: jsonschema would warn, then guess a draft
        cls = (
            jsonschema.validators.validator_for({"$schema": declared}, default=None)
            if isinstance(declared, str)
            else None
        )
        if cls is None:
            raise refuse(
                "$schema",
                "the URI of a JSON Schema draft jsonschema knows, e.g. "
                f"https://json-schema.org/draft/2020-12/schema; got {declared!r}",
            )
    try:
        cls.check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in e.absolute_path)
        raise refuse(
            where.lstrip("."), f"{_clip(e.message, 160)} (not a valid JSON schema)"
        ) from None


def _json_fn(p: dict[str, Any]) -> _CheckFn:
    import jsonschema

    validator = jsonschema.validators.validator_for(p["schema"])(p["schema"])

    def run(text: str) -> tuple[list[Check], None]:
        try:
            value = extract_json(text)
        except ValueError as e:
            return [
                Check("json:parse", False, f"invalid JSON: {e}"),
                Check("json:schema", False, "not checked: invalid JSON"),
            ], None
        errors = sorted(validator.iter_errors(value), key=lambda e: list(e.absolute_path))
        reason = ""
        if errors:
            e = errors[0]
            where = e.json_path if hasattr(e, "json_path") else "$"
            more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
            reason = f"schema: {_clip(e.message, 120)} at {where}{more}"
        return [Check("json:parse", True), Check("json:schema", not reason, reason)], None

    return run


def _label_fn(p: dict[str, Any]) -> _CheckFn:
    labels, cs = p["labels"], p["case_sensitive"]

    def run(text: str) -> tuple[list[Check], None]:
        ok = normalize_label(text, labels, cs) is not None
        reason = "" if ok else f"output {_clip(text.strip())!r} is not one of: {', '.join(labels)}"
        return [Check("label", ok, reason)], None

    return run


def _regex_fn(p: dict[str, Any]) -> _CheckFn:
    flags = re.MULTILINE | (re.IGNORECASE if p["ignore_case"] else 0)
    rules = [(pat, re.compile(pat, flags), True) for pat in p["must_match"]]
    rules += [(pat, re.compile(pat, flags), False) for pat in p["must_not_match"]]

    def run(text: str) -> tuple[list[Check], None]:
        checks = []
        for pat, rx, want in rules:
            hit = rx.search(text)
            if want:
                reason = "" if hit else f"no match for /{pat}/"
            else:
                reason = f"forbidden match /{pat}/: {_clip(hit.group(0))!r}" if hit else ""
            checks.append(Check(f"regex:{pat}", not reason, reason))
        return checks, None

    return run


def span_source(prompt: Any, field: str = "context") -> str | None:
    """The passage a ``span`` answer must come from: ``prompt.meta[field]``, else the prompt's
    text (a few-shot example has no fields); None without a prompt."""
    if prompt is None:
        return None
    value = (getattr(prompt, "meta", None) or {}).get(field)
    return str(value) if value is not None else str(prompt.text)


def is_span(answer: str, source: str) -> bool:
    """Whether ``answer``'s words, SQuAD-normalized, occur consecutively in ``source``'s."""
    from distiller.metrics import normalize_answer

    norm = normalize_answer(answer)
    return bool(norm) and f" {norm} " in f" {normalize_answer(source)} "


def span_checks(answer: str, source: str | None, max_words: int) -> list[Check]:
    """A short answer (1 to ``max_words`` normalized words) that is a span of ``source``."""
    from distiller.metrics import normalize_answer

    n_words = len(normalize_answer(answer).split())
    short = 0 < n_words <= max_words
    shown = repr(_clip(answer.strip()))
    reason = "" if short else f"an answer of 1 to {max_words} words, got {n_words}: {shown}"
    checks = [Check("span:short", short, reason)]
    if source is None:
        checks.append(Check("span:in_context", False, "no passage to check the answer against"))
    else:
        found = is_span(answer, source)
        reason = "" if found else f"{shown} is not a span of the passage"
        checks.append(Check("span:in_context", found, reason))
    return checks


def _span_fn(p: dict[str, Any]) -> Callable[[str, Any], tuple[list[Check], None]]:
    field_name, max_words = p["field"], p["max_words"]

    def run(text: str, prompt: Any) -> tuple[list[Check], None]:
        return span_checks(text, span_source(prompt, field_name), max_words), None

    return run


_BUILDERS: dict[str, Callable[[dict[str, Any]], _CheckFn]] = {
    "sections": _sections_fn,
    "distinct_sections": _distinct_fn,
    "length": _length_fn,
    "repetition": _repetition_fn,
    "json_schema": _json_fn,
    "label": _label_fn,
    "regex": _regex_fn,
    "span": _span_fn,  # type: ignore[dict-item]  # takes the prompt too (Validator.__call__)
}


def _clip(s: str, n: int = 60) -> str:
    s = " ".join(s.split())
    return s if len(s) <= n else s[: n - 1] + "…"


# ---------------------------------------------------------------------------------------------
# The combined validator


def quality(text: str) -> float:
    """A small tie-breaker in [0, 1]: the fraction of word trigrams that are not repeats."""
    w = words(text)
    grams = [tuple(w[i : i + 3]) for i in range(len(w) - 2)]
    return len(set(grams)) / len(grams) if grams else (1.0 if w else 0.0)


@dataclass
class Validator:
    """``validator(text, prompt=None) -> Verdict``; build with ``build_validator``. ``prompt``
    (a ``distiller.spec.Prompt``) is read only by checks about the input (``span``)."""

    fns: list[_CheckFn] = field(default_factory=list)
    types: list[str] = field(default_factory=list)

    def __call__(self, text: str, prompt: Any = None) -> Verdict:
        checks: list[Check] = []
        sections: dict[str, bool] = {}
        for fn, type_ in zip(self.fns, self.types, strict=True):
            c, sec = fn(text, prompt) if type_ == "span" else fn(text)  # type: ignore[call-arg]
            checks += c
            if sec is not None:
                sections.update(sec)
        passed = all(c.passed for c in checks)
        frac = sum(c.passed for c in checks) / len(checks) if checks else 1.0
        # 0.9 weight on checks keeps any extra passed check worth more than the whole quality
        # term whenever there are fewer than 10 checks ... and quality only breaks ties otherwise.
        score = 0.9 * frac + 0.1 * quality(text)
        return Verdict(passed, checks, sections, min(1.0, max(0.0, score)))


def build_validator(specs: Sequence[Any]) -> Validator:
    """Combine validator specs into one callable.

    ``specs`` holds ``distiller.spec.ValidatorSpec`` objects, or anything with ``type`` and
    ``params`` attributes, or plain ``{"type": ..., **params}`` mappings. ``headers`` of
    ``distinct_sections`` / ``length`` default to those of the first ``sections`` validator.
    Raises ``ParamError`` (with ``index``) on bad params.
    """
    entries: list[tuple[str, dict[str, Any]]] = []
    for i, spec in enumerate(specs):
        if isinstance(spec, dict):
            params = {k: v for k, v in spec.items() if k != "type"}
            type_ = spec.get("type", "")
        else:
            type_, params = spec.type, dict(spec.params)
        try:
            entries.append((type_, check_params(type_, params)))
        except ParamError as e:
            e.index = i
            raise
    default_headers = next((p["headers"] for t, p in entries if t == "sections"), None)
    validator = Validator()
    for i, (type_, params) in enumerate(entries):
        needs_headers = type_ == "distinct_sections" or (
            type_ == "length"
            and (params["section_min_words"] is not None or params["section_max_words"] is not None)
        )
        if needs_headers and params.get("headers") is None:
            if default_headers is None:
                raise ParamError(
                    "headers", "a list of headers (no 'sections' validator to take them from)", i
                )
            params["headers"] = list(default_headers)
        validator.fns.append(_BUILDERS[type_](params))
        validator.types.append(type_)
    return validator
