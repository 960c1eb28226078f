"""The compiled single-token decode step gives the model's own logits and greedy tokens."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx_lm.models.cache import make_prompt_cache
from tiny_lm import build_tiny_model_dir  # tests/ is on sys.path (pytest rootdir import)

from distiller import decode_step, fast_ops
from distiller.decoding import Decoding
from distiller.generate import generate_one

pytestmark = pytest.mark.skipif(not decode_step.enabled(), reason="the compiled step is CPU-only")


@pytest.fixture(scope="module", params=["stock", "patched"])
def tiny(request, tmp_path_factory):
    """The tiny llama twice: loaded by mlx_lm as is (first: patching is per model file) and by
    distiller (fast ops patched in)."""
    path = build_tiny_model_dir(tmp_path_factory.mktemp("tiny_lm"), seed=3)
    if request.param == "patched":
        from distiller.models import load_model

        return load_model(str(path))
    from mlx_lm import load

    return load(str(path))


def _greedy(model, prompt: list[int], steps: int, cache_model) -> tuple[list[int], list]:
    cache = make_prompt_cache(cache_model)
    logits = model(mx.array(prompt)[None], cache=cache)[:, -1, :]
    tokens, rows = [], []
    for _ in range(steps):
        token = int(mx.argmax(logits, axis=-1).item())
        tokens.append(token)
        rows.append(logits)
        logits = model(mx.array([[token]]), cache=cache)[:, -1, :]
    return tokens, rows


def test_compiled_step_gives_the_models_logits_and_greedy_tokens(tiny):
    model, tokenizer = tiny
    fast = decode_step.compiled_decoder(model)
    assert isinstance(fast, decode_step.CompiledDecoder)
    prompt = tokenizer.encode("the cat sat on the mat because")
    plain_tokens, plain_rows = _greedy(model, prompt, 40, model)
    fast_tokens, fast_rows = _greedy(fast, prompt, 40, model)
    assert fast_tokens == plain_tokens
    for a, b in zip(plain_rows, fast_rows, strict=True):
        assert mx.allclose(a, b, atol=1e-5, rtol=1e-5).item()


def test_generate_one_tokens_are_those_of_the_uncompiled_path(tiny, monkeypatch):
    model, tokenizer = tiny
    prompts = [tokenizer.encode(t) for t in ("a quorum is", "leader election", "x")]
    decoding = Decoding(max_tokens=24)
    compiled = [generate_one(model, tokenizer, p, decoding) for p in prompts]
    monkeypatch.setenv("DISTILLER_COMPILE_DECODE", "0")
    assert decode_step.compiled_decoder(model) is model
    plain = [generate_one(model, tokenizer, p, decoding) for p in prompts]
    assert [g.tokens for g in compiled] == [g.tokens for g in plain]
    assert [g.text for g in compiled] == [g.text for g in plain]


def test_other_calls_go_to_the_model_itself(tiny):
    model, tokenizer = tiny
    fast = decode_step.compiled_decoder(model)
    prompt = mx.array(tokenizer.encode("the cat sat"))[None]
    # Prefill (several tokens), a batch of two, no cache: exactly what the model returns.
    for inputs, cache in [
        (prompt, make_prompt_cache(model)),
        (mx.concatenate([prompt, prompt]), make_prompt_cache(model)),
        (prompt[:, :1], None),
    ]:
        want = model(inputs, cache=None if cache is None else make_prompt_cache(model))
        assert mx.array_equal(fast(inputs, cache=cache), want).item()
    assert fast.layers is model.layers and fast.args is model.args  # stands in for the model


def test_weights_changed_after_compiling_are_used(tiny_dir_copy):
    from distiller.models import load_model

    model, tokenizer = load_model(str(tiny_dir_copy))
    fast = decode_step.compiled_decoder(model)
    prompt = tokenizer.encode("the cat sat on")
    _, before = _greedy(fast, prompt, 4, model)  # traced and compiled with the old weights
    mlp = model.model.layers[-1].mlp
    mlp.down_proj.weight = mlp.down_proj.weight * 50.0  # a very different model
    fast_tokens, after = _greedy(fast, prompt, 12, model)
    assert fast_tokens == _greedy(model, prompt, 12, model)[0]
    assert not mx.allclose(before[1], after[1]).item()  # the new weights were read


def test_unsupported_models_are_returned_as_they_are(tiny_dir_copy):
    from mlx_lm.tuner.utils import linear_to_lora_layers

    from distiller.models import load_model

    model, _ = load_model(str(tiny_dir_copy))
    linear_to_lora_layers(model, 2, {"rank": 2, "scale": 1.0, "dropout": 0.0})
    assert not decode_step.supported(model)
    assert decode_step.compiled_decoder(model) is model


@pytest.fixture
def tiny_dir_copy(tmp_path):
    return build_tiny_model_dir(tmp_path / "tiny", seed=5)


def test_fast_ops_stay_switchable(monkeypatch):
    monkeypatch.setenv("DISTILLER_FAST_OPS", "0")
    assert not fast_ops.enabled() and not decode_step.enabled()


def test_one_prompt_batch_takes_the_single_stream_path(tiny):
    """A lone prompt (a server request) is decoded like ``generate_one``: same tokens, with the
    callbacks and stats a batch gives."""
    from distiller.generate import generate_batch

    model, tokenizer = tiny
    prompt = tokenizer.encode("a quorum is")
    for decoding in (Decoding(max_tokens=16), Decoding(max_tokens=16, temperature=0.8, seed=4)):
        streamed, finished, progressed = [], [], []
        (g,) = gens = generate_batch(
            model, tokenizer, [prompt], decoding,
            on_tokens=lambda i, kept, out=streamed: out.append((i, list(kept))),
            on_finish=lambda i, gen, out=finished: out.append((i, gen)),
            progress=progressed.append,
        )  # fmt: skip
        assert g.tokens == generate_one(model, tokenizer, prompt, decoding).tokens
        assert finished == [(0, g)] and progressed == [1]
        assert streamed[-1] == (0, g.tokens) and len(streamed) == g.generation_tokens
        st = gens.stats
        assert st.sequences == 1 and st.generation_tokens == g.generation_tokens
        assert st.prompt_tokens == len(prompt) and st.decode_time > 0 and st.prompt_time > 0
