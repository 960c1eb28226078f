"""Validators: property tests on generated documents, plus the failures seen in practice."""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from distiller.validators import (
    ParamError,
    build_validator,
    check_params,
    extract_json,
    find_sections,
    normalize_label,
    similarity,
    split_sections,
)

HEADERS = ["FAILURE MODE", "NAIVE FIXES", "MECHANISM", "TRADE-OFF"]
SECTIONS = [{"type": "sections", "headers": HEADERS}]
FULL = [
    {"type": "sections", "headers": HEADERS},
    {"type": "distinct_sections"},
    {"type": "length", "min_words": 20, "max_words": 250, "section_min_words": 3},
    {"type": "repetition"},
]

GOOD = """\
FAILURE MODE: The partition isolates the primary while replicas promote a new one, so two nodes accept conflicting writes.
NAIVE FIXES: Shorter timeouts only change how often the race happens; no timeout tells dead from unreachable.
MECHANISM: A majority quorum elects the leader and every term carries an epoch that storage uses as a fencing token.
TRADE-OFF: The minority side refuses writes during the partition, trading availability for a single history.
"""

# What SmolLM2-135M with few-shot examples actually tends to do: right headers, one sentence.
REPEATED = """\
FAILURE MODE: The system fails because the leader is not available to the clients.
NAIVE FIXES: The system fails because the leader is not available to the clients.
MECHANISM: The system fails because the leader is not available to the clients.
TRADE-OFF: The system fails because the leader is not available to the clients.
"""

# Header markup variants the parser accepts (content follows on the same line or the next).
STYLES = [
    "{h}: {c}",
    "**{h}:** {c}",
    "**{h}**: {c}",
    "## {h}\n{c}",
    "### {h}:\n{c}",
    "{n}. {h}: {c}",
    "- **{h}** - {c}",
    "{h}\n{c}",
    "{lh}: {c}",
    "__{h}__\n{c}",
]


def render(headers: list[str], contents: list[str], style: str = "{h}: {c}") -> str:
    parts = [
        style.format(h=h, lh=h.lower(), c=c, n=i + 1)
        for i, (h, c) in enumerate(zip(headers, contents, strict=True))
    ]
    return "\n\n".join(parts) + "\n"


# Words that cannot be mistaken for headers: lowercase letters only, and each section draws
# from its own suffix so generated sections are genuinely different texts.
word = st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=3, max_size=9)


def sentence(suffix: str) -> st.SearchStrategy[str]:
    return st.lists(word, min_size=5, max_size=10, unique=True).map(
        lambda ws: " ".join(w + suffix for w in ws).capitalize() + "."
    )


@st.composite
def section_contents(draw, n: int = 4) -> list[str]:
    out = []
    for i in range(n):
        sents = draw(st.lists(sentence("qxzjv"[i]), min_size=1, max_size=3, unique=True))
        out.append(" ".join(sents))
    return out


header_names = st.lists(
    st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=3, max_size=10),
    min_size=2,
    max_size=5,
    unique=True,
)


# ---------------------------------------------------------------------------------------------
# sections


@given(contents=section_contents(), style=st.sampled_from(STYLES))
def test_well_formed_documents_pass_sections_in_any_markup(contents, style):
    v = build_validator(SECTIONS)
    verdict = v(render(HEADERS, contents, style))
    assert verdict.passed, verdict.reasons
    assert verdict.sections == dict.fromkeys(HEADERS, True)


@given(headers=header_names, data=st.data())
def test_split_sections_round_trips_generated_documents(headers, data):
    contents = data.draw(section_contents(len(headers)))
    style = data.draw(st.sampled_from(STYLES))
    doc = render(headers, contents, style)
    assert split_sections(doc, headers) == dict(zip(headers, contents, strict=True))


@given(contents=section_contents(), perm=st.permutations(range(4)))
def test_shuffled_headers_fail_order(contents, perm):
    assume(list(perm) != [0, 1, 2, 3])
    doc = render([HEADERS[i] for i in perm], [contents[i] for i in perm])
    verdict = build_validator(SECTIONS)(doc)
    assert not verdict.passed
    assert not all(verdict.sections.values())
    assert any("out of order" in r for r in verdict.reasons)
    # Order checking can be switched off: then the same document passes.
    assert build_validator([{"type": "sections", "headers": HEADERS, "order": False}])(doc).passed


@given(contents=section_contents(), drop=st.integers(0, 3))
def test_missing_header_is_named(contents, drop):
    hs = [h for i, h in enumerate(HEADERS) if i != drop]
    cs = [c for i, c in enumerate(contents) if i != drop]
    verdict = build_validator(SECTIONS)(render(hs, cs))
    assert verdict.reasons == [f"missing header: {HEADERS[drop]}"]
    assert verdict.sections[HEADERS[drop]] is False


def test_empty_and_repeated_sections_fail():
    empty = GOOD.replace(GOOD.splitlines()[2], "MECHANISM:")
    verdict = build_validator(SECTIONS)(empty)
    assert verdict.reasons == ["empty section: MECHANISM"]
    twice = GOOD + "MECHANISM: and again.\n"
    assert build_validator(SECTIONS)(twice).reasons == ["repeated header: MECHANISM (2 times)"]


def test_header_words_in_prose_are_not_headers():
    text = "FAILURE MODE: x y z.\nMechanism of the bug is a race.\nNAIVE FIXES: a b c."
    assert [s.header for s in find_sections(text, HEADERS)] == ["FAILURE MODE", "NAIVE FIXES"]
    # A longer header is never shadowed by a shorter one that prefixes it.
    assert split_sections("FIXES: a\nFIX: b", ["FIX", "FIXES"]) == {"FIXES": "a", "FIX": "b"}


def test_case_sensitivity_is_a_param():
    text = GOOD.replace("MECHANISM:", "Mechanism:")
    assert build_validator(SECTIONS)(text).passed
    strict = build_validator([{"type": "sections", "headers": HEADERS, "case_sensitive": True}])
    assert strict(text).reasons == ["missing header: MECHANISM"]


def test_preamble_is_allowed_unless_forbidden():
    text = "Sure! Here is the analysis.\n" + GOOD
    assert build_validator(SECTIONS)(text).passed
    strict = build_validator([{"type": "sections", "headers": HEADERS, "allow_preamble": False}])
    assert strict(text).reasons == ["text before the first header: 'Sure! Here is the analysis.'"]


# ---------------------------------------------------------------------------------------------
# distinct_sections


def test_repeated_sentence_in_every_section_fails():
    verdict = build_validator(FULL)(REPEATED)
    assert not verdict.passed
    assert all(verdict.sections.values())  # the headers themselves are fine ...
    reasons = verdict.reasons
    # ... but every pair of sections is flagged, and so is the shared sentence.
    assert "sections 'FAILURE MODE' and 'NAIVE FIXES' are 1.00 similar (max 0.6)" in reasons
    assert sum("similar" in r for r in reasons) == 6
    assert any(
        r.startswith("sentence repeated in 'FAILURE MODE' and 'NAIVE FIXES'") for r in reasons
    )


def test_good_answer_passes_everything_and_outscores_the_repetition():
    good, bad = build_validator(FULL)(GOOD), build_validator(FULL)(REPEATED)
    assert good.passed, good.reasons
    assert good.score > bad.score
    assert 0.0 <= bad.score <= good.score <= 1.0


def test_shared_sentence_with_different_surroundings_is_caught():
    shared = "The leader keeps serving writes after it lost its quorum."
    text = render(
        HEADERS,
        [
            f"Clients see two histories. {shared}",
            "Longer timeouts only shift when the race happens.",
            f"Fencing tokens stop it. {shared} Storage rejects old epochs, always and everywhere.",
            "Minority partitions lose write availability.",
        ],
    )
    verdict = build_validator([*SECTIONS, {"type": "distinct_sections"}])(text)
    assert any(
        r.startswith("sentence repeated in 'FAILURE MODE' and 'MECHANISM'") for r in verdict.reasons
    )


@given(contents=section_contents())
def test_distinct_generated_sections_pass_and_copies_fail(contents):
    v = build_validator([*SECTIONS, {"type": "distinct_sections"}])
    assert v(render(HEADERS, contents)).passed
    copied = v(render(HEADERS, [contents[0]] * 4))
    assert not copied.passed
    assert sum("similar" in r for r in copied.reasons) == 6


@given(a=st.text(max_size=80), b=st.text(max_size=80))
def test_similarity_is_bounded_and_reflexive(a, b):
    assert 0.0 <= similarity(a, b) <= 1.0
    assert similarity(a, a) == 1.0


def test_distinct_needs_headers_from_somewhere():
    with pytest.raises(ParamError, match="headers"):
        build_validator([{"type": "distinct_sections"}])
    v = build_validator([{"type": "distinct_sections", "headers": ["A", "B"]}])
    assert v("A: one thing here.\nB: something else entirely.").passed
    assert v("A: only one section here.").reasons == ["missing or empty sections: B"]


# ---------------------------------------------------------------------------------------------
# length and repetition


def test_length_limits_whole_text_and_sections():
    v = build_validator(
        [*SECTIONS, {"type": "length", "min_words": 10, "max_words": 100, "section_max_words": 20}]
    )
    assert v(GOOD).passed
    long = GOOD.replace("TRADE-OFF: ", "TRADE-OFF: " + "word " * 30)
    n = len(split_sections(long, HEADERS)["TRADE-OFF"].split())
    reasons = v(long).reasons
    assert f"section TRADE-OFF too long: {n} words (max 20)" in reasons
    assert any(r.startswith("too long:") for r in reasons)
    assert "too short: 3 words (min 10)" in v("FAILURE MODE: x").reasons


def test_repetition_catches_degenerate_loops():
    v = build_validator([{"type": "repetition"}])
    assert v(GOOD).passed
    loop = "The cache is cold. " + "and then the cache is cold again " * 8
    reasons = v(loop).reasons
    assert any(r.startswith("4-gram") for r in reasons)
    assert any(r.startswith("only ") and "distinct" in r for r in reasons)
    same_lines = "alpha beta gamma\nalpha beta gamma\n"
    assert any(r.startswith("line repeated 2 times") for r in v(same_lines).reasons)
    # A sentence repeated under different headers is caught here too (header labels stripped).
    assert any(r.startswith("sentence repeated 4 times") for r in v(REPEATED).reasons)


@given(sent=sentence(""), k=st.integers(2, 5))
def test_any_repeated_sentence_fails_repetition(sent, k):
    v = build_validator([{"type": "repetition", "max_ngram_count": 100, "max_line_count": 100}])
    assert v(sent).passed
    assert not v(" ".join([sent] * k)).passed


# ---------------------------------------------------------------------------------------------
# json_schema

ANY_JSON = [{"type": "json_schema", "schema": {}}]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(), kids, max_size=4),
    max_leaves=12,
)


def _loads_ok(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


@given(text=st.text(max_size=40) | json_values.map(json.dumps))
def test_json_validator_agrees_with_json_loads(text):
    assume("```" not in text)
    assert build_validator(ANY_JSON)(text).passed == _loads_ok(text)


@given(value=json_values, indent=st.sampled_from([None, 2]))
def test_fenced_json_parses_to_the_same_value(value, indent):
    body = json.dumps(value, indent=indent)
    assert extract_json(f"```json\n{body}\n```") == json.loads(body)
    assert build_validator(ANY_JSON)(f"\n```\n{body}\n```\n").passed


def test_json_schema_reasons_are_specific(tmp_path):
    schema = {
        "type": "object",
        "properties": {"severity": {"enum": ["low", "high"]}, "n": {"type": "integer"}},
        "required": ["severity", "n"],
    }
    v = build_validator([{"type": "json_schema", "schema": schema}])
    assert v('{"severity": "low", "n": 3}').passed
    assert v('{"severity": "mid", "n": 3}').reasons == [
        "schema: 'mid' is not one of ['low', 'high'] at $.severity"
    ]
    assert v('{"severity": "low"').reasons[0].startswith("invalid JSON: Expecting")
    assert not v('Here you go: ```json\n{"severity": "low", "n": 3}\n```').passed
    path = tmp_path / "s.json"
    path.write_text(json.dumps(schema))
    assert build_validator([{"type": "json_schema", "schema_file": str(path)}])(
        '{"severity": "high", "n": 1}'
    ).passed


# ---------------------------------------------------------------------------------------------
# label and regex

LABELS = ["critical", "major", "minor"]


@given(
    label=st.sampled_from(LABELS),
    case=st.sampled_from([str.lower, str.upper, str.title]),
    pad=st.sampled_from(["", " ", "\n", '"', "'"]),
    dot=st.booleans(),
)
def test_label_accepts_normalized_spellings(label, case, pad, dot):
    text = f"{pad}{case(label)}{'.' if dot else ''}{pad}"
    assert normalize_label(text, LABELS) == label
    assert build_validator([{"type": "label", "labels": LABELS}])(text).passed


@given(text=st.text(max_size=20))
def test_label_rejects_everything_else(text):
    assume(normalize_label(text, LABELS) is None)
    verdict = build_validator([{"type": "label", "labels": LABELS}])(text)
    assert not verdict.passed
    assert verdict.reasons[0].endswith("is not one of: critical, major, minor")


def test_regex_must_and_must_not():
    v = build_validator(
        [{"type": "regex", "must_match": [r"^ANSWER:"], "must_not_match": [r"(?i)as an ai"]}]
    )
    assert v("ANSWER: 42").passed
    assert v("42").reasons == ["no match for /^ANSWER:/"]
    assert v("ANSWER: As an AI, 42").reasons == ["forbidden match /(?i)as an ai/: 'As an AI'"]


# ---------------------------------------------------------------------------------------------
# params


@pytest.mark.parametrize(
    ("type_", "params", "key", "fragment"),
    [
        ("section", {}, "type", "did you mean 'sections'"),
        ("sections", {"headrs": ["A"]}, "headrs", "did you mean 'headers'"),
        ("sections", {}, "headers", "required"),
        ("sections", {"headers": ["A", "a"]}, "headers", "distinct"),
        ("sections", {"headers": "A"}, "headers", "a list"),
        ("sections", {"headers": ["A"], "order": "yes"}, "order", "true/false"),
        ("distinct_sections", {"max_similarity": 1.5}, "max_similarity", "(0, 1]"),
        ("length", {}, "min_words", "at least one"),
        ("length", {"min_words": 10, "max_words": 5}, "min_words", "<= max_words"),
        ("length", {"min_words": -1}, "min_words", ">= 0"),
        ("repetition", {"ngram": 0}, "ngram", ">= 1"),
        ("json_schema", {}, "schema", "exactly one"),
        ("json_schema", {"schema": {"type": "nope"}}, "schema.type", "not a valid JSON schema"),
        (
            "json_schema",
            {"schema": {"properties": {"age": {"type": "integr"}}}},
            "schema.properties.age.type",
            "'integr' is not valid",
        ),
        (
            "json_schema",
            {"schema": {"$schema": "http://nope"}},
            "schema.$schema",
            "a JSON Schema draft",
        ),
        ("json_schema", {"schema": {"$schema": 5}}, "schema.$schema", "a JSON Schema draft"),
        ("json_schema", {"schema_file": "/nonexistent.json"}, "schema_file", "an existing"),
        ("regex", {"must_match": ["("]}, "must_match[0]", "valid regex"),
        ("regex", {}, "must_match", "at least one"),
        ("label", {"labels": []}, "labels", "non-empty"),
    ],
)
def test_bad_params_name_the_param(type_, params, key, fragment):
    with pytest.raises(ParamError) as info:
        check_params(type_, params)
    assert info.value.key == key
    assert fragment in info.value.expected


def test_build_validator_reports_the_index_and_accepts_objects():
    with pytest.raises(ParamError) as info:
        build_validator([*SECTIONS, {"type": "repetition", "ngram": 0}])
    assert info.value.index == 1

    class Spec:  # anything with .type and .params works (distiller.spec.ValidatorSpec does)
        type, params = "label", {"labels": ["yes", "no"]}

    assert build_validator([Spec()])("Yes").passed


@settings(max_examples=30)
@given(text=st.text(max_size=300))
def test_verdicts_are_total_and_serializable(text):
    verdict = build_validator(
        [*FULL, {"type": "json_schema", "schema": {}}, {"type": "label", "labels": LABELS}]
    )(text)
    d = json.loads(json.dumps(verdict.to_dict()))
    assert d["passed"] == all(c["passed"] for c in d["checks"])
    assert d["reasons"] == [c["reason"] for c in d["checks"] if not c["passed"]]
    assert all(c["reason"] for c in d["checks"] if not c["passed"])
    assert 0.0 <= verdict.score <= 1.0


def test_validation_is_deterministic_under_check_order():
    texts = [GOOD, REPEATED, "", "MECHANISM: only"]
    rng = random.Random(0)
    specs = list(FULL)
    base = [build_validator(specs)(t).passed for t in texts]
    for _ in range(5):
        rng.shuffle(specs)
        assert [build_validator(specs)(t).passed for t in texts] == base
