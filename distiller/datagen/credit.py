"""Synthetic credit-risk applicants: a documented rule, seeded label noise, text in many styles.

Each applicant has an age, an occupation, an annual income, an outstanding debt, a credit
utilization (the share of the credit limit in use) and a payment behaviour. The label follows
from three of them by points:

    payment behaviour     always on time: +2    occasionally late: 0    frequently missed: -2
    credit utilization    below 30%: +1         30% to 60%: 0           above 60%: -1
    debt-to-income        debt / annual income below 0.25: +1; 0.25 to 0.6: 0; above 0.6: -1

    total >= 2: Good      total <= -2: Bad      otherwise: Standard

Age and occupation carry no points (a model must learn to ignore them). Before noise the
classes come out about 7 : 13 : 7 (Good : Standard : Bad): Standard is the common class, as
in real credit data. Noise: each row's label is, with probability ``noise`` (seeded, per row),
replaced by one of the two other labels, so no model can be perfect and a memorised rule is
not the whole story.

Every rendering shows every field the rule reads, exactly (incomes are whole hundreds a month,
debts whole hundreds, utilization a whole percent), in one of five styles with varied phrasing,
order and units (yearly or monthly income, thousands or full amounts, a percentage, a ratio or
a balance against a limit). ``parse_applicant`` reads any rendering back, so the label follows
from the text alone (the tests check every style).

All randomness comes from sha256 of (seed, row, draw number), not from ``random``: the same
seed gives byte-identical data on any Python version and platform, and row ``i`` does not
depend on how many rows are generated.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

LABELS = ("Good", "Standard", "Bad")
PAYMENTS = ("on_time", "late", "missed")
PAYMENT_POINTS = {"on_time": 2, "late": 0, "missed": -2}
STYLES = ("compact", "sentence", "narrative", "bullets", "record")
OCCUPATIONS = (
    "nurse", "teacher", "software engineer", "electrician", "accountant", "chef",
    "truck driver", "lawyer", "mechanic", "pharmacist", "journalist", "architect", "cashier",
    "scientist", "plumber", "musician", "dentist", "farmer", "librarian", "pilot",
    "graphic designer", "police officer", "waiter", "carpenter",
)  # fmt: skip
DEFAULT_NOISE = 0.05


# ---------------------------------------------------------------------------------------------
# The rule


def utilization_points(utilization: int) -> int:
    """+1 below 30%, -1 above 60%, else 0 (``utilization`` in whole percent)."""
    return 1 if utilization < 30 else -1 if utilization > 60 else 0


def debt_to_income_points(debt: int, income: int) -> int:
    """+1 when debt / income < 0.25, -1 when > 0.6, else 0 (in integers: no rounding)."""
    if 4 * debt < income:
        return 1
    return -1 if 5 * debt > 3 * income else 0


def rule_label(income: int, debt: int, utilization: int, payment: str) -> str:
    """Good / Standard / Bad by the points of the module docstring."""
    total = (
        PAYMENT_POINTS[payment]
        + utilization_points(utilization)
        + debt_to_income_points(debt, income)
    )
    return "Good" if total >= 2 else "Bad" if total <= -2 else "Standard"


@dataclass(frozen=True)
class Applicant:
    age: int
    occupation: str
    income: int  # dollars a year, a multiple of 1,200 (whole hundreds a month)
    debt: int  # dollars outstanding, a multiple of 100
    utilization: int  # percent of the credit limit in use, 1..99
    credit_limit: int  # dollars, a multiple of 1,000 (so the balance is whole dollars)
    payment: str  # on_time | late | missed

    @property
    def label(self) -> str:
        return rule_label(self.income, self.debt, self.utilization, self.payment)

    @property
    def balance(self) -> int:
        return self.utilization * self.credit_limit // 100


# ---------------------------------------------------------------------------------------------
# Deterministic draws


class Draws:
    """Uniform draws from sha256(key, counter): stable across Python versions and platforms."""

    def __init__(self, *key: Any):
        self._key = "\x1f".join(map(str, key))
        self._count = 0

    def _u64(self) -> int:
        digest = hashlib.sha256(f"{self._key}\x1e{self._count}".encode()).digest()
        self._count += 1
        return int.from_bytes(digest[:8], "big")

    def integer(self, lo: int, hi: int) -> int:
        """Uniform on lo..hi inclusive (rejection sampling: no modulo bias)."""
        span = hi - lo + 1
        limit = (1 << 64) - (1 << 64) % span
        while True:
            x = self._u64()
            if x < limit:
                return lo + x % span

    def choice(self, options: Sequence[Any]) -> Any:
        return options[self.integer(0, len(options) - 1)]

    def chance(self, p: float) -> bool:
        return self._u64() < p * (1 << 64)

    def shuffled(self, items: Sequence[Any]) -> list[Any]:
        out = list(items)
        for i in range(len(out) - 1, 0, -1):
            j = self.integer(0, i)
            out[i], out[j] = out[j], out[i]
        return out


def draw_applicant(d: Draws) -> Applicant:
    """Payment, utilization band and debt-to-income band uniform; values inside each band."""
    payment = d.choice(PAYMENTS)
    utilization = d.choice(((2, 29), (30, 60), (61, 97)))
    utilization = d.integer(*utilization)
    income = 1200 * d.integer(15, 150)
    lo, hi = d.choice(((3, 24), (25, 60), (61, 140)))  # debt-to-income, in hundredths
    debt = max(100, round(income * d.integer(lo, hi) / 100 / 100) * 100)
    return Applicant(
        age=d.integer(19, 74),
        occupation=d.choice(OCCUPATIONS),
        income=income,
        debt=debt,
        utilization=utilization,
        credit_limit=1000 * d.integer(2, 40),
        payment=payment,
    )


# ---------------------------------------------------------------------------------------------
# Rendering: clause templates with <field|format> slots, parsed back by the same templates


def _usd(x: int) -> str:
    return f"${x:,}"


def _usd_k(x: int) -> str:
    tenths = x % 1000 // 100
    return f"${x // 1000}" + (f".{tenths}" if tenths else "") + "k"


# format -> (render, regex, number of groups, the value of the groups)
_FORMATS: dict[str, tuple[Callable[[int], str], str, int, Callable[..., int]]] = {
    "usd": (_usd, r"\$(\d{1,3}(?:,\d{3})*)", 1, lambda s: int(s.replace(",", ""))),
    "usd_k": (_usd_k, r"\$(\d+)(?:\.(\d))?k", 2, lambda a, b: int(a) * 1000 + int(b or 0) * 100),
    "plain": (str, r"(\d+)", 1, int),
    "cents": (lambda x: f"{x}.00", r"(\d+)\.00", 1, int),
    "pct": (lambda u: f"{u}%", r"(\d{1,2})%", 1, int),
    "ratio": (lambda u: f"0.{u:02d}", r"0\.(\d\d)", 1, int),
    "pct1": (lambda u: f"{u}.0", r"(\d{1,2})\.0", 1, int),
}
_SLOT = re.compile(r"<(\w+)\|(\w+)>")

# Clauses in the third person (subject: the applicant), one list per quantity the rule reads.
INCOME_CLAUSES = (
    "earns <income|usd_k> a year",
    "earns <income|usd> a year",
    "has an annual income of <income|usd>",
    "makes <monthly|usd> a month",
    "has an income of <income|plain> dollars per year",
)
DEBT_CLAUSES = (
    "owes <debt|usd>",
    "carries <debt|usd_k> in debt",
    "has outstanding debt of <debt|usd>",
    "owes <debt|plain> dollars in total",
)
UTILIZATION_CLAUSES = (
    "uses <utilization|pct> of available credit",
    "has a credit utilization of <utilization|pct>",
    "runs a utilization ratio of <utilization|ratio>",
    "has drawn <balance|usd> of a <limit|usd> credit limit",
)
PAYMENT_CLAUSES = {
    "on_time": ("always pays on time", "has never missed a payment", "pays every bill on time"),
    "late": ("occasionally pays late", "is sometimes late with payments", "has paid late a few times"),
    "missed": ("frequently misses payments", "has missed several payments", "is often behind on payments"),
}  # fmt: skip
AGE_CLAUSES = (
    "Applicant, <age|plain>,",
    "<age|plain>-year-old",
    "age <age|plain>.",
    "Age: <age|plain>",
)

# Bullet-list lines and the fixed-order record (the field names a form or a database uses).
INCOME_LINES = ("- Annual income: <income|usd>", "- Monthly income: <monthly|usd>")
DEBT_LINES = ("- Outstanding debt: <debt|usd>",)
UTILIZATION_LINES = (
    "- Credit utilization: <utilization|pct>",
    "- Credit used: <balance|usd> of <limit|usd>",
)
PAYMENT_LINES = {
    "on_time": ("- Payment history: on time", "- Payments: never missed"),
    "late": ("- Payment history: occasionally late", "- Payments: sometimes late"),
    "missed": ("- Payment history: frequently missed", "- Payments: often missed"),
}  # fmt: skip
RECORD = (
    "Age: <age|plain>, Occupation: {occupation}, Annual Income: <income|cents>, "
    "Outstanding Debt: <debt|cents>, Credit Utilization Ratio: <utilization|pct1>, "
    "Payment Behaviour: {payment}"
)
RECORD_PAYMENTS = {"on_time": "On_time", "late": "Occasionally_late", "missed": "Frequently_missed"}
RECORD_CLAUSES = {
    "income": ("Annual Income: <income|cents>",),
    "debt": ("Outstanding Debt: <debt|cents>",),
    "utilization": ("Credit Utilization Ratio: <utilization|pct1>",),
}


def _values(a: Applicant) -> dict[str, int]:
    return {
        "age": a.age,
        "income": a.income,
        "monthly": a.income // 12,
        "debt": a.debt,
        "utilization": a.utilization,
        "balance": a.balance,
        "limit": a.credit_limit,
    }


def fill(template: str, a: Applicant) -> str:
    """``template`` with each ``<field|format>`` slot rendered from ``a``."""
    values = _values(a)
    return _SLOT.sub(lambda m: _FORMATS[m.group(2)][0](values[m.group(1)]), template)


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _clauses(a: Applicant, d: Draws) -> list[str]:
    """The four rule clauses (income, debt, utilization, payment), phrased and ordered at random."""
    parts = [
        fill(d.choice(INCOME_CLAUSES), a),
        fill(d.choice(DEBT_CLAUSES), a),
        fill(d.choice(UTILIZATION_CLAUSES), a),
        d.choice(PAYMENT_CLAUSES[a.payment]),
    ]
    return d.shuffled(parts)


def _joined(parts: list[str]) -> str:
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def render(a: Applicant, style: str, d: Draws) -> str:
    """The applicant as text in ``style`` (one of ``STYLES``), phrasing drawn from ``d``."""
    if style == "compact":
        return f"Applicant, {a.age}, {a.occupation}; {_joined(_clauses(a, d))}."
    if style == "sentence":
        return f"A {a.age}-year-old {a.occupation} who {_joined(_clauses(a, d))}."
    if style == "narrative":
        body = ". ".join(_cap(c) for c in _clauses(a, d))
        return f"{_cap(a.occupation)}, age {a.age}. {body}."
    if style == "bullets":
        lines = [
            fill("- Age: <age|plain>", a),
            f"- Occupation: {a.occupation}",
            fill(d.choice(INCOME_LINES), a),
            fill(d.choice(DEBT_LINES), a),
            fill(d.choice(UTILIZATION_LINES), a),
            d.choice(PAYMENT_LINES[a.payment]),
        ]
        return "\n".join(d.shuffled(lines))
    if style == "record":
        text = RECORD.format(occupation=a.occupation.title(), payment=RECORD_PAYMENTS[a.payment])
        return fill(text, a)
    raise ValueError(f"style must be one of {', '.join(STYLES)}, got {style!r}")


# ---------------------------------------------------------------------------------------------
# Parsing a rendering back


def _pattern(template: str) -> tuple[re.Pattern[str], list[tuple[str, str]]]:
    """A regex matching ``template``'s renderings, and the (field, format) of its slots."""
    parts, slots, pos = [], [], 0
    for m in _SLOT.finditer(template):
        parts.append(re.escape(template[pos : m.start()]))
        parts.append(_FORMATS[m.group(2)][1])
        slots.append((m.group(1), m.group(2)))
        pos = m.end()
    parts.append(re.escape(template[pos:]))
    start = r"\b" if template[:1].isalnum() else ""
    return re.compile(start + "".join(parts), re.IGNORECASE), slots


def _find(text: str, templates: Sequence[str], what: str) -> dict[str, int]:
    """The slot values of the one template in ``templates`` that ``text`` contains."""
    found = []
    for template in templates:
        pattern, slots = _pattern(template)
        for m in pattern.finditer(text):
            groups, values = list(m.groups()), {}
            for field, fmt in slots:
                _, _, n, value = _FORMATS[fmt]
                values[field] = value(*groups[:n])
                groups = groups[n:]
            found.append(values)
    if len(found) != 1:
        raise ValueError(f"expected one {what} in the text, found {len(found)}: {text!r}")
    return found[0]


def parse_applicant(text: str) -> dict[str, Any]:
    """The rule's inputs read back from any rendering: age, income (a year), debt,
    utilization (percent) and payment; raises ``ValueError`` if any is missing or repeated."""
    age = _find(text, AGE_CLAUSES, "age")["age"]
    income = _find(text, INCOME_CLAUSES + INCOME_LINES + RECORD_CLAUSES["income"], "income")
    debt = _find(text, DEBT_CLAUSES + DEBT_LINES + RECORD_CLAUSES["debt"], "debt")["debt"]
    util = _find(
        text, UTILIZATION_CLAUSES + UTILIZATION_LINES + RECORD_CLAUSES["utilization"], "utilization"
    )
    payments = []
    for payment in PAYMENTS:
        phrases = (
            *PAYMENT_CLAUSES[payment],
            *PAYMENT_LINES[payment],
            f"Payment Behaviour: {RECORD_PAYMENTS[payment]}",
        )
        payments += [payment for p in phrases if p.casefold() in text.casefold()]
    if len(payments) != 1:
        raise ValueError(f"expected one payment behaviour in the text, found {payments}: {text!r}")
    utilization = (
        util["utilization"] if "utilization" in util else util["balance"] * 100 // util["limit"]
    )
    return {
        "age": age,
        "income": income["income"] if "income" in income else income["monthly"] * 12,
        "debt": debt,
        "utilization": utilization,
        "payment": payments[0],
    }


def label_from_text(text: str) -> str:
    """The rule's label for a rendering, from the text alone."""
    f = parse_applicant(text)
    return rule_label(f["income"], f["debt"], f["utilization"], f["payment"])


# ---------------------------------------------------------------------------------------------
# Rows


@dataclass(frozen=True)
class Row:
    id: str
    text: str
    label: str  # the gold label: the rule's, or another one on a noisy row
    applicant: Applicant
    style: str
    noisy: bool  # the label was flipped away from the rule's

    def entry(self) -> dict[str, str]:
        """The prompts-file entry: what a task spec reads."""
        return {"id": self.id, "text": self.text, "label": self.label}


def make_row(seed: int, index: int, noise: float = DEFAULT_NOISE, prefix: str = "credit") -> Row:
    """Row ``index`` of the stream ``seed``: a function of (seed, index, noise) alone."""
    if not 0 <= noise < 1:
        raise ValueError(f"noise must be in [0, 1), got {noise}")
    d = Draws("credit", seed, index)
    a = draw_applicant(d)
    style = d.choice(STYLES)
    text = render(a, style, d)
    label, noisy = a.label, d.chance(noise)
    if noisy:
        label = d.choice([x for x in LABELS if x != label])
    return Row(f"{prefix}-{index:04d}", text, label, a, style, noisy)


def generate(
    n: int, seed: int = 0, noise: float = DEFAULT_NOISE, prefix: str = "credit"
) -> list[Row]:
    """Rows 0..n-1 of stream ``seed``, classes in their natural proportions."""
    return [make_row(seed, i, noise, prefix) for i in range(n)]


def generate_balanced(
    per_class: int,
    seed: int,
    noise: float = DEFAULT_NOISE,
    prefix: str = "credit",
    exclude: Sequence[str] = (),
) -> list[Row]:
    """The first ``per_class`` rows of each label in stream ``seed`` (by gold label), skipping
    rows whose text is in ``exclude``; in stream order."""
    taken = {label: 0 for label in LABELS}
    skip = set(exclude)
    out, i = [], 0
    while min(taken.values()) < per_class:
        row = make_row(seed, i, noise, prefix)
        i += 1
        if taken[row.label] < per_class and row.text not in skip:
            taken[row.label] += 1
            out.append(row)
    return out
