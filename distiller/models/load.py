"""The one model loader: a model reference (registry name, cached import, directory or hub id)
resolved to a local MLX model directory, loaded for compute, and identified for cache keys."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from distiller import fast_ops
from distiller.device import compute_dtype
from distiller.errors import UserError
from distiller.hashing import stable_hash
from distiller.models import registry
from distiller.models.check import check_adapter_dir, check_model_dir


def resolve_model(name_or_path: str | Path, pull: bool = True) -> Path:
    """A local MLX/HF-format model dir for a registry name, a cached import, a path or a hub id.

    Registry names are pulled into the cache when missing (``pull=True``); a hub id is handed
    to mlx-lm's downloader, which only succeeds when the hub is reachable or already cached.
    """
    text = str(name_or_path)
    if text in registry.REGISTRY:
        path = registry.cache_path(text)
        if registry.is_complete(path):
            return path
        if not pull:
            raise UserError(f"model {text!r} is not pulled; run: distiller models pull {text}")
        return registry.pull(text)
    cached = registry.cached_models()
    if text in cached:
        return cached[text]
    path = Path(text).expanduser()
    if path.exists():
        if path.is_file() and path.suffix == ".gguf":
            raise UserError(
                f"{path}: a GGUF file; convert it first: distiller models import {path}"
            )
        check_model_dir(path)
        return path
    if "/" not in text or text.startswith((".", "/", "~")):
        known = ", ".join(sorted({*registry.REGISTRY, *cached}))
        raise UserError(
            f"model {text!r}: not a registry or cached model ({known}), nor an existing dir"
        )
    try:
        from mlx_lm.utils import _download

        return Path(_download(text))
    except Exception as exc:  # offline, unknown repo, auth: all end here
        raise UserError(
            f"model {text!r}: not a registry name or local dir, and fetching it as a "
            f"Hugging Face hub id failed (offline?): {type(exc).__name__}: {exc}"
        ) from exc


def model_dir(name_or_path: str | Path, pull: bool = False) -> Path | None:
    """The local directory behind a model reference, or None when there is none (not a model
    directory, a hub id that cannot be fetched; a registry model not pulled unless ``pull``)."""
    try:
        return resolve_model(str(name_or_path), pull=pull)
    except (UserError, OSError, ValueError):
        return None


def model_fingerprint(name_or_path: str | Path) -> dict[str, Any]:
    """What identifies a model's weights, for cache keys: its directory, a hash of its config,
    and its weight files' sizes and modification times (cheap; no weights are read). A registry
    model is pulled first, so its key is the same before and after the first pull."""
    path = model_dir(name_or_path, pull=True)
    if path is None:
        return {"ref": str(name_or_path)}
    weights = {
        p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(path.glob("*.safetensors"))
    }
    config = path / "config.json"
    return {
        "dir": str(path.resolve()),
        "config": stable_hash(config.read_text()) if config.exists() else None,
        "weights": weights,
    }


def disk_size_mb(name_or_path: str | Path) -> float | None:
    """Size of the model directory's files (weights, config, tokenizer) in MB (1e6 bytes)."""
    path = model_dir(name_or_path)
    if path is None:
        return None
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6


def _as_dtype(dtype: Any) -> mx.Dtype | None:
    if dtype is None or isinstance(dtype, mx.Dtype):
        return dtype
    if isinstance(dtype, str) and dtype in ("float32", "float16", "bfloat16"):
        return getattr(mx, dtype)
    raise UserError(f"dtype {dtype!r}: expected float32, float16 or bfloat16")


def load_model(
    name_or_path: str | Path, adapter_path: str | None = None, dtype: Any = None
) -> tuple[nn.Module, Any]:
    """Load (model, TokenizerWrapper) with mlx-lm, float weights cast to the compute dtype.

    ``dtype`` (mx.Dtype or its name) overrides ``distiller.device.compute_dtype()``. Quantized
    models keep their packed weights and their scales' dtype.
    """
    from mlx_lm import load

    target = _as_dtype(dtype)
    path = resolve_model(name_or_path)
    check_model_dir(path)
    if adapter_path is not None:
        check_adapter_dir(Path(adapter_path))
    try:
        model, tokenizer, config = load(str(path), adapter_path=adapter_path, return_config=True)
    except (ValueError, KeyError, TypeError, AttributeError, RuntimeError, OSError) as exc:
        # What the checks above cannot see (weights that do not fit the architecture, a
        # tokenizer file that does not parse): still one line naming the directory.
        raise UserError(f"{path}: cannot load the model: {_first_line(exc)}") from None
    if "quantization" not in config and "quantization_config" not in config:
        if target is None:
            floats = [v.dtype for _, v in _leaves(model) if mx.issubdtype(v.dtype, mx.floating)]
            target = compute_dtype(floats[0] if floats else None)
        model.set_dtype(target)
        mx.eval(model.parameters())
    fast_ops.patch_model(model)
    return model, tokenizer


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _leaves(model: nn.Module):
    from mlx.utils import tree_flatten

    return tree_flatten(model.parameters())
