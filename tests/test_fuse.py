"""Fuse: fused model == base + adapter (logits), loadable by plain mlx_lm.load, quantize option."""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.optimizers as optim
import pytest
from mlx_lm import load

from distiller.errors import UserError
from distiller.fuse import adapter_hash, fuse
from distiller.spec import LoraSpec, QuantizeSpec
from distiller.train import lora as LR
from distiller.train.routes import sft_loss
from distiller.train.step import make_train_step


def _adapter(tmp_path, base_dir):
    """A LoRA adapter with non-trivial weights: a few real training steps on random tokens."""
    model, _ = load(str(base_dir))
    cfg = LR.adapter_config(model, LoraSpec(rank=4, alpha=8), False, str(base_dir))
    LR.prepare_trainable(model, cfg)
    step = make_train_step(model, optim.Adam(learning_rate=1e-2), sft_loss, compile=False)
    rng = mx.random.key(0)
    toks = mx.random.randint(0, 200, (2, 17), key=rng)
    batch = {"inputs": toks[:, :-1], "targets": toks[:, 1:], "mask": mx.ones((2, 16))}
    for _ in range(3):
        step(batch)
    out = tmp_path / "adapter"
    LR.save_adapter(out, model, cfg)
    return out, toks[:, :-1]


def test_fused_logits_match_base_plus_adapter(tmp_path, tiny_model_dir):
    adapter, inputs = _adapter(tmp_path, tiny_model_dir)
    ref_model, _ = load(str(tiny_model_dir), adapter_path=str(adapter))
    base_model, _ = load(str(tiny_model_dir))
    r = fuse(adapter, tmp_path / "fused", spec_hash="abc")
    fused_model, tok = load(str(tmp_path / "fused"))  # plain mlx_lm, no adapter
    ref, fused_out, base = ref_model(inputs), fused_model(inputs), base_model(inputs)
    assert mx.allclose(ref, fused_out, atol=1e-4, rtol=1e-4).item()
    assert not mx.allclose(ref, base, atol=1e-3).item()  # the adapter really changed something
    assert r.fused_layers == 2 * 7
    prov = json.loads((tmp_path / "fused" / "distiller_provenance.json").read_text())
    assert prov["spec_hash"] == "abc" and prov["adapter_sha256"] == adapter_hash(adapter)
    assert prov["base_model"] == str(tiny_model_dir)
    assert (tmp_path / "fused" / "tokenizer.json").exists()
    assert tok.encode("hello world") == load(str(tiny_model_dir))[1].encode("hello world")
    assert not list(tmp_path.glob(".fused.tmp-*"))


def test_fuse_and_quantize(tmp_path, tiny_model_dir):
    adapter, inputs = _adapter(tmp_path, tiny_model_dir)
    fuse(adapter, tmp_path / "q", quantize=QuantizeSpec(bits=8, group_size=32))
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert cfg["quantization"]["bits"] == 8 and cfg["quantization"]["group_size"] == 32
    qmodel, _ = load(str(tmp_path / "q"))
    ref, _ = load(str(tiny_model_dir), adapter_path=str(adapter))
    a, b = ref(inputs), qmodel(inputs)
    # 8-bit weights: logits close but not identical
    assert mx.abs(a - b).max().item() < 0.1 * mx.abs(a).max().item()


def test_fuse_rejects_non_adapter_dir(tmp_path):
    with pytest.raises(UserError, match="not an adapter dir"):
        fuse(tmp_path, tmp_path / "out")
