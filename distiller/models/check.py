"""Checks on a model directory before any library reads it, so that bad input is one clear line
(the directory, the file, what is wrong) instead of a traceback from deep inside mlx-lm.

Only what can be checked cheaply is checked here (JSON, headers, file presence, declared
shapes against the config's); loading itself still guards the rest (``load.load_model``).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from distiller.errors import UserError

__all__ = ["check_adapter_dir", "check_model_dir", "read_json_object", "safetensors_header"]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tiktoken.model")
# A safetensors header is JSON; anything this large is not a header but garbage.
MAX_HEADER_BYTES = 100 * 1024 * 1024


def read_json_object(path: Path, what: str) -> dict[str, Any]:
    """The JSON object in ``path``; a ``UserError`` naming the file for anything else."""
    try:
        text = path.read_text(encoding="utf-8")
    except IsADirectoryError:
        raise UserError(f"{path}: a directory, expected the {what} file") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (byte {exc.start}); expected the {what}") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read the {what}: {exc.strerror or exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(
            f"{path}:{exc.lineno}: not valid JSON ({exc.msg}); expected the {what}"
        ) from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object ({what}), got {type(data).__name__}")
    return data


def safetensors_header(path: Path) -> dict[str, Any]:
    """The header of a ``.safetensors`` file, after checking that the file holds every byte the
    header promises. Raises a ``UserError`` naming the file and what is wrong."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise UserError(f"{path}: truncated: {size} bytes, not even a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > min(MAX_HEADER_BYTES, size - 8):
                raise UserError(
                    f"{path}: not a safetensors file, or truncated: the header says it is "
                    f"{n} bytes, the file has {size}"
                )
            raw = f.read(n)
    except OSError as exc:
        raise UserError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise UserError(f"{path}: damaged safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: damaged safetensors header (not a JSON object)")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and "shape" in info):
            raise UserError(f"{path}: damaged safetensors header (entry {name!r})")
        end = max(end, int(offsets[1]))
    need = 8 + n + end
    if need > size:
        raise UserError(f"{path}: truncated: the header says {need} bytes, the file has {size}")
    return header


def _model_type_module(config: dict[str, Any], config_path: Path) -> None:
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise UserError(f"{config_path}: model_type: expected a model type name such as 'llama'")
    import importlib.util

    from mlx_lm.utils import MODEL_REMAPPING

    module = MODEL_REMAPPING.get(model_type, model_type)
    if not module.isidentifier() or importlib.util.find_spec(f"mlx_lm.models.{module}") is None:
        raise UserError(
            f"{config_path}: model_type {model_type!r} is not a model type mlx-lm supports"
        )


def _declared_shape_problem(header: dict[str, Any], config: dict[str, Any]) -> str | None:
    """A mismatch between the embedding's shape in the weights and the config, if any."""
    vocab, hidden = config.get("vocab_size"), config.get("hidden_size")
    for name, info in header.items():
        if name.endswith("embed_tokens.weight") and isinstance(info, dict):
            shape = info.get("shape") or []
            if info.get("dtype") in ("U32", "I32"):  # quantized: the columns are packed
                return None
            known = len(shape) == 2 and isinstance(vocab, int) and isinstance(hidden, int)
            if known and shape != [vocab, hidden]:
                return (
                    f"{name} has shape {shape}, the config says "
                    f"vocab_size={vocab}, hidden_size={hidden}"
                )
    return None


def check_model_dir(path: Path) -> None:
    """Refuse a directory that cannot be a loadable MLX/HF-format model, naming the file."""
    if not path.is_dir():
        raise UserError(f"{path}: not a directory")
    config_path = path / "config.json"
    if not config_path.exists():
        raise UserError(f"{path}: not a model directory (no config.json)")
    config = read_json_object(config_path, "model config")
    _model_type_module(config, config_path)
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        raise UserError(f"{path}: no weights (no *.safetensors file)")
    headers = {w: safetensors_header(w) for w in weights}
    if not any((path / f).exists() for f in TOKENIZER_FILES):
        raise UserError(f"{path}: no tokenizer (expected one of {', '.join(TOKENIZER_FILES)})")
    for w, header in headers.items():
        problem = _declared_shape_problem(header, config)
        if problem:
            raise UserError(f"{w}: {problem}")


def check_adapter_dir(path: Path) -> None:
    """Refuse an adapter directory without the files ``mlx_lm.load(adapter_path=...)`` reads."""
    if not path.is_dir():
        raise UserError(f"{path}: no such adapter directory")
    read_json_object(path / "adapter_config.json", "adapter config")
    weights = path / "adapters.safetensors"
    if not weights.is_file():
        raise UserError(f"{path}: no adapters.safetensors")
    safetensors_header(weights)
