"""JSON-Schema-constrained decoding (distiller/constrain.py) on every generation path.

The tiny model has random weights: left alone it writes no JSON at all, so every output that
parses and validates here does so because of the constraint. Schemas bound their strings,
arrays and numbers, so every accepted value has at most ``max_json_bytes(schema)`` bytes; each
token is at least one byte, so that many tokens (plus the end token) always suffice, and a
generation that does not end with "stop" is a failure, not bad luck.
"""

from __future__ import annotations

import json
from decimal import Decimal

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distiller.constrain import WHITESPACE_MAX
from distiller.decoding import Decoding
from distiller.generate import generate_batch, generate_one, use_shared_prefix

COLORS = ["red", "green", "blue"]

# Objects, required keys, strings, numbers, integers, booleans, enums, arrays and nesting.
COVERAGE = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "score": {"type": "number", "minimum": -10, "maximum": 10, "multipleOf": 0.25},
        "active": {"type": "boolean"},
        "color": {"enum": COLORS},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 10},
                "zip": {"type": "integer", "minimum": 10000, "maximum": 99999},
            },
            "required": ["city"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "active", "color", "address"],
    "additionalProperties": False,
}


def max_json_bytes(schema: dict) -> int:
    """The most UTF-8 bytes of any value ``schema`` accepts as the constraint lets it be
    written: compact, plus up to ``WHITESPACE_MAX`` whitespace characters in each gap between
    tokens (after an opening bracket, around each ``:`` and ``,``, before a closing one).
    Covers the bounded subset the tests use."""
    if "enum" in schema:  # of scalars here, which hold no whitespace
        return max(len(json.dumps(v, ensure_ascii=False).encode()) for v in schema["enum"])
    kind = schema["type"]
    if kind == "boolean":
        return len("false")
    if kind == "integer":
        return max(len(str(schema["minimum"])), len(str(schema["maximum"])))
    if kind == "number":
        decimals = max(0, -Decimal(str(schema["multipleOf"])).as_tuple().exponent)
        whole = max(abs(int(schema["minimum"])), abs(int(schema["maximum"])))
        return len("-") + len(str(whole)) + len(".") + decimals
    if kind == "string":  # a character is at most 6 bytes: a \uXXXX escape
        return 2 + 6 * schema["maxLength"]
    if kind == "array":
        n = schema["maxItems"]
        return (
            2 + n * max_json_bytes(schema["items"]) + max(n - 1, 0) + WHITESPACE_MAX * (2 * n + 1)
        )
    if kind == "object":
        props = schema["properties"]
        members = sum(len(json.dumps(k)) + 1 + max_json_bytes(v) for k, v in props.items())
        n = len(props)
        return 2 + members + max(n - 1, 0) + WHITESPACE_MAX * (4 * n + 1)
    raise AssertionError(f"no bound for {schema}")


def constrained(schema: dict, **kw) -> Decoding:
    return Decoding(json_schema=schema, max_tokens=max_json_bytes(schema) + 1, **kw)


def assert_valid(gens, schema: dict) -> None:
    for g in gens:
        # "stop" is the end token: the constraint forced it once the value was complete.
        assert g.finish_reason == "stop", g.text
        assert g.generation_tokens == len(g.tokens) + 1, g
        jsonschema.validate(json.loads(g.text), schema)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from distiller.models import load_model

    return load_model(str(tiny_model_dir))


def _prompts(n: int) -> list[list[int]]:
    return [[1, 100 + 7 * i, 200 + i, 300] for i in range(n)]


def _shared_prompts(n: int) -> list[list[int]]:
    scaffold = list(range(100, 180))  # 80 shared tokens, as a system prompt + few-shot would be
    return [[*scaffold, *range(200 + 10 * i, 201 + 10 * i + i % 3)] for i in range(n)]


# -- what the constraint guarantees --------------------------------------------------------


@pytest.mark.parametrize(
    "schema",
    [
        COVERAGE,
        {"enum": ["yes", "no", 3, True, None]},
        {"type": "array", "items": {"enum": COLORS}, "minItems": 1, "maxItems": 4},
        {"type": "integer", "minimum": -5, "maximum": 5},
        {
            "type": "object",
            "properties": {
                "rows": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "k": {"type": "string", "maxLength": 3},
                            "v": {"type": "number", "minimum": 0, "maximum": 1, "multipleOf": 0.5},
                        },
                        "required": ["k", "v"],
                        "additionalProperties": False,
                    },
                    "minItems": 2,
                    "maxItems": 2,
                },
            },
            "required": ["rows"],
            "additionalProperties": False,
        },
    ],
    ids=["coverage", "enum", "array-of-enums", "integer", "nested-array-of-objects"],
)
def test_every_output_parses_and_validates(tiny, schema):
    model, tokenizer = tiny
    prompts = _prompts(5)
    greedy = generate_batch(model, tokenizer, prompts, constrained(schema), batch_size=3)
    sampled = generate_batch(
        model, tokenizer, prompts, constrained(schema, temperature=1.0, seed=11), batch_size=3
    )
    assert_valid(greedy, schema)
    assert_valid(sampled, schema)


@pytest.mark.parametrize("fast_ops", ["1", "0"])
def test_every_path_gives_the_same_greedy_output(tiny, monkeypatch, fast_ops):
    """Batched without and with a shared prefix (fast ops: the one-prefix cascade; off: the
    copied prefix caches) and single-stream generation write the same constrained tokens."""
    monkeypatch.setenv("DISTILLER_FAST_OPS", fast_ops)
    model, tokenizer = tiny
    prompts = _shared_prompts(5)
    assert use_shared_prefix(model, prompts, 64) == (fast_ops == "1")
    decoding = constrained(COVERAGE)
    plain = generate_batch(
        model, tokenizer, prompts, decoding, batch_size=3, min_shared_prefix=10**9
    )
    shared = generate_batch(model, tokenizer, prompts, decoding, batch_size=3)
    single = [generate_one(model, tokenizer, p, decoding) for p in prompts]
    assert shared.stats.cached_prompt_tokens == 80 * (len(prompts) - 1)
    assert_valid(plain, COVERAGE)
    assert [g.tokens for g in shared] == [g.tokens for g in plain]
    assert [g.tokens for g in single] == [g.tokens for g in plain]
    assert [g.text for g in single] == [g.text for g in plain]


def test_a_complete_value_ends_the_sequence(tiny):
    """Once the value is complete and nothing may follow, the end token is the only choice:
    the text is the value and nothing else, whatever budget is left."""
    model, tokenizer = tiny
    schema = {"enum": ["alpha", "beta"]}
    gens = generate_batch(
        model, tokenizer, _prompts(4), Decoding(json_schema=schema, max_tokens=200)
    )
    for g in gens:
        assert g.finish_reason == "stop" and json.loads(g.text) in schema["enum"], g
        assert g.generation_tokens == len(g.tokens) + 1 < 200


def test_padded_vocabulary_rows_are_never_sampled(tiny_model_factory):
    """A model's logits can be wider than the tokenizer's vocabulary (padded embedding rows,
    random here, so unmasked some would win): those ids are never allowed."""
    import mlx.core as mx

    from distiller.models import load_model

    model, tokenizer = load_model(str(tiny_model_factory(vocab_size=49152 + 128)))
    vocab = len(tokenizer.get_vocab())
    assert model(mx.array([[1, 2]])).shape[-1] > vocab
    gens = generate_batch(model, tokenizer, _prompts(4), constrained(COVERAGE))
    assert_valid(gens, COVERAGE)
    assert all(t < vocab for g in gens for t in g.tokens)


def test_shaping_that_bans_every_allowed_token_yields_to_the_schema(tiny):
    """The n-gram ban would forbid repeating `"a", ` but the schema requires it: the schema's
    choice stands on those steps, and the output still validates."""
    model, tokenizer = tiny
    schema = {"type": "array", "items": {"const": "a"}, "minItems": 8, "maxItems": 8}
    decoding = Decoding(json_schema=schema, max_tokens=60, no_repeat_ngram=2)
    gens = generate_batch(model, tokenizer, _prompts(3), decoding)
    single = generate_one(model, tokenizer, _prompts(1)[0], decoding)
    for g in [*gens, single]:
        assert g.finish_reason == "stop" and json.loads(g.text) == ["a"] * 8, g.text


# -- random schemas ------------------------------------------------------------------------

_WORD = st.text(alphabet="abcdefghij_", min_size=1, max_size=6)


@st.composite
def _leaf(draw) -> dict:
    kind = draw(st.sampled_from(["string", "integer", "number", "boolean", "enum"]))
    if kind == "string":
        hi = draw(st.integers(0, 8))
        return {"type": "string", "minLength": draw(st.integers(0, hi)), "maxLength": hi}
    if kind in ("integer", "number"):
        lo, span = draw(st.integers(-1000, 1000)), draw(st.integers(1, 1000))
        schema = {"type": kind, "minimum": lo, "maximum": lo + span}
        if kind == "number":  # binary fractions: jsonschema's float multipleOf is exact for them
            schema["multipleOf"] = draw(st.sampled_from([0.5, 0.25, 0.125]))
        return schema
    if kind == "boolean":
        return {"type": "boolean"}
    values = st.one_of(_WORD, st.integers(-99, 99), st.booleans(), st.none())
    return {"enum": draw(st.lists(values, min_size=1, max_size=4, unique_by=json.dumps))}


@st.composite
def _object(draw, children) -> dict:
    props = draw(st.dictionaries(_WORD, children, min_size=1, max_size=4))
    required = draw(st.lists(st.sampled_from(sorted(props)), unique=True))
    return {
        "type": "object",
        "properties": props,
        "required": required,
        "additionalProperties": False,
    }


def _array(children) -> st.SearchStrategy[dict]:
    return st.builds(
        lambda items, lo, extra: {
            "type": "array",
            "items": items,
            "minItems": lo,
            "maxItems": lo + extra,
        },
        children,
        st.integers(0, 2),
        st.integers(0, 2),
    )


def _in_object(schema: dict) -> dict:
    if schema.get("type") == "object":
        return schema
    return {
        "type": "object",
        "properties": {"v": schema},
        "required": ["v"],
        "additionalProperties": False,
    }


SCHEMAS = st.recursive(
    _leaf(), lambda children: st.one_of(_object(children), _array(children)), max_leaves=6
).map(_in_object)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schema=SCHEMAS, seed=st.integers(0, 2**16))
def test_random_schemas_always_validate(tiny, schema, seed):
    model, tokenizer = tiny
    prompts = _prompts(2)
    assert_valid(generate_batch(model, tokenizer, prompts, constrained(schema)), schema)
    sampled = constrained(schema, temperature=1.0, seed=seed)
    assert_valid(generate_batch(model, tokenizer, prompts, sampled), schema)


# -- errors and settings -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("schema", "says"),
    [
        ('{"type": "object",', "JSON text"),
        ("[1, 2]", "a JSON schema object"),
        ({"type": "objekt"}, "'objekt' is not valid under any of the given schemas"),
        ({"type": "object", "required": "name"}, "'name' is not of type 'array'"),
        ({"type": "string", "format": "no-such-format"}, "Unknown format: no-such-format"),
        ({"not": {"type": "string"}}, "Unimplemented keys"),
        ({"type": "integer", "minimum": 5, "maximum": 1}, "minimum (5) is greater than maximum"),
    ],
)
def test_a_schema_that_does_not_compile_is_a_clear_error(schema, says):
    with pytest.raises(ValueError, match="json_schema: expected") as info:
        Decoding(json_schema=schema)
    assert says in str(info.value)


def test_the_schema_is_held_as_one_hashable_text():
    spaced = Decoding(json_schema='{"type": "object", "properties": {"b": {}, "a": {}}}')
    mapping = Decoding(json_schema={"type": "object", "properties": {"b": {}, "a": {}}})
    assert spaced == mapping and hash(spaced) == hash(mapping)
    assert spaced.json_schema == '{"type":"object","properties":{"b":{},"a":{}}}'
    # Property order decides the order keys are written in: it is kept, not sorted.
    assert spaced != Decoding(json_schema={"type": "object", "properties": {"a": {}, "b": {}}})
    assert spaced.shapes_logits and not Decoding().shapes_logits


def test_property_order_is_the_written_order(tiny):
    model, tokenizer = tiny
    props = {"zeta": {"type": "boolean"}, "alpha": {"type": "boolean"}}
    schema = {
        "type": "object",
        "properties": props,
        "required": ["zeta", "alpha"],
        "additionalProperties": False,
    }
    (g,) = generate_batch(model, tokenizer, _prompts(1), constrained(schema))
    assert list(json.loads(g.text)) == ["zeta", "alpha"], g.text


def _spec(tmp_path, eval_schema: str, teacher_schema: str = "{type: boolean}") -> str:
    spec = tmp_path / "task.yaml"
    spec.write_text(
        "name: tiny\n"
        "prompts:\n"
        "  items: [first question, second question, third question]\n"
        "teacher:\n"
        "  model: smollm2-135m-instruct\n"
        f"  decoding: {{temperature: 0.7, json_schema: {teacher_schema}}}\n"
        "eval:\n"
        f"  json_schema: {eval_schema}\n"
    )
    return str(spec)


def test_spec_names_the_schema_by_file_or_inline(tmp_path):
    from distiller.spec import load_spec

    (tmp_path / "schemas").mkdir()
    (tmp_path / "schemas" / "person.yaml").write_text(
        "type: object\nproperties:\n  name: {type: string}\n  age: {type: integer}\n"
        "required: [name]\n"
    )
    spec = load_spec(_spec(tmp_path, "schemas/person.yaml"))
    assert json.loads(spec.eval.decoding.json_schema) == {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name"],
    }
    assert spec.teacher.decoding.json_schema == '{"type":"boolean"}'
    assert spec.teacher.decoding.temperature == 0.7


@pytest.mark.parametrize(
    ("value", "key", "says"),
    [
        ("no/such.json", "eval.json_schema", "JSON/YAML schema file"),
        ("{type: objekt}", "eval.json_schema", "not valid under any of the given schemas"),
        ("{type: string, format: nope}", "eval.json_schema", "Unknown format: nope"),
        ("[1, 2]", "eval.json_schema", "a schema file or an inline schema mapping"),
    ],
)
def test_spec_refuses_a_bad_schema_naming_the_key(tmp_path, value, key, says):
    from distiller.errors import SpecError
    from distiller.spec import load_spec

    with pytest.raises(SpecError) as info:
        load_spec(_spec(tmp_path, value))
    # The key is the spec's json_schema, or a key inside the schema it names.
    assert info.value.key.startswith(key) and says in info.value.expected, info.value
    assert info.value.line is not None


def test_cli_generate_takes_a_schema_file(tiny_model_dir, tmp_path, capsys):
    from distiller.cli import main

    props = {"ok": {"type": "boolean"}}
    schema = {"type": "object", "properties": props, "additionalProperties": False}
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(schema))
    argv = ["generate", "--model", str(tiny_model_dir), "--prompt", "hi", "--max-tokens", "30"]
    assert main([*argv, "--json-schema", str(path)]) == 0
    out = capsys.readouterr()
    jsonschema.validate(json.loads(out.out), schema)
    assert "finish: stop" in out.err

    # A bad schema is one line naming where (the file, or the option) and what is wrong.
    path.write_text('{"type": "objekt"}')
    assert main([*argv, "--json-schema", str(path)]) == 2
    err = capsys.readouterr().err
    assert "'objekt' is not valid" in err and (str(path) in err or "--json-schema" in err), err
    path.write_text('{"type": "string", "format": "nope"}')
    assert main([*argv, "--json-schema", str(path)]) == 2
    err = capsys.readouterr().err
    assert "--json-schema: expected a schema that constrained decoding supports" in err
    assert "Unknown format: nope" in err


def test_an_endpoint_gets_the_schema_as_response_format():
    from fake_openai import FakeOpenAI

    from distiller.backends import CompletionRequest
    from distiller.backends.openai_compat import OpenAICompatBackend

    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    with FakeOpenAI() as srv:
        be = OpenAICompatBackend(srv.url, "teacher-x", timeout_s=5.0)
        messages = [{"role": "user", "content": "q"}]
        (c,) = be.complete([CompletionRequest(messages, Decoding(json_schema=schema))])
        (plain,) = be.complete([CompletionRequest(messages, Decoding())])
        be.close()
    assert c.ok and plain.ok
    sent = srv.requests[0]["response_format"]
    assert sent["type"] == "json_schema" and sent["json_schema"]["schema"] == schema
    assert sent["json_schema"]["strict"] is True
    assert "response_format" not in srv.requests[1]


# -- the real model ------------------------------------------------------------------------


@pytest.mark.real_model
def test_real_model_extracts_fields_that_validate():
    from distiller.generate import build_messages, chat_prompt
    from distiller.models import load_model

    model, tokenizer = load_model("smollm2-135m-instruct")
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 40},
            "age": {"type": "integer", "minimum": 0, "maximum": 130},
            "city": {"type": "string", "maxLength": 40},
            "employed": {"type": "boolean"},
            "languages": {"type": "array", "items": {"type": "string", "maxLength": 20},
                          "maxItems": 5},
        },
        "required": ["name", "age", "city", "employed", "languages"],
        "additionalProperties": False,
    }  # fmt: skip
    document = (
        "Maria Lopez is 34 years old and lives in Lisbon, where she works as a nurse at the "
        "city hospital. She speaks Portuguese, Spanish and English."
    )
    prompt = chat_prompt(
        tokenizer,
        build_messages(f"Extract name, age, city, employed and languages as JSON:\n{document}"),
    )
    decoding = Decoding(json_schema=schema, max_tokens=max_json_bytes(schema) + 1)
    # Both paths; their tokens are not compared here: the paths round differently (batched
    # attention, a different cache), and on a near tie of the real model's logits greedy may
    # pick differently on another CPU (the tiny model's test compares the paths).
    single = generate_one(model, tokenizer, prompt, decoding)
    (batched,) = generate_batch(model, tokenizer, [prompt], decoding)
    assert_valid([single, batched], schema)
