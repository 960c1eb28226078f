"""Reading spec files: YAML (or JSONL) with the line of every dotted key, and typed access to
one mapping that names file, key, expectation and line in every error."""

from __future__ import annotations

import difflib
import json
import math
import re
from pathlib import Path
from typing import Any

import yaml

from distiller.errors import SpecError


class Doc:
    """One parsed file: its data, and the line of every dotted key (for error messages)."""

    def __init__(self, path: Path, data: Any, lines: dict[str, int]):
        self.path, self.data, self.lines = path, data, lines

    def line(self, key: str) -> int | None:
        while key:
            if key in self.lines:
                return self.lines[key]
            key = re.sub(r"(\.[^.\[\]]*|\[\d+\])$", "", key) if re.search(r"[.\[]", key) else ""
        return None

    def error(self, key: str, expected: str) -> SpecError:
        return SpecError(self.path, key or "(file)", expected, self.line(key))


def _key_name(node: yaml.Node) -> str:
    # The key as the loaded data spells it: YAML turns an unquoted `false:` key into False.
    if isinstance(node, yaml.ScalarNode):
        return str(yaml.SafeLoader("").construct_object(node))
    return str(node.value)


def _walk_lines(node: yaml.Node, prefix: str, out: dict[str, int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            name = _key_name(k)
            key = f"{prefix}.{name}" if prefix else name
            out.setdefault(key, k.start_mark.line + 1)
            _walk_lines(v, key, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            key = f"{prefix}[{i}]"
            out[key] = item.start_mark.line + 1
            _walk_lines(item, key, out)


def read_doc(path: Path, *, what: str = "file") -> Doc:
    """Parse a YAML file (or a JSONL one, one value per line); ``what`` names it in errors."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(path, "(file)", f"an existing {what}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError(path, "(file)", f"a readable UTF-8 {what} ({e})") from None
    if path.suffix == ".jsonl":
        data, lines = [], {}
        for n, raw in enumerate(text.splitlines(), 1):
            if raw.strip():
                try:
                    data.append(json.loads(raw))
                except ValueError as e:
                    raise SpecError(
                        path, f"[{len(data)}]", f"one JSON value per line ({e})", n
                    ) from None
                lines[f"[{len(data) - 1}]"] = n
        return Doc(path, data, lines)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        problem = getattr(e, "problem", None) or str(e)
        raise SpecError(
            path, "(yaml)", f"valid YAML ({problem})", mark.line + 1 if mark else None
        ) from None
    lines: dict[str, int] = {}
    if node is not None:
        _walk_lines(node, "", lines)
    return Doc(path, data, lines)


# ---------------------------------------------------------------------------------------------
# Typed access to one mapping of the spec, with unknown-key detection

_MISSING: Any = object()
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def describe(v: Any) -> str:
    """A value as an error message shows it: its kind for containers, its repr otherwise."""
    if isinstance(v, dict):
        return "a mapping"
    if isinstance(v, list):
        return "a list"
    return repr(v)


class Map:
    """One mapping of a spec at dotted ``key``: unknown keys are errors (with a "did you mean"),
    and each accessor checks a key's type and range, naming file, key and line when it fails."""

    def __init__(self, doc: Doc, key: str, value: Any, allowed: tuple[str, ...]):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise doc.error(key, f"a mapping, got {describe(value)}")
        self.doc, self.key, self.data, self.allowed = doc, key, value, allowed
        for k in value:
            if k not in allowed:
                hint = difflib.get_close_matches(str(k), allowed, n=1)
                more = f" (did you mean '{hint[0]}'?)" if hint else ""
                raise doc.error(
                    self.k(str(k)), f"unknown key{more}; allowed here: {', '.join(allowed)}"
                )

    def k(self, name: str) -> str:
        return f"{self.key}.{name}" if self.key else name

    def err(self, name: str, expected: str) -> SpecError:
        return self.doc.error(self.k(name), expected)

    def has(self, name: str) -> bool:
        return self.data.get(name) is not None

    def is_null(self, name: str) -> bool:
        """Given explicitly as null (``key: null`` or ``key:``), which some keys use for "off"."""
        return name in self.data and self.data[name] is None

    def raw(self, name: str, default: Any = None) -> Any:
        v = self.data.get(name)
        return default if v is None else v

    def sub(self, name: str, allowed: tuple[str, ...]) -> Map:
        return Map(self.doc, self.k(name), self.data.get(name), allowed)

    def str(
        self, name: str, default: Any = _MISSING, choices: tuple[str, ...] | None = None
    ) -> Any:
        v = self.data.get(name)
        if v is None:
            if default is _MISSING:
                raise self.err(
                    name,
                    "required" + (f": one of {', '.join(choices)}" if choices else " (a string)"),
                )
            return default
        if choices is not None:
            if v not in choices:
                hint = difflib.get_close_matches(str(v), choices, n=1)
                more = f" (did you mean '{hint[0]}'?)" if hint else ""
                raise self.err(name, f"one of {', '.join(choices)}; got {v!r}{more}")
            return v
        if not isinstance(v, str) or not v.strip():
            raise self.err(name, f"a non-empty string, got {describe(v)}")
        return v

    def int(
        self, name: str, default: Any = _MISSING, lo: int | None = None, hi: int | None = None
    ) -> Any:
        v = self.data.get(name)
        if v is None:
            if default is _MISSING:
                raise self.err(name, "required (an integer)")
            return default
        if isinstance(v, bool) or not isinstance(v, int):
            raise self.err(name, f"an integer, got {describe(v)}")
        self._range(name, v, lo, hi)
        return v

    def float(
        self,
        name: str,
        default: Any = _MISSING,
        lo: float | None = None,
        hi: float | None = None,
        lo_open: bool = False,
        hi_open: bool = False,
    ) -> Any:
        v = self.data.get(name)
        if v is None:
            if default is _MISSING:
                raise self.err(name, "required (a number)")
            return default
        # PyYAML reads "1e-4" (no dot) as a string: accept numeric strings.
        if isinstance(v, str) and _NUMBER.match(v.strip()):
            v = float(v)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise self.err(name, f"a number, got {describe(v)}")
        v = float(v)
        if (lo is not None and (v < lo or (lo_open and v == lo))) or (
            hi is not None and (v > hi or (hi_open and v == hi))
        ):
            raise self.err(
                name,
                f"a number in {'(' if lo_open else '['}{_g(lo)}, {_g(hi)}{')' if hi_open else ']'}, got {v:g}",
            )
        return v

    def bool(self, name: str, default: bool) -> bool:
        v = self.data.get(name)
        if v is None:
            return default
        if not isinstance(v, bool):
            raise self.err(name, f"true or false, got {describe(v)}")
        return v

    def _range(self, name: str, v: float, lo: float | None, hi: float | None) -> None:
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            if hi is None:
                raise self.err(name, f"a value >= {lo}, got {v}")
            if lo is None:
                raise self.err(name, f"a value <= {hi}, got {v}")
            raise self.err(name, f"a value in [{lo}, {hi}], got {v}")


def _g(x: float | None) -> str:
    return "inf" if x is None else f"{x:g}"


def resolve_path(base: Path, value: str) -> Path:
    """``value`` as an absolute path; a relative one is relative to ``base`` (the spec's dir)."""
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base / p).resolve()


def looks_like_path(value: str) -> bool:
    """Whether a model name is a filesystem path (resolved) rather than a registry or hub name."""
    return value.startswith(("./", "../", "/", "~")) or value in (".", "..")
