"""One stable hash for cache keys: the same value always gives the same key, on any machine."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path
from typing import Any

__all__ = ["canonical", "stable_hash"]


def canonical(obj: Any) -> Any:
    """``obj`` as plain JSON values: dataclasses as dicts, tuples as lists, sets sorted."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: canonical(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): canonical(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [canonical(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted((canonical(v) for v in obj), key=lambda v: json.dumps(v, sort_keys=True))
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return repr(obj)
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    raise TypeError(f"stable_hash: cannot hash {type(obj).__name__}")


def stable_hash(obj: Any, length: int | None = None) -> str:
    """sha256 hex of ``obj``'s canonical JSON (sorted keys), cut to ``length`` characters."""
    data = json.dumps(canonical(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    digest = hashlib.sha256(data.encode("utf-8")).hexdigest()
    return digest[:length] if length else digest
