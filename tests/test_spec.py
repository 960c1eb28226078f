"""Task specs: the shipped fixtures load and are sound; every bad input names file, key and line."""

from __future__ import annotations

import itertools
import json
import textwrap
from pathlib import Path

import jsonschema
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from distiller.errors import SpecError
from distiller.spec import (
    LORA_KEYS,
    DropLayersSpec,
    TaskSpec,
    load_spec,
    read_prompts,
    stable_hash,
)
from distiller.validators import build_validator, similarity, words

TASKS = Path(__file__).resolve().parent.parent / "fixtures" / "tasks"

MINIMAL = """\
name: tiny
prompts:
  items: [first question, second question, third question]
teacher:
  model: smollm2-135m-instruct
"""


def write(tmp_path: Path, text: str, name: str = "task.yaml") -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def spec_error(tmp_path: Path, text: str) -> SpecError:
    with pytest.raises(SpecError) as info:
        load_spec(write(tmp_path, text))
    return info.value


# ---------------------------------------------------------------------------------------------
# The shipped fixtures


@pytest.fixture(scope="module")
def cot() -> TaskSpec:
    return load_spec(TASKS / "structured_cot.yaml")


def test_structured_cot_loads_with_the_intended_settings(cot):
    assert cot.name == "structured_cot"
    assert len(cot.prompts) >= 60
    assert 18 <= len(cot.eval.prompt_sets["unseen"]) <= 25
    assert cot.teacher.model == "smollm2-135m-instruct"
    assert len(cot.teacher.few_shot) == 2
    assert cot.teacher.keep == "first" and cot.teacher.samples_per_prompt == 3
    assert [v.type for v in cot.validators] == [
        "sections",
        "distinct_sections",
        "length",
        "repetition",
    ]
    assert cot.validators[0].params["headers"] == [
        "FAILURE MODE",
        "NAIVE FIXES",
        "MECHANISM",
        "TRADE-OFF",
    ]
    s = cot.student
    assert (s.route, s.prompt_style, s.lora.rank, s.lora.keys) == ("sft", "bare", 8, LORA_KEYS)
    assert s.train.max_seq_length == 512 and s.train.batch_size == 4
    assert (cot.split.train, cot.split.valid, cot.split.test, cot.split.seed) == (0.7, 0.1, 0.2, 0)
    assert cot.eval.thresholds == {"format_rate": 0.9} and cot.eval.decoding.max_tokens == 200
    assert (cot.teacher.decoding.no_repeat_ngram, cot.eval.decoding.no_repeat_ngram) == (4, 3)
    assert cot.teacher.decoding.stop == cot.eval.decoding.stop == ("\n\n",)
    assert len(cot.eval.dev) == 24
    # Prompts are the template applied to the scenario; the scenario is kept in meta.
    p = cot.prompts[0]
    assert p.text == "Analyze this distributed-systems failure: " + p.meta["scenario"]


def test_few_shot_answers_are_compact_and_pass_the_task_validators(cot):
    check = build_validator(cot.validators)
    for ex in cot.teacher.few_shot:
        verdict = check(ex.assistant)
        assert verdict.passed, verdict.reasons
        assert 60 <= len(words(ex.assistant)) <= 120
        # 1-2 sentences per section.
        for body in ex.assistant.splitlines():
            assert 1 <= body.count(". ") + 1 <= 2


def _scenarios(cot: TaskSpec) -> dict[str, list[str]]:
    prefix = "Analyze this distributed-systems failure: "
    return {
        "curriculum": [p.meta["scenario"] for p in cot.prompts],
        "unseen": [p.meta["scenario"] for p in cot.eval.prompt_sets["unseen"]],
        "dev": [p.meta["scenario"] for p in cot.eval.dev],
        "few_shot": [ex.user.removeprefix(prefix) for ex in cot.teacher.few_shot],
    }


def _content_words(text: str) -> set[str]:
    stop = {"a", "an", "the", "and", "or", "of", "to", "in", "on", "for", "is", "are", "its", "it"}
    stop |= {
        "that",
        "with",
        "by",
        "from",
        "at",
        "as",
        "so",
        "but",
        "every",
        "one",
        "after",
        "which",
    }
    return {w for w in words(text) if w not in stop and len(w) > 2}


def test_scenarios_are_genuinely_distinct(cot):
    groups = _scenarios(cot)
    everything = [(g, s) for g, items in groups.items() for s in items]
    worst = (0.0, None)
    for (ga, a), (gb, b) in itertools.combinations(everything, 2):
        wa, wb = _content_words(a), _content_words(b)
        jaccard = len(wa & wb) / len(wa | wb)
        score = max(similarity(a, b), jaccard)
        worst = max(worst, (score, (ga, a, gb, b)), key=lambda x: x[0])
    assert worst[0] < 0.4, worst


def test_unseen_is_written_in_other_voices(cot):
    unseen = _scenarios(cot)["unseen"]
    styled = [s for s in unseen if s.endswith("?") or s.split(":")[0].lower() in
              {"q", "terse", "incident", "incident report", "postmortem", "ticket"} or s.startswith("INC-")]  # fmt: skip
    assert len(styled) >= 0.8 * len(unseen)


def test_label_ranking_fixture():
    spec = load_spec(TASKS / "label_ranking.yaml")
    assert len(spec.prompts) >= 30
    assert spec.labels == ["critical", "major", "minor"]
    assert spec.split.stratify_by == "label"
    counts = {label: sum(p.label == label for p in spec.prompts) for label in spec.labels}
    assert min(counts.values()) >= 8, counts
    assert all(p.reference == p.label for p in spec.prompts)
    check = build_validator(spec.validators)
    assert check("Critical.").passed and not check("severe").passed


def test_json_extraction_fixture_references_satisfy_its_schema():
    spec = load_spec(TASKS / "json_extraction.yaml")
    assert len(spec.prompts) >= 30
    (v,) = spec.validators
    assert v.type == "json_schema" and "schema_file" not in v.params  # loaded by content
    jsonschema.validate(
        spec.teacher.few_shot[0].assistant and json.loads(spec.teacher.few_shot[0].assistant),
        v.params["schema"],
    )
    check = build_validator(spec.validators)
    for p in spec.prompts:
        jsonschema.validate(p.reference, v.params["schema"])
        assert check(json.dumps(p.reference)).passed
        # Every reference value is recoverable from the alert text itself.
        for key in ("service", "region", "started_at"):
            assert p.reference[key] in p.meta["text"]
    assert spec.student.train.epochs == 3 and spec.student.train.iters is None


# ---------------------------------------------------------------------------------------------
# Defaults, paths, prompts


def test_minimal_spec_gets_sensible_defaults(tmp_path):
    spec = load_spec(write(tmp_path, MINIMAL))
    assert [p.text for p in spec.prompts] == ["first question", "second question", "third question"]
    assert all(p.id.startswith("p-") for p in spec.prompts)
    assert spec.student.model == "smollm2-135m-instruct"  # defaults to the teacher's model
    assert spec.student.lora.keys == LORA_KEYS and spec.student.train.iters == 200
    assert spec.validators == () and spec.teacher.keep == "first"
    assert spec.path == tmp_path / "task.yaml"


def test_relative_paths_resolve_against_the_spec_dir(tmp_path):
    write(tmp_path, "- {id: a, scenario: x fails}\n- {id: b, scenario: y fails}\n", "data/c.yaml")
    write(tmp_path, '{"type": "object"}', "data/schema.json")
    write(tmp_path, "- {id: u, scenario: z fails}\n", "data/unseen.yaml")
    (tmp_path / "models" / "m").mkdir(parents=True)
    spec_path = write(
        tmp_path,
        """\
        prompts: {file: data/c.yaml, field: scenario, template: "Why? {scenario}"}
        teacher: {model: ./models/m}
        validators: [{type: json_schema, schema_file: data/schema.json}]
        eval: {prompt_sets: {unseen: data/unseen.yaml}}
        """,
        "specs/t.yaml",
    )
    # Move the data next to the spec: paths are relative to the spec, not the cwd.
    (tmp_path / "data").rename(tmp_path / "specs" / "data")
    (tmp_path / "models").rename(tmp_path / "specs" / "models")
    spec = load_spec(spec_path)
    assert [p.id for p in spec.prompts] == ["a", "b"]
    assert spec.prompts[0].text == "Why? x fails"
    assert spec.teacher.model == str(tmp_path / "specs" / "models" / "m")
    assert spec.student.model == spec.teacher.model
    assert spec.validators[0].params["schema"] == {"type": "object"}
    assert spec.eval.prompt_sets["unseen"][0].text == "Why? z fails"  # inherits template + field


def test_vary_expands_a_product_with_stable_ids(tmp_path):
    spec = load_spec(
        write(
            tmp_path,
            """\
            prompts:
              items: [{id: q, topic: quorums}, {id: r, topic: leases}]
              template: "Explain {topic} to a {who} in {n} sentences."
              vary: {who: [novice, expert], n: [2, 3]}
            teacher: {model: m}
            """,
        )
    )
    assert len(spec.prompts) == 8
    assert spec.prompts[0].id == "q[who=novice,n=2]"
    assert spec.prompts[0].text == "Explain quorums to a novice in 2 sentences."
    assert spec.prompts[-1].meta == {"who": "expert", "n": 3, "topic": "leases"}


def test_jsonl_prompts_report_their_line(tmp_path):
    write(tmp_path, '{"text": "a"}\n\n{"text": "b", "label": "x"}\n{"txt": "c"}\n', "p.jsonl")
    err = spec_error(tmp_path, "prompts: p.jsonl\nteacher: {model: m}\n")
    assert (Path(err.path).name, err.key, err.line) == ("p.jsonl", "[2]", 4)
    assert "'text'" in err.expected


def test_template_missing_field_names_the_entry(tmp_path):
    write(tmp_path, "- {scenario: one}\n- {scenrio: two}\n", "c.yaml")
    err = spec_error(
        tmp_path, 'prompts: {file: c.yaml, template: "X {scenario}"}\nteacher: {model: m}\n'
    )
    assert (Path(err.path).name, err.key, err.line) == ("c.yaml", "[1]", 2)
    assert err.expected == "field 'scenario' used by prompts.template"


def test_duplicate_prompts_are_rejected(tmp_path):
    err = spec_error(tmp_path, "prompts: [a b, c, '  A   B ']\nteacher: {model: m}\n")
    assert err.key == "prompts[2]" and "same text as prompts[0]" in err.expected
    err = spec_error(
        tmp_path, "prompts: [{id: x, text: a}, {id: x, text: b}]\nteacher: {model: m}\n"
    )
    assert err.key == "prompts[1].id" and "unique id" in err.expected


def test_eval_prompt_sets_may_not_leak_training_prompts(tmp_path):
    err = spec_error(
        tmp_path,
        "prompts: [alpha, beta]\nteacher: {model: m}\neval: {prompt_sets: {unseen: [gamma, beta]}}\n",
    )
    assert err.key == "eval.prompt_sets.unseen" and err.line == 3
    err = spec_error(
        tmp_path, "prompts: [alpha, beta]\nteacher: {model: m}\neval:\n  dev: [alpha]\n"
    )
    assert err.key == "eval.dev" and err.line == 4


def test_stop_strings(tmp_path):
    base = "prompts: [a]\nteacher: {model: m, decoding: {stop: X}}\n"
    spec = load_spec(write(tmp_path, base + 'eval: {stop: ["\\n\\n", END]}\n'))
    assert spec.teacher.decoding.stop == ("X",) and spec.eval.decoding.stop == ("\n\n", "END")
    err = spec_error(tmp_path, base + "eval:\n  stop: ['']\n")
    assert err.key == "eval.stop" and "non-empty string" in err.expected and err.line == 4


def test_dev_prompts_inherit_the_template_and_stay_out_of_reports(tmp_path):
    from distiller.evaluate import resolve_prompts
    from distiller.pipeline import prompt_sets

    spec = load_spec(
        write(
            tmp_path,
            'prompts: {items: [x fails], template: "Why? {text}"}\nteacher: {model: m}\n'
            "eval: {dev: [y fails]}\n",
        )
    )
    assert resolve_prompts(spec, "dev")[1][0].text == "Why? y fails"
    assert prompt_sets(spec) == ["split:test"]


def test_few_shot_answers_must_pass_the_validators(tmp_path):
    err = spec_error(
        tmp_path,
        """\
        prompts: [q1, q2]
        teacher:
          model: m
          few_shot:
            - {user: q0, assistant: "A: same words here.\\nB: same words here."}
        validators:
          - {type: sections, headers: [A, B]}
          - {type: distinct_sections}
        """,
    )
    assert err.key == "teacher.few_shot[0].assistant" and err.line == 5
    assert "are 1.00 similar" in err.expected


def test_labels_default_from_the_curriculum_and_stratify_needs_them(tmp_path):
    spec = load_spec(
        write(
            tmp_path,
            """\
            prompts: [{text: a, label: "yes"}, {text: b, label: "no"}, {text: c, label: 3}]
            teacher: {model: m}
            validators: [{type: label}]
            split: {stratify_by: label}
            """,
        )
    )
    assert spec.validators[0].params["labels"] == ["3", "no", "yes"]
    # YAML 1.1 reads a bare `no` as false: that is an error, not a label "False".
    err = spec_error(tmp_path, "prompts: [{text: a, label: no}]\nteacher: {model: m}\n")
    assert err.key == "prompts[0].label" and "quote" in err.expected
    err = spec_error(
        tmp_path,
        "prompts: [{text: a, label: x}, b]\nteacher: {model: m}\nsplit: {stratify_by: label}\n",
    )
    assert err.key == "split.stratify_by" and "1 have none" in err.expected


# ---------------------------------------------------------------------------------------------
# Errors name file, key, expectation and line


@pytest.mark.parametrize(
    ("extra", "key", "fragment", "line"),
    [
        ("student:\n  lora:\n    rnak: 8\n", "student.lora.rnak", "did you mean 'rank'", 8),
        ("student:\n  lora: {rank: 0}\n", "student.lora.rank", ">= 1, got 0", 7),
        ("student:\n  lora: {dropout: 1.0}\n", "student.lora.dropout", "[0, 1)", 7),
        ("student: {lora: {layers: top}}\n", "student.lora.layers", "an integer", 6),
        ("student: {route: distill}\n", "student.route", "one of sft, seq-kd, logit-kd, dpo", 6),
        (
            "student: {prompt_style: scafold}\n",
            "student.prompt_style",
            "did you mean 'scaffold'",
            6,
        ),
        ("student: {train: {iters: 10, epochs: 2}}\n", "student.train.epochs", "exactly one", 6),
        ("student: {train: {learning_rate: -1}}\n", "student.train.learning_rate", "(0, inf]", 6),
        ("student: {train: {learning_rate: fast}}\n", "student.train.learning_rate", "a number", 6),
        (
            "student: {train: {schedule: cosin}}\n",
            "student.train.schedule",
            "did you mean 'cosine'",
            6,
        ),
        (
            "student: {train: {iters: 10, warmup_steps: 10}}\n",
            "student.train.warmup_steps",
            "fewer than iters",
            6,
        ),
        ("student: {kd: {alpha: 1}}\n", "student.kd", "route is sft", 6),
        (
            "student: {route: logit-kd, kd: {temperature: 0}}\n",
            "student.kd.temperature",
            "(0, inf]",
            6,
        ),
        (
            "student: {route: logit-kd, kd: {divergence: kld}}\n",
            "student.kd.divergence",
            "kl, reverse_kl, jsd",
            6,
        ),
        (
            "student: {route: logit-kd, kd: {layer_map: [[1, 2, 3]]}}\n",
            "student.kd.layer_map",
            "pairs",
            6,
        ),
        (
            "student: {drop_layers: {keep_every: 2, keep: [0]}}\n",
            "student.drop_layers",
            "exactly one",
            6,
        ),
        ("student: {quantize: {bits: 7}}\n", "student.quantize.bits", "one of 2, 3, 4, 5, 6, 8", 6),
        ("student: {full_finetune: true, lora: {rank: 4}}\n", "student.lora", "exclusive", 6),
        ("split: {train: 0.5, valid: 0.1, test: 0.1}\n", "split", "= 1, got 0.7", 6),
        ("split: {test: 0}\n", "split.test", "(0, 1)", 6),
        ("eval: {thresholds: {format_rate: high}}\n", "eval.thresholds.format_rate", "a number", 6),
        ("eval: {no_repeat_ngram: 1}\n", "eval.no_repeat_ngram", ">= 2, got 1", 6),
        ("eval: {repetition_penalty: 0}\n", "eval.repetition_penalty", "(0, inf]", 6),
        (
            "  decoding: {no_repeat_ngram: -3}\n",
            "teacher.decoding.no_repeat_ngram",
            ">= 0, got -3",
            6,
        ),
        ("validators: [{type: sectons}]\n", "validators[0]", "did you mean 'sections'", 6),
        (
            "validators:\n  - type: length\n    max_wrds: 5\n",
            "validators[0].max_wrds",
            "did you mean 'max_words'",
            8,
        ),
        (
            "validators: [{type: regex, must_match: ['(']}]\n",
            "validators[0].must_match[0]",
            "valid regex",
            6,
        ),
        (
            "validators: [{type: distinct_sections}]\n",
            "validators[0].headers",
            "no 'sections' validator",
            6,
        ),
        ("eval: {prompt_sets: {unseen: nope.yaml}}\n", "(file)", "an existing prompts file", None),
        ("promts: []\n", "promts", "did you mean 'prompts'", 6),
    ],
)
def test_bad_values_name_key_expectation_and_line(tmp_path, extra, key, fragment, line):
    err = spec_error(tmp_path, MINIMAL + extra)
    assert err.key == key
    assert fragment in err.expected, err.expected
    assert err.line == line
    assert str(err).startswith(str(err.path))


def test_teacher_needs_exactly_one_source_and_never_a_key(tmp_path):
    base = "prompts: [a]\n"
    err = spec_error(tmp_path, base + "teacher: {system_prompt: hi}\n")
    assert err.key == "teacher" and "exactly one of 'model'" in err.expected
    err = spec_error(
        tmp_path, base + "teacher:\n  endpoint: {url: 'http://x/v1', model: big, api_key: sk-123}\n"
    )
    assert (
        err.key == "teacher.endpoint.api_key" and "NAME of an environment variable" in err.expected
    )
    assert "sk-123" not in str(err)
    err = spec_error(
        tmp_path,
        base + "teacher:\n  endpoint: {url: 'http://x/v1', model: big, api_key_env: sk-123}\n",
    )
    assert err.key == "teacher.endpoint.api_key_env"
    err = spec_error(tmp_path, base + "teacher:\n  endpoint: {url: 'http://x/v1', model: big}\n")
    assert err.key == "student.model" and "endpoint" in err.expected
    err = spec_error(
        tmp_path,
        base
        + "teacher:\n  endpoint: {url: 'http://x/v1', model: big}\nstudent: {model: s, route: logit-kd}\n",
    )
    assert err.key == "student.route" and "local teacher" in err.expected
    spec = load_spec(
        write(
            tmp_path,
            base
            + "teacher:\n  endpoint: {url: 'http://127.0.0.1:8080/v1', model: big, api_key_env: TEACHER_KEY, max_concurrency: 2}\n"
            + "student: {model: s, route: seq-kd}\n",
        )
    )
    ep = spec.teacher.endpoint
    assert (ep.url, ep.model, ep.api_key_env, ep.max_concurrency, ep.max_retries) == (
        "http://127.0.0.1:8080/v1", "big", "TEACHER_KEY", 2, 3,
    )  # fmt: skip
    assert spec.teacher.model is None


def test_logit_shaping_for_teacher_and_eval(tmp_path):
    spec = load_spec(
        write(
            tmp_path,
            MINIMAL
            + "  decoding: {no_repeat_ngram: 4, repetition_penalty: 1.1}\n"
            + "eval: {no_repeat_ngram: 3}\n",
        )
    )
    d = spec.teacher.decoding
    assert (d.no_repeat_ngram, d.repetition_penalty) == (4, 1.1)
    assert (spec.eval.decoding.no_repeat_ngram, spec.eval.decoding.repetition_penalty) == (3, None)
    plain = load_spec(write(tmp_path, MINIMAL, "plain.yaml"))
    assert (plain.eval.decoding.no_repeat_ngram, plain.teacher.decoding.no_repeat_ngram) == (0, 0)
    # An endpoint cannot honour it: refused at load, not silently dropped.
    err = spec_error(
        tmp_path,
        "prompts: [a]\nstudent: {model: s}\nteacher:\n  endpoint: {url: 'http://x/v1', model: big}\n"
        "  decoding: {no_repeat_ngram: 4}\n",
    )
    assert err.key == "teacher.decoding.no_repeat_ngram" and "endpoint" in err.expected


def test_yaml_syntax_errors_have_a_line(tmp_path):
    err = spec_error(tmp_path, "name: x\nprompts: [a, b\nteacher: {model: m}\n")
    assert err.key == "(yaml)" and err.line is not None and "valid YAML" in err.expected


def test_top_level_must_be_a_mapping(tmp_path):
    assert spec_error(tmp_path, "- a\n- b\n").expected == "a mapping, got a list"


def test_routes_and_their_sections(tmp_path):
    spec = load_spec(
        write(
            tmp_path,
            MINIMAL
            + "student:\n  route: logit-kd\n  kd: {alpha: 0.2, beta: 0.8, layer_map: [[0, 0], [1, 2]]}\n"
            + "  drop_layers: {keep_every: 2}\n  train: {learning_rate: 1e-4}\n",
        )
    )
    kd = spec.student.kd
    assert (kd.alpha, kd.beta, kd.layer_map) == (0.2, 0.8, ((0, 0), (1, 2)))
    assert spec.student.train.learning_rate == 1e-4  # PyYAML reads "1e-4" as a string
    assert spec.student.drop_layers.layers_to_keep(7) == [0, 2, 4, 6]
    assert spec.student.drop_layers.layers_to_keep(6) == [0, 2, 4, 5]
    assert DropLayersSpec(keep=(0, 3)).layers_to_keep(4) == [0, 3]
    spec = load_spec(write(tmp_path, MINIMAL + "student: {route: dpo, full_finetune: true}\n"))
    assert spec.student.dpo.beta == 0.1 and spec.student.lora is None
    spec = load_spec(write(tmp_path, MINIMAL + "student: {train: {epochs: 2}}\n"))
    assert (spec.student.train.iters, spec.student.train.epochs) == (None, 2.0)


# ---------------------------------------------------------------------------------------------
# Hashing


def test_fingerprint_tracks_content_not_location(tmp_path, cot):
    a = load_spec(write(tmp_path, MINIMAL, "a/t.yaml"))
    b = load_spec(
        write(tmp_path, MINIMAL.replace("name: tiny", "name: tiny\ndescription: hi"), "b/t.yaml")
    )
    assert a.fingerprint() == b.fingerprint()
    c = load_spec(write(tmp_path, MINIMAL + "student: {lora: {rank: 4}}\n", "c/t.yaml"))
    assert c.fingerprint() != a.fingerprint()
    assert a.fingerprint(a.teacher) == c.fingerprint(c.teacher)
    assert a.fingerprint(a.teacher, "x") != a.fingerprint(a.teacher, "y")
    assert len(cot.fingerprint()) == 64 and cot.fingerprint() == load_spec(cot.path).fingerprint()


@settings(max_examples=50)
@given(d=st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=5), max_size=6))
def test_stable_hash_ignores_key_order(d):
    assert stable_hash(d) == stable_hash(dict(reversed(list(d.items()))))
    assert stable_hash((1, [d])) == stable_hash([1, (d,)])


@settings(max_examples=25, deadline=None)
@given(
    key=st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=3, max_size=12),
    at=st.integers(0, 4),
)
def test_unknown_key_anywhere_is_reported_at_its_line(tmp_path_factory, key, at):
    lines = MINIMAL.splitlines()
    data = yaml.safe_load(MINIMAL)
    if key in data:
        return
    at = [0, 1, 3, 5, 5][at]  # top-level positions
    lines.insert(at, f"{key}: 1")
    path = write(tmp_path_factory.mktemp("s"), "\n".join(lines) + "\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    (loaded_key,) = yaml.safe_load(f"{key}: 1")  # e.g. `false` loads as False
    assert (info.value.key, info.value.line) == (str(loaded_key), at + 1)


# ---------------------------------------------------------------------------------------------
# read_prompts and the `distiller spec` command


def test_read_prompts_outside_a_spec(tmp_path):
    path = write(tmp_path, "- {q: one}\n- {q: two}\n", "extra.yaml")
    prompts = read_prompts(path, template="Q: {q}")
    assert [p.text for p in prompts] == ["Q: one", "Q: two"]
    with pytest.raises(SpecError) as info:
        read_prompts(path, template="Q: {x}")
    assert (info.value.key, info.value.line) == ("[0]", 1)


def test_cli_summarizes_and_checks(tmp_path, capsys):
    from distiller.cli import main

    assert main(["spec", str(TASKS / "structured_cot.yaml"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["prompts"] >= 60 and summary["validators"][0] == "sections"

    cot = load_spec(TASKS / "structured_cot.yaml")
    good = write(tmp_path, cot.teacher.few_shot[0].assistant, "good.txt")
    assert main(["spec", str(cot.path), "--check", str(good)]) == 0
    assert capsys.readouterr().out.startswith("PASS")
    bad = write(tmp_path, "FAILURE MODE: x\nMECHANISM: y\n", "bad.txt")
    assert main(["spec", str(cot.path), "--check", str(bad)]) == 1
    assert "missing header: NAIVE FIXES" in capsys.readouterr().out

    broken = write(tmp_path, MINIMAL + "student: {lora: {rank: -1}}\n")
    assert main(["spec", str(broken)]) != 0
    assert "student.lora.rank" in capsys.readouterr().err
