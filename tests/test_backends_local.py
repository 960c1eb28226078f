"""Local MLX backend on a tiny random chat model."""

from __future__ import annotations

import pytest
from tiny_lm import build_tiny_model_dir

from distiller.backends import Backend, CompletionRequest, make_backend
from distiller.backends.local import LocalBackend
from distiller.decoding import Decoding
from distiller.generate import build_messages, chat_prompt, generate_batch
from distiller.spec import TeacherSpec


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny_lm"))


def test_local_backend_matches_generate_batch_and_keeps_order(tiny_dir):
    be = make_backend(TeacherSpec(model=str(tiny_dir), batch_size=2))
    assert isinstance(be, LocalBackend) and isinstance(be, Backend)
    assert be.fingerprint() == {"backend": "local", "model": str(tiny_dir)}
    users = ["hello", "a quorum", "fox", "dog", "forty-two"]
    reqs = []
    for i, u in enumerate(users):
        # interleave two decoding settings: the backend groups them but keeps request order
        temp = 1.0 if i % 2 else 0.0
        msgs = build_messages(u, system="sys", few_shot=[("q", "a")])
        reqs.append(CompletionRequest(msgs, Decoding(max_tokens=6, temperature=temp, seed=50 + i)))
    out = be.complete(reqs)
    assert len(out) == len(reqs) and all(c.ok for c in out)
    model, tok = be._model()
    expected_tokens = 0
    for req, c in zip(reqs, out, strict=True):
        (g,) = generate_batch(
            model,
            tok,
            [chat_prompt(tok, req.messages)],
            req.decoding,
            seeds=[req.decoding.seed],
        )
        assert c.text == g.text
        assert c.completion_tokens == g.generation_tokens <= 6
        assert c.prompt_tokens == g.prompt_tokens and c.finish_reason == g.finish_reason
        expected_tokens += g.generation_tokens
    assert be.stats.sequences == len(reqs) and be.stats.generation_tokens == expected_tokens


def test_local_backend_applies_logit_shaping_per_request(tiny_dir):
    be = LocalBackend(str(tiny_dir), batch_size=4)
    msgs = build_messages("hello world")
    free, banned = Decoding(max_tokens=40), Decoding(max_tokens=40, no_repeat_ngram=2)
    plain, shaped = be.complete([CompletionRequest(msgs, free), CompletionRequest(msgs, banned)])
    model, tok = be._model()
    ids = [chat_prompt(tok, msgs)]
    (want,) = generate_batch(model, tok, ids, banned)
    (unshaped,) = generate_batch(model, tok, ids, free)
    # Each request got its own decoding: the shaped one is generate_batch's with the ban...
    assert (shaped.text, plain.text) == (want.text, unshaped.text)
    # ...which changes the answer exactly when the free answer repeats a 2-gram.
    pairs = list(zip(unshaped.tokens, unshaped.tokens[1:], strict=False))
    assert (shaped.text != plain.text) == (len(set(pairs)) < len(pairs))


def test_local_backend_bad_conversation_fails_alone(tiny_dir):
    be = LocalBackend(str(tiny_dir))
    good = CompletionRequest(build_messages("hello"), Decoding(max_tokens=3))
    bad = CompletionRequest([{"role": "user"}], Decoding(max_tokens=3))  # no content
    out = be.complete([good, bad, good])
    assert out[0].ok and out[2].ok and out[0].text == out[2].text
    assert not out[1].ok and "chat template" in out[1].error
