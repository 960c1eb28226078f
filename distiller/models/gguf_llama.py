"""What the llama architecture looks like on both sides of a GGUF file, shared by the importer
(``distiller.models.gguf``: GGUF -> MLX) and the exporter (``distiller.models.export_gguf``:
MLX -> GGUF): the tensor-name table and the Q/K row permutation with its inverse.

llama.cpp's converter (convert_hf_to_gguf.py, ``LlamaModel.permute``) reorders the rows of the
Q and K projections so that each rotary pair is two adjacent rows (llama.cpp's "interleaved"
RoPE); Hugging Face / mlx-lm llama keeps the pairs half a head apart ("rotate half").
"""

from __future__ import annotations

import numpy as np

# GGUF tensor name -> mlx-lm llama parameter name, for the tensors outside the blocks...
GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# ... and within block N (GGUF ``blk.N.<key>`` <-> mlx-lm ``model.layers.N.<value>``).
BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def gguf_name(mlx_name: str) -> str | None:
    """The GGUF tensor name of an mlx-lm llama parameter, or None when it has none."""
    for gguf_key, mlx_key in GLOBAL_NAMES.items():
        if mlx_name == mlx_key:
            return gguf_key
    prefix = "model.layers."
    if mlx_name.startswith(prefix):
        layer, _, rest = mlx_name[len(prefix) :].partition(".")
        for gguf_key, mlx_key in BLOCK_NAMES.items():
            if layer.isdigit() and rest == mlx_key:
                return f"blk.{int(layer)}.{gguf_key}"
    return None


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Hugging Face -> llama.cpp Q/K row order: per head, rows (half, i) -> (i, half).

    ``n_head`` is the number of heads of this projection (key/value heads for K).
    """
    head_dim = w.shape[0] // n_head
    return w.reshape(n_head, 2, head_dim // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp -> Hugging Face Q/K row order: the inverse of ``permute_rows``."""
    head_dim = w.shape[0] // n_head
    return w.reshape(n_head, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
