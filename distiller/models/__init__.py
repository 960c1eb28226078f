"""Models: the registry and cache, GGUF conversion, and loading for compute.

``load_model`` / ``resolve_model`` are imported lazily so that ``import distiller.models``
(e.g. for the CLI's ``--help``) does not pull in MLX.
"""

from __future__ import annotations

from typing import Any

__all__ = ["disk_size_mb", "load_model", "model_dir", "model_fingerprint", "resolve_model"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from distiller.models import load

        return getattr(load, name)
    raise AttributeError(f"module 'distiller.models' has no attribute {name!r}")
