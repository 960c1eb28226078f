"""Synthetic incident tickets with gold JSON: the schema-constrained extraction task.

Each row is one short ticket about a made-up service outage, written in one of four styles:

    form      "Key: value" lines (key names vary: "Ticket" / "ID", "Severity" / "Priority")
    email     a few sentences to the team, from the reporter
    alert     one pager line of " | "-separated parts
    notes     "- " bullet notes, each a fragment

Facts come in a shuffled order in every style, and each row carries one to three distracting
facts that look like an answer but are not one: a related ticket number, the engineer the
ticket is assigned to (a second person and team), a service that kept working, the date of the
last deploy, the region traffic failed over to, the service's total user count beside the
affected users, the normal error rate beside the current one.

Gold (``reference``) is one object in the schema's key order (``SCHEMA``, written next to the
data as ``schema.json``), and every key is always present: a fact the ticket does not state is
``null`` (users, error_pct, the reporter's team) or, for the regions, ``[]``. So a
missing field is never an absent key in gold; the metrics (``distiller.metrics.
extraction_scores``) score a null, an absent key and an empty array alike, as "no value".

    id               string "INC-" + 4 digits (a second, related ticket number may appear)
    severity         one of low / medium / high / critical
    service          string (kind + suffix, e.g. "billing-api")
    opened           "YYYY-MM-DD" (the last deploy's date may appear too)
    customer         boolean: are customers affected
    users            integer or null: users affected (the total user count may appear too)
    error_pct        error rate in percent, a multiple of 0.5, or null (the normal rate may
                     appear too)
    reporter         {name: string, team: one of TEAMS or null} (the assignee may appear too)
    regions          0-2 distinct regions (the schema allows 3), in the order the ticket names
                     them (a failover region, not affected, may appear too)

Names of people are assembled from syllables (``distiller.datagen.qa``'s), so no model knows
them. All randomness comes from ``credit.Draws`` (sha256 of seed, row and draw number): the same
seed gives byte-identical data anywhere, and row ``i`` does not depend on how many are drawn.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from distiller.datagen.credit import Draws
from distiller.datagen.qa import _FIRST, _LAST_HEAD, _LAST_TAIL

STYLES = ("form", "email", "alert", "notes")
SEVERITIES = ("low", "medium", "high", "critical")
TEAMS = ("platform", "payments", "identity", "search", "data", "mobile")
REGIONS = ("us-east", "us-west", "eu-west", "eu-central", "ap-south", "ap-east")
_KINDS = (
    "billing", "auth", "search", "checkout", "inventory", "notify", "ledger", "media",
    "profile", "report", "shipping", "session",
)  # fmt: skip
_SUFFIXES = ("api", "gateway", "worker", "db", "cache", "svc")
_MONTHS = (
    "January", "February", "March", "April", "May", "June", "July", "August", "September",
    "October", "November", "December",
)  # fmt: skip

# The answer's keys, in the order gold writes them and constrained decoding requires them.
FIELDS = (
    "id",
    "severity",
    "service",
    "opened",
    "customer",
    "users",
    "error_pct",
    "reporter",
    "regions",
)
# The answer's JSON Schema. Bounded everywhere (string patterns and lengths, number steps and
# ranges, array sizes, no extra keys), so a constrained answer always completes within a small
# token budget (``uniqueItems`` is left out: llguidance does not compile it, so distinct regions
# are the data's promise, not the schema's); every type a schema can name appears: object, nested object, string, enum,
# integer, number, boolean, null, array.
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "id": {"type": "string", "pattern": "^INC-[0-9]{4}$"},
        "severity": {"enum": list(SEVERITIES)},
        "service": {"type": "string", "minLength": 1, "maxLength": 24},
        "opened": {"type": "string", "pattern": "^20[0-9]{2}-[01][0-9]-[0-3][0-9]$"},
        "customer": {"type": "boolean"},
        "users": {"type": ["integer", "null"], "minimum": 0, "maximum": 999999},
        "error_pct": {
            "type": ["number", "null"],
            "minimum": 0,
            "maximum": 100,
            "multipleOf": 0.5,  # exact in binary floating point, unlike 0.1
        },
        "reporter": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "minLength": 1, "maxLength": 32},
                "team": {"enum": [*TEAMS, None]},
            },
            "required": ["name", "team"],
            "additionalProperties": False,
        },
        "regions": {
            "type": "array",
            "items": {"enum": list(REGIONS)},
            "maxItems": 3,
        },
    },
    "required": list(FIELDS),
    "additionalProperties": False,
}

# The instruction the spec's prompts template puts before each ticket.
INSTRUCTION = (
    "Extract this incident ticket as JSON: id, severity, service, opened (YYYY-MM-DD), "
    "customer (are customers affected), users (affected), error_pct, reporter (name, team), "
    "regions. Use null for what it does not say."
)


@dataclass(frozen=True)
class Incident:
    """The facts of one ticket (gold), and the distracting values drawn beside them."""

    ticket: str
    severity: str
    service: str
    opened: tuple[int, int, int]  # year, month, day
    customer_facing: bool
    users_affected: int | None
    error_rate_pct: float | int | None
    reporter: str
    team: str | None
    regions: tuple[str, ...]
    # distractors
    related: str
    assignee: str
    assignee_team: str
    healthy: str
    deployed: tuple[int, int, int]
    failover: str
    total_users: int
    normal_rate: float

    def gold(self) -> dict[str, Any]:
        """The reference object, keys in ``SCHEMA``'s order."""
        y, m, d = self.opened
        return {
            "id": self.ticket,
            "severity": self.severity,
            "service": self.service,
            "opened": f"{y:04d}-{m:02d}-{d:02d}",
            "customer": self.customer_facing,
            "users": self.users_affected,
            "error_pct": self.error_rate_pct,
            "reporter": {"name": self.reporter, "team": self.team},
            "regions": list(self.regions),
        }


def _person(d: Draws) -> str:
    return f"{d.choice(_FIRST)} {d.choice(_LAST_HEAD)}{d.choice(_LAST_TAIL)}"


def _service(d: Draws) -> str:
    return f"{d.choice(_KINDS)}-{d.choice(_SUFFIXES)}"


def _rate(d: Draws, lo: int, hi: int) -> float | int:
    """A multiple of 0.5 in [lo, hi]; integral ones as ints (JSON writes 12, not 12.0)."""
    halves = d.integer(2 * lo, 2 * hi)
    return halves // 2 if halves % 2 == 0 else halves / 2


def draw_incident(d: Draws) -> Incident:
    ticket, related = (f"INC-{n}" for n in _distinct(d, lambda: d.integer(1000, 9999), 2))
    reporter, assignee = _distinct(d, lambda: _person(d), 2)
    service, healthy = _distinct(d, lambda: _service(d), 2)
    year, month = 2024 + d.integer(0, 1), d.integer(1, 12)
    day = d.integer(8, 28)
    deployed = (year, month, day - d.integer(1, 7))  # a few days before it opened
    regions = tuple(d.shuffled(REGIONS)[: d.choice((0, 1, 1, 2, 2))])
    failover = d.choice([r for r in REGIONS if r not in regions])
    customer_facing = d.chance(0.6)
    total = d.integer(20, 400) * 250
    users = d.integer(12, total // 8) if d.chance(0.7) else None
    normal = d.choice((0.1, 0.2, 0.3, 0.5))
    rate = _rate(d, 1, 60) if d.chance(0.7) else None
    team = d.choice(TEAMS) if d.chance(0.75) else None
    return Incident(
        ticket=ticket,
        severity=d.choice(SEVERITIES),
        service=service,
        opened=(year, month, day),
        customer_facing=customer_facing,
        users_affected=users,
        error_rate_pct=rate,
        reporter=reporter,
        team=team,
        regions=regions,
        related=related,
        assignee=assignee,
        assignee_team=d.choice(TEAMS),
        healthy=healthy,
        deployed=deployed,
        failover=failover,
        total_users=total,
        normal_rate=normal,
    )


def _distinct(d: Draws, make: Any, n: int) -> list[Any]:
    out: list[Any] = []
    while len(out) < n:
        value = make()
        if value not in out:
            out.append(value)
    return out


# ---------------------------------------------------------------------------------------------
# Rendering


def _date(ymd: tuple[int, int, int], written: int) -> str:
    """The date in one of three ways: ISO, "4 March 2024", "March 4, 2024"."""
    y, m, d = ymd
    if written == 0:
        return f"{y:04d}-{m:02d}-{d:02d}"
    if written == 1:
        return f"{d} {_MONTHS[m - 1]} {y}"
    return f"{_MONTHS[m - 1]} {d}, {y}"


def _count(n: int, grouped: bool) -> str:
    return f"{n:,}" if grouped else str(n)


def _regions(regions: tuple[str, ...]) -> str:
    if len(regions) <= 1:
        return "".join(regions)
    return ", ".join(regions[:-1]) + " and " + regions[-1]


def _facts(x: Incident, d: Draws, style: str) -> list[str]:
    """One piece of text per stated fact, in the style's voice (order not yet shuffled)."""
    written = d.integer(0, 2)  # one date format per ticket: the distractor date uses it too
    grouped = d.chance(0.5)
    opened = _date(x.opened, written)
    who = x.reporter + (f" ({x.team})" if x.team else "")
    impact_yes = d.choice(("customers are affected", "customer-facing", "customer impact: yes"))
    impact_no = d.choice(("internal only", "no customer impact", "customers not affected"))
    impact = impact_yes if x.customer_facing else impact_no
    sev = x.severity
    users = None if x.users_affected is None else _count(x.users_affected, grouped)
    rate = None if x.error_rate_pct is None else f"{x.error_rate_pct}%"
    regions = _regions(x.regions)
    if style == "form":
        out = [
            f"{d.choice(('Ticket', 'ID', 'Incident'))}: {x.ticket}",
            f"{d.choice(('Severity', 'Priority'))}: {sev.capitalize()}",
            f"{d.choice(('Service', 'Component'))}: {x.service}",
            f"{d.choice(('Opened', 'Created', 'Start'))}: {opened}",
            f"Customer impact: {'yes' if x.customer_facing else 'no'}",
            f"{d.choice(('Reporter', 'Reported by'))}: {who}",
        ]
        if users is not None:
            out.append(f"{d.choice(('Users affected', 'Affected users'))}: {users}")
        if rate is not None:
            out.append(f"Error rate: {rate}")
        if regions:
            out.append(f"{d.choice(('Regions', 'Affected regions'))}: {', '.join(x.regions)}")
        return out
    if style == "email":
        out = [
            f"since {opened}, {x.service} has been failing",
            f"I filed it as {x.ticket}, severity {sev}",
            impact.capitalize(),
            f"{x.reporter} here" + (f", {x.team} team" if x.team else ""),
        ]
        if users is not None:
            out.append(f"About {users} users are affected")
        if rate is not None:
            out.append(f"{rate} of requests return errors")
        if regions:
            out.append(f"It hits {regions}")
        return out
    if style == "alert":
        out = [
            f"[{sev.upper()}] {x.ticket}",
            x.service,
            f"opened {opened}",
            impact,
            f"reporter {who}",
        ]
        if users is not None:
            out.append(f"{users} users")
        if rate is not None:
            out.append(f"err {rate}")
        if regions:
            out.append(f"regions {'/'.join(x.regions)}")
        return out
    # notes
    out = [
        f"{x.ticket} opened {opened}",
        f"{sev} severity",
        f"broken: {x.service}",
        impact,
        f"reported by {who}",
    ]
    if users is not None:
        out.append(f"~{users} users hit")
    if rate is not None:
        out.append(f"errors at {rate}")
    if regions:
        out.append(f"in {regions}")
    return out


def _distractors(x: Incident, d: Draws, style: str) -> list[tuple[str, str]]:
    """(kind, text) of one to three facts that answer nothing, in the style's voice."""
    written = d.integer(0, 2)
    options = {
        "related": (f"Related: {x.related}", f"Possibly linked to {x.related}",
                    f"see {x.related}", f"dup of {x.related}?"),
        "assignee": (f"Assignee: {x.assignee} ({x.assignee_team})",
                     f"{x.assignee} from {x.assignee_team} is taking it",
                     f"assigned {x.assignee} ({x.assignee_team})",
                     f"{x.assignee} ({x.assignee_team}) on it"),
        "healthy": (f"Unaffected: {x.healthy}", f"the {x.healthy} service looks fine",
                    f"{x.healthy} ok", f"{x.healthy} still healthy"),
        "deployed": (f"Last deploy: {_date(x.deployed, written)}",
                     f"The last deploy went out on {_date(x.deployed, written)}",
                     f"last deploy {_date(x.deployed, written)}",
                     f"deployed {_date(x.deployed, written)}"),
        "failover": (f"Failover: {x.failover}", f"Traffic is failing over to {x.failover}",
                     f"failover {x.failover}", f"shifted traffic to {x.failover}"),
        "total_users": (f"Total users: {x.total_users:,}",
                        f"The service has {x.total_users:,} users in all",
                        f"of {x.total_users:,} users", f"{x.total_users:,} users total"),
        "normal_rate": (f"Baseline error rate: {x.normal_rate}%",
                        f"Normally the error rate is {x.normal_rate}%",
                        f"baseline {x.normal_rate}%", f"usual errors {x.normal_rate}%"),
    }  # fmt: skip
    kinds = d.shuffled(sorted(options))[: d.integer(1, 3)]
    index = STYLES.index(style)
    return [(k, options[k][index]) for k in kinds]


def render(x: Incident, style: str, d: Draws) -> tuple[str, tuple[str, ...]]:
    """The ticket's text in ``style`` and the kinds of distractor it carries."""
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    facts = _facts(x, d, style)
    noise = _distractors(x, d, style)
    parts = d.shuffled(facts + [text for _, text in noise])
    kinds = tuple(k for k, _ in noise)
    if style == "form":
        return "\n".join(parts), kinds
    if style == "email":
        greeting = d.choice(("Hi team,", "Hello all,", "Team,"))
        body = " ".join(p[0].upper() + p[1:] + "." for p in parts)
        return f"{greeting} {body}", kinds
    if style == "alert":
        return " | ".join(parts), kinds
    return "\n".join(f"- {p}" for p in parts), kinds


# ---------------------------------------------------------------------------------------------
# Rows


@dataclass(frozen=True)
class Row:
    """One ticket: its text, gold object, style and the distractors and nulls it has."""

    id: str
    text: str
    reference: dict[str, Any]
    style: str
    distractors: tuple[str, ...]

    @property
    def missing(self) -> tuple[str, ...]:
        """Paths whose gold is "not stated" (null, or no regions)."""
        ref = self.reference
        out = [k for k in ("users", "error_pct") if ref[k] is None]
        if ref["reporter"]["team"] is None:
            out.append("reporter.team")
        if not ref["regions"]:
            out.append("regions")
        return tuple(out)

    def entry(self) -> dict[str, Any]:
        """The prompts-file entry: ``text``, ``reference`` and, in ``meta``, style, distractors
        and the fields not stated."""
        return {
            "id": self.id,
            "text": self.text,
            "reference": self.reference,
            "meta": {
                "style": self.style,
                "distractors": list(self.distractors),
                "missing": list(self.missing),
            },
        }


def make_row(index: int, seed: int, prefix: str = "inc") -> Row:
    """Row ``index`` of the set drawn with ``seed`` (styles in turn, so each is a quarter)."""
    d = Draws("extraction", seed, index)
    x = draw_incident(d)
    style = STYLES[index % len(STYLES)]
    text, kinds = render(x, style, d)
    return Row(f"{prefix}-{index:04d}", text, x.gold(), style, kinds)


def generate(n: int, seed: int, prefix: str = "inc", exclude: tuple[str, ...] = ()) -> list[Row]:
    """``n`` rows with distinct texts and ticket numbers, none of whose texts is in ``exclude``."""
    rows: list[Row] = []
    seen, tickets = set(exclude), set()
    index = 0
    while len(rows) < n:
        row = make_row(index, seed, prefix)
        index += 1
        if row.text in seen or row.reference["id"] in tickets:
            continue
        seen.add(row.text)
        tickets.add(row.reference["id"])
        rows.append(row)
    return rows


def schema_text() -> str:
    """``SCHEMA`` as the committed ``schema.json`` holds it."""
    return json.dumps(SCHEMA, indent=2) + "\n"
