"""Prompts sections: a file, an inline list or ``{file | items, template, field, vary}``."""

from __future__ import annotations

import hashlib
import itertools
import string
from pathlib import Path
from typing import Any

from distiller.spec.schema import Prompt
from distiller.spec.yamldoc import Doc, Map, describe, read_doc, real_path, resolve_path

_RESERVED = ("id", "label", "reference", "meta")
_PROMPTS_KEYS = ("file", "items", "template", "field", "vary")


def norm_text(text: str) -> str:
    """Text as the duplicate and held-out checks compare it: whitespace collapsed, case folded."""
    return " ".join(text.split()).casefold()


def template_fields(template: str) -> list[str]:
    """The field names of a template already passed by ``check_template``."""
    return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]


def check_template(doc: Doc, key: str, template: str) -> None:
    """Templates take plain ``{field}`` placeholders only (``{{`` and ``}}`` for braces):
    attribute access, indexing, conversions and format specs would run code on the entry's
    values (``{text.upper}`` writes a method's repr, with its memory address, into the prompt)."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise doc.error(
            key, f"a template with {{field}} placeholders ({e}; write {{{{ or }}}} for a brace)"
        ) from None
    for _, name, format_spec, conversion in parsed:
        if name is None:
            continue
        placeholder = (
            "{" + name + (f"!{conversion}" if conversion else "")
            + (f":{format_spec}" if format_spec else "") + "}"
        )  # fmt: skip
        if not name.isidentifier() or conversion or format_spec:
            raise doc.error(
                key,
                f"plain {{field}} placeholders (a field name: no attribute, index, conversion "
                f"or format), got {placeholder}",
            )


def load_prompts(
    value: Any,
    base: Path,
    doc: Doc,
    key: str,
    inherit_template: str | None = None,
    inherit_field: str = "text",
    origins: dict[str, tuple[Doc, str]] | None = None,
) -> tuple[Prompt, ...]:
    """Parse one prompts section (its format: the ``distiller.spec`` docstring).

    Errors point at ``doc``/``key``, or at the prompts file's own lines for its entries.
    ``origins``, when given, is filled with prompt id -> (the document, the entry's key), so
    that checks made later (a gold answer, a label) can name the entry's own file and line.
    """
    template, fld, vary = inherit_template, inherit_field, {}
    src_doc, src_key, entries = doc, key, None
    if isinstance(value, str):
        src_doc = read_doc(resolve_path(base, value), what="prompts file")
        src_key, entries = "", src_doc.data
    elif isinstance(value, list):
        entries = value
    else:
        m = Map(doc, key, value, _PROMPTS_KEYS)
        if m.has("file") == m.has("items"):
            raise doc.error(
                key, "exactly one of 'file' (a YAML/JSONL list) or 'items' (an inline list)"
            )
        if "template" in m.data:  # explicit null opts out of an inherited template
            template = m.data["template"]
            if template is not None and (not isinstance(template, str) or not template.strip()):
                raise m.err(
                    "template", f"a string with {{field}} placeholders, got {describe(template)}"
                )
        fld = m.str("field", inherit_field)
        vm = m.raw("vary", {})
        if not isinstance(vm, dict):
            raise m.err("vary", "a mapping of field -> list of values")
        for vk, vv in vm.items():
            if not isinstance(vv, list) or not vv:
                raise m.err(f"vary.{vk}", "a non-empty list of values")
        vary = vm
        if m.has("file"):
            src_doc = read_doc(resolve_path(base, m.str("file")), what="prompts file")
            src_key, entries = "", src_doc.data
        else:
            src_key, entries = m.k("items"), m.raw("items")
    if template is not None:
        check_template(doc, f"{key}.template", template)
    if not isinstance(entries, list) or not entries:
        raise src_doc.error(src_key, f"a non-empty list of prompt entries, got {describe(entries)}")

    prompts: list[Prompt] = []
    seen_text: dict[str, str] = {}
    seen_id: dict[str, str] = {}
    combos = (
        [dict(zip(vary, vals, strict=True)) for vals in itertools.product(*vary.values())]
        if vary
        else [{}]
    )
    for i, entry in enumerate(entries):
        ekey = f"{src_key}[{i}]"
        if isinstance(entry, str):
            fields: dict[str, Any] = {fld: entry}
            pid = label = reference = None
            meta: dict[str, Any] = {}
        elif isinstance(entry, dict):
            fields = {str(k): v for k, v in entry.items() if k not in _RESERVED}
            pid, label, reference = entry.get("id"), entry.get("label"), entry.get("reference")
            meta = entry.get("meta") or {}
            if not isinstance(meta, dict):
                raise src_doc.error(f"{ekey}.meta", "a mapping")
            if pid is not None and not isinstance(pid, (str, int)):
                raise src_doc.error(f"{ekey}.id", f"a string, got {describe(pid)}")
            if isinstance(label, bool):  # YAML 1.1 turns unquoted yes/no/on/off into booleans
                raise src_doc.error(
                    f"{ekey}.label", f"a string (quote {label!r}-like words: 'yes', 'no')"
                )
            if label is not None and not isinstance(label, (str, int)):
                raise src_doc.error(f"{ekey}.label", f"a string, got {describe(label)}")
        else:
            raise src_doc.error(ekey, f"a string or a mapping, got {describe(entry)}")
        for combo in combos:
            f = {**combo, **fields}
            if template is None:
                text = f.get(fld)
                if not isinstance(text, str):
                    raise src_doc.error(ekey, f"a '{fld}' string (no template is set)")
            else:
                for name in template_fields(template):
                    if name not in f:
                        raise src_doc.error(ekey, f"field {name!r} used by {key}.template")
                    if not isinstance(f[name], (str, int, float)) or isinstance(f[name], bool):
                        raise src_doc.error(
                            f"{ekey}.{name}",
                            f"a string or number for {key}.template, got {describe(f[name])}",
                        )
                text = template.format_map(f)
            text = text.strip()
            if not text:
                raise src_doc.error(ekey, "a non-empty prompt text")
            norm = norm_text(text)
            if norm in seen_text:
                raise src_doc.error(ekey, f"a distinct prompt; same text as {seen_text[norm]}")
            seen_text[norm] = ekey
            if pid is None:
                this_id = "p-" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]
            elif combo:
                this_id = f"{pid}[" + ",".join(f"{k}={v}" for k, v in combo.items()) + "]"
            else:
                this_id = str(pid)
            if this_id in seen_id:
                raise src_doc.error(
                    f"{ekey}.id", f"a unique id; '{this_id}' is also used by {seen_id[this_id]}"
                )
            seen_id[this_id] = ekey
            if origins is not None:
                origins[this_id] = (src_doc, ekey)
            prompts.append(
                Prompt(
                    id=this_id,
                    text=text,
                    label=None if label is None else str(label),
                    reference=reference,
                    meta={**f, **meta},
                )
            )
    return tuple(prompts)


def read_prompts(
    path: str | Path, template: str | None = None, field: str = "text"
) -> tuple[Prompt, ...]:
    """Prompts from a YAML/JSONL list outside any spec (an extra eval set, say); same rules."""
    path = real_path(Path(path).expanduser())
    value = {"file": str(path), "template": template, "field": field}
    return load_prompts(value, path.parent, Doc(path, value, {}), "prompts")
