"""Stage: adapter -> fused model. Fold LoRA weights into the base, optionally quantize.

The output is a standalone model dir (config.json, model.safetensors, tokenizer files) that
plain ``mlx_lm.load(dir)`` opens, plus ``distiller_provenance.json`` recording the base model,
the adapter's hash and the spec hash. It is written to a temporary sibling dir and renamed into
place, so an interrupted fuse never leaves a half-written model behind.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from distiller import cli_types
from distiller.errors import UserError
from distiller.spec import QuantizeSpec

# Files of a model dir that are rewritten by the fuse; everything else (tokenizer, chat
# template, generation config) is copied verbatim from the base.
_REWRITTEN = {
    "config.json",
    "model.safetensors.index.json",
    "README.md",
    "distiller_provenance.json",
}


@dataclass
class FuseResult:
    out_dir: str
    base_model: str
    adapter_sha256: str
    quantized: dict | None
    fused_layers: int


def adapter_hash(adapter_dir: str | Path) -> str:
    """sha256 over the adapter config and weights: identifies exactly what was fused."""
    adapter_dir = Path(adapter_dir)
    h = hashlib.sha256()
    for name in ("adapter_config.json", "adapters.safetensors"):
        h.update(name.encode())
        with open(adapter_dir / name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _check_out_dir(out_dir: Path) -> None:
    """``out_dir`` may be replaced only when it is nothing, empty, or a model dir: never a file
    or a directory of something else that --out happened to name."""
    if not os.path.lexists(out_dir):
        return
    if not out_dir.is_dir():
        raise UserError(f"{out_dir}: a file, expected the fused model dir to write")
    if any(out_dir.iterdir()) and not (out_dir / "config.json").exists():
        raise UserError(
            f"{out_dir}: exists and is not a model dir (no config.json); not replacing it"
        )


def _read_adapter(adapter_dir: Path) -> dict:
    """adapter_config.json of an adapter dir that ``distiller train`` finished (or mlx-lm wrote)."""
    from distiller.models.check import read_json_object, safetensors_header
    from distiller.train.checkpoint import RESULT_FILE, unfinished

    cfg_path, weights = adapter_dir / "adapter_config.json", adapter_dir / "adapters.safetensors"
    if not cfg_path.is_file() or not weights.is_file():
        raise UserError(
            f"{adapter_dir}: not an adapter dir (needs adapter_config.json and adapters.safetensors)"
        )
    if unfinished(adapter_dir):
        raise UserError(
            f"{adapter_dir}: training has not finished (a checkpoint, no {RESULT_FILE}); run the "
            "same `distiller train` command again to finish it"
        )
    adapter_cfg = read_json_object(cfg_path, "adapter config")
    safetensors_header(weights)
    return adapter_cfg


def fuse(
    adapter_dir: str | Path,
    out_dir: str | Path,
    *,
    base_model: str | None = None,
    quantize: QuantizeSpec | None = None,
    spec_hash: str | None = None,
) -> FuseResult:
    """Fuse ``adapter_dir`` (from ``distiller train``) into its base model, written to ``out_dir``.

    ``quantize``: None (keep the base's dtype) or the bits and group size to quantize to.
    ``base_model`` overrides the base recorded in adapter_config.json.
    """
    import mlx.core as mx
    from mlx.utils import tree_unflatten
    from mlx_lm.tuner.utils import load_adapters
    from mlx_lm.utils import load_model, quantize_model, save_config, save_model

    from distiller.files import atomic_dir
    from distiller.models import resolve_model

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    adapter_cfg = _read_adapter(adapter_dir)
    cfg_path = adapter_dir / "adapter_config.json"
    base = base_model or adapter_cfg.get("model")
    if not base:
        raise UserError(f"{cfg_path}: no base model recorded; pass --base")
    if not isinstance(base, str):
        raise UserError(f"{cfg_path}: model: expected a model name or dir, got {base!r}")
    _check_out_dir(out_dir)
    base_dir = resolve_model(base)

    # The base in its stored dtype: fusing must not silently upcast the saved model.
    try:
        model, config = load_model(base_dir)
    except (ValueError, KeyError, TypeError, AttributeError, RuntimeError, OSError) as exc:
        raise UserError(f"{base_dir}: cannot load the model: {_first_line(exc)}") from None
    try:
        load_adapters(model, str(adapter_dir))
    except (ValueError, KeyError, TypeError, AttributeError, RuntimeError, OSError) as exc:
        # An adapter trained on another model (shapes, layer count) or a damaged config.
        raise UserError(
            f"{adapter_dir}: the adapter does not fit {base}: {_first_line(exc)}"
        ) from None
    fused = [(n, m.fuse()) for n, m in model.named_modules() if hasattr(m, "fuse")]
    if fused:
        model.update_modules(tree_unflatten(fused))

    quant = None
    if quantize:
        quant = {"bits": quantize.bits, "group_size": quantize.group_size}
        model, config = quantize_model(model, config, quant["group_size"], quant["bits"])
    mx.eval(model.parameters())

    result = FuseResult(str(out_dir), str(base), adapter_hash(adapter_dir), quant, len(fused))
    try:
        # Built in a temporary sibling and renamed into place: an interrupted fuse leaves the
        # previous model (or none), never a half-written one.
        with atomic_dir(out_dir) as tmp:
            save_model(tmp, model)
            save_config(dict(config), tmp / "config.json")
            for f in base_dir.iterdir():
                if f.is_file() and f.suffix != ".safetensors" and f.name not in _REWRITTEN:
                    shutil.copy2(f, tmp / f.name)
            provenance = {
                **asdict(result),
                "base_dir": str(base_dir),
                "adapter_dir": str(adapter_dir),
                "adapter_config": adapter_cfg,
                "spec_hash": spec_hash,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            (tmp / "distiller_provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
    except OSError as exc:  # disk full, no permission
        raise UserError(f"{out_dir}: cannot write the fused model: {exc.strerror or exc}") from None
    return result


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter", required=True, help="adapter dir written by `distiller train`")
    parser.add_argument(
        "--out",
        required=True,
        type=cli_types.out_dir,
        help="fused model dir to write (a model dir already there is replaced)",
    )
    parser.add_argument(
        "--base", help="base model (default: the one recorded in adapter_config.json)"
    )
    parser.add_argument(
        "--spec",
        help="task spec: its hash goes into the provenance, and its "
        "student.quantize settings are used unless --bits is given",
    )
    parser.add_argument(
        "--bits", type=int, choices=(2, 3, 4, 5, 6, 8), help="quantize to this many bits"
    )
    parser.add_argument(
        "--group-size",
        type=int,
        choices=(32, 64, 128),
        help=f"weights sharing one scale when quantizing with --bits (default: "
        f"{QuantizeSpec.group_size})",
    )


def run_cli(args: argparse.Namespace) -> int:
    if args.group_size is not None and args.bits is None:
        raise UserError("--group-size applies only with --bits (quantizing)")
    spec_hash, quant = None, None
    if args.spec:
        from distiller.spec import load_spec

        spec = load_spec(args.spec)
        spec_hash, quant = spec.fingerprint(), spec.student.quantize
    if args.bits:
        group = {"group_size": args.group_size} if args.group_size else {}
        quant = QuantizeSpec(bits=args.bits, **group)
    r = fuse(args.adapter, args.out, base_model=args.base, quantize=quant, spec_hash=spec_hash)
    q = f", quantized to {r.quantized['bits']} bits" if r.quantized else ""
    print(f"fused {r.fused_layers} adapter layers into {r.base_model}{q}: {r.out_dir}")
    return 0
