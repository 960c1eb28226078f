"""Metrics: Wilson/Newcombe intervals, the paired and unpaired regression tests, format
compliance, task metrics."""

from __future__ import annotations

import math
import re
import string
from collections import Counter

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from distiller import metrics as M
from distiller.validators import build_validator


@st.composite
def counts(draw, max_n: int = 500):
    n = draw(st.integers(0, max_n))
    k = draw(st.integers(0, n))
    return k, n


# -- Wilson ------------------------------------------------------------------------------------


def test_wilson_known_values():
    # Reference values (Newcombe 1998, table I / standard calculators).
    lo, hi = M.wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    lo, hi = M.wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = M.wilson_interval(81, 263)
    assert lo == pytest.approx(0.2553, abs=1e-4) and hi == pytest.approx(0.3662, abs=1e-4)
    assert M.wilson_interval(0, 0) == (0.0, 1.0)


@given(counts())
def test_wilson_contains_estimate_and_stays_in_unit_interval(kn):
    k, n = kn
    lo, hi = M.wilson_interval(k, n)
    assert 0.0 <= lo <= hi <= 1.0
    if n:
        assert lo <= k / n + 1e-12 and k / n <= hi + 1e-12


@given(st.integers(1, 400), st.data())
def test_wilson_monotone_in_successes(n, data):
    k = data.draw(st.integers(0, n - 1))
    lo1, hi1 = M.wilson_interval(k, n)
    lo2, hi2 = M.wilson_interval(k + 1, n)
    assert lo2 >= lo1 - 1e-12 and hi2 >= hi1 - 1e-12


@given(st.integers(1, 200), st.floats(0, 1))
def test_wilson_narrows_with_more_data(n, p):
    k = round(p * n)
    lo1, hi1 = M.wilson_interval(k, n)
    lo2, hi2 = M.wilson_interval(4 * k, 4 * n)
    assert hi2 - lo2 < hi1 - lo1


def test_rate_roundtrip_and_str():
    r = M.rate(9, 10)
    assert r.value == 0.9 and M.Rate.from_dict(r.to_dict()) == r
    assert "9/10" in str(r)
    assert math.isnan(M.rate(0, 0).value) and M.rate(0, 0).to_dict()["value"] is None
    with pytest.raises(ValueError):
        M.rate(3, 2)


def test_meets_threshold_uses_point_estimate():
    assert M.meets_threshold(M.rate(9, 10), 0.9)
    assert not M.meets_threshold(M.rate(8, 10), 0.9)
    assert not M.meets_threshold(M.rate(0, 0), 0.0)


# -- regression test ---------------------------------------------------------------------------


@given(counts(), st.floats(0.001, 0.5))
def test_regression_never_flags_equal_rates(kn, alpha):
    k, n = kn
    assert not M.regression_test(k, n, k, n, alpha).regressed
    # The same rate measured on a different sample size is not a drop either.
    assert not M.regression_test(2 * k, 2 * n, k, n, alpha).regressed
    assert not M.regression_test(k, n, 3 * k, 3 * n, alpha).regressed


@given(counts(200), counts(200), st.data())
@settings(max_examples=300)
def test_regression_monotone_in_counts(base, new, data):
    (kb, nb), (kn, nn) = base, new
    drop = M.regression_test(kb, nb, kn, nn).drop_lower
    if kn < nn:  # one more new success can only weaken the evidence of a drop
        assert M.regression_test(kb, nb, kn + 1, nn).drop_lower <= drop + 1e-12
    if kb < nb:  # one more baseline success can only strengthen it
        assert M.regression_test(kb + 1, nb, kn, nn).drop_lower >= drop - 1e-12
    if M.regression_test(kb, nb, kn, nn).regressed and kn > 0:
        assert M.regression_test(kb, nb, kn - 1, nn).regressed


@given(st.integers(50, 1000), st.floats(0.3, 1.0), st.floats(0.3, 1.0))
def test_regression_flags_large_drops_at_adequate_n(n, p_base, drop):
    assume(p_base - drop >= 0)
    kb = round(p_base * n)
    kn = round((p_base - drop) * n)
    assume(kb - kn >= 0.3 * n)
    r = M.regression_test(kb, n, kn, n, alpha=0.05)
    assert r.regressed, r.explain()


def test_regression_small_samples_are_not_enough():
    # 9/10 -> 7/10 is plausible noise; 90/100 -> 70/100 is not.
    assert not M.regression_test(9, 10, 7, 10).regressed
    assert M.regression_test(90, 100, 70, 100).regressed
    r = M.regression_test(90, 100, 70, 100)
    assert "significant drop" in r.explain() and r.to_dict()["regressed"] is True


def test_regression_margin_and_empty_sides():
    assert not M.regression_test(90, 100, 70, 100, margin=0.2).regressed
    assert not M.regression_test(0, 0, 0, 10).regressed
    assert not M.regression_test(10, 10, 0, 0).regressed
    with pytest.raises(ValueError):
        M.regression_test(1, 2, 1, 2, margin=-0.1)
    with pytest.raises(ValueError):
        M.regression_test(1, 2, 1, 2, alpha=0)


def test_regression_alpha_orders_verdicts():
    # A stricter test (smaller alpha) flags a subset of what a looser one flags.
    for kb, nb, kn, nn in [(18, 20, 12, 20), (40, 50, 30, 50), (9, 10, 4, 10)]:
        strict = M.regression_test(kb, nb, kn, nn, alpha=0.01).regressed
        loose = M.regression_test(kb, nb, kn, nn, alpha=0.2).regressed
        assert loose or not strict


# -- paired regression test (McNemar exact) ----------------------------------------------------

flips = st.integers(0, 300)


def test_mcnemar_known_values():
    # Hand-computed binomial tails, X ~ Binomial(b + c, 1/2), p = P(X >= b):
    # b=5, c=0: 1/32; b=6, c=1: (C(7,6) + C(7,7)) / 2^7 = 8/128; b=8, c=2: (45 + 10 + 1) / 1024.
    assert M.mcnemar_exact(5, 0) == 1 / 32
    assert M.mcnemar_exact(6, 1) == 8 / 128
    assert M.mcnemar_exact(8, 2) == 56 / 1024
    assert M.mcnemar_exact(0, 4) == 1.0  # no pass->fail flip: "at least 0" is certain
    assert M.mcnemar_exact(0, 0) == 1.0
    with pytest.raises(ValueError):
        M.mcnemar_exact(-1, 2)


@given(flips, flips)
def test_mcnemar_p_value_in_unit_interval_and_symmetric(b, c):
    p = M.mcnemar_exact(b, c)
    assert 0.0 < p <= 1.0
    # Swapping the roles of baseline and new swaps the flips: P(X >= b) + P(X >= c) counts
    # every outcome once, and X == b (= m - c) twice.
    m = b + c
    assert p + M.mcnemar_exact(c, b) == pytest.approx(1 + math.comb(m, b) / 2**m, rel=1e-12)
    if b == c:
        assert p >= 0.5  # as many flips each way is never evidence of a drop


@given(flips, flips)
def test_mcnemar_monotone_in_flips(b, c):
    p = M.mcnemar_exact(b, c)
    assert M.mcnemar_exact(b + 1, c) <= p  # one more pass->fail: stronger evidence of a drop
    assert M.mcnemar_exact(b, c + 1) >= p  # one more fail->pass: weaker


@given(st.integers(0, 120), st.floats(0.001, 0.5))
def test_mcnemar_false_alarm_rate_at_most_alpha(m, alpha):
    # With m flips and no real change, b ~ Binomial(m, 1/2); the exact test's chance of
    # flagging is the probability of the b it flags, which must not exceed alpha.
    flagged = sum(math.comb(m, b) for b in range(m + 1) if M.mcnemar_exact(b, m - b) <= alpha)
    assert flagged / 2**m <= alpha


@st.composite
def paired_verdicts(draw, max_n: int = 60):
    n = draw(st.integers(0, max_n))
    ids = [f"p{i}" for i in range(n)]
    base = {i: draw(st.booleans()) for i in ids}
    new = {i: draw(st.booleans()) for i in ids}
    return base, new


@given(paired_verdicts(), st.floats(0.001, 0.5))
def test_paired_no_flips_is_never_a_regression(verdicts, alpha):
    base, _ = verdicts
    r = M.paired_regression_test(base, dict(base), alpha)
    assert not r.regressed and r.p_value == 1.0 and not r.pass_to_fail


@given(paired_verdicts(), st.data())
@settings(max_examples=200)
def test_paired_counts_and_monotone_in_pass_to_fail(verdicts, data):
    base, new = verdicts
    r = M.paired_regression_test(base, new)
    # An independent recount of the flips and of both rates.
    assert len(r.pass_to_fail) == sum(base[i] and not new[i] for i in base)
    assert len(r.fail_to_pass) == sum(new[i] and not base[i] for i in base)
    assert (r.baseline.k, r.new.k) == (sum(base.values()), sum(new.values()))
    assert r.p_value == M.mcnemar_exact(len(r.pass_to_fail), len(r.fail_to_pass))
    # Turning one more baseline pass into a failure now can only make a drop more flagged.
    still_passing = [i for i in base if base[i] and new[i]]
    if still_passing:
        worse = {**new, data.draw(st.sampled_from(still_passing)): False}
        w = M.paired_regression_test(base, worse)
        assert w.p_value <= r.p_value and (w.regressed or not r.regressed)
    # Swapping roles swaps the flips.
    s = M.paired_regression_test(new, base)
    assert (set(s.pass_to_fail), set(s.fail_to_pass)) == (set(r.fail_to_pass), set(r.pass_to_fail))


def test_paired_test_catches_a_drop_the_unpaired_test_misses():
    # 20 prompts; half passed in the baseline; 5 of those fail now, none got better.
    base = {f"p{i}": i < 10 for i in range(20)}
    new = {f"p{i}": i < 5 for i in range(20)}
    paired = M.paired_regression_test(base, new, alpha=0.05)
    assert paired.regressed and paired.p_value == 1 / 32
    assert paired.pass_to_fail == ("p5", "p6", "p7", "p8", "p9") and not paired.fail_to_pass
    text = paired.explain()
    assert "significant drop" in text and "5 went pass->fail, 0 fail->pass" in text
    assert "McNemar" in text and "p5" in text
    # The same counts as independent samples (10/20 -> 5/20) are within Newcombe's noise.
    assert not M.regression_test(10, 20, 5, 20, alpha=0.05).regressed


def test_paired_test_rejects_different_prompts_and_bad_alpha():
    with pytest.raises(ValueError, match="same prompts: 1 ids only in the baseline, 1 only"):
        M.paired_regression_test({"a": True, "b": True}, {"a": True, "c": False})
    with pytest.raises(ValueError):
        M.paired_regression_test({"a": True}, {"a": False}, alpha=1.0)


# -- format compliance -------------------------------------------------------------------------


def test_format_compliance_overall_and_sections():
    v = build_validator([{"type": "sections", "headers": ["A", "B"]}])
    texts = ["A: one\nB: two", "A: one", "nothing", "B: two\nA: one"]
    fc = M.format_compliance([v(t) for t in texts])
    assert (fc["overall"].k, fc["overall"].n) == (1, 4)
    assert set(fc["sections"]) == {"A", "B"}
    assert fc["sections"]["A"].k >= fc["overall"].k
    assert sum(fc["failed_checks"].values()) > 0
    # Works on serialized verdicts too, with the same answer.
    fc2 = M.format_compliance([v(t).to_dict() for t in texts])
    assert fc2["overall"] == fc["overall"] and fc2["sections"] == fc["sections"]
    assert M.format_compliance([])["overall"].n == 0


# -- classification ----------------------------------------------------------------------------

LABELS = ["critical", "major", "minor"]


def test_classification_metrics_by_hand():
    refs = ["critical", "critical", "major", "minor", "minor", "minor"]
    preds = ["critical", "major", "major", "minor", None, "critical"]
    assert M.accuracy(preds, refs) == pytest.approx(3 / 6)
    m = M.confusion_matrix(preds, refs, LABELS)
    assert m.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 1]]
    rep = M.classification_report(preds, refs, LABELS)
    assert rep["critical"]["precision"] == pytest.approx(0.5)
    assert rep["critical"]["recall"] == pytest.approx(0.5)
    assert rep["major"]["precision"] == pytest.approx(0.5) and rep["major"]["recall"] == 1.0
    assert rep["minor"]["precision"] == 1.0 and rep["minor"]["recall"] == pytest.approx(1 / 3)
    f1s = [0.5, 2 / 3, 0.5]
    assert M.macro_f1(preds, refs, LABELS) == pytest.approx(sum(f1s) / 3)
    assert rep["macro"]["support"] == 6


@given(st.lists(st.tuples(st.sampled_from(LABELS), st.sampled_from([*LABELS, None])), max_size=60))
def test_classification_properties(pairs):
    refs = [r for r, _ in pairs]
    preds = [p for _, p in pairs]
    m = M.confusion_matrix(preds, refs, LABELS)
    assert m.sum() == sum(p is not None for p in preds)
    assert np.all(m.sum(axis=1) <= [refs.count(label) for label in LABELS])
    if refs:
        assert M.accuracy(preds, refs) == pytest.approx(np.trace(m) / len(refs))
        f1 = M.macro_f1(preds, refs, LABELS)
        assert 0.0 <= f1 <= 1.0
        assert M.macro_f1(refs, refs, LABELS) == pytest.approx(
            sum(label in refs for label in LABELS) / 3
        )


def test_classification_rejects_bad_input():
    with pytest.raises(ValueError):
        M.accuracy(["a"], ["a", "b"])
    with pytest.raises(ValueError):
        M.confusion_matrix(["a"], ["zzz"], LABELS)


# -- extractive answers ------------------------------------------------------------------------


def test_squad_normalisation_and_scores():
    assert M.normalize_answer("The  Quorum, of course!") == "quorum of course"
    assert M.exact_match("the Raft protocol.", "Raft protocol") == 1.0
    assert M.exact_match("Paxos", ["Raft", "paxos"]) == 1.0
    assert M.exact_match("Paxos", "Raft") == 0.0
    assert M.token_f1("leader election timeout", "the election timeout") == pytest.approx(0.8)
    assert M.token_f1("", "") == 1.0 and M.token_f1("x", "") == 0.0


# The official SQuAD v1.1 evaluation script's functions (evaluate-v1.1.py), transcribed as the
# reference the implementation is checked against.
def _squad11_normalize(s: str) -> str:
    def remove_articles(text):
        return re.sub(r"\b(a|an|the)\b", " ", text)

    def white_space_fix(text):
        return " ".join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    return white_space_fix(remove_articles(remove_punc(s.lower())))


def _squad11_f1(prediction: str, ground_truth: str) -> float:
    prediction_tokens = _squad11_normalize(prediction).split()
    ground_truth_tokens = _squad11_normalize(ground_truth).split()
    common = Counter(prediction_tokens) & Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(prediction_tokens)
    recall = 1.0 * num_same / len(ground_truth_tokens)
    return (2 * precision * recall) / (precision + recall)


def _squad11_em(prediction: str, ground_truth: str) -> bool:
    return _squad11_normalize(prediction) == _squad11_normalize(ground_truth)


def _squad11_max(metric_fn, prediction, ground_truths):
    return max(metric_fn(prediction, gt) for gt in ground_truths)


def test_squad_normalization_by_hand():
    # Punctuation goes before articles: "a.n" becomes the article "an" and disappears; the
    # other order would leave "n apple".
    assert M.normalize_answer("A.n apple") == "apple"
    assert M.normalize_answer("The Cat's  hat!") == "cats hat"
    assert M.normalize_answer("theatre, anthem and a-team") == "theatre anthem and ateam"
    # Only ASCII punctuation goes (the dash stays), and letters are lowercased beyond ASCII.
    assert M.normalize_answer("\tAn\n\u00c9cole — the end.") == "\u00e9cole — end"
    assert M.normalize_answer("The.") == "" and M.normalize_answer("") == ""


def test_squad_scores_by_hand():
    assert M.exact_match("Seven", ["7", "seven"]) == 1.0
    assert M.exact_match("March 4", ["March 4", "4 March"]) == 1.0
    assert M.exact_match("4 March.", ("March 4", "4 March")) == 1.0  # any iterable of answers
    # "on march 4 2025" vs "march 4": 2 shared of 4 and of 2 tokens: P 1/2, R 1, F1 2/3.
    assert M.token_f1("on March 4, 2025", "March 4") == pytest.approx(2 / 3)
    # Tokens are a multiset: "cat cat dog" vs "cat dog dog" share one cat and one dog.
    assert M.token_f1("cat cat dog", "cat dog dog") == pytest.approx(2 / 3)
    # Articles go before counting: "the the cat" is ["cat"] against ["cat", "cat"].
    assert M.token_f1("the the cat", "cat cat") == pytest.approx(2 / 3)
    # The best reference counts, not the first or the mean.
    assert M.token_f1("Ilsa Varholt", ["Varholt", "Ilsa Varholt", "Teodor"]) == 1.0
    assert M.token_f1("Ilsa", ["Ilsa Varholt", "Teodor"]) == pytest.approx(2 / 3)
    assert M.token_f1("", "Ilsa") == 0.0 and M.token_f1("Ilsa", "the") == 0.0
    # The one deliberate difference from v1.1 (see token_f1): both empty after normalization.
    assert M.token_f1("the", "a") == 1.0 and _squad11_f1("the", "a") == 0
    assert M.exact_match("the", "a") == 1.0
    with pytest.raises(ValueError, match="no gold answers"):
        M.exact_match("x", [])
    with pytest.raises(ValueError, match="no gold answers"):
        M.token_f1("x", [])


# Texts built from what the normalization acts on: articles (alone, capitalised, inside words,
# split by punctuation), punctuation, odd whitespace, non-ASCII letters and digits.
_PIECES = ["the", "The", "a", "An", "an.", "a.n", "theatre", "cat", "Cat,", "dog", "'s", "-",
           "!", "  ", "\t", "\u00c9cole", "7", "seven", "March", "4"]  # fmt: skip
_answers = st.one_of(
    st.lists(st.sampled_from(_PIECES), max_size=6).map(" ".join),
    st.lists(st.sampled_from(_PIECES), max_size=6).map("".join),
    st.text(max_size=20),
)


@given(_answers, st.lists(_answers, min_size=1, max_size=3))
@settings(max_examples=400)
def test_squad_scores_match_the_official_v11_script(prediction, references):
    assert M.normalize_answer(prediction) == _squad11_normalize(prediction)
    em = M.exact_match(prediction, references)
    f1 = M.token_f1(prediction, references)
    assert em == float(_squad11_max(_squad11_em, prediction, references))
    official_f1 = _squad11_max(_squad11_f1, prediction, references)
    if all(_squad11_normalize(r) for r in references):  # every gold answer a valid spec allows
        assert f1 == pytest.approx(official_f1)
    else:  # the empty-vs-empty rule can only raise a score, and only to 1
        assert f1 == pytest.approx(official_f1) or (f1 == 1.0 and official_f1 == 0)


@given(_answers, st.lists(_answers, min_size=1, max_size=3), _answers)
def test_squad_scores_are_a_max_over_references(prediction, references, extra):
    # One more accepted answer never lowers a score; the scores are those of the best single one.
    for fn in (M.exact_match, M.token_f1):
        assert fn(prediction, [*references, extra]) >= fn(prediction, references)
        assert fn(prediction, references) == max(fn(prediction, r) for r in references)


@given(st.text(max_size=40), st.text(max_size=40))
def test_token_f1_properties(a, b):
    f = M.token_f1(a, b)
    assert 0.0 <= f <= 1.0
    assert f == pytest.approx(M.token_f1(b, a))
    assert M.token_f1(a, a) == 1.0
    assert M.exact_match(a, b) <= f + 1e-12  # an exact match has F1 1


# -- JSON --------------------------------------------------------------------------------------

SCHEMA = {
    "type": "object",
    "properties": {"service": {"type": "string"}, "rate": {"type": "number"}},
    "required": ["service", "rate"],
}


def test_json_validity_with_and_without_schema():
    texts = [
        '{"service": "a", "rate": 1}',
        '```json\n{"service": "b", "rate": 2.5}\n```',
        "{oops",
        '{"service": 3}',
    ]
    assert M.json_validity(texts).k == 3
    assert M.json_validity(texts, SCHEMA).k == 2
    assert M.json_validity([], SCHEMA).n == 0


def test_field_accuracy():
    refs = [{"service": "billing-api", "rate": 12.5}, {"service": "auth", "rate": 3}]
    texts = ['{"service": "Billing-API ", "rate": 12.50}', '{"service": "auth", "rate": 4}']
    fa = M.field_accuracy(texts, refs)
    assert fa["fields"] == {"service": 1.0, "rate": 0.5}
    assert fa["overall"] == pytest.approx(0.75) and fa["exact"] == pytest.approx(0.5)
    assert M.field_accuracy(["not json", "[1]"], refs)["overall"] == 0.0
