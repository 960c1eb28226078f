"""Decoding settings: the one value that says how a completion is decoded.

A ``Decoding`` is parsed once from a spec (``teacher.decoding``, ``eval``), carried by backend
requests, and taken as it is by every generation path (batched, shared-prefix, single-stream),
by latency measurement and by the CLIs. A change to how decoding works touches this type and
the code that reads it, nothing in between.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
from dataclasses import dataclass
from typing import Any

__all__ = ["GREEDY", "Decoding", "add_decoding_arguments", "cli_text", "decoding_from_args"]


@dataclass(frozen=True)
class Decoding:
    """How to decode one completion. ``temperature == 0`` is greedy (then ``top_p`` and ``seed``
    do not matter).

    ``seed`` is a run seed: generation derives a distinct, stable seed per prompt position from
    it, so a prompt's sample does not depend on which other prompts share its batch.
    ``stop`` strings end a generation (its text ends before the string). ``no_repeat_ngram``
    forbids completing an n-gram already generated (line breaks exempt); ``repetition_penalty``
    is mlx-lm/vLLM style. Both shape logits, so they exist only where the logits are ours (local
    models); an endpoint gets ``repetition_penalty`` as the vLLM extension and refuses n-grams.
    ``json_schema`` constrains decoding token by token to JSON the schema accepts
    (``distiller.constrain``); it holds the schema as compact JSON text (a mapping given is
    turned into it), so the value stays hashable. An endpoint gets it as OpenAI's
    ``response_format``.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 256
    seed: int | None = None
    stop: tuple[str, ...] = ()
    no_repeat_ngram: int = 0
    repetition_penalty: float | None = None
    json_schema: str | None = None

    def __post_init__(self) -> None:
        # A list given for ``stop`` would make the value unhashable (and unequal to its tuple).
        object.__setattr__(self, "stop", tuple(self.stop))
        if self.json_schema is not None:
            from distiller.constrain import canonical_schema

            # One text per schema, so equal schemas make equal values and cache keys; what is
            # wrong with one that is not JSON, problems() says.
            with contextlib.suppress(TypeError, ValueError):
                object.__setattr__(self, "json_schema", canonical_schema(self.json_schema))
        problems = self.problems()
        if problems:
            raise ValueError("; ".join(problems))

    def problems(self) -> list[str]:
        """What is out of range, one phrase each (``field: expected, got value``)."""
        out = []
        if not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            out.append(f"max_tokens: expected an integer > 0, got {self.max_tokens!r}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            out.append(
                f"temperature: expected a number >= 0 (0 = greedy), got {self.temperature!r}"
            )
        if not 0 < self.top_p <= 1:
            out.append(f"top_p: expected a number in (0, 1], got {self.top_p!r}")
        if self.no_repeat_ngram < 0 or self.no_repeat_ngram == 1:
            out.append(
                f"no_repeat_ngram: expected 0 (off) or an n-gram length >= 2, "
                f"got {self.no_repeat_ngram!r}"
            )
        if self.repetition_penalty is not None and not (
            math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0
        ):
            out.append(
                f"repetition_penalty: expected a number > 0, got {self.repetition_penalty!r}"
            )
        if any(not isinstance(s, str) for s in self.stop):
            out.append(f"stop: expected strings, got {list(self.stop)!r}")
        if self.json_schema is not None:
            from distiller.constrain import schema_problem

            problem = (
                schema_problem(self.json_schema)
                if isinstance(self.json_schema, str)
                else f"JSON text or a mapping, got {type(self.json_schema).__name__}"
            )
            if problem:
                out.append(f"json_schema: expected {problem}")
        return out

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def shapes_logits(self) -> bool:
        """Whether logits processors run (n-gram ban, a repetition penalty other than 1, or a
        JSON schema)."""
        return (
            bool(self.no_repeat_ngram)
            or self.repetition_penalty not in (None, 1.0)
            or self.json_schema is not None
        )

    def replace(self, **changes: Any) -> Decoding:
        """A copy with ``changes`` applied; ``None`` values are ignored (unset CLI options)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


GREEDY = Decoding()


# -- command-line options ------------------------------------------------------------------


def cli_text(text: str) -> str:
    """A command-line string with ``\\n`` and ``\\t`` read as a line break and a tab."""
    return text.replace("\\n", "\n").replace("\\t", "\t")


def add_decoding_arguments(parser: argparse.ArgumentParser, defaults: Decoding | None) -> None:
    """The decoding options every generating command takes. ``defaults=None``: every option
    defaults to unset, and ``decoding_from_args`` leaves the base value (a spec's) alone."""

    def default(name: str) -> Any:
        return None if defaults is None else getattr(defaults, name)

    def shown(name: str, fallback: str) -> str:
        return f"default: {default(name)}" if defaults is not None else f"default: {fallback}"

    g = parser.add_argument_group("decoding")
    g.add_argument(
        "--max-tokens",
        type=int,
        default=default("max_tokens"),
        help=f"most tokens to generate ({shown('max_tokens', 'the spec eval.max_tokens')})",
    )
    g.add_argument(
        "--temperature",
        type=float,
        default=default("temperature"),
        help=f"0 = greedy ({shown('temperature', 'greedy')})",
    )
    g.add_argument(
        "--top-p",
        type=float,
        default=default("top_p"),
        help=f"nucleus sampling ({shown('top_p', '1')})",
    )
    g.add_argument("--seed", type=int, default=default("seed"), help="seed for sampling")
    g.add_argument(
        "--no-repeat-ngram",
        type=int,
        default=default("no_repeat_ngram"),
        help="forbid repeating any n-gram of the answer; 0 = off "
        f"({shown('no_repeat_ngram', 'the spec eval.no_repeat_ngram')})",
    )
    g.add_argument(
        "--repetition-penalty",
        type=float,
        default=default("repetition_penalty"),
        help="penalize tokens already in the context "
        f"({shown('repetition_penalty', 'the spec eval.repetition_penalty')})",
    )
    g.add_argument(
        "--stop",
        action="append",
        default=None,
        metavar="TEXT",
        help="end the answer at TEXT, where \\n and \\t stand for a line break and a tab "
        f"(repeatable; --stop '' for none; {shown('stop', 'the spec eval.stop')})",
    )
    g.add_argument(
        "--json-schema",
        default=None,
        metavar="FILE",
        help="constrain the answer, token by token, to JSON this schema file (JSON or YAML) "
        "accepts (default: the spec eval.json_schema, else none)",
    )


def decoding_from_args(args: argparse.Namespace, base: Decoding = GREEDY) -> Decoding:
    """``base`` with the options given on the command line applied; bad values are a
    ``UserError`` naming the option."""
    from distiller.errors import UserError

    changes = {
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "seed": args.seed,
        "no_repeat_ngram": args.no_repeat_ngram,
        "repetition_penalty": args.repetition_penalty,
    }
    if args.stop is not None:
        changes["stop"] = tuple(cli_text(x) for x in args.stop if x)
    if args.json_schema is not None:
        changes["json_schema"] = _schema_from_file(args.json_schema, "--json-schema")
    try:
        return base.replace(**changes)
    except ValueError as exc:
        # Decoding's messages name the field; the user typed the option.
        text = str(exc)
        for name in changes:
            text = text.replace(f"{name}:", f"--{name.replace('_', '-')}:")
        raise UserError(text) from None


def _schema_from_file(path: str, what: str) -> dict[str, Any]:
    """The JSON Schema in the JSON or YAML file ``path``, read and checked the way the
    ``json_schema`` validator reads its ``schema_file``; a problem is a ``UserError`` that
    starts with ``what`` (the option or key naming the file)."""
    from distiller.errors import UserError
    from distiller.validators import ParamError, check_params

    try:
        return check_params("json_schema", {"schema_file": path})["schema"]
    except ParamError as exc:  # problems inside the file are SpecErrors naming file and line
        raise UserError(f"{what}: expected {exc.expected}") from None
