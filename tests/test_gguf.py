"""GGUF -> MLX conversion on tiny GGUF files written with gguf.GGUFWriter.

Block formats are checked against blocks encoded here by hand from known (q, d, m) and the
ggml formulas; the Q/K un-permutation and the whole model against a reference mlx-lm llama in
Hugging Face layout (its logits must match the converted model's).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader, GGUFWriter
from gguf.quants import dequantize, quantize

import distiller  # noqa: F401  (must precede mlx)
from distiller.errors import UserError
from distiller.models.gguf import convert_gguf, float_tensor, mlx_quantized, pack_mlx

RNG = np.random.default_rng(0)


# --- block encoders written from the ggml block layouts --------------------------------------


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16)[..., None].view(np.uint8)


def _nibble_bytes(q: np.ndarray) -> np.ndarray:
    low = q[..., :16] & 0x0F
    high = q[..., 16:] & 0x0F
    return (low | (high << 4)).astype(np.uint8)


def _qh_bytes(q: np.ndarray) -> np.ndarray:
    bits = ((q >> 4) & 1).astype(np.uint32)
    qh = (bits << np.arange(32, dtype=np.uint32)).sum(axis=-1, dtype=np.uint32)
    return qh.astype("<u4")[..., None].view(np.uint8)


def encode_blocks(qtype: str, rows: int, blocks: int):
    """Random (bytes, expected float64 values) for a (rows, blocks*32) tensor of ``qtype``."""
    d = RNG.uniform(0.01, 0.1, (rows, blocks)).astype(np.float16).astype(np.float64)
    m = RNG.uniform(-0.5, 0.5, (rows, blocks)).astype(np.float16).astype(np.float64)
    if qtype == "Q8_0":
        qi = RNG.integers(-128, 128, (rows, blocks, 32))
        raw = np.concatenate([_f16_bytes(d), qi.astype(np.int8).view(np.uint8)], axis=-1)
        expected = d[..., None] * qi
    else:
        bits = 4 if qtype.startswith("Q4") else 5
        q = RNG.integers(0, 2**bits, (rows, blocks, 32))
        parts = [_f16_bytes(d)]
        if qtype.endswith("_1"):
            parts.append(_f16_bytes(m))
        if bits == 5:
            parts.append(_qh_bytes(q))
        parts.append(_nibble_bytes(q))
        raw = np.concatenate(parts, axis=-1)
        if qtype.endswith("_1"):
            expected = d[..., None] * q + m[..., None]
        else:
            expected = d[..., None] * (q - 2 ** (bits - 1))
    return raw.reshape(rows, -1).astype(np.uint8), expected.reshape(rows, -1)


def _read_single(tmp_path: Path, raw: np.ndarray, qtype: QT):
    path = tmp_path / "t.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_tensor("w", raw, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return GGUFReader(str(path)).tensors[0]


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"])
def test_block_formats_dequantize_and_repack_exactly(tmp_path, qtype):
    import mlx.core as mx

    raw, expected = encode_blocks(qtype, rows=3, blocks=4)
    tensor = _read_single(tmp_path, raw, QT[qtype])
    got = float_tensor(tensor, "t.gguf")
    assert got.shape == (3, 128)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)

    wq, scales, biases, bits = mlx_quantized(tensor, qtype)
    assert bits == {"Q4": 4, "Q5": 5, "Q8": 8}[qtype[:2]]
    assert wq.dtype == np.uint32 and wq.shape == (3, 128 * bits // 32)
    back = mx.dequantize(
        mx.array(wq), mx.array(scales), mx.array(biases), group_size=32, bits=bits, mode="affine"
    )
    np.testing.assert_allclose(np.array(back), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bits", [4, 5, 8])
def test_pack_mlx_matches_mlx_layout(bits):
    import mlx.core as mx

    q = RNG.integers(0, 2**bits, (5, 64)).astype(np.uint8)
    packed = pack_mlx(q, bits)
    ones = mx.ones((5, 2))
    zeros = mx.zeros((5, 2))
    back = mx.dequantize(mx.array(packed), ones, zeros, group_size=32, bits=bits)
    np.testing.assert_array_equal(np.array(back).astype(np.int64), q)
    # mx.quantize's own packing: recover the integers it chose from its scales and biases
    # (exact here: each group spans 0..max) and pack them with pack_mlx -> identical words.
    q[:, ::32] = 0
    q[:, 1::32] = 2**bits - 1
    wq, scales, biases = mx.quantize(mx.array(q.astype(np.float32)), group_size=32, bits=bits)
    s, b = (np.repeat(np.array(x), 32, axis=1) for x in (scales, biases))
    chosen = np.round((q - b) / s).astype(np.uint8)
    assert chosen.min() == 0 and chosen.max() == 2**bits - 1
    np.testing.assert_array_equal(np.array(wq), pack_mlx(chosen, bits))


def test_float_types(tmp_path):
    w = RNG.standard_normal((4, 64)).astype(np.float32)
    t = _read_single(tmp_path, w.astype(np.float16), QT.F16)
    np.testing.assert_array_equal(float_tensor(t, "x"), w.astype(np.float16).astype(np.float32))
    bf = quantize(w, QT.BF16)
    t = _read_single(tmp_path, bf, QT.BF16)
    np.testing.assert_array_equal(float_tensor(t, "x"), dequantize(bf, QT.BF16))


# --- a whole tiny llama ----------------------------------------------------------------------

TINY = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 96,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "vocab_size": 260,
    "tie_word_embeddings": True,
}

# HF name (within a layer) -> (GGUF name, GGUF type used in the test file)
LAYER_TENSORS = {
    "input_layernorm.weight": ("attn_norm.weight", QT.F32),
    "self_attn.q_proj.weight": ("attn_q.weight", QT.Q4_1),
    "self_attn.k_proj.weight": ("attn_k.weight", QT.Q4_0),
    "self_attn.v_proj.weight": ("attn_v.weight", QT.F16),
    "self_attn.o_proj.weight": ("attn_output.weight", QT.Q5_1),
    "post_attention_layernorm.weight": ("ffn_norm.weight", QT.F32),
    "mlp.gate_proj.weight": ("ffn_gate.weight", QT.Q5_0),
    "mlp.up_proj.weight": ("ffn_up.weight", QT.Q8_0),
    "mlp.down_proj.weight": ("ffn_down.weight", QT.BF16),
}


def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's converter does to Q/K rows: within a head, row (half, i) -> row (i, half)."""
    head_dim = w.shape[0] // n_head
    out = np.empty_like(w)
    for h in range(n_head):
        for half in range(2):
            for i in range(head_dim // 2):
                out[h * head_dim + 2 * i + half] = w[h * head_dim + half * head_dim // 2 + i]
    return out


def _tokens() -> list[str]:
    from tokenizers import pre_tokenizers

    return [
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "<x>",
        *pre_tokenizers.ByteLevel.alphabet(),
    ]


def write_tiny_llama_gguf(
    path: Path,
    *,
    types: dict[str, QT] | None = None,
    arch: str = "llama",
    extra_tensors: dict[str, tuple[np.ndarray, QT]] | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Write a tiny llama GGUF; returns the HF-layout float32 weights it encodes (dequantized)."""
    rng = np.random.default_rng(seed)
    cfg = TINY
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    head_dim = hidden // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * head_dim
    shapes = {
        "input_layernorm.weight": (hidden,),
        "self_attn.q_proj.weight": (hidden, hidden),
        "self_attn.k_proj.weight": (kv, hidden),
        "self_attn.v_proj.weight": (kv, hidden),
        "self_attn.o_proj.weight": (hidden, hidden),
        "post_attention_layernorm.weight": (hidden,),
        "mlp.gate_proj.weight": (inter, hidden),
        "mlp.up_proj.weight": (inter, hidden),
        "mlp.down_proj.weight": (hidden, inter),
    }
    types = {**{k: v[1] for k, v in LAYER_TENSORS.items()}, **(types or {})}
    writer = GGUFWriter(str(path), arch)
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_context_length(512)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(inter)
    writer.add_head_count(cfg["num_attention_heads"])
    writer.add_head_count_kv(cfg["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_rope_freq_base(cfg["rope_theta"])
    writer.add_vocab_size(cfg["vocab_size"])
    tokens = _tokens()
    assert len(tokens) == cfg["vocab_size"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3, 3, 4] + [1] * 256)
    writer.add_token_merges([])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)

    expected: dict[str, np.ndarray] = {}

    def add(gguf_name: str, hf_name: str, w: np.ndarray, qtype: QT, n_head: int | None = None):
        stored = llamacpp_permute(w, n_head) if n_head else w
        if qtype == QT.F32:
            data = stored.astype(np.float32)
            back = data
        elif qtype == QT.F16:
            data = stored.astype(np.float16)
            back = data.astype(np.float32)
        elif qtype == QT.IQ4_NL:  # not encodable here: zero blocks of the right size
            data = np.zeros((w.shape[0], w.shape[1] // 32 * 18), dtype=np.uint8)
            back = None
        else:
            data = quantize(stored.astype(np.float32), qtype)
            back = dequantize(data, qtype).astype(np.float32)
        writer.add_tensor(gguf_name, data, raw_dtype=qtype)
        if back is not None:
            expected[hf_name] = llamacpp_permute_inverse(back, n_head) if n_head else back

    emb = rng.standard_normal((cfg["vocab_size"], hidden)).astype(np.float32) * 0.5
    add("token_embd.weight", "model.embed_tokens.weight", emb, types.get("embed", QT.Q8_0))
    add("output_norm.weight", "model.norm.weight", 1 + 0.1 * rng.standard_normal(hidden), QT.F32)
    for layer in range(cfg["num_hidden_layers"]):
        for hf, (gg, _) in LAYER_TENSORS.items():
            shape = shapes[hf]
            if len(shape) == 1:
                w = 1 + 0.1 * rng.standard_normal(shape)
            else:
                w = rng.standard_normal(shape) / np.sqrt(shape[1])
            heads = (
                cfg["num_attention_heads"]
                if hf.startswith("self_attn.q")
                else cfg["num_key_value_heads"]
                if hf.startswith("self_attn.k")
                else None
            )
            add(f"blk.{layer}.{gg}", f"model.layers.{layer}.{hf}", w, types[hf], heads)
    for name, (data, qtype) in (extra_tensors or {}).items():
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


def llamacpp_permute_inverse(w: np.ndarray, n_head: int) -> np.ndarray:
    head_dim = w.shape[0] // n_head
    out = np.empty_like(w)
    for h in range(n_head):
        for half in range(2):
            for i in range(head_dim // 2):
                out[h * head_dim + half * head_dim // 2 + i] = w[h * head_dim + 2 * i + half]
    return out


def test_permutation_helpers_are_inverse():
    w = np.arange(16 * 3).reshape(16, 3)
    assert not np.array_equal(llamacpp_permute(w, 2), w)
    np.testing.assert_array_equal(llamacpp_permute_inverse(llamacpp_permute(w, 2), 2), w)


def _reference_model(expected: dict[str, np.ndarray]):
    import mlx.core as mx
    from mlx_lm.models import llama

    model = llama.Model(llama.ModelArgs.from_dict({"model_type": "llama", **TINY}))
    model.load_weights([(k, mx.array(v)) for k, v in expected.items()], strict=True)
    return model


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    expected = write_tiny_llama_gguf(path)
    return path, expected


def test_convert_dequantized_matches_reference(tiny_gguf, tmp_path):
    import mlx.core as mx
    from mlx_lm import load

    path, expected = tiny_gguf
    report = convert_gguf(path, tmp_path / "out", progress=False)
    assert report.tensor_types == {
        "Q8_0": 3,
        "F32": 5,
        "Q4_1": 2,
        "Q4_0": 2,
        "F16": 2,
        "Q5_1": 2,
        "Q5_0": 2,
        "BF16": 2,
    }
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    for key, value in TINY.items():
        assert config[key] == value, key
    assert config["eos_token_id"] == 2 and "quantization" not in config

    saved = mx.load(str(tmp_path / "out" / "model.safetensors"))
    assert set(saved) == set(expected)  # tied: no lm_head
    for name, value in expected.items():
        assert saved[name].dtype == mx.float32
        np.testing.assert_array_equal(np.array(saved[name]), value, err_msg=name)

    model, tok = load(str(tmp_path / "out"))
    ids = mx.array([[5, 9, 40, 77, 100, 3, 250]])
    np.testing.assert_allclose(
        np.array(model(ids)), np.array(_reference_model(expected)(ids)), rtol=1e-4, atol=1e-4
    )
    assert tok.eos_token_id == 2


def test_convert_keep_quantized_matches_reference(tiny_gguf, tmp_path):
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm import load

    path, expected = tiny_gguf
    report = convert_gguf(path, tmp_path / "q", keep_quantized=True, progress=False)
    assert report.quantized["model.embed_tokens"] == 8
    assert report.quantized["model.layers.0.self_attn.q_proj"] == 4
    assert report.quantized["model.layers.1.mlp.gate_proj"] == 5
    assert "model.layers.0.self_attn.v_proj" not in report.quantized  # F16 stays float
    assert "model.layers.0.mlp.down_proj" not in report.quantized  # BF16 stays float

    model, _ = load(str(tmp_path / "q"))
    layer = model.model.layers[0]
    assert (
        isinstance(layer.self_attn.q_proj, nn.QuantizedLinear) and layer.self_attn.q_proj.bits == 4
    )
    assert layer.mlp.up_proj.bits == 8 and layer.self_attn.o_proj.bits == 5
    assert isinstance(layer.self_attn.v_proj, nn.Linear)
    assert isinstance(model.model.embed_tokens, nn.QuantizedEmbedding)
    q = layer.self_attn.q_proj
    w = mx.dequantize(q.weight, q.scales, q.biases, group_size=32, bits=4)
    np.testing.assert_allclose(
        np.array(w), expected["model.layers.0.self_attn.q_proj.weight"], rtol=1e-5, atol=1e-6
    )
    ids = mx.array([[5, 9, 40, 77, 100, 3, 250]])
    np.testing.assert_allclose(
        np.array(model(ids)), np.array(_reference_model(expected)(ids)), rtol=1e-3, atol=1e-3
    )


def test_not_unpermuting_would_be_caught(tiny_gguf, tmp_path):
    """Guard for the test above: the reference is sensitive to the Q/K row order."""
    import mlx.core as mx

    _, expected = tiny_gguf
    swapped = dict(expected)
    name = "model.layers.0.self_attn.q_proj.weight"
    swapped[name] = llamacpp_permute(expected[name], TINY["num_attention_heads"])
    ids = mx.array([[5, 9, 40, 77, 100, 3, 250]])
    diff = np.abs(
        np.array(_reference_model(swapped)(ids)) - np.array(_reference_model(expected)(ids))
    )
    assert diff.max() > 1e-2


def test_untied_output_gets_lm_head(tmp_path):
    import mlx.core as mx

    out_w = np.random.default_rng(1).standard_normal((TINY["vocab_size"], 64)).astype(np.float32)
    write_tiny_llama_gguf(tmp_path / "u.gguf", extra_tensors={"output.weight": (out_w, QT.F32)})
    report = convert_gguf(tmp_path / "u.gguf", tmp_path / "out", progress=False)
    assert report.config["tie_word_embeddings"] is False
    saved = mx.load(str(tmp_path / "out" / "model.safetensors"))
    np.testing.assert_array_equal(np.array(saved["lm_head.weight"]), out_w)


def test_unsupported_architecture(tmp_path):
    write_tiny_llama_gguf(tmp_path / "x.gguf", arch="gpt2")
    with pytest.raises(UserError, match=r"architecture 'gpt2' is not supported"):
        convert_gguf(tmp_path / "x.gguf", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_unknown_tensor_name(tmp_path):
    extra = np.zeros((4, 64), dtype=np.float32)
    write_tiny_llama_gguf(
        tmp_path / "x.gguf", extra_tensors={"blk.0.ffn_extra.weight": (extra, QT.F32)}
    )
    with pytest.raises(UserError, match=r"'blk.0.ffn_extra.weight' has no llama mapping"):
        convert_gguf(tmp_path / "x.gguf", tmp_path / "out", progress=False)


def test_unsupported_tensor_type_names_tensor_and_type(tmp_path):
    write_tiny_llama_gguf(tmp_path / "x.gguf", types={"mlp.up_proj.weight": QT.IQ4_NL})
    for keep in (False, True):
        with pytest.raises(UserError, match=r"'blk.0.ffn_up.weight' has type IQ4_NL"):
            convert_gguf(tmp_path / "x.gguf", tmp_path / "out", keep_quantized=keep, progress=False)
    assert not (tmp_path / "out").exists()


def test_missing_file_and_bad_dtype(tmp_path):
    with pytest.raises(UserError, match="no such GGUF file"):
        convert_gguf(tmp_path / "nope.gguf", tmp_path / "out", progress=False)
    with pytest.raises(UserError, match="dtype"):
        convert_gguf(tmp_path / "nope.gguf", tmp_path / "out", dtype="int8", progress=False)
