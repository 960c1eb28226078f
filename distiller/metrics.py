"""Metrics: rates with confidence intervals, regression tests, and task metrics.

Everything here is pure Python/numpy and fast; the eval stage and the pytest gate call it.

Rates and intervals
    ``wilson_interval(k, n)`` is the Wilson score interval: unlike the normal ("Wald")
    interval it stays inside [0, 1] and keeps its coverage at small n and at rates near 0 or 1,
    which is exactly where eval sets of 20-50 prompts live.

Regression against a baseline
    Two tests ask whether a pass rate is lower than the baseline's by more than sampling noise
    explains, both at one-sided level ``alpha``:

    - ``paired_regression_test(baseline, new, alpha)`` when both sides scored the SAME prompts
      (``{prompt id: passed}`` on each side). Only prompts whose verdict changed carry evidence:
      under "no change" a changed prompt is as likely to go pass->fail as fail->pass, so
      McNemar's exact test (``mcnemar_exact``) asks whether the pass->fail flips are
      significantly more than half of the flips: a one-sided binomial tail. Prompts that pass
      (or fail) on both sides cancel out, so it detects smaller drops than the unpaired test
      at the same false-alarm rate.
    - ``regression_test(k_base, n_base, k_new, n_new, alpha)`` when the prompt sets differ (or
      the baseline kept only counts). Both rates are independent noisy measurements, so it
      bounds their DIFFERENCE with Newcombe's hybrid score interval (method 10 of Newcombe
      1998, built from the two Wilson intervals) and flags when the lower bound of
      (baseline - new) exceeds ``margin`` (default 0).

    Properties (property-tested in tests/test_metrics.py): equal rates / no flips are never
    flagged; the verdict only gets "more flagged" as evidence of a drop grows; the exact test
    never flags more often than ``alpha`` when nothing changed.

Thresholds
    A spec threshold (``format_rate: 0.9``) is a product requirement, not a measurement, so
    ``meets_threshold`` compares the point estimate; the interval is reported alongside so a
    reader can see how firm the figure is.

Task metrics
    accuracy, macro-F1, per-class report and confusion matrix (classification); exact match and
    token F1 with SQuAD v1.1's normalization and max over gold answers (extractive answers); JSON validity against a schema
    and per-field accuracy against reference objects (extraction); for schema-constrained
    extraction, ``extraction_scores``: schema-valid and exact-record rates and field-level
    precision / recall / F1 over flattened paths (its docstring defines how null, missing and
    extra fields count).
"""

from __future__ import annotations

import json
import math
import re
import string
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Any

import numpy as np

__all__ = [
    "PairedRegression",
    "Rate",
    "Regression",
    "accuracy",
    "bootstrap_f1_interval",
    "classification_report",
    "confusion_matrix",
    "exact_match",
    "extraction_scores",
    "field_accuracy",
    "flatten_fields",
    "format_compliance",
    "json_validity",
    "macro_f1",
    "mcnemar_exact",
    "meets_threshold",
    "newcombe_interval",
    "normalize_answer",
    "paired_bootstrap_f1_difference",
    "paired_difference_interval",
    "paired_regression_test",
    "rate",
    "regression_test",
    "token_f1",
    "wilson_interval",
    "z_value",
]


# ---------------------------------------------------------------------------------------------
# Rates and intervals


def z_value(alpha: float, two_sided: bool = True) -> float:
    """Standard normal quantile for a test at level ``alpha`` (1.96 for 0.05 two-sided)."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    return NormalDist().inv_cdf(1 - (alpha / 2 if two_sided else alpha))


def _check_counts(k: int, n: int) -> None:
    if n < 0 or k < 0 or k > n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")


def wilson_interval(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials (default: 95% two-sided).

    With n == 0 nothing is known: (0, 1).
    """
    _check_counts(k, n)
    if n == 0:
        return 0.0, 1.0
    p = k / n
    z2 = z * z
    denom = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    # The closed form is exact at k == 0 / k == n; clamp away float dust.
    lo = 0.0 if k == 0 else max(0.0, centre - half)
    hi = 1.0 if k == n else min(1.0, centre + half)
    return lo, hi


@dataclass(frozen=True)
class Rate:
    """k of n, with its Wilson interval at ``confidence``."""

    k: int
    n: int
    lo: float
    hi: float
    confidence: float = 0.95

    @property
    def value(self) -> float:
        return self.k / self.n if self.n else float("nan")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["value"] = None if self.n == 0 else self.value
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Rate:
        return rate(int(d["k"]), int(d["n"]), float(d.get("confidence", 0.95)))

    def __str__(self) -> str:
        if self.n == 0:
            return "n/a (n=0)"
        return f"{self.value:.3f} [{self.lo:.3f}, {self.hi:.3f}] ({self.k}/{self.n})"


def rate(k: int, n: int, confidence: float = 0.95) -> Rate:
    lo, hi = wilson_interval(k, n, z_value(1 - confidence))
    return Rate(k, n, lo, hi, confidence)


def meets_threshold(r: Rate, threshold: float) -> bool:
    """Point estimate >= threshold (see the module docstring for why not the interval)."""
    return r.n > 0 and r.value >= threshold - 1e-12


def newcombe_interval(
    k1: int, n1: int, k2: int, n2: int, z: float = 1.959963984540054
) -> tuple[float, float]:
    """Newcombe's hybrid score interval for p1 - p2 (from the two Wilson intervals)."""
    _check_counts(k1, n1)
    _check_counts(k2, n2)
    p1 = k1 / n1 if n1 else 0.5
    p2 = k2 / n2 if n2 else 0.5
    l1, u1 = wilson_interval(k1, n1, z)
    l2, u2 = wilson_interval(k2, n2, z)
    d = p1 - p2
    lower = d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)
    upper = d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)
    return max(-1.0, lower), min(1.0, upper)


def paired_difference_interval(
    both: int, only_first: int, only_second: int, neither: int, z: float = 1.959963984540054
) -> tuple[float, float]:
    """Newcombe's score interval (method 10 of Newcombe 1998, paired data) for p1 - p2, where
    p1 and p2 are two success rates on the SAME n items, from the four counts of the 2x2 table.

    Built from the two Wilson intervals like ``newcombe_interval``, with the correlation phi of
    the table: agreement between the two sides narrows it, disagreement widens it.
    """
    for k in (both, only_first, only_second, neither):
        if k < 0:
            raise ValueError(f"counts must be >= 0, got {k}")
    n = both + only_first + only_second + neither
    if n == 0:
        return -1.0, 1.0
    k1, k2 = both + only_first, both + only_second
    p1, p2 = k1 / n, k2 / n
    l1, u1 = wilson_interval(k1, n, z)
    l2, u2 = wilson_interval(k2, n, z)
    margins = (k1, n - k1, k2, n - k2)
    denom = math.sqrt(math.prod(margins)) if all(margins) else 0.0
    phi = (both * neither - only_first * only_second) / denom if denom else 0.0
    d = p1 - p2
    lower = d - math.sqrt(
        max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2)
    )
    upper = d + math.sqrt(
        max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2)
    )
    return max(-1.0, lower), min(1.0, upper)


@dataclass(frozen=True)
class Regression:
    """Outcome of ``regression_test``: ``drop`` bounds baseline - new at one-sided ``alpha``."""

    regressed: bool
    baseline: Rate
    new: Rate
    drop_lower: float  # lower confidence bound of (baseline rate - new rate)
    drop_upper: float
    alpha: float
    margin: float

    def explain(self) -> str:
        verdict = "significant drop" if self.regressed else "no significant drop"
        return (
            f"{verdict}: new {self.new} vs baseline {self.baseline}; baseline - new in "
            f"[{self.drop_lower:+.3f}, {self.drop_upper:+.3f}] "
            f"(Newcombe, one-sided alpha={self.alpha:g}, margin={self.margin:g})"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "regressed": self.regressed,
            "baseline": self.baseline.to_dict(),
            "new": self.new.to_dict(),
            "drop_lower": self.drop_lower,
            "drop_upper": self.drop_upper,
            "alpha": self.alpha,
            "margin": self.margin,
        }


def regression_test(
    k_base: int, n_base: int, k_new: int, n_new: int, alpha: float = 0.05, margin: float = 0.0
) -> Regression:
    """Is the new rate lower than the baseline's by more than sampling noise explains?

    Flags when the one-sided (1 - alpha) lower bound of (p_base - p_new) exceeds ``margin``.
    An empty side (n == 0) carries no evidence and never flags.
    """
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    z = z_value(alpha, two_sided=False)
    lower, upper = newcombe_interval(k_base, n_base, k_new, n_new, z)
    conf = 1 - alpha
    regressed = n_base > 0 and n_new > 0 and lower > margin
    return Regression(
        regressed, rate(k_base, n_base, conf), rate(k_new, n_new, conf), lower, upper, alpha, margin
    )


def mcnemar_exact(pass_to_fail: int, fail_to_pass: int) -> float:
    """One-sided p-value of McNemar's exact test for a drop: P(X >= pass_to_fail) with
    X ~ Binomial(pass_to_fail + fail_to_pass, 1/2).

    Under "nothing changed" each prompt whose verdict flipped is equally likely to have flipped
    either way; the p-value is the chance of at least this many pass->fail flips among them.
    No flips at all: 1.0 (no evidence).
    """
    if pass_to_fail < 0 or fail_to_pass < 0:
        raise ValueError(f"need counts >= 0, got {pass_to_fail}, {fail_to_pass}")
    flips = pass_to_fail + fail_to_pass
    tail = sum(math.comb(flips, i) for i in range(pass_to_fail, flips + 1))
    return tail / 2**flips  # exact integers until this one (correctly rounded) division


@dataclass(frozen=True)
class PairedRegression:
    """Outcome of ``paired_regression_test``: the prompts whose verdict flipped, each way."""

    regressed: bool
    baseline: Rate
    new: Rate
    pass_to_fail: tuple[str, ...]  # prompt ids: passed in the baseline, fail now
    fail_to_pass: tuple[str, ...]
    p_value: float
    alpha: float

    def explain(self, show: int = 5) -> str:
        verdict = "significant drop" if self.regressed else "no significant drop"
        ids = ", ".join(self.pass_to_fail[:show])
        more = f" (+{len(self.pass_to_fail) - show} more)" if len(self.pass_to_fail) > show else ""
        went = f"; pass->fail: {ids}{more}" if self.pass_to_fail else ""
        return (
            f"{verdict}: new {self.new} vs baseline {self.baseline} on the same "
            f"{self.new.n} prompts; {len(self.pass_to_fail)} went pass->fail, "
            f"{len(self.fail_to_pass)} fail->pass (McNemar exact, one-sided "
            f"p={self.p_value:.4g}, alpha={self.alpha:g}){went}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "regressed": self.regressed,
            "baseline": self.baseline.to_dict(),
            "new": self.new.to_dict(),
            "pass_to_fail": list(self.pass_to_fail),
            "fail_to_pass": list(self.fail_to_pass),
            "p_value": self.p_value,
            "alpha": self.alpha,
        }


def paired_regression_test(
    baseline: Mapping[str, bool], new: Mapping[str, bool], alpha: float = 0.05
) -> PairedRegression:
    """Has the pass rate dropped on the same prompts? ``baseline`` and ``new`` map each prompt
    id to whether it passed; they must hold the same ids. Flags when McNemar's exact one-sided
    p-value is at most ``alpha``."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if set(baseline) != set(new):
        only_base, only_new = len(set(baseline) - set(new)), len(set(new) - set(baseline))
        raise ValueError(
            f"paired test needs the same prompts: {only_base} ids only in the baseline, "
            f"{only_new} only in the new run"
        )
    ids = list(baseline)
    worse = tuple(i for i in ids if baseline[i] and not new[i])
    better = tuple(i for i in ids if new[i] and not baseline[i])
    p = mcnemar_exact(len(worse), len(better))
    conf = 1 - alpha
    return PairedRegression(
        regressed=p <= alpha,
        baseline=rate(sum(map(bool, baseline.values())), len(ids), conf),
        new=rate(sum(map(bool, new.values())), len(ids), conf),
        pass_to_fail=worse,
        fail_to_pass=better,
        p_value=p,
        alpha=alpha,
    )


# ---------------------------------------------------------------------------------------------
# Format compliance


def format_compliance(verdicts: Sequence[Any], confidence: float = 0.95) -> dict[str, Any]:
    """Overall pass rate and per-section rates of validator verdicts, plus failure counts.

    ``verdicts`` are ``distiller.validators.Verdict`` objects or their ``to_dict()`` forms.
    Returns ``{"overall": Rate, "sections": {header: Rate}, "failed_checks": {name: count}}``;
    a section absent from a verdict counts as not satisfied.
    """

    def get(v: Any, name: str) -> Any:
        return v[name] if isinstance(v, dict) else getattr(v, name)

    n = len(verdicts)
    passed = sum(bool(get(v, "passed")) for v in verdicts)
    headers: list[str] = []
    for v in verdicts:
        for h in get(v, "sections") or {}:
            if h not in headers:
                headers.append(h)
    sections = {
        h: rate(sum(bool((get(v, "sections") or {}).get(h)) for v in verdicts), n, confidence)
        for h in headers
    }
    failed: Counter[str] = Counter()
    for v in verdicts:
        for c in get(v, "checks") or ():
            ok = c["passed"] if isinstance(c, dict) else c.passed
            if not ok:
                failed[c["name"] if isinstance(c, dict) else c.name] += 1
    return {
        "overall": rate(passed, n, confidence),
        "sections": sections,
        "failed_checks": dict(failed.most_common()),
    }


# ---------------------------------------------------------------------------------------------
# Classification


def accuracy(predictions: Sequence[Any], references: Sequence[Any]) -> float:
    _same_length(predictions, references)
    if not references:
        return float("nan")
    return sum(p == r for p, r in zip(predictions, references, strict=True)) / len(references)


def _same_length(a: Sequence, b: Sequence) -> None:
    if len(a) != len(b):
        raise ValueError(f"{len(a)} predictions for {len(b)} references")


def confusion_matrix(
    predictions: Sequence[Any], references: Sequence[Any], labels: Sequence[Any]
) -> np.ndarray:
    """``m[i, j]`` = count of reference ``labels[i]`` predicted as ``labels[j]``.

    Predictions outside ``labels`` (unparseable outputs, None) fall in no column, so a row can
    sum to less than its support: they are errors that no class "received".
    """
    _same_length(predictions, references)
    index = {label: i for i, label in enumerate(labels)}
    m = np.zeros((len(labels), len(labels)), dtype=np.int64)
    for p, r in zip(predictions, references, strict=True):
        if r not in index:
            raise ValueError(f"reference label {r!r} is not one of {list(labels)}")
        if p in index:
            m[index[r], index[p]] += 1
    return m


def classification_report(
    predictions: Sequence[Any], references: Sequence[Any], labels: Sequence[Any]
) -> dict[str, dict[str, float]]:
    """Per-class precision, recall, F1 and support (0 where undefined), plus ``macro``."""
    m = confusion_matrix(predictions, references, labels)
    support = np.array([sum(r == label for r in references) for label in labels], dtype=float)
    predicted = np.array([sum(p == label for p in predictions) for label in labels], dtype=float)
    tp = np.diag(m).astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(support > 0, tp / support, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    report = {
        str(label): {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, label in enumerate(labels)
    }
    report["macro"] = {
        "precision": float(precision.mean()) if len(labels) else float("nan"),
        "recall": float(recall.mean()) if len(labels) else float("nan"),
        "f1": float(f1.mean()) if len(labels) else float("nan"),
        "support": int(support.sum()),
    }
    return report


def macro_f1(predictions: Sequence[Any], references: Sequence[Any], labels: Sequence[Any]) -> float:
    """Unweighted mean of per-class F1 over ``labels`` (a class never seen nor predicted: 0)."""
    return classification_report(predictions, references, labels)["macro"]["f1"]


# ---------------------------------------------------------------------------------------------
# Extractive answers (SQuAD-style)

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD v1.1's normalization, in its order: lowercase, drop ASCII punctuation, drop the
    articles a/an/the, collapse whitespace. Punctuation goes before articles, as there: "a.n"
    becomes "an", then an article, so nothing is left."""
    text = text.lower().translate(_PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _references(reference: str | Iterable[str]) -> list[str]:
    refs = [reference] if isinstance(reference, str) else list(reference)
    if not refs:
        raise ValueError("no gold answers to score against (an empty list)")
    return refs


def exact_match(prediction: str, reference: str | Iterable[str]) -> float:
    """1.0 if the normalized prediction equals a normalized reference (SQuAD v1.1's EM: the
    best over the references); a ``ValueError`` for an empty list of references."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(r) for r in _references(reference)))


def token_f1(prediction: str, reference: str | Iterable[str]) -> float:
    """Bag-of-tokens F1 between normalized texts, the best over the references (SQuAD v1.1).

    One deliberate difference from the v1.1 script: when the prediction or the reference has no
    token left after normalization, F1 is 1.0 if both are empty, else 0.0 (the v2.0 script's
    rule). v1.1 scores two empty texts 0.0 while their exact match is 1.0, which would make an
    exact match score below its own F1. Gold answers that normalize to nothing are refused by
    the spec loader, so on a valid task the two scripts agree everywhere.
    """
    pred = normalize_answer(prediction).split()
    best = 0.0
    for r in _references(reference):
        ref = normalize_answer(r).split()
        if not pred or not ref:
            best = max(best, float(pred == ref))
            continue
        common = sum((Counter(pred) & Counter(ref)).values())
        if common:
            p, rc = common / len(pred), common / len(ref)
            best = max(best, 2 * p * rc / (p + rc))
    return best


# ---------------------------------------------------------------------------------------------
# JSON extraction


def _parse_json(text: str) -> tuple[bool, Any]:
    from distiller.validators import extract_json

    try:
        return True, extract_json(text)
    except ValueError:
        return False, None


def _schema_validator(schema: dict | None) -> Any:
    if schema is None:
        return None
    import jsonschema

    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def json_validity(
    texts: Sequence[str], schema: dict | None = None, confidence: float = 0.95
) -> Rate:
    """Rate of texts that parse as JSON (a lone fenced block counts) and, if given, match ``schema``."""
    validator = _schema_validator(schema)
    ok = 0
    for t in texts:
        parsed, value = _parse_json(t)
        if parsed and (validator is None or validator.is_valid(value)):
            ok += 1
    return rate(ok, len(texts), confidence)


def _same_value(a: Any, b: Any) -> bool:
    # 12.5 and 12.50 and "12.5" are the same extraction; strings compare trimmed, case-folded.
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-9)
    if isinstance(a, str) and isinstance(b, str):
        return a.strip().casefold() == b.strip().casefold()
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def field_accuracy(texts: Sequence[str], references: Sequence[dict]) -> dict[str, Any]:
    """Per-field and overall accuracy of extracted JSON objects against reference objects.

    A text that does not parse to an object scores 0 on every reference field. Returns
    ``{"overall": float, "fields": {key: float}, "exact": float}`` (``exact``: every field right).
    """
    _same_length(texts, references)
    right: Counter[str] = Counter()
    total: Counter[str] = Counter()
    exact = 0
    for text, ref in zip(texts, references, strict=True):
        parsed, value = _parse_json(text)
        obj = value if parsed and isinstance(value, dict) else {}
        all_ok = True
        for key, want in ref.items():
            total[key] += 1
            if key in obj and _same_value(obj[key], want):
                right[key] += 1
            else:
                all_ok = False
        exact += all_ok
    fields = {k: right[k] / total[k] for k in total}
    n_fields = sum(total.values())
    return {
        "overall": sum(right.values()) / n_fields if n_fields else float("nan"),
        "fields": fields,
        "exact": exact / len(references) if references else float("nan"),
    }


# ---------------------------------------------------------------------------------------------
# Schema-constrained extraction: field-level precision / recall / F1


def _leaf_key(value: Any) -> tuple[str, Any]:
    """A leaf value as a hashable key under ``_same_value``'s equality: strings trimmed and
    case-folded, numbers as floats (12 == 12.0; rounded to 9 significant digits so that float
    dust does not split equal values), booleans apart from numbers (True is not 1)."""
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, (int, float)):
        return ("num", float(f"{float(value):.9g}"))
    if isinstance(value, str):
        return ("str", value.strip().casefold())
    return ("json", json.dumps(value, sort_keys=True))


def flatten_fields(value: Any, prefix: str = "") -> list[tuple[str, tuple[str, Any]]]:
    """The leaves of a JSON value as ``(path, leaf key)`` pairs: object keys join with ``.``
    (``reporter.name``); every element of an array shares the path ``key[]`` (``regions[]``,
    ``items[].sku``), so arrays compare as multisets, in any order. ``null``, ``{}`` and ``[]``
    give no leaf: they state no value."""
    if value is None:
        return []
    if isinstance(value, dict):
        out = []
        for k, v in value.items():
            out += flatten_fields(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    if isinstance(value, list):
        return [leaf for v in value for leaf in flatten_fields(v, f"{prefix}[]")]
    return [(prefix, _leaf_key(value))]


def _prf(tp: int, fp: int, fn: int) -> tuple[float | None, float | None, float | None]:
    """Precision, recall, F1 from counts; None where the denominator is 0 (undefined)."""
    p = tp / (tp + fp) if tp + fp else None
    r = tp / (tp + fn) if tp + fn else None
    f = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None
    return p, r, f


def _record_counts(predicted: Any, reference: Any) -> dict[str, list[int]]:
    """Per path ``[tp, fp, fn]`` of one answer against its reference (multiset matching)."""
    want = Counter(flatten_fields(reference))
    have = Counter(flatten_fields(predicted))
    counts: dict[str, list[int]] = {}
    for (path, _), k in (want & have).items():
        counts.setdefault(path, [0, 0, 0])[0] += k
    for (path, _), k in (have - want).items():
        counts.setdefault(path, [0, 0, 0])[1] += k
    for (path, _), k in (want - have).items():
        counts.setdefault(path, [0, 0, 0])[2] += k
    return counts


def bootstrap_f1_interval(
    counts: Sequence[tuple[int, int, int]],
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the micro F1 ``2 TP / (2 TP + FP + FN)`` over records:
    whole records (their ``(tp, fp, fn)``) are resampled, because the fields of one document
    are not independent. Seeded, so the same counts give the same interval. (0, 1) when empty."""
    c = np.asarray(counts, dtype=np.int64).reshape(-1, 3)
    if len(c) == 0:
        return 0.0, 1.0
    idx = np.random.default_rng(seed).integers(0, len(c), size=(resamples, len(c)))
    return _quantiles(_resampled_f1(c, idx), confidence)


def paired_bootstrap_f1_difference(
    first: Sequence[tuple[int, int, int]],
    second: Sequence[tuple[int, int, int]],
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of micro F1(second) - F1(first), two models' ``(tp, fp,
    fn)`` on the SAME records: each resample draws the same records for both, so what the
    records share (an easy or a hard ticket) cancels out. (-1, 1) when empty."""
    a = np.asarray(first, dtype=np.int64).reshape(-1, 3)
    b = np.asarray(second, dtype=np.int64).reshape(-1, 3)
    if len(a) != len(b):
        raise ValueError(f"paired records: {len(a)} and {len(b)}")
    if len(a) == 0:
        return -1.0, 1.0
    idx = np.random.default_rng(seed).integers(0, len(a), size=(resamples, len(a)))
    return _quantiles(_resampled_f1(b, idx) - _resampled_f1(a, idx), confidence)


def _resampled_f1(c: np.ndarray, idx: np.ndarray) -> np.ndarray:
    tp, fp, fn = (c[:, j][idx].sum(axis=1) for j in range(3))
    denom = 2 * tp + fp + fn
    return np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 1.0)


def _quantiles(values: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = (1 - confidence) / 2
    lo, hi = np.quantile(values, [tail, 1 - tail])
    return float(lo), float(hi)


def extraction_scores(
    texts: Sequence[str],
    references: Sequence[Any],
    schema: dict | None = None,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """Schema validity, exact records and field-level precision / recall / F1 of extracted
    JSON answers against gold objects.

    Each answer is parsed as JSON (a lone fenced block counts, as in ``json_validity``); one
    that does not parse to an object states nothing. Answer and gold are flattened to leaves
    (``flatten_fields``: dotted paths, ``[]`` for array elements), leaves compared as
    ``_same_value`` compares (numbers by value, strings trimmed and case-folded). Per path, as
    multisets:

    - a gold leaf the answer has with the same value: a true positive;
    - an answer leaf with no equal gold leaf (a wrong value, a value where gold is null or the
      array shorter, a key gold does not have): a false positive;
    - a gold leaf the answer lacks (null, absent, or another value): a false negative. A wrong
      value is so both a false positive and a false negative, as in entity-level F1.
    - null, an absent key, ``{}`` and ``[]`` state no value on either side: "not stated" in gold
      and "not stated" in the answer is no count at all (it shows in ``exact_record``), and a
      gold null the answer fills in is a false positive.

    Returns ``schema_valid`` (parses and validates against ``schema``; without one: parses to
    an object) and ``exact_record`` (the same leaves as gold, nothing more or less), rates over
    records with Wilson intervals; ``precision`` (TP / (TP + FP)) and ``recall`` (TP / (TP +
    FN)) micro over every leaf of every record, as rates with Wilson intervals (over leaves,
    which are not independent: read them as optimistic, the bootstrap below is the honest
    one); ``f1`` (micro, 2 TP / (2 TP + FP + FN)) with ``f1_interval``, a bootstrap over whole
    records (``bootstrap_f1_interval``); ``fields``: per path ``tp``, ``fp``, ``fn``,
    ``support`` (gold leaves) and ``precision`` / ``recall`` / ``f1`` (None where undefined);
    ``records``: per answer ``schema_valid``, ``exact``, ``tp``, ``fp``, ``fn`` and ``f1``
    (1.0 for a record with nothing stated on either side).
    """
    _same_length(texts, references)
    validator = _schema_validator(schema)
    per_field: dict[str, list[int]] = {}
    records = []
    for text, ref in zip(texts, references, strict=True):
        parsed, value = _parse_json(text)
        obj = value if parsed and isinstance(value, dict) else None
        valid = parsed and (validator.is_valid(value) if validator is not None else obj is not None)
        counts = _record_counts(obj, ref)
        for path, c in counts.items():
            acc = per_field.setdefault(path, [0, 0, 0])
            for j in range(3):
                acc[j] += c[j]
        tp, fp, fn = (sum(c[j] for c in counts.values()) for j in range(3))
        f1 = _prf(tp, fp, fn)[2]
        records.append(
            {
                "schema_valid": bool(valid),
                "exact": obj is not None and fp == 0 and fn == 0,
                "tp": tp,
                "fp": fp,
                "fn": fn,
                "f1": 1.0 if f1 is None else f1,
            }
        )
    n = len(records)
    tp, fp, fn = (sum(r[k] for r in records) for k in ("tp", "fp", "fn"))
    f1 = _prf(tp, fp, fn)[2]
    fields = {}
    for path in sorted(per_field):
        t, f_p, f_n = per_field[path]
        p, r, f = _prf(t, f_p, f_n)
        fields[path] = {
            "tp": t, "fp": f_p, "fn": f_n, "support": t + f_n, "precision": p, "recall": r, "f1": f,
        }  # fmt: skip
    return {
        "schema_valid": rate(sum(r["schema_valid"] for r in records), n, confidence),
        "exact_record": rate(sum(r["exact"] for r in records), n, confidence),
        "precision": rate(tp, tp + fp, confidence),
        "recall": rate(tp, tp + fn, confidence),
        "f1": float("nan") if f1 is None else f1,
        "f1_interval": bootstrap_f1_interval(
            [(r["tp"], r["fp"], r["fn"]) for r in records], confidence
        ),
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "fields": fields,
        "records": records,
    }
