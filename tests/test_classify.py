"""classify: the ranking arithmetic (hypothesis), the batched scores against one forward pass per
label on a tiny random model, the eval.classify spec section, and ranking inside evaluate."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from distiller import classify as C
from distiller.errors import SpecError
from distiller.spec import load_spec

LABELS = ("Bad", "Good", "Standard")
scores = st.floats(-30, 5, allow_nan=False, width=64)


def score_matrix(n_labels: int = 3):
    return hnp.arrays(np.float64, st.tuples(st.integers(1, 6), st.just(n_labels)), elements=scores)


# ---------------------------------------------------------------------------------------------
# The arithmetic


@given(
    score_matrix(),
    hnp.arrays(np.float64, 3, elements=scores),
    hnp.arrays(np.float64, 3, elements=st.floats(-3, 3)),
)
def test_probabilities_sum_to_one_and_margin_is_top1_minus_top2(raw, prior, bias):
    for r in C.rank(raw, LABELS, prior, bias):
        p = np.array([r.probabilities[y] for y in LABELS])
        assert np.all(p >= 0) and np.all(p <= 1)
        assert p.sum() == pytest.approx(1.0, abs=1e-12)
        top = np.sort(p)[::-1]
        assert 0.0 <= r.margin <= 1.0
        assert r.margin == pytest.approx(top[0] - top[1], abs=1e-12)
        assert r.probabilities[r.prediction] == pytest.approx(top[0], abs=1e-12)
        for y in LABELS:
            assert r.calibrated[y] == pytest.approx(r.raw[y] - r.prior[y] + bias[LABELS.index(y)])


@given(
    hnp.arrays(np.float64, 3, elements=scores),
    hnp.arrays(np.float64, 5, elements=st.floats(-20, 20, allow_nan=False)),
)
def test_a_model_that_scores_every_prompt_like_the_prior_gets_uniform_probabilities(prior, shift):
    # Every prompt's scores are the content-free prior plus a constant of its own: the model
    # prefers labels only as it does with no content, so calibration leaves no preference.
    raw = prior[None, :] + shift[:, None]
    for r in C.rank(raw, LABELS, prior):
        assert all(r.probabilities[y] == pytest.approx(1 / 3, abs=1e-9) for y in LABELS)
        assert r.margin == pytest.approx(0.0, abs=1e-9)


@given(score_matrix(), hnp.arrays(np.float64, 3, elements=scores), st.permutations(range(3)))
def test_permuting_the_labels_permutes_every_output(raw, prior, perm):
    plain = C.rank(raw, LABELS, prior)
    permuted = C.rank(raw[:, perm], [LABELS[i] for i in perm], prior[perm])
    for a, b in zip(plain, permuted, strict=True):
        for field in ("raw", "prior", "calibrated", "probabilities"):
            got, want = getattr(b, field), getattr(a, field)
            assert got.keys() == want.keys()
            assert all(got[y] == pytest.approx(want[y], abs=1e-12) for y in LABELS)
        assert b.margin == pytest.approx(a.margin, abs=1e-12)
        calibrated = sorted(a.calibrated.values())
        if calibrated[-1] > calibrated[-2]:  # a tie goes to the first label, which moved
            assert b.prediction == a.prediction


@given(score_matrix(), hnp.arrays(np.float64, 3, elements=scores))
def test_calibration_removes_a_preference_the_content_free_prompts_show(raw, preference):
    # A model that adds `preference` to every prompt's scores, and so to the prior too, ranks
    # after calibration as the same model without the preference.
    base = C.rank(raw, LABELS, np.zeros(3))
    biased = C.rank(raw + preference, LABELS, preference)
    for a, b in zip(base, biased, strict=True):
        assert all(
            b.probabilities[y] == pytest.approx(a.probabilities[y], abs=1e-9) for y in LABELS
        )


def test_a_bias_moves_the_prediction_to_its_label():
    raw = np.array([[-1.0, -1.2, -1.5]])
    assert C.rank(raw, LABELS)[0].prediction == "Bad"
    assert C.rank(raw, LABELS, bias=np.array([0.0, 0.0, 0.6]))[0].prediction == "Standard"


def test_uncalibrated_prediction_is_the_raw_argmax_ties_to_the_first_label():
    assert (
        C.uncalibrated_prediction({"Bad": -2.0, "Good": -1.0, "Standard": -3.0}, LABELS) == "Good"
    )
    assert C.uncalibrated_prediction({"Bad": -1.0, "Good": -1.0, "Standard": -3.0}, LABELS) == "Bad"


# ---------------------------------------------------------------------------------------------
# Scores from a model


CONVERSATIONS = [
    [{"role": "user", "content": "Rate: pays on time, low debt."}],
    [{"role": "user", "content": "Rate this much longer applicant description, who often misses payments and owes a lot."}],
    [{"role": "system", "content": "Answer with one word."}, {"role": "user", "content": "Rate: x"}],
]  # fmt: skip
# Labels of different token lengths, one sharing its first token with another.
MIXED_LABELS = ("Good", "Standard risk", "Good enough", "Bad credit history")


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from distiller.models import load_model

    return load_model(tiny_model_dir)


def one_forward_per_label(model, tokenizer, conversation, labels) -> list[float]:
    """The reference: each label's whole conversation alone, full logits, log-softmax, mean."""
    import mlx.core as mx

    out = []
    for e in C.answer_examples(tokenizer, conversation, labels):
        logits = model(mx.array(e.tokens)[None])[0].astype(mx.float32)
        logp = np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
        picked = [logp[t - 1, e.tokens[t]] for t in range(e.offset, len(e.tokens))]
        out.append(float(np.mean(picked)))
    return out


@pytest.mark.parametrize("batch_size", [1, 2, 8])
def test_batched_prompt_cache_scores_equal_one_forward_per_label(tiny, batch_size):
    model, tokenizer = tiny
    assert C._plain_kv_cache(model)  # the cached path is the one under test
    stats = C.ScoringStats()
    got = C.score_labels(
        model, tokenizer, CONVERSATIONS, MIXED_LABELS, batch_size=batch_size, stats=stats
    )
    want = np.array(
        [one_forward_per_label(model, tokenizer, c, MIXED_LABELS) for c in CONVERSATIONS]
    )
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=0)
    assert stats.rows == len(CONVERSATIONS) * len(MIXED_LABELS)
    prompt_tokens = sum(
        C.answer_examples(tokenizer, c, MIXED_LABELS[:1])[0].offset for c in CONVERSATIONS
    )
    assert stats.tokens > prompt_tokens  # each prompt once, plus the answers' tails


def test_whole_sequence_scores_equal_one_forward_per_label(tiny):
    # The path for models whose cache is not a plain KV cache (sliding windows, recurrences).
    model, tokenizer = tiny
    examples = [e for c in CONVERSATIONS for e in C.answer_examples(tokenizer, c, MIXED_LABELS)]
    got = C._score_whole_sequences(model, examples, len(MIXED_LABELS))
    want = np.array(
        [one_forward_per_label(model, tokenizer, c, MIXED_LABELS) for c in CONVERSATIONS]
    )
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=0)


def test_rank_labels_subtracts_the_mean_content_free_score(tiny):
    model, tokenizer = tiny
    null = [[{"role": "user", "content": t}] for t in ("N/A", "", "[MASK]")]
    rankings = C.rank_labels(
        model, tokenizer, CONVERSATIONS, LABELS, content_free=null, bias={"Good": 0.25}
    )
    prior = C.score_labels(model, tokenizer, null, LABELS).mean(axis=0)
    raw = C.score_labels(model, tokenizer, CONVERSATIONS, LABELS)
    for i, r in enumerate(rankings):
        for j, y in enumerate(LABELS):
            assert r.prior[y] == pytest.approx(prior[j], abs=1e-6)
            assert r.raw[y] == pytest.approx(raw[i, j], abs=1e-6)
            assert r.calibrated[y] == pytest.approx(raw[i, j] - prior[j] + (y == "Good") * 0.25)


def test_rank_labels_refuses_a_bias_for_an_unranked_label_and_calibration_without_nulls(tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="Excellent"):
        C.rank_labels(
            model, tokenizer, CONVERSATIONS, LABELS, calibrate=False, bias={"Excellent": 1}
        )
    with pytest.raises(ValueError, match="content-free"):
        C.rank_labels(model, tokenizer, CONVERSATIONS, LABELS, calibrate=True)


# ---------------------------------------------------------------------------------------------
# The spec section


SPEC = """\
name: tiny_credit
prompts:
  template: "Rate: {{text}}"
  items:
    - {{id: a, text: "pays on time", label: Good}}
    - {{id: b, text: "misses payments", label: Bad}}
    - {{id: c, text: "sometimes late", label: Standard}}
    - {{id: d, text: "always on time, low debt", label: Good}}
    - {{id: e, text: "defaulted twice", label: Bad}}
    - {{id: f, text: "late once", label: Standard}}
teacher: {{gold: true}}
validators: [{{type: label}}]
student: {{model: {model}}}
split: {{test_per_class: 1, valid_per_class: 0, stratify_by: label}}
eval:
  batch_size: 4
  classify: {classify}
"""


def write_spec(
    tmp_path: Path,
    model: str | Path = "tiny",
    classify: str = "{decoder: ranking}",
    swap: tuple[tuple[str, str], ...] = (),
) -> Path:
    text = SPEC.format(model=model, classify=classify)
    for old, new in swap:
        assert old in text
        text = text.replace(old, new)
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    return path


def test_classify_section_defaults_and_content_free_through_the_template(tmp_path):
    spec = load_spec(write_spec(tmp_path))
    c = spec.eval.classify
    assert c.labels == LABELS  # the label validator's, which default to the data's (sorted)
    assert (c.decoder, c.calibrate, c.bias) == ("ranking", True, {})
    assert c.content_free == ("Rate: N/A", "Rate:", "Rate: [MASK]")


def test_classify_section_reads_bias_and_content_free(tmp_path):
    spec = load_spec(
        write_spec(tmp_path, classify='{content_free: ["none"], bias: {Standard: 0.5}}')
    )
    assert spec.eval.classify.content_free == ("Rate: none",)
    assert spec.eval.classify.bias == {"Standard": 0.5}


@pytest.mark.parametrize(
    ("classify", "key", "expected"),
    [
        ("{bias: {Excellent: 1.0}}", "eval.classify.bias.Excellent", "unknown key"),
        ("{bias: {Good: high}}", "eval.classify.bias.Good", "a number"),
        ("{decoder: beam}", "eval.classify.decoder", "one of ranking, generate"),
        (
            "{decoder: generate, bias: {Good: 1.0}}",
            "eval.classify.bias",
            "absent with decoder: generate",
        ),
        ("{content_free: []}", "eval.classify.content_free", "a non-empty list of strings"),
        ("{content_free: N/A}", "eval.classify.content_free", "a non-empty list of strings"),
        ("{calibrate: maybe}", "eval.classify.calibrate", "true or false"),
    ],
)
def test_bad_classify_sections_fail_naming_the_key(tmp_path, classify, key, expected):
    with pytest.raises(SpecError) as e:
        load_spec(write_spec(tmp_path, classify=classify))
    assert key in str(e.value) and expected in str(e.value)


def test_classify_needs_labels_on_the_data(tmp_path):
    swap = (
        ('text: "late once", label: Standard', 'text: "late once"'),
        ("split: {test_per_class: 1, valid_per_class: 0, stratify_by: label}", ""),
        ("teacher: {gold: true}", "teacher: {model: smollm2-135m-instruct}"),
        ("[{type: label}]", "[{type: label, labels: [Bad, Good, Standard]}]"),
    )
    path = write_spec(tmp_path, swap=swap)
    with pytest.raises(
        SpecError, match=r"prompts.*a label on every prompt, for eval.classify .*'f'"
    ):
        load_spec(path)


def test_classify_needs_dev_labels_among_the_labels(tmp_path):
    path = write_spec(tmp_path)
    path.write_text(
        path.read_text() + '  dev: {items: [{id: z, text: "fine", label: Excellent}]}\n'
    )
    with pytest.raises(
        SpecError,
        match=r"eval.dev.*a label among validators\[0\].labels .*'z' is labelled 'Excellent'",
    ):
        load_spec(path)


def test_classify_needs_a_label_validator(tmp_path):
    path = write_spec(tmp_path, swap=(("validators: [{type: label}]", "validators: []"),))
    with pytest.raises(SpecError, match=r"eval.classify.*a `label` validator"):
        load_spec(path)


# ---------------------------------------------------------------------------------------------
# Inside an evaluation


@pytest.fixture(scope="module")
def ranking_spec(tiny_model_dir, tmp_path_factory):
    return load_spec(write_spec(tmp_path_factory.mktemp("spec"), tiny_model_dir))


def test_evaluate_ranks_labels_and_records_every_figure(tiny_model_dir, ranking_spec, tiny):
    from distiller.evaluate import evaluate

    spec = ranking_spec
    result = evaluate(tiny_model_dir, spec, spec.prompts, loaded=tiny, progress=False)
    recs = result.records
    assert len(recs) == len(spec.prompts)
    for r in recs:
        assert r["output"] == r["prediction"] in LABELS
        assert set(r["probabilities"]) == set(LABELS)
        assert sum(r["probabilities"].values()) == pytest.approx(1.0)
        assert r["probabilities"][r["prediction"]] == max(r["probabilities"].values())
        assert 0.0 <= r["margin"] <= 1.0
        assert r["scores"] == {y: pytest.approx(r["raw_scores"][y] - r["prior"][y]) for y in LABELS}
    task = result.metrics["task"]
    correct = sum(r["prediction"] == r["label"] for r in recs)
    assert task["accuracy"] == correct / len(recs)
    raw_correct = sum(
        C.uncalibrated_prediction(r["raw_scores"], list(LABELS)) == r["label"] for r in recs
    )
    assert task["accuracy_uncalibrated"] == raw_correct / len(recs)
    assert sum(map(sum, task["confusion"]["matrix"])) == len(recs)
    assert result.metrics["classify"]["labels"] == list(LABELS)


def test_the_decoder_is_part_of_the_evaluation_key(tiny_model_dir, ranking_spec):
    from distiller.evaluate import eval_key

    spec = ranking_spec
    generative = replace(
        spec, eval=replace(spec.eval, classify=replace(spec.eval.classify, decoder="generate"))
    )
    uncalibrated = replace(
        spec, eval=replace(spec.eval, classify=replace(spec.eval.classify, calibrate=False))
    )
    keys = {
        eval_key(tiny_model_dir, s, s.prompts, "bare", None)
        for s in (spec, generative, uncalibrated)
    }
    assert len(keys) == 3


def test_generate_decoder_evaluates_by_generation(tiny_model_dir, ranking_spec, tiny):
    from distiller.evaluate import evaluate

    spec = ranking_spec
    spec = replace(
        spec, eval=replace(spec.eval, classify=replace(spec.eval.classify, decoder="generate"))
    )
    result = evaluate(tiny_model_dir, spec, spec.prompts[:2], loaded=tiny, progress=False)
    assert all("raw_scores" not in r and "probabilities" not in r for r in result.records)
    assert "accuracy_uncalibrated" not in result.metrics["task"]


@settings(deadline=None, max_examples=25)
@given(st.lists(st.sampled_from(LABELS), min_size=1, max_size=8))
def test_rank_handles_any_number_of_prompts(labels_seen):
    raw = np.array([[float(y == x) for y in LABELS] for x in labels_seen])
    assert [r.prediction for r in C.rank(raw, LABELS)] == labels_seen


# ---------------------------------------------------------------------------------------------
# The paired interval of a lift (evals/test_quality.py: accuracy_lift)

tables = st.tuples(*[st.integers(0, 60)] * 4).filter(lambda t: sum(t) > 0)


@given(tables)
def test_paired_interval_contains_the_difference_and_stays_in_bounds(t):
    from distiller.metrics import paired_difference_interval

    both, only_first, only_second, neither = t
    n = sum(t)
    lo, hi = paired_difference_interval(*t)
    d = (only_first - only_second) / n
    assert -1.0 <= lo <= d + 1e-12 and d - 1e-12 <= hi <= 1.0
    # Swapping the two sides negates the interval.
    lo2, hi2 = paired_difference_interval(both, only_second, only_first, neither)
    assert (lo2, hi2) == pytest.approx((-hi, -lo), abs=1e-12)


@given(st.integers(1, 40), st.integers(1, 40), st.integers(1, 40), st.integers(1, 40))
def test_paired_interval_is_the_unpaired_one_when_the_sides_are_uncorrelated(a, b, c, d):
    from distiller.metrics import newcombe_interval, paired_difference_interval

    # A table with ad == bc has phi == 0: pairing carries no information.
    t = (a * c, a * d, b * c, b * d)  # rows: first side right / wrong; columns: second side
    both, only_first, only_second, neither = t[0], t[1], t[2], t[3]
    n = sum(t)
    got = paired_difference_interval(both, only_first, only_second, neither)
    want = newcombe_interval(both + only_first, n, both + only_second, n)
    assert got == pytest.approx(want, abs=1e-9)


def test_agreement_narrows_the_paired_interval():
    from distiller.metrics import newcombe_interval, paired_difference_interval

    # 100 items, first side right on 70, second on 50; they agree as much as they can.
    paired = paired_difference_interval(50, 20, 0, 30)
    unpaired = newcombe_interval(70, 100, 50, 100)
    assert paired[1] - paired[0] < unpaired[1] - unpaired[0]
    assert paired[0] > 0.1  # 20 disagreements, all one way: a clear lift


def test_without_calibration_or_bias_no_uncalibrated_figures_are_repeated(
    tiny_model_dir, ranking_spec, tiny
):
    from distiller.evaluate import evaluate

    spec = ranking_spec
    spec = replace(
        spec, eval=replace(spec.eval, classify=replace(spec.eval.classify, calibrate=False))
    )
    result = evaluate(tiny_model_dir, spec, spec.prompts[:3], loaded=tiny, progress=False)
    task = result.metrics["task"]
    assert "accuracy_uncalibrated" not in task and 0.0 <= task["mean_margin"] <= 1.0
    assert all(r["prior"] == {y: 0.0 for y in LABELS} for r in result.records)
    assert all(r["scores"] == r["raw_scores"] for r in result.records)


def test_the_report_shows_per_class_figures_and_the_confusion_matrix(
    tiny_model_dir, ranking_spec, tiny
):
    from distiller.evaluate import evaluate
    from distiller.report import build_report

    spec = ranking_spec
    result = evaluate(
        tiny_model_dir, spec, spec.prompts, loaded=tiny, progress=False, name="vanilla"
    )
    _, markdown = build_report([result], samples=0)
    section = markdown.split("## Classification\n", 1)[1]
    task = result.metrics["task"]
    k = round(task["accuracy"] * len(spec.prompts))
    assert f"({k}/{len(spec.prompts)})" in section and "decoder: ranking" in section
    assert "without calibration or bias" in section and "mean top-2 margin" in section
    for label in LABELS:
        row = next(line for line in section.splitlines() if line.startswith(f"| {label} "))
        assert f"{task['per_class'][label]['recall']:.3f}" in row
    counts = task["confusion"]["matrix"]
    matrix_rows = [
        line for line in section.splitlines() if line.startswith("| ") and "gold" not in line
    ][-3:]
    for line, want in zip(matrix_rows, counts, strict=True):
        assert [int(x) for x in line.strip("| ").split("|")[1:]] == want
