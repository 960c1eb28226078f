"""Convert a llama-architecture GGUF file into an MLX model dir that plain ``mlx_lm.load`` opens.

The output is config.json + model.safetensors + the tokenizer files rebuilt from the GGUF
metadata. Weights are either dequantized to a float dtype (the default: float32 is what runs fast
on CPU) or, with ``keep_quantized``, re-packed without loss into MLX affine quantization:

* Q4_0: w = d * (q - 8)   -> 4 bits, group 32, scale d, bias -8d
* Q4_1: w = d * q + m     -> 4 bits, group 32, scale d, bias m
* Q5_0: w = d * (q - 16)  -> 5 bits, group 32, scale d, bias -16d
* Q5_1: w = d * q + m     -> 5 bits, group 32, scale d, bias m
* Q8_0: w = d * q (int8)  -> 8 bits, group 32, scale d, bias -128d (q stored as q + 128)

MLX computes w = scale * q + bias per group of consecutive elements along a row, exactly the
GGUF block formulas above, so nothing is re-rounded. Tensors of other types stay float; each
quantized module gets its own entry in config.json's ``quantization`` map, which mlx-lm applies
per layer.

llama.cpp's converter permutes the rows of the Q and K projections so that rotary embedding pairs
are adjacent (its "interleaved" RoPE); mlx-lm's llama uses the Hugging Face "rotate half" layout,
so we undo that permutation.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from distiller.errors import UserError
from distiller.models.gguf_llama import BLOCK_NAMES, GLOBAL_NAMES, unpermute_rows
from distiller.models.gguf_tokenizer import write_tokenizer

SUPPORTED_ARCHITECTURES = ("llama",)

_FLOAT_DTYPES = ("float32", "float16", "bfloat16")


@dataclass
class ConversionReport:
    """What a conversion wrote, for progress output and tests."""

    path: Path
    config: dict[str, Any]
    tensor_types: dict[str, int] = field(default_factory=dict)  # GGUF type name -> count
    quantized: dict[str, int] = field(default_factory=dict)  # MLX parameter -> bits
    seconds: float = 0.0
    bytes_written: int = 0


def _gguf_module():
    import gguf

    return gguf


def open_gguf(path: str | Path):
    """``gguf.GGUFReader`` for ``path``, with a UserError for a missing or unreadable file."""
    gguf = _gguf_module()
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such GGUF file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise UserError(f"{path}: not a GGUF file (it does not start with the bytes 'GGUF')")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # numpy/struct errors from reading past the end of the file
        raise UserError(
            f"{path}: truncated or damaged GGUF file ({size} bytes): "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from None
    end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > size:
        raise UserError(f"{path}: truncated: its tensors end at byte {end}, the file has {size}")
    return reader


def _value(fields, key: str, default: Any = None) -> Any:
    f = fields.get(key)
    return default if f is None else f.contents()


def _f32(value: Any) -> float:
    """A GGUF float32 as the shortest decimal that rounds to it (1e-05, not 9.9999997e-06)."""
    return float(str(np.float32(value)))


def llama_config(reader, source: str) -> dict[str, Any]:
    """The mlx-lm llama config.json for a GGUF reader (raises UserError for other architectures)."""
    fields = reader.fields
    arch = _value(fields, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UserError(
            f"{source}: architecture {arch!r} is not supported; supported: "
            + ", ".join(SUPPORTED_ARCHITECTURES)
        )

    def need(key: str) -> Any:
        value = _value(fields, f"{arch}.{key}")
        if value is None:
            raise UserError(f"{source}: metadata key {arch}.{key} is missing")
        return value

    names = {t.name for t in reader.tensors}
    heads = int(need("attention.head_count"))
    hidden = int(need("embedding_length"))
    embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embed is None:
        raise UserError(f"{source}: tensor token_embd.weight is missing")
    vocab = int(_value(fields, f"{arch}.vocab_size", int(embed.shape[1])))
    config: dict[str, Any] = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "num_hidden_layers": int(need("block_count")),
        "intermediate_size": int(need("feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_value(fields, f"{arch}.attention.head_count_kv", heads)),
        "head_dim": int(_value(fields, f"{arch}.attention.key_length", hidden // heads)),
        "rms_norm_eps": _f32(need("attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32(_value(fields, f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(_value(fields, f"{arch}.context_length", 2048)),
        "vocab_size": vocab,
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": False,
        "mlp_bias": False,
    }
    scaling = _value(fields, f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        if scaling != "linear":
            raise UserError(f"{source}: rope scaling {scaling!r} is not supported (only 'linear')")
        factor = _f32(_value(fields, f"{arch}.rope.scaling.factor", 1.0))
        config["rope_scaling"] = {"type": "linear", "factor": factor}
    if "rope_freqs.weight" in names:
        raise UserError(
            f"{source}: tensor rope_freqs.weight (llama3-style rope scaling) is not supported"
        )
    for key, name in (("bos", "bos_token_id"), ("eos", "eos_token_id")):
        token = _value(fields, f"tokenizer.ggml.{key}_token_id")
        if token is not None:
            config[name] = int(token)
    return config


def _mlx_name(gguf_name: str, n_layers: int, source: str) -> str:
    if gguf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in BLOCK_NAMES:
        layer = int(parts[1])
        if layer < n_layers:
            return f"model.layers.{layer}.{BLOCK_NAMES[parts[2]]}"
    raise UserError(f"{source}: tensor {gguf_name!r} has no llama mapping (unsupported tensor)")


# ---------------------------------------------------------------------------------------------
# Quantized blocks -> MLX affine quantization


def _f16(raw: np.ndarray, start: int) -> np.ndarray:
    """The float16 at byte ``start`` of each block, as float32, shape (rows, blocks)."""
    return (
        np.ascontiguousarray(raw[..., start : start + 2])
        .view(np.float16)[..., 0]
        .astype(np.float32)
    )


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """ggml 4-bit layout: element j in the low nibble of byte j, element j+16 in its high nibble."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _high_bits(raw: np.ndarray, start: int) -> np.ndarray:
    """The 5th bit of each of the 32 elements, from the little-endian uint32 qh at ``start``."""
    qh = np.ascontiguousarray(raw[..., start : start + 4]).view("<u4")  # (rows, blocks, 1)
    return (((qh >> np.arange(32, dtype=np.uint32)) & 1) << 4).astype(np.uint8)


def _blocks_q(raw: np.ndarray, qtype_name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(q per element, scale per block, bias per block, bits) for a (rows, blocks, bytes) array."""
    if qtype_name == "Q4_0":
        d = _f16(raw, 0)
        return _nibbles(raw[..., 2:18]), d, -8.0 * d, 4
    if qtype_name == "Q4_1":
        return _nibbles(raw[..., 4:20]), _f16(raw, 0), _f16(raw, 2), 4
    if qtype_name == "Q5_0":
        d = _f16(raw, 0)
        return _nibbles(raw[..., 6:22]) | _high_bits(raw, 2), d, -16.0 * d, 5
    if qtype_name == "Q5_1":
        return _nibbles(raw[..., 8:24]) | _high_bits(raw, 4), _f16(raw, 0), _f16(raw, 2), 5
    if qtype_name == "Q8_0":
        d = _f16(raw, 0)
        q = (raw[..., 2:34].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        return q, d, -128.0 * d, 8
    raise KeyError(qtype_name)


KEEPABLE_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")


def pack_mlx(q: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned ``bits``-bit values (rows, n) into MLX's uint32 layout (rows, n*bits/32).

    MLX stores the values as one little-endian bit stream per row: element k occupies bits
    [k*bits, (k+1)*bits) (for 4 and 8 bits that is simply element i of a word at bit i*bits).
    """
    rows, n = q.shape
    if 32 % bits == 0:
        per_word = 32 // bits
        words = q.reshape(rows, n // per_word, per_word).astype(np.uint32)
        shifts = np.arange(per_word, dtype=np.uint32) * bits
        return np.bitwise_or.reduce(words << shifts, axis=-1)
    stream = np.unpackbits(q[..., None], axis=-1, bitorder="little")[..., :bits]
    packed = np.packbits(stream.reshape(rows, n * bits), axis=-1, bitorder="little")
    return np.ascontiguousarray(packed).view("<u4")


def mlx_quantized(tensor, qtype_name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(packed uint32 weight, scales, biases, bits) for a GGUF reader tensor of a keepable type."""
    gguf = _gguf_module()
    _, block_bytes = gguf.GGML_QUANT_SIZES[tensor.tensor_type]
    rows = int(np.prod(tensor.shape[1:]))
    raw = tensor.data.reshape(rows, -1, block_bytes)
    q, scales, biases, bits = _blocks_q(raw, qtype_name)
    return pack_mlx(q.reshape(rows, -1), bits), scales, biases, bits


def float_tensor(tensor, source: str) -> np.ndarray:
    """A GGUF reader tensor as float32 in row-major (PyTorch/MLX) shape."""
    gguf = _gguf_module()
    qtype = gguf.GGMLQuantizationType(tensor.tensor_type)
    shape = tuple(int(d) for d in reversed(tensor.shape))
    if qtype == gguf.GGMLQuantizationType.F32:
        return np.asarray(tensor.data, dtype=np.float32).reshape(shape)
    if qtype == gguf.GGMLQuantizationType.F16:
        return np.asarray(tensor.data).astype(np.float32).reshape(shape)
    if qtype.name not in DEQUANTIZABLE_TYPES:
        raise UserError(
            f"{source}: tensor {tensor.name!r} has type {qtype.name}, which is not supported "
            f"(supported: {', '.join(('F32', 'F16', *DEQUANTIZABLE_TYPES))})"
        )
    return gguf.quants.dequantize(tensor.data, qtype).astype(np.float32).reshape(shape)


DEQUANTIZABLE_TYPES = ("BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")


# ---------------------------------------------------------------------------------------------


def convert_gguf(
    gguf_path: str | Path,
    out_dir: str | Path,
    *,
    keep_quantized: bool = False,
    dtype: str = "float32",
    progress: bool = True,
) -> ConversionReport:
    """Convert ``gguf_path`` (llama architecture) into an MLX model dir at ``out_dir``.

    ``dtype`` is the float type of every tensor that is not kept quantized (scales and biases
    included). ``keep_quantized`` keeps Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 tensors quantized (lossless);
    without it everything is dequantized. ``out_dir`` is created; existing files are overwritten.
    """
    import mlx.core as mx
    from tqdm import tqdm

    if dtype not in _FLOAT_DTYPES:
        raise UserError(f"dtype {dtype!r} is not one of {', '.join(_FLOAT_DTYPES)}")
    start = time.perf_counter()
    source = str(gguf_path)
    reader = open_gguf(gguf_path)
    config = llama_config(reader, source)
    n_layers = config["num_hidden_layers"]
    n_heads, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
    mx_dtype = getattr(mx, dtype)
    gguf = _gguf_module()

    # Check every tensor before writing anything, so a bad file fails fast and clearly.
    names = {}
    for t in reader.tensors:
        names[t.name] = _mlx_name(t.name, n_layers, source)
        type_name = gguf.GGMLQuantizationType(t.tensor_type).name
        if type_name not in ("F32", "F16", *DEQUANTIZABLE_TYPES):
            raise UserError(
                f"{source}: tensor {t.name!r} has type {type_name}, which is not supported "
                f"(supported: {', '.join(('F32', 'F16', *DEQUANTIZABLE_TYPES))})"
            )

    report = ConversionReport(path=Path(out_dir), config=config)
    weights: dict[str, Any] = {}
    quant: dict[str, dict[str, Any]] = {}
    for t in tqdm(reader.tensors, desc="converting", unit="tensor", disable=not progress):
        type_name = gguf.GGMLQuantizationType(t.tensor_type).name
        report.tensor_types[type_name] = report.tensor_types.get(type_name, 0) + 1
        name = names[t.name]
        heads = n_heads if ".q_proj." in name else n_kv if ".k_proj." in name else None
        if keep_quantized and type_name in KEEPABLE_TYPES and len(t.shape) == 2:
            wq, scales, biases, bits = mlx_quantized(t, type_name)
            if heads:
                wq, scales, biases = (unpermute_rows(a, heads) for a in (wq, scales, biases))
            base = name.removesuffix(".weight")
            weights[name] = mx.array(wq)
            weights[f"{base}.scales"] = mx.array(scales).astype(mx_dtype)
            weights[f"{base}.biases"] = mx.array(biases).astype(mx_dtype)
            quant[base] = {"group_size": 32, "bits": bits, "mode": "affine"}
            report.quantized[base] = bits
        else:
            w = float_tensor(t, source)
            if heads:
                w = unpermute_rows(w, heads)
            weights[name] = mx.array(w).astype(mx_dtype)

    if quant:
        # The most common setting is the default; every quantized module is also listed by path.
        # (ties go to the setting seen first, so the output is deterministic)
        settings = Counter(json.dumps(v, sort_keys=True) for v in quant.values())
        default = json.loads(settings.most_common(1)[0][0])
        config["quantization"] = {**default, **quant}
        config["quantization_config"] = config["quantization"]

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_tokenizer(reader.fields, out, source=source)
    report.bytes_written = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    report.seconds = time.perf_counter() - start
    return report
