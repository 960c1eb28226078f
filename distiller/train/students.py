"""Students made from the teacher: drop transformer blocks, keep the rest of the weights.

Also the per-layer forward pass (hidden states) that hidden-state distillation needs, and the
student-layer -> teacher-layer map.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from distiller.errors import UserError
from distiller.files import atomic_dir
from distiller.models.check import read_json_object
from distiller.spec import DropLayersSpec

# Side files of the teacher's dir that the student's are not copies of.
_REWRITTEN = ("config.json", "model.safetensors.index.json")
_LAYER_KEY = re.compile(r"^(model\.layers\.)(\d+)(\..*)$")


def kept_layers(n_layers: int, drop: Any) -> list[int]:
    """Indices of the teacher blocks a student keeps.

    ``drop``: "every_other" (keep 0, 2, 4, ... and always the last block, whose output feeds
    the final norm), an int N (keep N blocks spread evenly, first and last included), or a list
    of block indices to drop.
    """
    if hasattr(drop, "layers_to_keep"):  # distiller.spec.DropLayersSpec
        try:
            return list(drop.layers_to_keep(n_layers))
        except ValueError as exc:
            raise UserError(str(exc)) from None
    if drop in ("every_other", "alternate"):
        keep = list(range(0, n_layers, 2))
        if keep[-1] != n_layers - 1:
            keep.append(n_layers - 1)
        return keep
    if isinstance(drop, int) and not isinstance(drop, bool):
        return kept_layers(n_layers, DropLayersSpec(count=drop))
    if isinstance(drop, list | tuple):
        bad = [i for i in drop if not isinstance(i, int) or not 0 <= i < n_layers]
        if bad:
            raise UserError(f"drop_layers: indices must be in 0..{n_layers - 1}, got {bad}")
        keep = [i for i in range(n_layers) if i not in set(drop)]
        if not keep:
            raise UserError("drop_layers: would drop every layer")
        return keep
    raise UserError(
        f"drop_layers: expected 'every_other', a keep count, or a list of indices; got {drop!r}"
    )


def auto_layer_map(n_student: int, n_teacher: int) -> dict[int, int]:
    """Spread student blocks evenly over teacher blocks (output of block i -> block j)."""
    return {i: round((i + 1) * n_teacher / n_student) - 1 for i in range(n_student)}


def layer_map_for(
    spec_map: str | tuple[tuple[int, int], ...],
    n_student: int,
    n_teacher: int,
    kept: list[int] | None = None,
) -> dict[int, int]:
    """The student->teacher hidden-state map: ``kd.layer_map``'s explicit (student, teacher)
    pairs; for "auto", the kept-layer map of a layer-dropped student, or blocks spread evenly."""
    if spec_map != "auto":
        out = {int(s): int(t) for s, t in spec_map}
    elif kept is not None and len(kept) == n_student:
        out = dict(enumerate(kept))
    else:
        out = auto_layer_map(n_student, n_teacher)
    bad = {s: t for s, t in out.items() if not (0 <= s < n_student and 0 <= t < n_teacher)}
    if bad:
        raise UserError(
            f"kd.layer_map: pairs out of range (student<{n_student}, teacher<{n_teacher}): {bad}"
        )
    return out


def layer_count(model_dir: Path) -> int:
    """``num_hidden_layers`` of a model dir's config.json, checked."""
    path = model_dir / "config.json"
    n = read_json_object(path, "model config").get("num_hidden_layers")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise UserError(f"{path}: num_hidden_layers: expected a positive integer, got {n!r}")
    return n


def cached_kept_layers(student_dir: Path) -> list[int] | None:
    """The teacher blocks a layer-dropped student built earlier holds (None: there is none)."""
    try:
        kept = json.loads((student_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):  # absent or damaged: built again
        return None
    return kept.get("distiller_kept_layers") if isinstance(kept, dict) else None


def dropped_student(teacher_dir: str | Path, out_dir: str | Path, drop: Any) -> list[int]:
    """``make_dropped_student`` unless ``out_dir`` already holds the very layers asked for
    (``drop`` may have changed since); returns the kept indices. It is built whole or not at
    all, so a kill never leaves one to reuse with missing weights."""
    teacher_dir, out_dir = Path(teacher_dir), Path(out_dir)
    wanted = kept_layers(layer_count(teacher_dir), drop)
    if cached_kept_layers(out_dir) != wanted:
        make_dropped_student(teacher_dir, out_dir, drop)
    return wanted


def make_dropped_student(teacher_dir: str | Path, out_dir: str | Path, drop: Any) -> list[int]:
    """Write a model dir holding only the kept blocks of ``teacher_dir``; returns kept indices.

    Works on the weight files directly (no model instantiation), so it is cheap and keeps any
    quantization as is. Tokenizer and other side files are copied unchanged. The dir is built
    in a temporary sibling and renamed into place (``atomic_dir``): whole or not at all.
    """
    teacher_dir = Path(teacher_dir)
    config = read_json_object(teacher_dir / "config.json", "model config")
    keep = kept_layers(layer_count(teacher_dir), drop)
    new_index = {old: new for new, old in enumerate(keep)}
    weights: dict[str, mx.array] = {}
    for f in sorted(teacher_dir.glob("*.safetensors")):
        for k, v in mx.load(str(f)).items():
            m = _LAYER_KEY.match(k)
            if m is None:
                weights[k] = v
            elif int(m.group(2)) in new_index:
                weights[f"{m.group(1)}{new_index[int(m.group(2))]}{m.group(3)}"] = v
    config["num_hidden_layers"] = len(keep)
    if isinstance(config.get("layer_types"), list):
        config["layer_types"] = [config["layer_types"][i] for i in keep]
    config["distiller_kept_layers"] = keep
    with atomic_dir(out_dir) as tmp:
        for f in teacher_dir.iterdir():
            if f.is_file() and f.suffix != ".safetensors" and f.name not in _REWRITTEN:
                shutil.copy2(f, tmp / f.name)
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return keep


def _backbone(model: nn.Module) -> nn.Module:
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "embed_tokens") or not hasattr(inner, "layers"):
        raise UserError(
            f"hidden-state distillation needs a llama-style model (model.embed_tokens, "
            f"model.layers); got {type(model).__name__}"
        )
    return inner


def split_model(model: nn.Module) -> tuple[Callable, Callable] | None:
    """(backbone, head) of a llama-style model: ``model(x) == head(backbone(x))``; else None."""
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "embed_tokens") or not hasattr(inner, "norm"):
        return None
    if hasattr(model, "lm_head"):
        return inner, model.lm_head
    return inner, inner.embed_tokens.as_linear


def forward_with_hidden(
    model: nn.Module, inputs: mx.array, layer_ids: list[int]
) -> tuple[mx.array, list[mx.array]]:
    """Final (normed) hidden state plus the output of each block in ``layer_ids`` (same order).

    Apply the head (``split_model(model)[1]``) to the first to get logits.

    Re-runs the llama-style forward (embed -> blocks -> norm -> head) by hand so intermediate
    states are available without hooks; with no cache the mask is plain causal.
    """
    from mlx_lm.models.base import create_attention_mask

    inner = _backbone(model)
    h = inner.embed_tokens(inputs)
    mask = create_attention_mask(h, None)
    wanted = {i: None for i in layer_ids}
    for i, layer in enumerate(inner.layers):
        if getattr(layer, "use_sliding", False):
            window = getattr(inner, "sliding_window", None)
            h = layer(h, create_attention_mask(h, None, window_size=window), cache=None)
        else:
            h = layer(h, mask, cache=None)
        if i in wanted:
            wanted[i] = h
    h = inner.norm(h)
    return h, [wanted[i] for i in layer_ids]
