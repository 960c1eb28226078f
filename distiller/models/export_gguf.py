"""``distiller export``: a fused llama-architecture MLX model as one GGUF file for llama.cpp.

The file follows llama.cpp's own converter (convert_hf_to_gguf.py) so that llama.cpp, ollama
and LM Studio load it unchanged:

* ``general.architecture = llama`` and the ``llama.*`` hyperparameters (a layer-dropped student
  simply has a smaller ``llama.block_count``);
* the tokenizer as ``tokenizer.ggml.model = "gpt2"`` (byte-level BPE: tokens, token types,
  merges, the special ids, add_bos/add_eos) and ``tokenizer.chat_template``;
* Q and K weight rows permuted into llama.cpp's rotary layout (``gguf_llama.permute_rows``);
* 1-D tensors (the norms) always float32; 2-D tensors in the chosen type. A 2-D tensor whose
  rows are not a whole number of 32-element blocks falls back to float16 under q8_0/q4_0, as
  llama.cpp's converter does.

An MLX-quantized model is dequantized first and re-quantized into the GGUF type. The file is
written beside ``--out`` and renamed into place: it appears whole or not at all.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from distiller import cli_types
from distiller.errors import UserError
from distiller.files import atomic_file
from distiller.models.gguf_llama import gguf_name, permute_rows
from distiller.models.gguf_tokenizer import gguf_tokenizer_from_dir

FORMATS = ("gguf",)
# --quant -> (GGML type of the 2-D tensors, llama.cpp general.file_type)
QUANT_TYPES: dict[str, tuple[str, str]] = {
    "f32": ("F32", "ALL_F32"),
    "f16": ("F16", "MOSTLY_F16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"),
    "q4_0": ("Q4_0", "MOSTLY_Q4_0"),
}
DEFAULT_QUANT = "f16"  # llama.cpp's converter default


@dataclass
class ExportReport:
    """What an export wrote: for the CLI's summary line and for tests."""

    path: Path
    quant: str
    num_layers: int
    bytes_written: int = 0
    tensor_types: dict[str, int] = field(default_factory=dict)  # GGML type name -> count
    seconds: float = 0.0


def _check_out(out: Path) -> None:
    if out.is_dir():
        raise UserError(f"{out}: a directory; --out names the .gguf file to write")
    if out.exists() and not out.is_file():
        raise UserError(f"{out}: not a regular file")
    parent = out.parent
    if parent.exists() and not parent.is_dir():
        raise UserError(f"{out}: {parent} is a file, not a directory")


def _llama_config(model_dir: Path) -> dict[str, Any]:
    """The model's config.json; refused in one line when the llama GGUF layout cannot carry it."""
    from distiller.models.check import read_json_object

    config = read_json_object(model_dir / "config.json", "model config")
    model_type = config.get("model_type")
    if model_type != "llama":
        raise UserError(
            f"{model_dir}: model_type {model_type!r}; only llama-architecture models "
            "(model_type 'llama') can be exported to GGUF"
        )
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            raise UserError(f"{model_dir}: {key} is set; biased llama layers are not exported")
    scaling = config.get("rope_scaling")
    if scaling:
        kind = scaling.get("type", scaling.get("rope_type")) if isinstance(scaling, dict) else None
        if kind not in ("linear", "default"):
            raise UserError(f"{model_dir}: rope_scaling {kind!r} is not exported (only 'linear')")
    return config


def _float_weights(model: Any) -> dict[str, np.ndarray]:
    """Every parameter as float32 numpy, MLX-quantized modules dequantized."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    params = dict(tree_flatten(model.parameters()))
    for module_name, module in model.named_modules():
        if "scales" not in module:
            continue
        prefix = f"{module_name}." if module_name else ""
        weight = mx.dequantize(
            module["weight"],
            module["scales"],
            module.get("biases"),
            group_size=module.group_size,
            bits=module.bits,
            mode=getattr(module, "mode", "affine"),
        )
        for part in ("scales", "biases"):
            params.pop(prefix + part, None)
        params[prefix + "weight"] = weight
    return {k: np.array(v.astype(mx.float32)) for k, v in params.items()}


def export_gguf(
    model: str | Path,
    out: str | Path,
    quant: str = DEFAULT_QUANT,
    *,
    progress: bool = True,
) -> ExportReport:
    """Write the llama-architecture model ``model`` (any name ``resolve_model`` takes) as the
    GGUF file ``out``, its 2-D weights in ``quant`` (one of ``QUANT_TYPES``)."""
    import gguf
    import mlx.core as mx
    from tqdm import tqdm

    from distiller.models import load_model, resolve_model

    start = time.perf_counter()
    if quant not in QUANT_TYPES:
        raise UserError(f"quant {quant!r}: expected one of {', '.join(QUANT_TYPES)}")
    out = Path(out).expanduser()
    _check_out(out)
    model_dir = resolve_model(model)
    config = _llama_config(model_dir)
    # the tokenizer before the weights: a tokenizer we cannot export fails fast
    tokenizer = gguf_tokenizer_from_dir(model_dir, int(config.get("vocab_size") or 0))

    mlx_model, _ = load_model(model_dir, dtype="float32")
    args = mlx_model.args
    weights = _float_weights(mlx_model)
    del mlx_model
    mx.clear_cache()
    vocab = int(weights["model.embed_tokens.weight"].shape[0])
    if len(tokenizer.tokens) != vocab:
        raise UserError(
            f"{model_dir}: the tokenizer has {len(tokenizer.tokens)} tokens, the model's "
            f"embedding {vocab} rows"
        )

    heads, kv_heads = int(args.num_attention_heads), int(args.num_key_value_heads)
    hidden, layers = int(args.hidden_size), int(args.num_hidden_layers)
    head_dim = int(getattr(args, "head_dim", None) or hidden // heads)

    tensors: list[tuple[str, np.ndarray]] = []
    for name in sorted(weights, key=_tensor_order):
        target = gguf_name(name)
        if target is None:
            raise UserError(f"{model_dir}: parameter {name!r} has no GGUF llama tensor name")
        w = weights.pop(name)
        if target.endswith(".attn_q.weight"):
            w = permute_rows(w, heads)
        elif target.endswith(".attn_k.weight"):
            w = permute_rows(w, kv_heads)
        tensors.append((target, w))

    ggml_type_name, file_type_name = QUANT_TYPES[quant]
    report = ExportReport(path=out, quant=quant, num_layers=layers)
    types = Counter()
    with atomic_file(out) as tmp:
        writer = gguf.GGUFWriter(str(tmp), "llama")
        writer.add_name(model_dir.name)
        writer.add_context_length(int(args.max_position_embeddings or 2048))
        writer.add_embedding_length(hidden)
        writer.add_block_count(layers)
        writer.add_feed_forward_length(int(args.intermediate_size))
        writer.add_head_count(heads)
        writer.add_head_count_kv(kv_heads)
        writer.add_rope_dimension_count(head_dim)
        if head_dim != hidden // heads:
            writer.add_key_length(head_dim)
            writer.add_value_length(head_dim)
        writer.add_layer_norm_rms_eps(float(args.rms_norm_eps))
        writer.add_rope_freq_base(float(args.rope_theta))
        scaling = args.rope_scaling or {}
        if scaling.get("type", scaling.get("rope_type")) == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(scaling["factor"]))
        writer.add_vocab_size(vocab)
        writer.add_file_type(int(gguf.LlamaFileType[file_type_name]))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(tokenizer.pre)
        writer.add_token_list(tokenizer.tokens)
        writer.add_token_types(tokenizer.token_types)
        writer.add_token_merges(tokenizer.merges)
        for key, token_id in tokenizer.special_ids.items():
            {
                "bos": writer.add_bos_token_id,
                "eos": writer.add_eos_token_id,
                "unknown": writer.add_unk_token_id,
                "padding": writer.add_pad_token_id,
            }[key](token_id)
        writer.add_add_bos_token(tokenizer.add_bos)
        writer.add_add_eos_token(tokenizer.add_eos)
        if tokenizer.chat_template:
            writer.add_chat_template(tokenizer.chat_template)

        for target, w in tqdm(tensors, desc=f"export {quant}", unit="tensor", disable=not progress):
            type_name = _tensor_type(w, ggml_type_name)
            types[type_name] += 1
            if type_name == "F32":
                writer.add_tensor(target, np.ascontiguousarray(w, dtype=np.float32))
            elif type_name == "F16":
                writer.add_tensor(target, w.astype(np.float16))
            else:
                qtype = gguf.GGMLQuantizationType[type_name]
                writer.add_tensor(target, gguf.quants.quantize(w, qtype), raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    report.tensor_types = dict(types)
    report.bytes_written = out.stat().st_size
    report.seconds = time.perf_counter() - start
    return report


def _tensor_type(w: np.ndarray, wanted: str) -> str:
    if w.ndim != 2 or wanted == "F32":
        return "F32"
    if wanted == "F16":
        return "F16"
    import gguf

    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[wanted]][0]
    return wanted if w.shape[1] % block == 0 else "F16"


def _tensor_order(name: str) -> tuple[int, int, str]:
    """llama.cpp's order: token_embd, the blocks in layer order, then output_norm and output."""
    if name.startswith("model.layers."):
        return (1, int(name.split(".")[2]), name)
    return (0 if "embed_tokens" in name else 2, 0, name)


# ---------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Write a fused llama-architecture model (a registry name, a cached import or an MLX "
        "model dir, layer-dropped students included) as one GGUF file with its tokenizer and "
        "chat template, for llama.cpp and the tools built on it."
    )
    parser.add_argument(
        "model", metavar="MODEL", help="the model: registry name, cached import or MLX model dir"
    )
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="gguf",
        help="output format (only gguf: llama.cpp's single-file format)",
    )
    parser.add_argument(
        "--quant",
        choices=tuple(QUANT_TYPES),
        default=DEFAULT_QUANT,
        help=(
            "type of the 2-D weights (the norms stay f32): f32 (exact), f16, q8_0 (blocks of 32 "
            "int8 with one f16 scale: 8.5 bits a weight) or q4_0 (4-bit blocks of 32: 4.5 bits a "
            f"weight; the most error). Default: {DEFAULT_QUANT}"
        ),
    )
    parser.add_argument(
        "--out",
        type=cli_types.out_file,
        required=True,
        metavar="FILE",
        help="the .gguf file to write (replaced whole if it exists; never left half-written)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run_cli(args: argparse.Namespace) -> int:
    report = export_gguf(args.model, args.out, args.quant, progress=not args.quiet)
    types = ", ".join(f"{n} {t}" for t, n in sorted(report.tensor_types.items()))
    print(
        f"wrote {report.path} ({report.bytes_written / 1e6:.1f} MB, {report.quant}, "
        f"{report.num_layers} layers; tensors: {types}) in {report.seconds:.1f}s"
    )
    return 0
