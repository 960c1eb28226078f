"""Synthetic extractive QA: incident reports about made-up services, people and places.

Each row is one passage and one question whose answer is a span of the passage. The passage
reports an incident with two entities of every type, so the answer is never "the only name":

    services   the one that failed and the one that kept running (each with a kind: billing...)
    people     the one who reported the outage and the one who rolled out the fix
    dates      the day it went down and the day it was fixed
    places     the data center where it started and the one traffic moved to
    numbers    storage nodes that failed and hours of degraded service

Facts are written in one of three phrasings each, in a shuffled order (the failed service is
not always mentioned first), with up to two filler sentences that name a third entity of some
type (a person on leave, a backup site, an earlier review date). The question asks about one
entity (who / what / when / where / how many / which), in one of two phrasings.

Names of services, people and places are assembled from syllables, so a small model cannot
answer from memory: the passage is the only source. Gold answers (``reference``) are a list:
the first is the span exactly as the passage writes it, the others accepted variants ("7" and
"seven", "March 4" and "4 March", "billing" and "billing service").

All randomness comes from sha256 of (seed, row, draw number), not from ``random``: the same
seed gives byte-identical data on any Python version and platform, and row ``i`` does not
depend on how many rows are generated.
"""

from __future__ import annotations

import hashlib
import string
from dataclasses import dataclass
from typing import Any

QUESTION_TYPES = ("who", "what", "when", "where", "how many", "which")
TEMPLATE = "Context: {context}\nQuestion: {question}"

_FIRST = (
    "Ilsa", "Teodor", "Marisol", "Kenji", "Odile", "Ravi", "Zora", "Anselm", "Priya", "Tobiah",
    "Linnea", "Caspian", "Yusra", "Emeric", "Noor", "Lazlo", "Mireille", "Dario", "Saoirse",
    "Bertil", "Amara", "Joaquin", "Vesna", "Hollis",
)  # fmt: skip
_LAST_HEAD = (
    "Var", "Quen", "Thal", "Mor", "Bel", "Cas", "Dru", "Fen", "Hal", "Kest", "Lom", "Nar",
    "Pell", "Sor", "Tam", "Vey", "Wren", "Yar", "Ost", "Gral",
)  # fmt: skip
_LAST_TAIL = ("ridge", "ova", "holt", "ane", "wick", "strom", "ley", "mont", "ard", "ish", "by")
_PLACE_TAIL = ("ford", "haven", "mere", "port", "vale", "ton", "field", "moor", "crest")
_SERVICE_HEAD = (
    "Qu", "Br", "Tess", "Vel", "Zan", "Or", "Cal", "Nim", "Pax", "Lum", "Rho", "Syl", "Tor",
    "Ix", "Mer", "Fal",
)  # fmt: skip
_SERVICE_TAIL = ("ora", "ex", "ium", "ara", "ivo", "enta", "ux", "on", "ella", "is")
KINDS = (
    "billing", "search", "login", "messaging", "payments", "shipping", "analytics", "storage",
    "notification", "scheduling", "inventory", "reporting",
)  # fmt: skip
_MONTHS = (
    "January", "February", "March", "April", "May", "June", "July", "August", "September",
    "October", "November", "December",
)  # fmt: skip
NUMBER_WORDS = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
    "nineteen", "twenty",
)  # fmt: skip

# Each fact in three phrasings. Fields: {a} failed service, {ka} its kind, {b} the healthy
# one, {kb} its kind, {p1} reporter, {p2} fixer, {d1} went down, {d2} fixed, {l1} where it
# started, {l2} where traffic went, {n1} failed nodes, {n2} hours.
_FACTS = (
    (
        "On {d1}, {a}, the {ka} service, went down in the {l1} data center.",
        "{a}, which handles {ka}, stopped answering requests in {l1} on {d1}.",
        "The {ka} service {a} failed on {d1}; the trouble began in the {l1} data center.",
    ),
    (
        "{p1} was the first to report the outage, in the on-call channel.",
        "The outage was reported by {p1}, who noticed the error rate climbing.",
        "{p1} raised the alarm after a customer complaint.",
    ),
    (
        "Traffic was moved to {l2}, where {b}, the {kb} service, kept running normally.",
        "Engineers shifted traffic to the {l2} site; {b}, which handles {kb}, was unaffected.",
        "{b}, the {kb} service, stayed healthy, and requests were rerouted to {l2}.",
    ),
    (
        "{n1} storage nodes failed before the alerts fired.",
        "Before anyone was paged, {n1} storage nodes had already failed.",
        "The postmortem counted {n1} failed storage nodes.",
    ),
    (
        "{p2} rolled out the fix on {d2}, after {n2} hours of degraded service.",
        "The fix was deployed by {p2} on {d2}; service had been degraded for {n2} hours.",
        "After {n2} hours of slow responses, {p2} shipped a patch on {d2}.",
    ),
)
# A third entity of one type: a distractor that answers no question.
_FILLERS = (
    "{p3} was on leave that week and missed the whole incident.",
    "A backup copy in {l3} was never used.",
    "The previous capacity review had taken place on {d3}.",
    "The team had planned to add {n3} more nodes next quarter.",
    "{c}, the {kc} service, shares no hardware with either of them.",
)

# (type, answer role, two phrasings). Roles name the fields above.
QUESTIONS: tuple[tuple[str, str, tuple[str, str]], ...] = (
    ("who", "p1", ("Who reported the outage?", "Who first raised the alarm about the outage?")),
    ("who", "p2", ("Who rolled out the fix?", "Who deployed the fix for the outage?")),
    ("what", "ka", ("What kind of service is {a}?", "What does {a} handle?")),
    ("what", "kb", ("What kind of service is {b}?", "What does {b} handle?")),
    ("when", "d1", ("When did {a} go down?", "On what date did the outage begin?")),
    ("when", "d2", ("When was the fix rolled out?", "On what date was the fix deployed?")),
    ("where", "l1", ("Where did the outage start?", "In which data center did the trouble begin?")),
    ("where", "l2", ("Where was traffic moved?", "To which site were requests rerouted?")),
    ("how many", "n1", ("How many storage nodes failed?", "How many nodes failed before the alerts?")),
    ("how many", "n2", ("How many hours was service degraded?", "For how many hours was service degraded?")),
    ("which", "a", ("Which service went down?", "Which service failed?")),
    ("which", "b", ("Which service kept running normally?", "Which service stayed healthy?")),
)  # fmt: skip


class _Draws:
    """Integers from sha256(seed, row, draw number): platform- and version-independent."""

    def __init__(self, seed: int, row: int):
        self.key, self.count = f"{seed}:{row}", 0

    def below(self, n: int) -> int:
        digest = hashlib.sha256(f"{self.key}:{self.count}".encode()).digest()
        self.count += 1
        return int.from_bytes(digest[:8], "big") % n

    def pick(self, options: tuple[Any, ...] | list[Any]) -> Any:
        return options[self.below(len(options))]

    def shuffled(self, items: list[Any]) -> list[Any]:
        out = list(items)
        for i in range(len(out) - 1, 0, -1):  # Fisher-Yates
            j = self.below(i + 1)
            out[i], out[j] = out[j], out[i]
        return out


@dataclass(frozen=True)
class Row:
    """One passage, one question, its gold answers (the passage's span first)."""

    id: str
    context: str
    question: str
    answers: tuple[str, ...]
    question_type: str
    role: str
    distractors: tuple[str, ...]  # the passage's other entities of the answer's type

    @property
    def text(self) -> str:
        return TEMPLATE.format(context=self.context, question=self.question)

    def entry(self) -> dict[str, Any]:
        """The prompts-file entry: ``text``, ``reference`` and the passage in ``meta``."""
        return {
            "id": self.id,
            "text": self.text,
            "reference": list(self.answers),
            "meta": {
                "context": self.context,
                "question": self.question,
                "question_type": self.question_type,
            },
        }


def _distinct(draw: _Draws, make: Any, n: int) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        value = make(draw)
        if value not in out:
            out.append(value)
    return out


def _person(d: _Draws) -> str:
    return f"{d.pick(_FIRST)} {d.pick(_LAST_HEAD)}{d.pick(_LAST_TAIL)}"


def _place(d: _Draws) -> str:
    return f"{d.pick(_LAST_HEAD)}{d.pick(_PLACE_TAIL)}"


def _service(d: _Draws) -> str:
    return f"{d.pick(_SERVICE_HEAD)}{d.pick(_SERVICE_TAIL)}"


def make_row(index: int, seed: int, prefix: str = "qa") -> Row:
    """Row ``index`` of the set drawn with ``seed``."""
    d = _Draws(seed, index)
    a, b, c = _distinct(d, _service, 3)
    ka, kb, kc = _distinct(d, lambda x: x.pick(KINDS), 3)
    p1, p2, p3 = _distinct(d, _person, 3)
    l1, l2, l3 = _distinct(d, _place, 3)
    month, day = d.pick(_MONTHS), 1 + d.below(23)
    # Fixed one to five days after it went down; the filler's review date in another month.
    dates = [(month, day), (month, day + 1 + d.below(5))]
    dates.append((d.pick([m for m in _MONTHS if m != month]), 1 + d.below(28)))
    n1, n3 = _distinct(d, lambda x: 2 + x.below(18), 2)
    n2 = 2 + d.below(30)
    while n2 == n1:  # the hours and the node count must not be the same answer
        n2 = 2 + d.below(30)
    month_first = d.below(2) == 0  # "March 4" or "4 March", the same way throughout a passage
    words_for_nodes = d.below(2) == 0  # "seven storage nodes" or "7 storage nodes"

    def date_forms(md: tuple[str, int]) -> list[str]:
        month, day = md
        forms = [f"{month} {day}", f"{day} {month}"]
        return forms if month_first else forms[::-1]

    def number_forms(n: int, as_words: bool) -> list[str]:
        forms = [str(n)] + ([NUMBER_WORDS[n]] if n < len(NUMBER_WORDS) else [])
        return forms[::-1] if as_words and len(forms) == 2 else forms

    forms: dict[str, list[str]] = {
        "a": [a], "b": [b], "c": [c], "ka": [ka, f"{ka} service"], "kb": [kb, f"{kb} service"],
        "kc": [kc], "p1": [p1], "p2": [p2], "p3": [p3], "l1": [l1], "l2": [l2], "l3": [l3],
        "d1": date_forms(dates[0]), "d2": date_forms(dates[1]), "d3": date_forms(dates[2]),
        "n1": number_forms(n1, words_for_nodes), "n2": number_forms(n2, False),
        "n3": number_forms(n3, words_for_nodes),
    }  # fmt: skip
    values = {k: v[0] for k, v in forms.items()}
    templates = [d.pick(phrasings) for phrasings in _FACTS]
    templates += d.shuffled(list(_FILLERS))[: d.below(3)]
    used = {name for t in templates for _, name, _, _ in string.Formatter().parse(t) if name}
    sentences = d.shuffled([t.format_map(values) for t in templates])
    context = " ".join(s[0].upper() + s[1:] for s in sentences)
    qtype, role, phrasings = d.pick(QUESTIONS)
    question = d.pick(phrasings).format_map(values)
    # The planned node count (n3) can equal the hours (n2): then it restates the answer and is no
    # distractor. (Drawing n2 again would change committed passages that were measured.)
    same_type = [
        k
        for k in sorted(used)
        if k[:-1] == role[:-1] and k != role and not set(forms[k]) & set(forms[role])
    ]
    return Row(
        id=f"{prefix}-{index:04d}",
        context=context,
        question=question,
        answers=tuple(forms[role]),
        question_type=qtype,
        role=role,
        distractors=tuple(values[k] for k in same_type),
    )


def generate(n: int, seed: int, prefix: str = "qa", exclude: tuple[str, ...] = ()) -> list[Row]:
    """``n`` rows with distinct passages (none of them in ``exclude``, passages of another set)."""
    rows: list[Row] = []
    seen = set(exclude)
    index = 0
    while len(rows) < n:
        row = make_row(index, seed, prefix)
        index += 1
        if row.context in seen:
            continue
        seen.add(row.context)
        rows.append(row)
    return rows
