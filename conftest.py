"""Shared fixtures for tests/ and evals/: tiny random llama models with the real SmolLM2 tokenizer.

``tiny_model_dir`` is a session-wide tiny model dir (2 layers, hidden 64, GQA 4/2 heads,
vocab 49152, tied embeddings, float32) that plain ``mlx_lm.load`` opens. For other shapes use
``build_tiny_model_dir(path, num_hidden_layers=4, ...)`` directly, or the ``tiny_model_factory``
fixture, which builds each distinct shape once per session.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import distiller  # noqa: F401  (must precede mlx: it loads the fast BLAS)

REPO_ROOT = Path(__file__).resolve().parent
TOKENIZER_DIR = REPO_ROOT / "fixtures" / "tokenizer"

TINY_DEFAULTS: dict[str, Any] = {
    "model_type": "llama",
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "vocab_size": 49152,
    "rope_theta": 10000.0,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": True,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def build_tiny_model_dir(path: str | Path, seed: int = 0, **overrides: Any) -> Path:
    """Write a random llama model (config.json + model.safetensors + SmolLM2 tokenizer) to ``path``.

    ``overrides`` replace entries of ``TINY_DEFAULTS`` (any mlx-lm llama ``ModelArgs`` field),
    e.g. ``num_hidden_layers=4``. Weights are float32 and deterministic for a given ``seed``.
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    config = {**TINY_DEFAULTS, **overrides}
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    weights = dict(tree_flatten(model.parameters()))
    mx.eval(weights)
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for src in TOKENIZER_DIR.iterdir():
        shutil.copy(src, path / src.name)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random llama MLX model dir with the real SmolLM2 tokenizer (read-only: copy to edit)."""
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``factory(seed=0, **overrides) -> Path``: builds each distinct model once per session."""
    built: dict[str, Path] = {}

    def factory(seed: int = 0, **overrides: Any) -> Path:
        key = json.dumps({"seed": seed, **overrides}, sort_keys=True)
        if key not in built:
            built[key] = build_tiny_model_dir(
                tmp_path_factory.mktemp("tiny_model"), seed, **overrides
            )
        return built[key]

    return factory
