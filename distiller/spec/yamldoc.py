"""Reading spec files: YAML (or JSONL) with the line of every dotted key, and typed access to
one mapping that names file, key, expectation and line in every error.

Every file a spec names (the spec, prompts, few-shot and JSON schema files) is read here, by
``read_doc``, with the same refusals: not a regular file, not UTF-8 (the byte's line), a key
given twice in one mapping (both lines), nesting deeper than ``MAX_DEPTH``, aliases that
repeat more than ``MAX_ALIAS_NODES`` values in all or that sit inside their own anchor, and
strings with lone surrogates. Anchors, aliases and ``<<`` merge keys are otherwise allowed.
"""

from __future__ import annotations

import difflib
import json
import math
import os
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


# Limits that no real spec comes near, so that hostile YAML is refused at once instead of
# hanging or crashing the loader: nesting depth (the composer recurses per level), and how many
# nodes aliases may add in all (each *alias copies its anchor's whole value: anchors of anchors
# grow exponentially, the "billion laughs").
MAX_DEPTH = 64
MAX_ALIAS_NODES = 10_000

_MERGE_TAG = "tag:yaml.org,2002:merge"


# "\ud800" escapes (YAML double quotes, JSON) make strings no file, path or model can take.
LONE_SURROGATE = "text without lone surrogates (an escape like \\ud800 alone is not a character)"


def encodes(text: str) -> bool:
    """Whether ``text`` is real Unicode text (no lone surrogates), writable as UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class _Refused(yaml.YAMLError):
    """YAML that parses but that a spec file refuses: ``expected`` says what was wanted."""

    def __init__(self, expected: str, mark: yaml.Mark | None):
        super().__init__(expected)
        self.expected, self.mark = expected, mark


class _SpecLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` composing a bounded node graph: nesting at most ``MAX_DEPTH``
    levels, aliases adding at most ``MAX_ALIAS_NODES`` nodes, no alias inside its own anchor's
    value (a cycle). Sizes and heights are kept per node, so each check is O(1) per alias."""

    def __init__(self, text: str):
        super().__init__(text)
        self._depth = 0
        self._alias_nodes = 0
        self._open_anchors: set[str] = set()  # anchors whose value is still being composed
        self._size: dict[int, int] = {}  # id(node) -> nodes in its expanded value
        self._height: dict[int, int] = {}  # id(node) -> nesting levels of its expanded value

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            if event.anchor in self._open_anchors:
                raise _Refused(
                    f"no alias *{event.anchor} inside the value of &{event.anchor} "
                    "(a value that contains itself)",
                    event.start_mark,
                )
            node = super().compose_node(parent, index)  # the anchored node (or undefined alias)
            self._alias_nodes += self._size[id(node)]
            if self._alias_nodes > MAX_ALIAS_NODES:
                raise _Refused(
                    f"aliases (*name) that repeat at most {MAX_ALIAS_NODES} values in all; "
                    f"*{event.anchor} brings the total to {self._alias_nodes} (anchors built "
                    "from anchors multiply: write the values out)",
                    event.start_mark,
                )
            if self._depth + self._height[id(node)] > MAX_DEPTH:
                raise _Refused(f"at most {MAX_DEPTH} levels of nesting", event.start_mark)
            return node
        event = self.peek_event()
        if self._depth >= MAX_DEPTH:
            raise _Refused(f"at most {MAX_DEPTH} levels of nesting", event.start_mark)
        anchor = getattr(event, "anchor", None)
        if anchor is not None:
            self._open_anchors.add(anchor)
        self._depth += 1
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
            self._open_anchors.discard(anchor)
        children = _children(node)
        self._size[id(node)] = 1 + sum(self._size[id(c)] for c in children)
        self._height[id(node)] = 1 + max((self._height[id(c)] for c in children), default=0)
        return node

    def construct_scalar(self, node: yaml.Node) -> Any:
        value = super().construct_scalar(node)
        if isinstance(value, str) and not encodes(value):
            raise _Refused(LONE_SURROGATE, node.start_mark)
        return value

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        # A scalar YAML resolves that Python cannot build: a date like 2024-13-01, an integer
        # of thousands of digits.
        try:
            return super().construct_object(node, deep)
        except (ValueError, OverflowError) as e:
            why = str(e).split(";")[0]  # Python's advice on its int limit is not the user's
            raise _Refused(
                f"a value that can be read ({why}; quote it to keep it as text)", node.start_mark
            ) from None


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _walk_lines(
    node: yaml.Node, prefix: str, out: dict[str, int], loader: _SpecLoader, path: Path
) -> None:
    """Record the line of every dotted key under ``node``; a key given twice in one mapping is
    an error naming both lines (YAML itself would silently keep the last value)."""
    if isinstance(node, yaml.MappingNode):
        here: dict[str, int] = {}
        merged: list[yaml.Node] = []
        for k, v in node.value:
            if k.tag == _MERGE_TAG:  # `<<: *base` brings base's keys in; explicit keys win
                merged += v.value if isinstance(v, yaml.SequenceNode) else [v]
                continue
            name = _key_name(k, loader)
            key = f"{prefix}.{name}" if prefix else name
            line = k.start_mark.line + 1
            if name in here:
                raise SpecError(
                    path, key or repr(name), f"given twice (first at line {here[name]})", line
                )
            here[name] = line
            out.setdefault(key, line)
            _walk_lines(v, key, out, loader, path)
        for m in merged:
            _walk_lines(m, prefix, out, loader, path)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            key = f"{prefix}[{i}]"
            out.setdefault(key, item.start_mark.line + 1)
            _walk_lines(item, key, out, loader, path)


def _key_name(node: yaml.Node, loader: _SpecLoader) -> str:
    # The key as the loaded data spells it: YAML turns an unquoted `false:` key into False.
    if isinstance(node, yaml.ScalarNode):
        return str(loader.construct_object(node))
    return str(node.value)


def _json_depth_ok(value: Any) -> bool:
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if depth > MAX_DEPTH:
            return False
        if isinstance(v, dict):
            stack += [(x, depth + 1) for x in v.values()]
        elif isinstance(v, list):
            stack += [(x, depth + 1) for x in v]
    return True


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"key {k!r} is given twice")
        out[k] = v
    return out


def read_text(path: Path, what: str) -> str:
    """The file's text; a missing, special (FIFO, device) or non-UTF-8 file is a SpecError."""
    try:
        if not path.is_file():
            if path.exists():
                raise SpecError(path, "(file)", f"a regular file as the {what}")
            if os.path.lexists(path):
                raise SpecError(
                    path,
                    "(file)",
                    f"an existing {what} (a symlink that leads nowhere: dangling or a loop)",
                )
            raise SpecError(path, "(file)", f"an existing {what}")
        data = path.read_bytes()
    except OSError as e:  # unreadable, a symlink loop
        raise SpecError(path, "(file)", f"a readable {what} ({e.strerror or e})") from None
    return decode_utf8(data, path)


def decode_utf8(data: bytes, source: str | Path) -> str:
    """``data`` as text; bytes that are not UTF-8 are a SpecError naming ``source`` and line."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise SpecError(
            source, "(file)", f"UTF-8 text; byte 0x{data[e.start]:02x} is not UTF-8", line
        ) from None


def read_doc(path: Path, *, what: str = "file") -> Doc:
    """Parse a YAML file (or a JSONL one, one value per line); ``what`` names it in errors."""
    text = read_text(path, what)
    if path.suffix == ".jsonl":
        return _read_jsonl(path, text)
    loader = _SpecLoader(text)
    lines: dict[str, int] = {}
    try:
        node = loader.get_single_node()
        if node is not None:
            _walk_lines(node, "", lines, loader, path)
        data = loader.construct_document(node) if node is not None else None
    except _Refused as e:
        raise SpecError(path, "(yaml)", e.expected, e.mark.line + 1 if e.mark else None) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        problem = getattr(e, "problem", None) or str(e)
        if getattr(
            e, "context", None
        ):  # "while parsing a flow sequence", "expected a single document"
            problem = f"{e.context}, {problem}"
        raise SpecError(
            path, "(yaml)", f"valid YAML ({problem})", mark.line + 1 if mark else None
        ) from None
    finally:
        loader.dispose()
    return Doc(path, data, lines)


def _read_jsonl(path: Path, text: str) -> Doc:
    data: list[Any] = []
    lines: dict[str, int] = {}
    # Only "\n" ends a JSONL line: str.splitlines() would also break at U+2028 and other
    # characters that are valid inside a JSON string, misnumbering or breaking good lines.
    for n, raw in enumerate(text.split("\n"), 1):
        if not raw.strip():
            continue
        key = f"[{len(data)}]"
        try:
            value = json.loads(raw, object_pairs_hook=_unique_keys)
        except (ValueError, RecursionError) as e:
            raise SpecError(path, key, f"one JSON value per line ({e})", n) from None
        if not _json_depth_ok(value):
            raise SpecError(path, key, f"at most {MAX_DEPTH} levels of nesting", n)
        if "\\u" in raw and not encodes(json.dumps(value, ensure_ascii=False)):
            raise SpecError(path, key, LONE_SURROGATE, n)
        data.append(value)
        lines[key] = n
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


def resolve_path(base: Path, value: str | Path) -> Path:
    """``value`` as an absolute path; a relative one is relative to ``base`` (the spec's dir)."""
    p = Path(value).expanduser()
    return p if p.is_absolute() else real_path(base / p)


def real_path(path: Path) -> Path:
    """``path`` with its symlinks resolved; where they do not resolve (a loop), the absolute
    path as given, so that reading it reports the OS error against that path."""
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # RuntimeError: Python < 3.13 on a symlink loop
        return Path(os.path.abspath(path))


def looks_like_path(value: str) -> bool:
    """Whether a model name is a filesystem path (resolved) rather than a registry or hub name."""
    return value.startswith(("./", "../", "/", "~")) or value in (".", "..")
