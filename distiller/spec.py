"""Task specs: one YAML file describes a distillation task end to end.

``load_spec(path)`` reads and validates the file and returns a frozen ``TaskSpec``. Every
problem raises ``distiller.errors.SpecError`` naming the file, the dotted key
(``student.lora.rank``), what was expected and the YAML line. Unknown keys are errors (with a
"did you mean"). Relative file paths resolve against the spec's directory. A minimal spec::

    name: my_task
    prompts: {file: my_task/curriculum.yaml, template: "Explain: {text}"}
    teacher: {model: smollm2-135m-instruct}
    validators: [{type: regex, must_match: ["^ANSWER:"]}]

Everything else has a default; see the dataclasses below for each section's keys.

Prompts (``prompts:``, each of ``eval.prompt_sets``, and ``eval.dev``) are a file path, an
inline list, or a mapping ``{file | items, template, field, vary}``. Entries are strings or
mappings. A string entry is exposed to the template as ``{<field>}`` (``field`` defaults to
``text``); a mapping entry's keys are all template fields, except the reserved ``id``,
``label``, ``reference`` and ``meta``.
Without a template the entry's ``<field>`` is the prompt. ``vary: {k: [v1, v2]}`` expands every
entry once per combination of values (a product). Ids are given (``id``) or a hash of the text.
Prompt sets given as a bare path inherit the main template; give ``template: null`` to opt out.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import itertools
import json
import math
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from distiller.decoding import GREEDY, Decoding
from distiller.errors import SpecError
from distiller.hashing import stable_hash

__all__ = [
    "DPOSpec",
    "Decoding",
    "DropLayersSpec",
    "EndpointSpec",
    "EvalSpec",
    "FewShot",
    "KDSpec",
    "LoraSpec",
    "Prompt",
    "QuantizeSpec",
    "SplitSpec",
    "StudentSpec",
    "TaskSpec",
    "TeacherSpec",
    "TrainSpec",
    "ValidatorSpec",
    "load_spec",
    "read_prompts",
    "stable_hash",
]

LORA_KEYS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ROUTES = ("sft", "seq-kd", "logit-kd", "dpo")


# ---------------------------------------------------------------------------------------------
# Dataclasses


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str  # the bare user prompt, after template expansion
    label: str | None = None  # class label (classification tasks; stratified splits)
    reference: Any = None  # optional expected answer (a string, or a JSON value)
    meta: dict[str, Any] = field(default_factory=dict, hash=False)  # the entry's other fields


class FewShot(NamedTuple):
    user: str
    assistant: str


# The teacher samples by default (rejection sampling needs distinct draws); evaluation is greedy.
TEACHER_DECODING = Decoding(temperature=0.7, seed=0)


@dataclass(frozen=True)
class EndpointSpec:
    """An OpenAI-compatible chat completions server."""

    url: str
    model: str
    api_key_env: str | None = None  # the NAME of the env var holding the key, never the key
    timeout_s: float = 120.0
    max_concurrency: int = 4
    max_retries: int = 3


@dataclass(frozen=True)
class TeacherSpec:
    model: str | None = None  # registry name, model dir (resolved) or hub id; or ...
    endpoint: EndpointSpec | None = None  # ... a server (exactly one of the two)
    system_prompt: str | None = None
    few_shot: tuple[FewShot, ...] = ()
    decoding: Decoding = TEACHER_DECODING
    samples_per_prompt: int = 1  # rejection-sampling budget N per prompt
    keep: str = "first"  # "first" passing sample, or "best" by validator score
    batch_size: int = 8


@dataclass(frozen=True)
class ValidatorSpec:
    type: str
    params: dict[str, Any] = field(default_factory=dict, hash=False)  # defaults filled in


@dataclass(frozen=True)
class LoraSpec:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    layers: int | str = "all"  # how many layers from the top, or "all"
    keys: tuple[str, ...] = LORA_KEYS


@dataclass(frozen=True)
class TrainSpec:
    iters: int | None = 200  # exactly one of iters / epochs is set
    epochs: float | None = None
    batch_size: int = 4
    learning_rate: float = 1e-4
    schedule: str = "cosine"  # constant | cosine | linear
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0  # max global grad norm; None = off
    max_seq_length: int = 512
    steps_per_eval: int = 50
    early_stopping_patience: int | None = None  # evals without improvement; None = off
    checkpoint_every: int = 100
    seed: int = 0
    # The adapter that is the result: "best" (lowest validation loss) or "last" (final step).
    keep: str = "best"


@dataclass(frozen=True)
class KDSpec:
    """loss = alpha * CE(labels) + beta * divergence(teacher, student) + gamma * hidden MSE."""

    alpha: float = 0.5
    beta: float = 0.5
    gamma: float = 0.0
    temperature: float = 2.0
    divergence: str = "kl"  # kl | reverse_kl | jsd
    layer_map: str | tuple[tuple[int, int], ...] = "auto"  # or ((student, teacher), ...)


@dataclass(frozen=True)
class DropLayersSpec:
    """Make the student from the teacher by keeping a subset of its layers."""

    keep_every: int | None = None  # keep layers 0, k, 2k, ... and always the last one
    keep: tuple[int, ...] | None = None  # or these layer indices

    def layers_to_keep(self, n_layers: int) -> list[int]:
        if self.keep is not None:
            bad = [i for i in self.keep if i >= n_layers]
            if bad:
                raise ValueError(
                    f"drop_layers.keep: layers {bad} do not exist (model has {n_layers})"
                )
            return sorted(self.keep)
        kept = set(range(0, n_layers, self.keep_every or 1)) | {n_layers - 1}
        return sorted(kept)


@dataclass(frozen=True)
class DPOSpec:
    beta: float = 0.1


@dataclass(frozen=True)
class QuantizeSpec:
    bits: int = 4
    group_size: int = 64


@dataclass(frozen=True)
class StudentSpec:
    model: str
    route: str = "sft"  # sft | seq-kd | logit-kd | dpo
    prompt_style: str = "bare"  # bare: the student sees only the prompt | scaffold: as the teacher
    lora: LoraSpec | None = LoraSpec()  # None iff full_finetune
    full_finetune: bool = False
    train: TrainSpec = TrainSpec()
    kd: KDSpec | None = None  # set iff route == "logit-kd"
    drop_layers: DropLayersSpec | None = None
    dpo: DPOSpec | None = None  # set iff route == "dpo"
    quantize: QuantizeSpec | None = None


@dataclass(frozen=True)
class SplitSpec:
    train: float = 0.7
    valid: float = 0.1
    test: float = 0.2
    seed: int = 0
    stratify_by: str | None = None  # "label"


@dataclass(frozen=True)
class EvalSpec:
    # Greedy, the same for every model evaluated (and for latency): YAML keys eval.max_tokens,
    # eval.no_repeat_ngram, eval.repetition_penalty, eval.stop.
    decoding: Decoding = GREEDY
    thresholds: dict[str, float] = field(default_factory=dict, hash=False)
    prompt_sets: dict[str, tuple[Prompt, ...]] = field(default_factory=dict, hash=False)
    batch_size: int = 8
    # Prompts for choosing settings (decoding, training): evaluated only when asked for
    # (``distiller eval --prompts dev``), never in reports or gates, never trained on.
    dev: tuple[Prompt, ...] = field(default=(), hash=False)


@dataclass(frozen=True)
class TaskSpec:
    name: str
    description: str
    path: Path
    prompts: tuple[Prompt, ...]
    teacher: TeacherSpec
    validators: tuple[ValidatorSpec, ...]
    student: StudentSpec
    split: SplitSpec
    eval: EvalSpec

    @property
    def labels(self) -> list[str]:
        """Sorted distinct prompt labels (empty for unlabeled tasks)."""
        return sorted({p.label for p in self.prompts if p.label is not None})

    def fingerprint(self, *parts: Any) -> str:
        """``stable_hash`` of ``parts``; with none, of the whole spec except path/description.

        Stages key their caches on the pieces that determine their output, e.g.
        ``spec.fingerprint(spec.teacher, prompt.text)``.
        """
        if parts:
            return stable_hash(list(parts))
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d.pop("path"), d.pop("description")
        return stable_hash(d)


# ---------------------------------------------------------------------------------------------
# YAML with line numbers


class _Doc:
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


def _read_doc(path: Path, *, what: str = "file") -> _Doc:
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
        return _Doc(path, data, lines)
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
    return _Doc(path, data, lines)


# ---------------------------------------------------------------------------------------------
# Typed access to one mapping of the spec, with unknown-key detection

_MISSING: Any = object()
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _describe(v: Any) -> str:
    if isinstance(v, dict):
        return "a mapping"
    if isinstance(v, list):
        return "a list"
    return repr(v)


class _Map:
    def __init__(self, doc: _Doc, key: str, value: Any, allowed: tuple[str, ...]):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise doc.error(key, f"a mapping, got {_describe(value)}")
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

    def sub(self, name: str, allowed: tuple[str, ...]) -> _Map:
        return _Map(self.doc, self.k(name), self.data.get(name), allowed)

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
            raise self.err(name, f"a non-empty string, got {_describe(v)}")
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
            raise self.err(name, f"an integer, got {_describe(v)}")
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
            raise self.err(name, f"a number, got {_describe(v)}")
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
            raise self.err(name, f"true or false, got {_describe(v)}")
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


def _resolve(base: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base / p).resolve()


def _looks_like_path(value: str) -> bool:
    return value.startswith(("./", "../", "/", "~")) or value in (".", "..")


# ---------------------------------------------------------------------------------------------
# Prompts

_RESERVED = ("id", "label", "reference", "meta")
_PROMPTS_KEYS = ("file", "items", "template", "field", "vary")


def _norm_text(text: str) -> str:
    return " ".join(text.split()).casefold()


def _load_prompts(
    value: Any,
    base: Path,
    doc: _Doc,
    key: str,
    inherit_template: str | None = None,
    inherit_field: str = "text",
) -> tuple[Prompt, ...]:
    """Parse one prompts section (see the module docstring); errors point at ``doc``/``key``."""
    template, fld, vary = inherit_template, inherit_field, {}
    src_doc, src_key, entries = doc, key, None
    if isinstance(value, str):
        src_doc = _read_doc(_resolve(base, value), what="prompts file")
        src_key, entries = "", src_doc.data
    elif isinstance(value, list):
        entries = value
    else:
        m = _Map(doc, key, value, _PROMPTS_KEYS)
        if m.has("file") == m.has("items"):
            raise doc.error(
                key, "exactly one of 'file' (a YAML/JSONL list) or 'items' (an inline list)"
            )
        if "template" in m.data:  # explicit null opts out of an inherited template
            template = m.data["template"]
            if template is not None and (not isinstance(template, str) or not template.strip()):
                raise m.err(
                    "template", f"a string with {{field}} placeholders, got {_describe(template)}"
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
            src_doc = _read_doc(_resolve(base, m.str("file")), what="prompts file")
            src_key, entries = "", src_doc.data
        else:
            src_key, entries = m.k("items"), m.raw("items")
    if template is not None:
        try:
            list(string.Formatter().parse(template))
        except ValueError as e:
            raise doc.error(f"{key}.template", f"a valid format string ({e})") from None
    if not isinstance(entries, list) or not entries:
        raise src_doc.error(
            src_key, f"a non-empty list of prompt entries, got {_describe(entries)}"
        )

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
                raise src_doc.error(f"{ekey}.id", f"a string, got {_describe(pid)}")
            if isinstance(label, bool):  # YAML 1.1 turns unquoted yes/no/on/off into booleans
                raise src_doc.error(
                    f"{ekey}.label", f"a string (quote {label!r}-like words: 'yes', 'no')"
                )
            if label is not None and not isinstance(label, (str, int)):
                raise src_doc.error(f"{ekey}.label", f"a string, got {_describe(label)}")
        else:
            raise src_doc.error(ekey, f"a string or a mapping, got {_describe(entry)}")
        for combo in combos:
            f = {**combo, **fields}
            if template is None:
                text = f.get(fld)
                if not isinstance(text, str):
                    raise src_doc.error(ekey, f"a '{fld}' string (no template is set)")
            else:
                try:
                    text = template.format_map(f)
                except KeyError as e:
                    raise src_doc.error(
                        ekey, f"field {e.args[0]!r} used by {key}.template"
                    ) from None
                except (ValueError, IndexError, AttributeError) as e:
                    raise doc.error(f"{key}.template", f"a valid format string ({e})") from None
            text = text.strip()
            if not text:
                raise src_doc.error(ekey, "a non-empty prompt text")
            norm = _norm_text(text)
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
    path = Path(path).expanduser().resolve()
    value = {"file": str(path), "template": template, "field": field}
    return _load_prompts(value, path.parent, _Doc(path, value, {}), "prompts")


# ---------------------------------------------------------------------------------------------
# Sections

_TOP = ("name", "description", "prompts", "teacher", "validators", "student", "split", "eval")


def _teacher(m: _Map, base: Path) -> TeacherSpec:
    model = endpoint = None
    if m.has("model") == m.has("endpoint"):
        raise m.doc.error(m.key, "exactly one of 'model' (local) or 'endpoint' (a server)")
    if m.has("model"):
        model = m.str("model")
        if _looks_like_path(model):
            model = str(_resolve(base, model))
    else:
        e = m.sub(
            "endpoint",
            (
                "url",
                "model",
                "api_key_env",
                "api_key",
                "timeout_s",
                "max_concurrency",
                "max_retries",
            ),
        )
        if "api_key" in e.data:
            raise e.err(
                "api_key",
                "not a key in a spec file: put the NAME of an environment variable in api_key_env",
            )
        url = e.str("url")
        if not re.match(r"^https?://", url):
            raise e.err("url", f"an http:// or https:// URL, got {url!r}")
        env = e.raw("api_key_env")
        if env is not None and (
            not isinstance(env, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", env)
        ):
            raise e.err(
                "api_key_env", f"an environment variable name like OPENAI_API_KEY, got {env!r}"
            )
        endpoint = EndpointSpec(
            url=url,
            model=e.str("model"),
            api_key_env=env,
            timeout_s=e.float("timeout_s", 120.0, lo=0, lo_open=True),
            max_concurrency=e.int("max_concurrency", 4, lo=1),
            max_retries=e.int("max_retries", 3, lo=0),
        )
    d = m.sub("decoding", (
        "temperature", "top_p", "max_tokens", "seed", "no_repeat_ngram", "repetition_penalty", "stop",
    ))  # fmt: skip
    # An explicit `seed: null` means unseeded sampling; a missing seed means 0.
    seed = None if d.is_null("seed") else d.int("seed", 0, lo=0)
    decoding = Decoding(
        temperature=d.float("temperature", TEACHER_DECODING.temperature, lo=0),
        top_p=d.float("top_p", 1.0, lo=0, hi=1, lo_open=True),
        max_tokens=d.int("max_tokens", 256, lo=1),
        seed=seed,
        **_logit_shaping(d),
    )
    if endpoint is not None and decoding.no_repeat_ngram:
        raise d.err(
            "no_repeat_ngram",
            "0 with an endpoint teacher (the OpenAI chat API has no such parameter; "
            "it works with a local teacher model)",
        )
    system_prompt = m.raw("system_prompt")
    if system_prompt is not None and not isinstance(system_prompt, str):
        raise m.err("system_prompt", f"a string, got {_describe(system_prompt)}")
    few_shot = _few_shot(m, base)
    return TeacherSpec(
        model=model,
        endpoint=endpoint,
        system_prompt=system_prompt.strip() if system_prompt else None,
        few_shot=few_shot,
        decoding=decoding,
        samples_per_prompt=m.int("samples_per_prompt", 1, lo=1),
        keep=m.str("keep", "first", choices=("first", "best")),
        batch_size=m.int("batch_size", 8, lo=1),
    )


def _few_shot(m: _Map, base: Path) -> tuple[FewShot, ...]:
    value, doc, key = m.raw("few_shot", []), m.doc, m.k("few_shot")
    if isinstance(value, str):
        doc = _read_doc(_resolve(base, value), what="few-shot file")
        value, key = doc.data, ""
    if not isinstance(value, list):
        raise doc.error(key, "a list of {user, assistant} mappings, or a file holding one")
    out = []
    for i, ex in enumerate(value):
        em = _Map(doc, f"{key}[{i}]", ex, ("user", "assistant"))
        out.append(FewShot(em.str("user").strip(), em.str("assistant").strip()))
    return tuple(out)


def _validators(
    doc: _Doc, value: Any, base: Path, prompts: tuple[Prompt, ...]
) -> tuple[ValidatorSpec, ...]:
    from distiller import validators as V

    if value is None:
        return ()
    if not isinstance(value, list):
        raise doc.error("validators", "a list of {type: ..., <params>} mappings")
    specs = []
    for i, entry in enumerate(value):
        key = f"validators[{i}]"
        if not isinstance(entry, dict) or "type" not in entry:
            raise doc.error(key, f"a mapping with a 'type' (one of {', '.join(V.VALIDATOR_TYPES)})")
        type_ = entry["type"]
        params = {k: v for k, v in entry.items() if k != "type"}
        if type_ == "json_schema" and isinstance(params.get("schema_file"), str):
            params["schema_file"] = str(_resolve(base, params["schema_file"]))
        if (
            type_ == "label"
            and params.get("labels") is None
            and prompts
            and all(p.label for p in prompts)
        ):
            params["labels"] = sorted(
                {p.label for p in prompts}
            )  # default: the curriculum's labels
        try:
            params = V.check_params(str(type_), params)
        except V.ParamError as e:
            k = key if e.key == "type" and "type" not in params else f"{key}.{e.key}"
            raise doc.error(k, e.expected) from None
        if type_ == "json_schema":
            params.pop("schema_file")  # loaded into 'schema': hashes by content, not by path
        specs.append(ValidatorSpec(str(type_), params))
    try:
        V.build_validator(specs)  # cross-validator defaults (headers) are resolved here
    except V.ParamError as e:
        raise doc.error(f"validators[{e.index}].{e.key}", e.expected) from None
    return tuple(specs)


def _student(m: _Map, teacher: TeacherSpec) -> StudentSpec:
    if m.has("model"):
        model = m.str("model")
    elif teacher.model is not None:
        model = teacher.model  # distilling into the teacher's own base model (or a cut of it)
    else:
        raise m.err("model", "required when the teacher is an endpoint")
    if _looks_like_path(model):
        model = str(_resolve(m.doc.path.parent, model))
    route = m.str("route", "sft", choices=ROUTES)
    full = m.bool("full_finetune", False)
    lora = None
    if full and m.has("lora"):
        raise m.err("lora", "absent when full_finetune is true (they are exclusive)")
    if not full:
        lm = m.sub("lora", ("rank", "alpha", "dropout", "layers", "keys"))
        layers = lm.raw("layers", "all")
        if layers != "all":
            layers = lm.int("layers", lo=1)
        keys = lm.raw("keys", list(LORA_KEYS))
        if (
            not isinstance(keys, list)
            or not keys
            or not all(isinstance(k, str) and k for k in keys)
        ):
            raise lm.err(
                "keys", f"a non-empty list of projection names like {', '.join(LORA_KEYS)}"
            )
        if len(set(keys)) != len(keys):
            raise lm.err("keys", "distinct projection names")
        lora = LoraSpec(
            rank=lm.int("rank", 8, lo=1),
            alpha=lm.float("alpha", 16.0, lo=0, lo_open=True),
            dropout=lm.float("dropout", 0.0, lo=0, hi=1, hi_open=True),
            layers=layers,
            keys=tuple(keys),
        )
    tm = m.sub(
        "train",
        (
            "iters", "epochs", "batch_size", "learning_rate", "schedule", "warmup_steps",
            "weight_decay", "grad_clip", "max_seq_length", "steps_per_eval",
            "early_stopping_patience", "checkpoint_every", "seed", "keep",
        ),
    )  # fmt: skip
    if tm.has("iters") and tm.has("epochs"):
        raise tm.err("epochs", "absent when iters is set (give exactly one of iters / epochs)")
    epochs = tm.float("epochs", None, lo=0, lo_open=True)
    iters = tm.int("iters", None if epochs else 200, lo=1)
    grad_clip = None if tm.is_null("grad_clip") else tm.float("grad_clip", 1.0, lo=0, lo_open=True)
    train = TrainSpec(
        iters=iters,
        epochs=epochs,
        batch_size=tm.int("batch_size", 4, lo=1),
        learning_rate=tm.float("learning_rate", 1e-4, lo=0, lo_open=True),
        schedule=tm.str("schedule", "cosine", choices=("constant", "cosine", "linear")),
        warmup_steps=tm.int("warmup_steps", 0, lo=0),
        weight_decay=tm.float("weight_decay", 0.0, lo=0),
        grad_clip=grad_clip,
        max_seq_length=tm.int("max_seq_length", 512, lo=16),
        steps_per_eval=tm.int("steps_per_eval", 50, lo=1),
        early_stopping_patience=tm.int("early_stopping_patience", None, lo=1),
        checkpoint_every=tm.int("checkpoint_every", 100, lo=1),
        seed=tm.int("seed", 0, lo=0),
        keep=tm.str("keep", "best", choices=("best", "last")),
    )
    if iters is not None and train.warmup_steps >= iters:
        raise tm.err("warmup_steps", f"fewer than iters ({iters}), got {train.warmup_steps}")

    kd = None
    if m.has("kd") and route != "logit-kd":
        raise m.err("kd", f"absent unless route is logit-kd (route is {route})")
    if route == "logit-kd":
        if teacher.model is None:
            raise m.err(
                "route",
                "a route other than logit-kd: logit KD needs a local teacher model, not an endpoint",
            )
        km = m.sub("kd", ("alpha", "beta", "gamma", "temperature", "divergence", "layer_map"))
        layer_map = km.raw("layer_map", "auto")
        if layer_map != "auto":
            ok = (
                isinstance(layer_map, list)
                and layer_map
                and all(
                    isinstance(p, list)
                    and len(p) == 2
                    and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in p)
                    for p in layer_map
                )
            )
            if not ok:
                raise km.err(
                    "layer_map", "'auto' or a list of [student_layer, teacher_layer] index pairs"
                )
            layer_map = tuple((int(a), int(b)) for a, b in layer_map)
        kd = KDSpec(
            alpha=km.float("alpha", 0.5, lo=0),
            beta=km.float("beta", 0.5, lo=0),
            gamma=km.float("gamma", 0.0, lo=0),
            temperature=km.float("temperature", 2.0, lo=0, lo_open=True),
            divergence=km.str("divergence", "kl", choices=("kl", "reverse_kl", "jsd")),
            layer_map=layer_map,
        )
        if kd.alpha + kd.beta + kd.gamma == 0:
            raise km.err("alpha", "at least one of alpha, beta, gamma > 0")

    drop = None
    if m.has("drop_layers"):
        if teacher.model is None:
            raise m.err(
                "drop_layers",
                "absent when the teacher is an endpoint (layers come from a local teacher)",
            )
        dm = m.sub("drop_layers", ("keep_every", "keep"))
        if dm.has("keep_every") == dm.has("keep"):
            raise dm.doc.error(
                dm.key,
                "exactly one of keep_every (an integer >= 2) or keep (a list of layer indices)",
            )
        keep = dm.raw("keep")
        if keep is not None:
            if (
                not isinstance(keep, list)
                or not keep
                or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in keep)
            ):
                raise dm.err("keep", "a non-empty list of layer indices (integers >= 0)")
            if len(set(keep)) != len(keep):
                raise dm.err("keep", "distinct layer indices")
            keep = tuple(sorted(keep))
        drop = DropLayersSpec(keep_every=dm.int("keep_every", None, lo=2), keep=keep)

    dpo = None
    if m.has("dpo") and route != "dpo":
        raise m.err("dpo", f"absent unless route is dpo (route is {route})")
    if route == "dpo":
        dpo = DPOSpec(beta=m.sub("dpo", ("beta",)).float("beta", 0.1, lo=0, lo_open=True))

    quant = None
    if m.has("quantize"):
        qm = m.sub("quantize", ("bits", "group_size"))
        bits, gs = qm.int("bits", 4), qm.int("group_size", 64)
        if bits not in (2, 3, 4, 5, 6, 8):
            raise qm.err("bits", f"one of 2, 3, 4, 5, 6, 8; got {bits}")
        if gs not in (32, 64, 128):
            raise qm.err("group_size", f"one of 32, 64, 128; got {gs}")
        quant = QuantizeSpec(bits, gs)

    return StudentSpec(
        model=model,
        route=route,
        prompt_style=m.str("prompt_style", "bare", choices=("bare", "scaffold")),
        lora=lora,
        full_finetune=full,
        train=train,
        kd=kd,
        drop_layers=drop,
        dpo=dpo,
        quantize=quant,
    )


def _split(m: _Map, prompts: tuple[Prompt, ...]) -> SplitSpec:
    s = SplitSpec(
        train=m.float("train", 0.7, lo=0, hi=1, lo_open=True, hi_open=True),
        valid=m.float("valid", 0.1, lo=0, hi=1, hi_open=True),
        test=m.float("test", 0.2, lo=0, hi=1, lo_open=True, hi_open=True),
        seed=m.int("seed", 0, lo=0),
        stratify_by=m.str("stratify_by", None, choices=("label",)),
    )
    if abs(s.train + s.valid + s.test - 1.0) > 1e-6:
        raise m.doc.error(m.key, f"train + valid + test = 1, got {s.train + s.valid + s.test:g}")
    if s.stratify_by == "label":
        missing = [p.id for p in prompts if p.label is None]
        if missing:
            raise m.err(
                "stratify_by",
                f"labels on every prompt ({len(missing)} have none, e.g. {missing[0]})",
            )
    return s


def _logit_shaping(m: _Map) -> dict[str, Any]:
    """``no_repeat_ngram`` (0 or >= 2), ``repetition_penalty`` (> 0 or absent), ``stop``."""
    n = m.int("no_repeat_ngram", 0, lo=0)
    if n == 1:
        raise m.err("no_repeat_ngram", "0 (off) or an n-gram length >= 2, got 1")
    penalty = m.float("repetition_penalty", None, lo=0, lo_open=True)
    stop = m.raw("stop", [])
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(x, str) and x for x in stop):
        raise m.err("stop", f"a non-empty string or a list of them, got {_describe(stop)}")
    return {"no_repeat_ngram": n, "repetition_penalty": penalty, "stop": tuple(stop)}


def _eval(m: _Map, base: Path, template: str | None, fld: str) -> EvalSpec:
    th = m.raw("thresholds", {})
    if not isinstance(th, dict):
        raise m.err("thresholds", "a mapping of metric name -> number")
    tm = m.sub("thresholds", tuple(str(x) for x in th))
    thresholds = {str(k): tm.float(str(k)) for k in th}
    ps = m.raw("prompt_sets", {})
    if not isinstance(ps, dict):
        raise m.err("prompt_sets", "a mapping of set name -> prompts file (or prompts section)")
    sets = {}
    for name, value in ps.items():
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", str(name)):
            raise m.err(f"prompt_sets.{name}", "a set name of letters, digits, _ . -")
        sets[str(name)] = _load_prompts(
            value,
            base,
            m.doc,
            m.k(f"prompt_sets.{name}"),
            inherit_template=template,
            inherit_field=fld,
        )
    dev: tuple[Prompt, ...] = ()
    if m.has("dev"):
        dev = _load_prompts(
            m.raw("dev"), base, m.doc, m.k("dev"), inherit_template=template, inherit_field=fld
        )
    return EvalSpec(
        decoding=Decoding(max_tokens=m.int("max_tokens", 256, lo=1), **_logit_shaping(m)),
        thresholds=thresholds,
        prompt_sets=sets,
        batch_size=m.int("batch_size", 8, lo=1),
        dev=dev,
    )


def load_spec(path: str | Path) -> TaskSpec:
    """Read and validate a task spec; raises ``SpecError`` (file, key, expected, line)."""
    path = Path(path).expanduser().resolve()
    doc = _read_doc(path, what="task spec")
    top = _Map(doc, "", doc.data, _TOP)
    base = path.parent
    name = top.str("name", path.stem)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise top.err("name", f"letters, digits, _ . - (it names directories), got {name!r}")
    description = top.raw("description", "")
    if not isinstance(description, str):
        raise top.err("description", "a string")

    if not top.has("prompts"):
        raise top.err("prompts", "required: a prompts file, a list, or {file, template, ...}")
    pv = top.data["prompts"]
    prompts = _load_prompts(pv, base, doc, "prompts")
    template = pv.get("template") if isinstance(pv, dict) else None
    fld = (pv.get("field") or "text") if isinstance(pv, dict) else "text"

    if not top.has("teacher"):
        raise top.err("teacher", "required: {model: ...} or {endpoint: {url, model}}")
    teacher = _teacher(top.sub("teacher", (
        "model", "endpoint", "system_prompt", "few_shot", "decoding", "samples_per_prompt", "keep", "batch_size",
    )), base)  # fmt: skip
    validators = _validators(doc, top.data.get("validators"), base, prompts)
    if teacher.keep == "best" and not validators:
        raise top.err("teacher.keep", "'first' when no validators are given (nothing to rank by)")
    if validators and teacher.few_shot:
        # The teacher imitates its few-shot answers: ones that fail the task's own checks teach
        # it to fail.
        from distiller.validators import build_validator

        check = build_validator(validators)
        for i, ex in enumerate(teacher.few_shot):
            verdict = check(ex.assistant)
            if not verdict.passed:
                raise doc.error(
                    f"teacher.few_shot[{i}].assistant",
                    "an answer that passes the validators: " + "; ".join(verdict.reasons),
                )

    student = _student(top.sub("student", (
        "model", "route", "prompt_style", "lora", "full_finetune", "train", "kd", "drop_layers", "dpo", "quantize",
    )), teacher)  # fmt: skip
    split = _split(top.sub("split", ("train", "valid", "test", "seed", "stratify_by")), prompts)
    eval_keys = ("max_tokens", "no_repeat_ngram", "repetition_penalty", "stop", "thresholds")
    ev = _eval(
        top.sub("eval", (*eval_keys, "prompt_sets", "batch_size", "dev")),
        base,
        template,
        fld,
    )

    train_texts = {_norm_text(p.text): p.id for p in prompts}
    held_out = {f"eval.prompt_sets.{k}": v for k, v in ev.prompt_sets.items()}
    held_out["eval.dev"] = ev.dev
    for key, set_prompts in held_out.items():
        for p in set_prompts:
            if _norm_text(p.text) in train_texts:
                raise doc.error(
                    key,
                    f"prompts not in the curriculum; {p.id!r} is the curriculum's {train_texts[_norm_text(p.text)]!r}",
                )

    return TaskSpec(
        name=name,
        description=description.strip(),
        path=path,
        prompts=prompts,
        teacher=teacher,
        validators=validators,
        student=student,
        split=split,
        eval=ev,
    )


# ---------------------------------------------------------------------------------------------
# CLI: `distiller spec FILE` checks a spec; `--check TEXT` runs its validators on a text


def add_arguments(parser: Any) -> None:
    parser.description = (
        "Load and validate a task spec and print a summary (exit 2 on the first problem, "
        "naming file, key and line). With --check, run the spec's validators on a text."
    )
    parser.add_argument("spec", help="task spec YAML, e.g. fixtures/tasks/structured_cot.yaml")
    parser.add_argument(
        "--check",
        metavar="TEXT_FILE",
        help="a file ('-' for stdin) holding one model output to validate; exit 1 if it fails",
    )
    parser.add_argument("--json", action="store_true", help="print the summary/verdict as JSON")


def run_cli(args: Any) -> int:
    import sys

    spec = load_spec(args.spec)
    if args.check:
        from distiller.validators import build_validator

        text = sys.stdin.read() if args.check == "-" else Path(args.check).read_text("utf-8")
        verdict = build_validator(spec.validators)(text)
        if args.json:
            print(json.dumps(verdict.to_dict(), indent=2))
        else:
            print(f"{'PASS' if verdict.passed else 'FAIL'}  score {verdict.score:.3f}")
            for reason in verdict.reasons:
                print(f"  - {reason}")
        return 0 if verdict.passed else 1
    summary = {
        "name": spec.name,
        "path": str(spec.path),
        "prompts": len(spec.prompts),
        "labels": {lb: sum(p.label == lb for p in spec.prompts) for lb in spec.labels},
        "prompt_sets": {k: len(v) for k, v in spec.eval.prompt_sets.items()},
        "teacher": spec.teacher.model
        or f"{spec.teacher.endpoint.model} @ {spec.teacher.endpoint.url}",
        "few_shot": len(spec.teacher.few_shot),
        "validators": [v.type for v in spec.validators],
        "student": f"{spec.student.model} ({spec.student.route})",
        "split": f"{spec.split.train:g}/{spec.split.valid:g}/{spec.split.test:g} seed {spec.split.seed}",
        "fingerprint": spec.fingerprint()[:16],
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        for k, v in summary.items():
            if v or v == 0:
                print(f"{k:12} {v}")
    return 0
