"""``distiller export --format gguf``: MLX llama -> GGUF -> ``distiller models import`` -> MLX.

Two checks per quantization type, on the tiny random llama (real SmolLM2 tokenizer) and on a
layer-dropped student:

* **layout**: the imported model gives the logits of the original MLX model with the same
  rounding applied to its weights in place (``gguf.quants`` quantize/dequantize, which work on
  rows independently, so row permutations commute with them). Any tensor-name, transpose or
  Q/K permutation mistake shows at once, whatever the quantization.
* **quantization error**: against the unrounded original, the relative RMS logit error stays
  under ``sqrt(M) * step``: ``step`` is the rounding step relative to the block's largest
  magnitude (f16: 2^-10 of the value; q8_0: 1/127; q4_0: 1/8), ``M`` the number of rounded
  matrices. Each rounded matrix adds independent relative noise of RMS ~ step / 2 for these
  uniform random weights (amax / rms = sqrt(3)); M of them in series add up as sqrt(M); the
  bound allows twice that.

llama.cpp itself (an independent reader of the file) is driven in the ``llamacpp`` tests,
which need the optional ``llama-cpp-python`` (``pip install -e .[llamacpp]``).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

import distiller  # noqa: F401  (must precede mlx: it loads the fast BLAS)
from distiller.cli import main
from distiller.errors import UserError

QUANT_STEP = {"f32": 0.0, "f16": 2.0**-10, "q8_0": 1 / 127, "q4_0": 1 / 8}
TEXTS = [
    "The capital of France is Paris; 12345 apples cost 3.14 euros, déjà vu 🙂.",
    "<|im_start|>user\nWhat is a quorum in a distributed system?<|im_end|>\n"
    "<|im_start|>assistant\nA quorum is the minimum number of nodes that must agree.",
]


def _export_and_import(model: str | Path, quant: str, tmp: Path, monkeypatch) -> tuple[Path, Path]:
    """The real CLI both ways; the import lands in a private DISTILLER_HOME."""
    out = tmp / f"model-{quant}.gguf"
    assert main(["export", str(model), "--format", "gguf", "--quant", quant, "--out", str(out),
                 "--quiet"]) == 0  # fmt: skip
    monkeypatch.setenv("DISTILLER_HOME", str(tmp / "home"))
    name = f"exported-{quant.replace('_', '-')}"
    assert main(["models", "import", str(out), "--name", name]) == 0
    from distiller.models.registry import cache_path

    return out, cache_path(name)


def _logits(model, tokenizer, text: str) -> np.ndarray:
    import mlx.core as mx

    ids = tokenizer.encode(text, add_special_tokens=False)
    return np.array(model(mx.array([ids]))[0].astype(mx.float32))


def _rounded(model, quant: str) -> int:
    """Round ``model``'s 2-D weights in place as the export does; returns how many it rounded."""
    import gguf
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten

    rounded = {}
    for name, w in tree_flatten(model.parameters()):
        if w.ndim != 2:
            continue
        x = np.array(w.astype(mx.float32))
        if quant == "f16":
            x = x.astype(np.float16).astype(np.float32)
        elif quant != "f32":
            qtype = gguf.GGMLQuantizationType[quant.upper()]
            x = gguf.quants.dequantize(gguf.quants.quantize(x, qtype), qtype)
        rounded[name] = mx.array(x)
    model.update(tree_unflatten(list(rounded.items())))
    return len(rounded)


def _relative_rms(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((a - b) ** 2)) / np.sqrt(np.mean(b**2)))


@pytest.fixture(scope="module")
def dropped_student(tiny_model_factory, tmp_path_factory) -> Path:
    from distiller.train.students import make_dropped_student

    teacher = tiny_model_factory(num_hidden_layers=4)
    out = tmp_path_factory.mktemp("dropped") / "student"
    assert make_dropped_student(teacher, out, [1]) == [0, 2, 3]
    return out


@pytest.mark.parametrize("quant", list(QUANT_STEP))
@pytest.mark.parametrize("which", ["tiny", "dropped"])
def test_round_trip_logits(which, quant, tiny_model_dir, dropped_student, tmp_path, monkeypatch):
    from distiller.models import load_model

    source = tiny_model_dir if which == "tiny" else dropped_student
    _, imported = _export_and_import(source, quant, tmp_path, monkeypatch)
    config = json.loads((imported / "config.json").read_text())
    assert config["num_hidden_layers"] == (2 if which == "tiny" else 3)

    original, tokenizer = load_model(source, dtype="float32")
    back, _ = load_model(imported, dtype="float32")
    reference = [_logits(original, tokenizer, t) for t in TEXTS]
    got = [_logits(back, tokenizer, t) for t in TEXTS]

    matrices = _rounded(original, "f32")  # f32 rounds nothing: this only counts them
    bound = 2 * math.sqrt(matrices) * QUANT_STEP[quant] / 2
    for want, have in zip(reference, got, strict=True):
        error = _relative_rms(have, want)
        assert error <= max(bound, 1e-6), (quant, error, bound)

    _rounded(original, quant)  # now the same rounding as the file, applied in MLX
    for text, have in zip(TEXTS, got, strict=True):
        assert _relative_rms(have, _logits(original, tokenizer, text)) < 1e-5, (quant, text)


def test_mlx_quantized_model_exports_its_dequantized_weights(tiny_model_dir, tmp_path, monkeypatch):
    """An MLX 8-bit model: dequantized weights are exact in f32, so f32 export is lossless."""
    from mlx_lm import convert

    from distiller.models import load_model

    quantized = tmp_path / "q8"
    convert(str(tiny_model_dir), str(quantized), quantize=True, q_bits=8, q_group_size=32)
    _, imported = _export_and_import(quantized, "f32", tmp_path, monkeypatch)
    original, tokenizer = load_model(quantized)
    back, _ = load_model(imported, dtype="float32")
    for text in TEXTS:
        want, have = _logits(original, tokenizer, text), _logits(back, tokenizer, text)
        assert _relative_rms(have, want) < 1e-5, text


def test_tokenizer_and_metadata_round_trip(dropped_student, tmp_path, monkeypatch):
    import gguf

    from distiller.models import load_model

    out, imported = _export_and_import(dropped_student, "q8_0", tmp_path, monkeypatch)
    fields = gguf.GGUFReader(str(out)).fields

    def value(key):
        return fields[key].contents()

    assert value("general.architecture") == "llama"
    assert value("llama.block_count") == 3
    assert value("llama.embedding_length") == 64
    assert value("llama.attention.head_count_kv") == 2
    assert value("tokenizer.ggml.model") == "gpt2"
    assert value("tokenizer.ggml.pre") == "smollm"
    assert len(value("tokenizer.ggml.tokens")) == 49152
    assert value("general.file_type") == int(gguf.LlamaFileType.MOSTLY_Q8_0)

    _, original = load_model(dropped_student)
    _, back = load_model(imported)
    assert value("tokenizer.ggml.bos_token_id") == original.bos_token_id
    assert value("tokenizer.ggml.eos_token_id") == original.eos_token_id
    for text in [*TEXTS, "  two  spaces\tand\nlines 0xFF", "<|endoftext|><repo_name>x"]:
        assert back.encode(text) == original.encode(text), text
    chat = [{"role": "user", "content": "Hi there"}]
    assert value("tokenizer.chat_template") == original.chat_template
    assert back.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) == (
        original.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    )


def test_permutation_matches_llama_cpp_and_inverts():
    from distiller.models.gguf_llama import permute_rows, unpermute_rows

    # one head of dim 4: HF pairs rotary rows (0, 2) and (1, 3); llama.cpp wants them adjacent
    rows = np.arange(8).reshape(8, 1)
    assert permute_rows(rows, 2)[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    w = np.random.default_rng(0).normal(size=(12, 5))
    np.testing.assert_array_equal(unpermute_rows(permute_rows(w, 3), 3), w)


def _run_cli(args: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(args)
    except SystemExit as exc:  # argparse's own usage errors
        code = exc.code
    return code, capsys.readouterr().err.strip().splitlines()[-1]


def test_bad_input_is_one_clear_line(tiny_model_dir, tmp_path, capsys):
    not_llama = tmp_path / "qwen"
    shutil.copytree(tiny_model_dir, not_llama)
    config = json.loads((not_llama / "config.json").read_text())
    (not_llama / "config.json").write_text(json.dumps({**config, "model_type": "qwen2"}))
    out = str(tmp_path / "x.gguf")

    code, line = _run_cli(["export", str(not_llama), "--out", out], capsys)
    assert code == 2 and "only llama-architecture models" in line, line
    code, line = _run_cli(["export", str(tmp_path), "--out", out], capsys)
    assert code == 2 and "not a model directory" in line, line
    code, line = _run_cli(["export", str(tiny_model_dir), "--quant", "q5_k", "--out", out], capsys)
    assert code == 2 and "invalid choice: 'q5_k'" in line, line
    code, line = _run_cli(["export", str(tiny_model_dir), "--out", str(tmp_path)], capsys)
    assert code == 2 and "expected a file, but it is a directory" in line, line
    assert not (tmp_path / "x.gguf").exists()

    from distiller.models.export_gguf import export_gguf

    with pytest.raises(UserError, match="quant 'q5_k'"):
        export_gguf(tiny_model_dir, out, "q5_k")
    with pytest.raises(UserError, match="a directory"):
        export_gguf(tiny_model_dir, tmp_path, "f16")


def test_output_is_whole_or_absent(tiny_model_dir, tmp_path, monkeypatch):
    """A failure while the tensors are being written leaves the previous file and no scraps."""
    import gguf

    from distiller.models.export_gguf import export_gguf

    out = tmp_path / "model.gguf"
    out.write_bytes(b"previous")

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_gguf(tiny_model_dir, out, "f16", progress=False)
    assert out.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"]


@pytest.mark.real_model
def test_real_model_f32_round_trip(tmp_path, monkeypatch):
    from distiller.models import load_model, resolve_model

    source = resolve_model("smollm2-135m-instruct")  # before DISTILLER_HOME moves
    _, imported = _export_and_import(source, "f32", tmp_path, monkeypatch)
    original, tokenizer = load_model(source, dtype="float32")
    back, _ = load_model(imported, dtype="float32")
    for text in TEXTS:
        assert _relative_rms(_logits(back, tokenizer, text), _logits(original, tokenizer, text)) < (
            1e-6
        )


# ---------------------------------------------------------------------------------------------
# llama.cpp reads the exported file (optional extra: llama-cpp-python)


def _llama(path: Path):
    llama_cpp = pytest.importorskip("llama_cpp")
    f32 = 0  # GGML_TYPE_F32: the KV cache in f32 too (llama.cpp's default is f16)
    return llama_cpp.Llama(
        str(path),
        n_ctx=512,
        n_batch=512,
        logits_all=True,
        n_threads=2,
        type_k=f32,
        type_v=f32,
        verbose=False,
    )


@pytest.mark.llamacpp
@pytest.mark.parametrize("which", ["tiny", "dropped"])
def test_llamacpp_logits_match_mlx(which, tiny_model_dir, dropped_student, tmp_path):
    """llama.cpp computes f32 weights in f32: its logits are MLX's up to float rounding."""
    from distiller.models import load_model
    from distiller.models.export_gguf import export_gguf

    source = tiny_model_dir if which == "tiny" else dropped_student
    out = export_gguf(source, tmp_path / "m.gguf", "f32", progress=False).path
    llm = _llama(out)
    model, tokenizer = load_model(source, dtype="float32")
    for text in TEXTS:
        ids = llm.tokenize(text.encode(), add_bos=False, special=True)
        assert ids == tokenizer.encode(text, add_special_tokens=False)
        llm.reset()
        llm.eval(ids)
        theirs = np.array(llm.scores[: len(ids)], dtype=np.float32)
        assert _relative_rms(theirs, _logits(model, tokenizer, text)) < 1e-4, text


@pytest.mark.llamacpp
@pytest.mark.real_model
def test_llamacpp_greedy_text_matches_mlx(tmp_path):
    """SmolLM2 exported as f32: llama.cpp's greedy continuation is MLX's, token for token, up
    to the first step where MLX's top two are a float-rounding tie (none is expected)."""
    import mlx.core as mx

    from distiller.models import load_model, resolve_model
    from distiller.models.export_gguf import export_gguf

    source = resolve_model("smollm2-135m-instruct")
    out = export_gguf(source, tmp_path / "smollm2-f32.gguf", "f32", progress=False).path
    llm = _llama(out)
    model, tokenizer = load_model(source, dtype="float32")
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
    assert ids == tokenizer.encode(prompt, add_special_tokens=False)
    assert llm.metadata["tokenizer.chat_template"] == tokenizer.chat_template

    theirs = []
    for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        if token == llm.token_eos() or len(theirs) >= 32:
            break
        theirs.append(token)
    logits = np.array(model(mx.array([ids + theirs]))[0].astype(mx.float32))[len(ids) - 1 :]
    for step, token in enumerate(theirs):
        top2 = np.sort(logits[step])[-2:]
        if top2[1] - top2[0] < 1e-3:  # a tie at float rounding: either engine may pick either
            break
        assert int(np.argmax(logits[step])) == token, (step, tokenizer.decode(theirs))
    text = llm.detokenize(theirs).decode()
    print(f"llama.cpp greedy ({len(theirs)} tokens): {text!r}")
    assert "Paris" in text
