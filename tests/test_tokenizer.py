"""Tokenizer rebuilt from GGUF metadata: structure, round trips, and the shared tiny model fixture."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFWriter
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distiller.errors import UserError
from distiller.models.gguf_tokenizer import convert_tokenizer

REPO_ROOT = Path(__file__).resolve().parent.parent
FIXTURE_TOKENIZER = REPO_ROOT / "fixtures" / "tokenizer"
REFERENCE = REPO_ROOT / "fixtures" / "reference" / "llamacpp_logits.npz"


@pytest.fixture(scope="module")
def hf_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(FIXTURE_TOKENIZER))


@pytest.fixture(scope="module")
def raw_tokenizer():
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(FIXTURE_TOKENIZER / "tokenizer.json"))


def test_fixture_tokenizer_specials(hf_tokenizer):
    assert len(hf_tokenizer) == 49152
    assert hf_tokenizer.bos_token == "<|im_start|>" and hf_tokenizer.bos_token_id == 1
    assert hf_tokenizer.eos_token == "<|im_end|>" and hf_tokenizer.eos_token_id == 2
    assert hf_tokenizer.pad_token_id == 2 and hf_tokenizer.unk_token == "<|endoftext|>"
    # add_bos_token is False in the GGUF: nothing is prepended.
    assert hf_tokenizer.encode("Hello") == hf_tokenizer.encode("Hello", add_special_tokens=False)
    # control tokens are atomic and skipped on request
    ids = hf_tokenizer.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert hf_tokenizer.decode(ids, skip_special_tokens=True) == "user\nhi"


def test_chat_template(hf_tokenizer):
    text = hf_tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text.startswith("<|im_start|>system\n")
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_digits_are_split_individually(raw_tokenizer):
    # llama.cpp's "smollm" pre-tokenizer splits every digit on its own before the GPT-2 regex.
    pieces = [p for p, _ in raw_tokenizer.pre_tokenizer.pre_tokenize_str("in 2024, x12")]
    assert pieces == ["in", "Ġ", "2", "0", "2", "4", ",", "Ġx", "1", "2"]


def _unrepresentable_bytes() -> set[int]:
    """Bytes with no token in the SmolLM2 vocab (never valid UTF-8, or rare control bytes)."""
    from tokenizers import pre_tokenizers

    vocab = json.loads((FIXTURE_TOKENIZER / "tokenizer.json").read_text())["model"]["vocab"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    # ByteLevel maps printable bytes to themselves and the rest to chr(256 + n), in byte order.
    byte_chars = {}
    n = 0
    for b in range(256):
        if chr(b) in alphabet and (33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255):
            byte_chars[b] = chr(b)
        else:
            byte_chars[b] = chr(256 + n)
            n += 1
    return {b for b, c in byte_chars.items() if c not in vocab}


MISSING_BYTES = _unrepresentable_bytes()


def _representable(ch: str) -> bool:
    return not (set(ch.encode("utf-8")) & MISSING_BYTES)


def test_vocab_byte_gaps_are_the_known_ones():
    # The SmolLM2 vocab lacks 21 of the 256 byte tokens: bytes that never occur in UTF-8
    # (C0, C1, F5-FF), the lead bytes of planes 4-11 (F1, F2) and six control bytes. Text
    # containing them cannot be encoded by this vocab (the BPE model drops those bytes).
    assert {
        0x04,
        0x06,
        0x13,
        0x14,
        0x16,
        0x1D,
        0xC0,
        0xC1,
        0xF1,
        0xF2,
        *range(0xF5, 0x100),
    } == MISSING_BYTES


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.text(st.characters(codec="utf-8").filter(_representable), max_size=200))
def test_round_trip_arbitrary_unicode(raw_tokenizer, text):
    ids = raw_tokenizer.encode(text, add_special_tokens=False).ids
    assert raw_tokenizer.decode(ids, skip_special_tokens=False) == text


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.text(st.characters(codec="utf-8").filter(_representable), max_size=80))
def test_round_trip_through_transformers(hf_tokenizer, text):
    ids = hf_tokenizer.encode(text, add_special_tokens=False)
    assert hf_tokenizer.decode(ids) == text


def _write_gguf(path: Path, *, model: str = "gpt2", pre: str = "smollm") -> Path:
    tokens = ["<|endoftext|>", "<|im_start|>", "<x>", "a", "b", "ab", "Ġ", "Ġab", "1", "2"]
    types = [3, 3, 4, 1, 1, 1, 1, 1, 1, 1]
    writer = GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model(model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(["a b", "Ġ ab"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(0)
    writer.add_chat_template("{{ messages[0]['content'] }}")
    writer.add_tensor("dummy", np.zeros(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_convert_small_gguf(tmp_path):
    from tokenizers import Tokenizer

    src = _write_gguf(tmp_path / "t.gguf")
    convert_tokenizer(src, tmp_path / "out")
    tok = Tokenizer.from_file(str(tmp_path / "out" / "tokenizer.json"))
    assert tok.encode("ab ab12<x><|im_start|>").ids == [5, 7, 8, 9, 2, 1]
    config = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert config["bos_token"] == "<|im_start|>" and config["eos_token"] == "<|endoftext|>"
    assert config["chat_template"] == "{{ messages[0]['content'] }}"
    assert config["added_tokens_decoder"]["2"]["special"] is False  # user-defined
    assert config["added_tokens_decoder"]["1"]["special"] is True  # control


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"model": "llama"}, "only byte-level BPE"), ({"pre": "qwen2"}, "supported pre-tokenizers")],
)
def test_unsupported_tokenizers_are_user_errors(tmp_path, kwargs, message):
    src = _write_gguf(tmp_path / "t.gguf", **kwargs)
    with pytest.raises(UserError, match=message):
        convert_tokenizer(src, tmp_path / "out")


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(UserError, match="not a readable GGUF"):
        convert_tokenizer(bad, tmp_path / "out")
    with pytest.raises(UserError, match="no such GGUF"):
        convert_tokenizer(tmp_path / "missing.gguf", tmp_path / "out")


def test_tiny_model_dir_loads_with_mlx_lm(tiny_model_dir):
    import mlx.core as mx
    from mlx_lm import load

    model, tok = load(str(tiny_model_dir))
    assert len(model.layers) == 2
    assert tok.eos_token_id == 2
    logits = model(mx.array([tok.encode("hello world")]))
    assert logits.shape[-1] == 49152 and logits.dtype == mx.float32


def test_tiny_model_factory_custom_layers(tiny_model_factory):
    from mlx_lm import load

    path = tiny_model_factory(num_hidden_layers=4)
    assert path == tiny_model_factory(num_hidden_layers=4)  # cached per session
    model, _ = load(str(path))
    assert len(model.layers) == 4


def test_matches_llamacpp_tokenization(raw_tokenizer):
    """Token ids llama.cpp produced on the original GGUF (scripts/record_llamacpp_reference.py)."""
    data = np.load(REFERENCE, allow_pickle=False)
    prompts = json.loads(str(data["prompts"]))
    assert len(prompts) >= 5
    for i, prompt in enumerate(prompts):
        got = raw_tokenizer.encode(prompt, add_special_tokens=False).ids
        assert got == data[f"ids_{i}"].tolist(), f"prompt {i} {prompt[:40]!r}"


@pytest.mark.real_model
def test_fixture_is_what_the_real_gguf_converts_to(tmp_path):
    """The committed fixture equals a fresh conversion of the real GGUF."""
    from distiller.models.registry import cached_gguf, pull

    pull("smollm2-135m-instruct", log=lambda m: None)
    gguf_path = cached_gguf("smollm2-135m-instruct")
    assert gguf_path is not None
    convert_tokenizer(gguf_path, tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / name).read_bytes() == (FIXTURE_TOKENIZER / name).read_bytes(), name
