"""Rebuild a Hugging Face tokenizer (tokenizer.json + tokenizer_config.json) from GGUF metadata.

A GGUF file carries its whole tokenizer as metadata: the token strings, the BPE merges, a type
per token (normal / control / user-defined ...), the special token ids, the chat template and the
name of llama.cpp's pre-tokenizer. We turn that back into the files ``transformers`` (and so
``mlx_lm.load``) reads, written with the ``tokenizers`` library's own JSON schema.

Only byte-level BPE vocabularies (``tokenizer.ggml.model == "gpt2"``) are supported; the
pre-tokenizer must be one whose llama.cpp regex we can reproduce exactly (see ``_PRE_TOKENIZERS``).

``gguf_tokenizer_from_dir`` goes the other way, for ``distiller export``: a tokenizer dir's
files as the GGUF tokenizer metadata llama.cpp reads.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distiller.errors import UserError

# llama.cpp token types (llama_token_type in llama.h / gguf TokenType).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# llama.cpp's GPT-2 split regex; the tokenizers ByteLevel pre-tokenizer applies the same one
# (use_regex=True), so we name the pre-tokenizers by which extra splits they add before it.
# "smollm", "starcoder", "refact" and "codeshell" all first split every digit on its own
# (regex "\p{N}" in llama.cpp's llm_tokenizer_bpe), which tokenizers calls Digits(individual).
_PRE_TOKENIZERS: dict[str, str] = {
    "smollm": "digits+bytelevel",
    "starcoder": "digits+bytelevel",
    "refact": "digits+bytelevel",
    "codeshell": "digits+bytelevel",
    "gpt-2": "bytelevel",
    "gpt2": "bytelevel",
    "default": "bytelevel",
    "mpt": "bytelevel",
    "olmo": "bytelevel",
}

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _field(fields: Mapping[str, Any], key: str, default: Any = None) -> Any:
    field = fields.get(key)
    if field is None:
        return default
    return field.contents()


def _pre_tokenizer(kind: str) -> dict[str, Any]:
    byte_level = {
        "type": "ByteLevel",
        "add_prefix_space": False,
        "trim_offsets": True,
        "use_regex": True,
    }
    if kind == "bytelevel":
        return byte_level
    return {
        "type": "Sequence",
        "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte_level],
    }


def tokenizer_files_from_gguf(fields: Mapping[str, Any], source: str = "GGUF") -> dict[str, Any]:
    """Return ``{filename: json-able object}`` for the tokenizer described by GGUF ``fields``.

    ``fields`` is ``gguf.GGUFReader(path).fields``; ``source`` names the file in errors.
    """
    model = _field(fields, "tokenizer.ggml.model")
    if model is None:
        raise UserError(f"{source}: no tokenizer metadata (tokenizer.ggml.model is missing)")
    if model != "gpt2":
        raise UserError(
            f"{source}: tokenizer.ggml.model is {model!r}; only byte-level BPE ('gpt2') "
            "tokenizers can be converted"
        )
    pre = _field(fields, "tokenizer.ggml.pre", "default")
    if pre not in _PRE_TOKENIZERS:
        raise UserError(
            f"{source}: tokenizer.ggml.pre is {pre!r}; supported pre-tokenizers: "
            + ", ".join(sorted(_PRE_TOKENIZERS))
        )
    tokens: list[str] = list(_field(fields, "tokenizer.ggml.tokens", []))
    types: list[int] = [int(t) for t in _field(fields, "tokenizer.ggml.token_type", [])]
    merges_raw: list[str] = list(_field(fields, "tokenizer.ggml.merges", []))
    if not tokens or len(types) != len(tokens):
        raise UserError(
            f"{source}: tokenizer.ggml.tokens ({len(tokens)}) and tokenizer.ggml.token_type "
            f"({len(types)}) must be non-empty and of equal length"
        )

    merges = []
    for i, merge in enumerate(merges_raw):
        parts = merge.split(" ")
        if len(parts) != 2:
            raise UserError(
                f"{source}: tokenizer.ggml.merges[{i}] is {merge!r}; expected 'left right'"
            )
        merges.append(parts)

    added = []
    for idx, (text, kind) in enumerate(zip(tokens, types, strict=True)):
        if kind in (CONTROL, UNKNOWN, USER_DEFINED):
            added.append(
                {
                    "id": idx,
                    "content": text,
                    "single_word": False,
                    "lstrip": False,
                    "rstrip": False,
                    "normalized": False,
                    # Control/unknown tokens are special: skipped by decode(skip_special_tokens).
                    "special": kind != USER_DEFINED,
                }
            )

    def special(key: str) -> str | None:
        idx = _field(fields, f"tokenizer.ggml.{key}_token_id")
        if idx is None:
            return None
        idx = int(idx)
        if not 0 <= idx < len(tokens):
            raise UserError(f"{source}: tokenizer.ggml.{key}_token_id {idx} is outside the vocab")
        return tokens[idx]

    specials = {
        name: special(key)
        for name, key in (
            ("bos_token", "bos"),
            ("eos_token", "eos"),
            ("unk_token", "unknown"),
            ("pad_token", "padding"),
        )
    }
    specials = {k: v for k, v in specials.items() if v is not None}

    tokenizer_json = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": _pre_tokenizer(_PRE_TOKENIZERS[pre]),
        # ByteLevel post-processing only fixes offsets; llama.cpp adds no BOS/EOS unless the
        # GGUF asks for it, which tokenizer_config's add_bos_token/add_eos_token carry.
        "post_processor": {
            "type": "ByteLevel",
            "add_prefix_space": False,
            "trim_offsets": False,
            "use_regex": True,
        },
        "decoder": {
            "type": "ByteLevel",
            "add_prefix_space": False,
            "trim_offsets": True,
            "use_regex": True,
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": {text: idx for idx, text in enumerate(tokens)},
            "merges": merges,
        },
    }

    add_bos = bool(_field(fields, "tokenizer.ggml.add_bos_token", False))
    add_eos = bool(_field(fields, "tokenizer.ggml.add_eos_token", False))
    context = None
    arch = _field(fields, "general.architecture")
    if arch is not None:
        context = _field(fields, f"{arch}.context_length")
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(context) if context else 1_000_000_000,
        "added_tokens_decoder": {
            str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in added
        },
        "additional_special_tokens": [
            t["content"] for t in added if t["special"] and t["content"] not in specials.values()
        ],
        **specials,
    }
    template = _field(fields, "tokenizer.chat_template")
    if template:
        config["chat_template"] = template
    special_map = {**specials, "additional_special_tokens": config["additional_special_tokens"]}
    return {
        "tokenizer.json": tokenizer_json,
        "tokenizer_config.json": config,
        "special_tokens_map.json": special_map,
    }


def write_tokenizer(
    fields: Mapping[str, Any], out_dir: str | Path, source: str = "GGUF"
) -> list[Path]:
    """Write the tokenizer files for GGUF ``fields`` into ``out_dir``; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, obj in tokenizer_files_from_gguf(fields, source).items():
        path = out / name
        # tokenizer.json is large (vocab + merges): write it compactly; the small files indented.
        indent = None if name == "tokenizer.json" else 2
        path.write_text(json.dumps(obj, ensure_ascii=False, indent=indent) + "\n", encoding="utf-8")
        written.append(path)
    return written


def convert_tokenizer(gguf_path: str | Path, out_dir: str | Path) -> list[Path]:
    """Read ``gguf_path`` and write its tokenizer files into ``out_dir``."""
    from gguf import GGUFReader

    path = Path(gguf_path)
    if not path.is_file():
        raise UserError(f"{path}: no such GGUF file")
    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # the gguf package raises ValueError/struct errors on bad files
        raise UserError(f"{path}: not a readable GGUF file ({exc})") from exc
    return write_tokenizer(reader.fields, out_dir, source=str(path))


# ---------------------------------------------------------------------------------------------
# The other way: a Hugging Face byte-level BPE tokenizer dir -> GGUF tokenizer metadata

# The llama.cpp pre-tokenizer name written for each kind of pre-tokenizer we recognise.
_GGUF_PRE_NAMES = {"digits+bytelevel": "smollm", "bytelevel": "gpt-2"}


@dataclass
class GGUFTokenizer:
    """The tokenizer.* metadata of a GGUF file (llama.cpp's conventions for byte-level BPE)."""

    pre: str
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    special_ids: dict[str, int]  # "bos" / "eos" / "unknown" / "padding" -> token id
    add_bos: bool
    add_eos: bool
    chat_template: str | None


def _pre_kind(pre_tokenizer: Any) -> str | None:
    """Which of ``_pre_tokenizer``'s kinds a tokenizer.json pre_tokenizer is, if any."""

    def byte_level(p: Any) -> bool:
        return (
            isinstance(p, dict)
            and p.get("type") == "ByteLevel"
            and not p.get("add_prefix_space", False)
            and p.get("use_regex", True)
        )

    if byte_level(pre_tokenizer):
        return "bytelevel"
    if isinstance(pre_tokenizer, dict) and pre_tokenizer.get("type") == "Sequence":
        parts = pre_tokenizer.get("pretokenizers") or []
        digits = {"type": "Digits", "individual_digits": True}
        if len(parts) == 2 and parts[0] == digits and byte_level(parts[1]):
            return "digits+bytelevel"
    return None


def _token_text(value: Any) -> str | None:
    """A special token in tokenizer_config.json: a string or an AddedToken-like mapping."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def gguf_tokenizer_from_dir(model_dir: str | Path, vocab_size: int) -> GGUFTokenizer:
    """Read ``model_dir``'s tokenizer.json / tokenizer_config.json as GGUF tokenizer metadata.

    ``vocab_size`` is the model's (embedding rows): ids the tokenizer does not use are written
    as unused ``[PAD<id>]`` tokens, as llama.cpp's converter does. Only byte-level BPE
    tokenizers whose pre-tokenizer llama.cpp reproduces are accepted (``UserError`` otherwise).
    """
    from distiller.models.check import read_json_object

    model_dir = Path(model_dir)
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"{path}: missing; only tokenizer.json (byte-level BPE) can be exported")
    tok = read_json_object(path, "tokenizer")
    model = tok.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise UserError(
            f"{path}: a {model.get('type')!r} tokenizer model"
            + (" with byte fallback" if model.get("byte_fallback") else "")
            + "; only byte-level BPE tokenizers can be exported"
        )
    if tok.get("normalizer") is not None:
        raise UserError(f"{path}: has a normalizer, which llama.cpp's gpt2 tokenizer does not run")
    kind = _pre_kind(tok.get("pre_tokenizer"))
    if kind is None:
        raise UserError(
            f"{path}: pre_tokenizer {json.dumps(tok.get('pre_tokenizer'))[:120]} is not one "
            "llama.cpp reproduces (supported: ByteLevel, or Digits(individual) + ByteLevel)"
        )

    by_id: dict[int, str] = {int(i): t for t, i in (model.get("vocab") or {}).items()}
    types: dict[int, int] = {}
    for added in tok.get("added_tokens") or []:
        by_id[int(added["id"])] = added["content"]
        types[int(added["id"])] = CONTROL if added.get("special") else USER_DEFINED
    size = max(vocab_size, max(by_id, default=-1) + 1)
    tokens, token_types = [], []
    for i in range(size):
        if i in by_id:
            tokens.append(by_id[i])
            token_types.append(types.get(i, NORMAL))
        else:
            tokens.append(f"[PAD{i}]")
            token_types.append(UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]

    config_path = model_dir / "tokenizer_config.json"
    config = read_json_object(config_path, "tokenizer config") if config_path.exists() else {}
    ids = {t: i for i, t in enumerate(tokens)}
    special_ids = {}
    for key, name in (("bos", "bos_token"), ("eos", "eos_token"), ("unknown", "unk_token"),
                      ("padding", "pad_token")):  # fmt: skip
        text = _token_text(config.get(name))
        if text is not None and text in ids:
            special_ids[key] = ids[text]
    # Like llama.cpp's SpecialVocab: config.json's ids fill in what the tokenizer leaves out.
    model_config_path = model_dir / "config.json"
    if model_config_path.exists():
        model_config = read_json_object(model_config_path, "model config")
        for key in ("bos", "eos"):
            value = model_config.get(f"{key}_token_id")
            if isinstance(value, list) and value:
                value = value[0]
            if key not in special_ids and isinstance(value, int) and 0 <= value < size:
                special_ids[key] = value

    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: llama.cpp reads the default one
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    jinja = model_dir / "chat_template.jinja"
    if template is None and jinja.is_file():
        template = jinja.read_text(encoding="utf-8")
    return GGUFTokenizer(
        pre=_GGUF_PRE_NAMES[kind],
        tokens=tokens,
        token_types=token_types,
        merges=merges,
        special_ids=special_ids,
        add_bos=bool(config.get("add_bos_token", False)),
        add_eos=bool(config.get("add_eos_token", False)),
        chat_template=template if isinstance(template, str) else None,
    )
