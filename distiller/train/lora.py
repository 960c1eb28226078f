"""Turn a model into a trainable student: LoRA adapters (via mlx_lm.tuner) or full fine-tuning,
plus saving/loading adapters in the layout ``mlx_lm.load(adapter_path=...)`` understands."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from distiller.errors import UserError
from distiller.files import atomic_file, atomic_write
from distiller.spec import LoraSpec

ALL_PROJECTIONS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


def resolve_keys(model: nn.Module, keys: list[str] | None) -> list[str]:
    """Full in-layer module paths for ``keys``; short names ("q_proj") match by suffix."""
    if not keys:
        return list(ALL_PROJECTIONS)
    available = {name for name, m in model.layers[0].named_modules() if isinstance(m, nn.Linear)}
    out = []
    for k in keys:
        hits = sorted(a for a in available if a == k or a.endswith("." + k))
        if not hits:
            raise UserError(
                f"lora key {k!r} matches no linear layer; available: {', '.join(sorted(available))}"
            )
        out.extend(h for h in hits if h not in out)
    return out


def num_lora_layers(model: nn.Module, layers: int | str) -> int:
    """LoRA goes on the last ``layers`` blocks ("all" -> every block)."""
    n = len(model.layers)
    if layers == "all":
        return n
    if isinstance(layers, int) and not isinstance(layers, bool) and layers > 0:
        return min(layers, n)
    raise UserError(f"student.lora.layers must be a positive integer or 'all', got {layers!r}")


def adapter_config(
    model: nn.Module, lora: LoraSpec | None, full_finetune: bool, base_model: str
) -> dict:
    """The adapter_config.json that mlx_lm.tuner.utils.load_adapters reads back.

    ``lora`` is the spec's section (None only with ``full_finetune``, as the parser gives it).
    """
    if full_finetune:
        return {"fine_tune_type": "full", "num_layers": len(model.layers), "model": base_model}
    if lora is None:
        raise UserError("student.lora is required unless full_finetune is true")
    return {
        "fine_tune_type": "lora",
        "model": base_model,
        "num_layers": num_lora_layers(model, lora.layers),
        "lora_parameters": {
            "rank": lora.rank,
            # PEFT convention: the update is scaled by alpha / rank.
            "scale": lora.alpha / lora.rank,
            "dropout": lora.dropout,
            "keys": resolve_keys(model, list(lora.keys)),
        },
    }


def prepare_trainable(model: nn.Module, config: dict) -> nn.Module:
    """Freeze the base and insert LoRA layers (or unfreeze everything for full fine-tuning)."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    if config["fine_tune_type"] == "full":
        model.unfreeze()
        return model
    model.freeze()
    linear_to_lora_layers(model, config["num_layers"], config["lora_parameters"])
    return model


def trainable_weights(model: nn.Module) -> dict[str, mx.array]:
    return dict(tree_flatten(model.trainable_parameters()))


def atomic_save_safetensors(path: str | Path, arrays: dict[str, mx.array]) -> Path:
    """``mx.save_safetensors`` written whole or not at all (``distiller.files.atomic_file``).
    The arrays are streamed into the open file rather than serialized to bytes first, so full
    fine-tuning checkpoints do not hold a second copy of the weights in memory."""
    path = Path(path)
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        # A file object, not a path: MLX adds no ".safetensors" suffix to it.
        mx.save_safetensors(f, arrays)
    return path


def save_adapter(out_dir: str | Path, model: nn.Module, config: dict) -> Path:
    """adapters.safetensors + adapter_config.json, each replaced atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(out_dir / "adapters.safetensors", trainable_weights(model))
    atomic_write(out_dir / "adapter_config.json", json.dumps(config, indent=2) + "\n")
    return out_dir
