"""Teacher-logit cache and KD from top-k: the losses against the full-vocabulary ones, the
cache's format, reuse and crash safety (a real SIGKILLed build), and logit-kd trained from it."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mlx_lm import load
from mlx_server import MlxServer, free_port
from procs import kill_when
from test_train import QA, write_dataset, write_spec

from distiller.backends.openai_compat import OpenAICompatBackend
from distiller.errors import UserError
from distiller.spec import KDSpec, LogitCacheSpec, load_spec
from distiller.train import batches as B
from distiller.train import logit_cache as LC
from distiller.train import losses as L
from distiller.train import routes as R
from distiller.train import train

REPO = Path(__file__).resolve().parent.parent
DIVERGENCES = ("kl", "reverse_kl", "jsd")


def _examples(tokenizer, n: int = 8) -> list[B.Example]:
    rows = [
        [{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in QA[:n]
    ]
    return [B.encode_chat(tokenizer, m, 128) for m in rows]


def _logits(model, batch) -> mx.array:
    return R.selected_logits(model, {k: mx.array(v) for k, v in batch.items() if k != "lengths"})


# ---------------------------------------------------------------------------- losses


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("missing", L.MISSING_MASS)
def test_topk_with_k_equal_to_the_vocabulary_is_the_full_loss(
    tiny_model_factory, divergence, missing
):
    """With every token in the "top-k" there is no missing mass: both ways of handling it give
    exactly the full-vocabulary divergence (teacher and student: two tiny models)."""
    teacher, tok = load(str(tiny_model_factory(seed=3)))
    student, _ = load(str(tiny_model_factory(seed=4)))
    batch = B.collate(_examples(tok, 4))
    n = int(batch["sel_mask"].sum())
    t_logits, s_logits = _logits(teacher, batch)[:n], _logits(student, batch)[:n]
    vocab = t_logits.shape[-1]
    idx, vals, tail = LC.topk_entries(t_logits, vocab, temperature=2.0)
    full = L.token_divergence(t_logits, s_logits, 2.0, divergence)
    got = L.topk_divergence(
        s_logits, idx, vals, tail, temperature=2.0, divergence=divergence, missing=missing
    )
    np.testing.assert_allclose(np.array(got), np.array(full), rtol=1e-4, atol=1e-6)
    assert float(full.min()) > 0  # the models differ: a real divergence was compared


@settings(max_examples=60, deadline=None)
@given(
    vocab=st.integers(2, 40),
    k=st.integers(1, 40),
    scale=st.floats(0.1, 8.0),
    temperature=st.floats(0.5, 3.0),
    seed=st.integers(0, 2**31 - 1),
    divergence=st.sampled_from(DIVERGENCES),
)
def test_tail_bucket_is_a_lower_bound_of_the_full_divergence(
    vocab, k, scale, temperature, seed, divergence
):
    """Merging the tokens outside the top-k into one bucket is a coarse-graining of both
    distributions, so (data-processing inequality) no f-divergence can grow: kl, reverse kl and
    jsd on the k + 1 buckets never exceed the full ones."""
    rng = np.random.default_rng(seed)
    t_logits = mx.array(rng.normal(0, scale, (3, vocab)).astype(np.float32))
    s_logits = mx.array(rng.normal(0, scale, (3, vocab)).astype(np.float32))
    idx, vals, tail = LC.topk_entries(t_logits, min(k, vocab), temperature)
    full = np.array(L.token_divergence(t_logits, s_logits, temperature, divergence))
    bound = np.array(
        L.topk_divergence(s_logits, idx, vals, tail, temperature=temperature, divergence=divergence)
    )
    assert np.all(bound >= -1e-6)
    assert np.all(bound <= full + 1e-5 * (1 + full))


def test_renormalized_and_tail_losses_differ_when_mass_is_missing(tiny_model_factory):
    """With k < V the two ways are different losses (neither collapses into the other); the
    renormalized one compares the k tokens' shapes only: scaling the student's top-k by a
    common factor (the same renormalized distribution) leaves it unchanged."""
    rng = np.random.default_rng(0)
    t_logits = mx.array(rng.normal(0, 2, (4, 50)).astype(np.float32))
    s_logits = mx.array(rng.normal(0, 2, (4, 50)).astype(np.float32))
    idx, vals, tail = LC.topk_entries(t_logits, 5)
    tail_d = L.topk_divergence(s_logits, idx, vals, tail, missing="tail")
    renorm = L.topk_divergence(s_logits, idx, vals, tail, missing="renormalize")
    assert not np.allclose(np.array(tail_d), np.array(renorm), atol=1e-4)
    # Adding a constant to the student's logits outside the top-k moves its tail, not the
    # top-k's renormalized shape.
    outside = mx.put_along_axis(mx.full(s_logits.shape, 3.0), idx, mx.array(0.0), axis=-1)
    moved = s_logits + outside
    np.testing.assert_allclose(
        np.array(L.topk_divergence(moved, idx, vals, tail, missing="renormalize")),
        np.array(renorm),
        rtol=1e-5,
        atol=1e-6,
    )
    assert not np.allclose(
        np.array(L.topk_divergence(moved, idx, vals, tail, missing="tail")),
        np.array(tail_d),
        atol=1e-3,
    )


def test_cached_kd_loss_with_full_top_k_matches_the_live_teacher(tiny_model_factory):
    """logit-kd from the cache (float16 values) gives the live teacher's loss and gradient."""
    teacher, tok = load(str(tiny_model_factory(seed=3)))
    student, _ = load(str(tiny_model_factory(seed=4)))
    examples = _examples(tok, 4)
    kd = KDSpec(alpha=0.3, beta=0.7, temperature=2.0, cache=LogitCacheSpec(top_k=49152))
    score = LC.local_scorer(teacher, 49152, kd.temperature)
    idx, vals, tail = score(examples)
    counts = [LC.supervised_count(e) for e in examples]
    cache = LC.TeacherTopK(
        idx, vals, tail, np.concatenate([[0], np.cumsum(counts)]), 49152, kd.temperature
    )
    batch = B.collate(examples)
    cached_batch = {
        k: mx.array(v) for k, v in LC.attach(batch, cache, range(4)).items() if k != "lengths"
    }
    live_batch = {k: mx.array(v) for k, v in batch.items() if k != "lengths"}
    live, _ = R.make_kd_loss(teacher, kd, {})(student, live_batch)
    cached, _ = R.make_cached_kd_loss(kd)(student, cached_batch)
    assert float(cached) == pytest.approx(float(live), rel=2e-3)


# ---------------------------------------------------------------------------- the cache


def test_cache_format_reuse_and_invalidation(tmp_path, tiny_model_factory):
    teacher_dir = tiny_model_factory(seed=3)
    teacher, tok = load(str(teacher_dir))
    examples = _examples(tok, 10)
    fp = LC.teacher_fingerprint(teacher_dir)
    calls = []

    def score(chunk):
        calls.append(len(chunk))
        return LC.local_scorer(teacher, 8, 1.0)(chunk)

    cache, report = LC.build_cache(
        examples, tmp_path / "c", score, fingerprint=fp, top_k=8, temperature=1.0, rows_per_shard=4
    )
    assert calls == [4, 4, 2] and report.computed == 3 and report.shards == 3
    assert report.positions == sum(LC.supervised_count(e) for e in examples)
    assert cache.indices.dtype == np.int32 and cache.logprobs.dtype == np.float16
    assert cache.indices.shape == (report.positions, 8)
    # The k entries are the teacher's likeliest, in order, and with the tail they make one.
    mass = np.exp(cache.logprobs.astype(np.float64)).sum(1) + np.exp(cache.log_tail)
    np.testing.assert_allclose(mass, 1.0, atol=5e-3)
    assert np.all(np.diff(cache.logprobs.astype(np.float32), axis=1) <= 0)
    assert LC.bytes_per_token(8) == 52

    again, report2 = LC.build_cache(
        examples, tmp_path / "c", score, fingerprint=fp, top_k=8, temperature=1.0, rows_per_shard=4
    )
    assert report2.computed == 0 and len(calls) == 3  # every epoch and rerun: no teacher
    np.testing.assert_array_equal(again.indices, cache.indices)
    np.testing.assert_array_equal(again.logprobs, cache.logprobs)

    # Another k, or one changed row, computes only what it changes.
    edited = [*examples[:9], B.Example(examples[9].tokens[:-1], examples[9].offset)]
    _, report3 = LC.build_cache(
        edited, tmp_path / "c", score, fingerprint=fp, top_k=8, temperature=1.0, rows_per_shard=4
    )
    assert report3.computed == 1 and calls[-1] == 2
    _, report4 = LC.build_cache(
        examples, tmp_path / "c", score, fingerprint=fp, top_k=4, temperature=1.0, rows_per_shard=4
    )
    assert report4.computed == 3


BUILD_SCRIPT = """
import sys, time
sys.path.insert(0, {tests!r})
from mlx_lm import load
from distiller.train import logit_cache as LC
from test_logit_cache import _examples
teacher, tok = load({teacher!r})
scorer = LC.local_scorer(teacher, 16, 1.0)
def slow(chunk):
    time.sleep(0.3)  # room for the parent to kill the build between and inside writes
    return scorer(chunk)
LC.build_cache(_examples(tok, 24), {cache!r}, slow, fingerprint="fp", top_k=16, temperature=1.0,
               rows_per_shard=1)
"""


def test_cache_survives_sigkill_mid_build(tmp_path, tiny_model_factory):
    """A build SIGKILLed part-way leaves only whole shards; the resumed build computes exactly
    the missing ones, and the result equals an uninterrupted build, byte for byte."""
    teacher_dir = tiny_model_factory(seed=3)
    killed = tmp_path / "killed"
    script = BUILD_SCRIPT.format(
        tests=str(REPO / "tests"), teacher=str(teacher_dir), cache=str(killed)
    )
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stderr=subprocess.PIPE)
    kill_when(proc, lambda: len(list(killed.glob("*.npz"))) >= 3)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    on_disk = {p.name: p.read_bytes() for p in killed.glob("*.npz")}
    assert 3 <= len(on_disk) < 24

    teacher, tok = load(str(teacher_dir))
    examples = _examples(tok, 24)
    scorer = LC.local_scorer(teacher, 16, 1.0)
    args = {"fingerprint": "fp", "top_k": 16, "temperature": 1.0, "rows_per_shard": 1}
    resumed, report = LC.build_cache(examples, killed, scorer, **args)
    assert report.computed == 24 - len(on_disk)  # nothing recomputed, nothing missing
    assert not list(killed.glob(".*"))  # a torn write's temp file is gone
    for name, data in on_disk.items():  # what the killed build wrote is kept as it was
        assert (killed / name).read_bytes() == data
    straight, _ = LC.build_cache(examples, tmp_path / "straight", scorer, **args)
    assert sorted(p.name for p in killed.iterdir()) == sorted(
        p.name for p in (tmp_path / "straight").iterdir()
    )
    # Same rows in the same places. The values were computed by two processes, whose BLAS
    # may round differently: equal to float16 precision (sorted values are continuous in the
    # logits, so even a near-tie that swaps two indices keeps them close).
    np.testing.assert_array_equal(resumed.starts, straight.starts)
    np.testing.assert_allclose(
        resumed.logprobs.astype(np.float32), straight.logprobs.astype(np.float32), atol=2e-3
    )
    np.testing.assert_allclose(resumed.log_tail, straight.log_tail, rtol=1e-3, atol=1e-5)
    assert np.mean(resumed.indices == straight.indices) > 0.99


# ---------------------------------------------------------------------------- training


def test_logit_kd_trains_from_the_cache_and_reuses_it(tmp_path, tiny_model_factory, capsys):
    teacher, student = tiny_model_factory(seed=3), tiny_model_factory(seed=4)
    ds = write_dataset(tmp_path / "ds")
    spec = load_spec(
        write_spec(
            tmp_path / "s.yaml",
            student,
            teacher,
            route="logit-kd",
            full_finetune="true",
            kd="{alpha: 0.0, beta: 1.0, temperature: 1.0, cache: {top_k: 16}}",
            train="{iters: 8, batch_size: 4, learning_rate: 1.0e-2, steps_per_eval: 4}",
        )
    )
    r = train(spec, ds, tmp_path / "a", progress=True)
    first = capsys.readouterr().err
    assert "k=16" in first and "computed now" in first and "(0 computed now)" not in first
    vals = [m["val_loss"] for m in r.metrics if m["val_loss"] is not None]
    # Full fine-tuning towards a fixed target from a random student: the divergence on the
    # validation rows (same form as the training ones) falls far beyond rounding.
    assert vals[-1] < 0.9 * vals[0]
    train(spec, ds, tmp_path / "b", progress=True)
    assert "(0 computed now)" in capsys.readouterr().err  # a rerun: not one teacher forward


def test_spec_cache_settings(tmp_path, tiny_model_dir):
    def spec(kd: str):
        return load_spec(write_spec(tmp_path / "s.yaml", tiny_model_dir, route="logit-kd", kd=kd))

    kd = spec("{cache: {top_k: 64, missing: renormalize}}").student.kd
    assert kd.cache == LogitCacheSpec(top_k=64, missing="renormalize")
    assert spec("{cache: {}}").student.kd.cache == LogitCacheSpec(top_k=32, missing="tail")
    assert spec("{alpha: 1.0}").student.kd.cache is None
    for bad, match in [
        ("{cache: {top_k: 0}}", "top_k"),
        ("{cache: {missing: drop}}", "missing"),
        ("{gamma: 0.1, cache: {top_k: 8}}", "gamma"),
        ("{cache: {k: 8}}", "k"),
    ]:
        with pytest.raises(UserError, match=match):
            spec(bad)
    assert LC.bytes_per_token(32) == 196


# ---------------------------------------------------------------------------- served teacher


@pytest.fixture
def served_tiny_model(tiny_model_factory):
    """A real ``mlx_lm.server`` on loopback serving the tiny teacher; yields its /v1 URL."""
    model_dir = tiny_model_factory(seed=3)
    with MlxServer(model_dir) as srv:
        yield srv.url, model_dir


def _served(urls, **kwargs) -> OpenAICompatBackend:
    return OpenAICompatBackend(urls, "default_model", backoff_base_s=0.01, **kwargs)


def test_served_teacher_fills_the_same_cache(tmp_path, served_tiny_model):
    """The cache filled from mlx_lm.server's top_logprobs (teacher-forced, one request per
    answer token) holds the local teacher's log-probabilities of the tokens it names."""
    url, model_dir = served_tiny_model
    teacher, tok = load(str(model_dir))
    examples = _examples(tok, 2)
    scorer = LC.endpoint_scorer(_served(url), tok, 5)
    served, report = LC.build_cache(
        examples, tmp_path / "c", scorer, fingerprint="served", top_k=5, temperature=1.0
    )
    assert report.positions == sum(LC.supervised_count(e) for e in examples) > 0
    batch = B.collate(examples)
    n = int(batch["sel_mask"].sum())
    local = L.F.log_softmax(_logits(teacher, batch)[:n].astype(mx.float32), axis=-1)
    at_ids = np.take_along_axis(np.array(local), served.indices, axis=1)
    np.testing.assert_allclose(served.logprobs.astype(np.float32), at_ids, atol=2e-3)
    # They are the teacher's 5 likeliest (up to rounding near ties): the 5th is at least as
    # likely as the local 6th.
    sorted_local = -np.sort(-np.array(local), axis=1)
    assert np.all(served.logprobs[:, -1].astype(np.float32) >= sorted_local[:, 5] - 2e-3)
    mass = np.exp(served.logprobs.astype(np.float64)).sum(1) + np.exp(served.log_tail)
    np.testing.assert_allclose(mass, 1.0, atol=5e-3)


def test_served_teacher_across_servers_fails_over_a_dead_one(tmp_path, served_tiny_model):
    """teacher.endpoint.urls: the cache's requests go to every server in the list; one that
    does not answer (nothing listens on its port) leaves the rotation and its requests are
    answered by the live one, so the cache is the one server's, position for position."""
    url, model_dir = served_tiny_model
    _, tok = load(str(model_dir))
    examples = _examples(tok, 2)
    alone, _ = LC.build_cache(
        examples, tmp_path / "one", LC.endpoint_scorer(_served(url), tok, 4),
        fingerprint="served", top_k=4, temperature=1.0,
    )  # fmt: skip
    dead = f"http://127.0.0.1:{free_port()}/v1"
    backend = _served([dead, url], max_concurrency=2)
    both, report = LC.build_cache(
        examples, tmp_path / "two", LC.endpoint_scorer(backend, tok, 4),
        fingerprint="served", top_k=4, temperature=1.0,
    )  # fmt: skip
    assert report.positions == len(alone.indices) > 0
    np.testing.assert_array_equal(both.indices, alone.indices)
    np.testing.assert_array_equal(both.logprobs, alone.logprobs)
    dead_server, live = backend.pool.servers
    assert dead_server.attempts >= 1 and dead_server.answered == 0
    assert live.answered == report.positions
    backend.close()


def test_served_teacher_that_is_gone_is_a_clear_error(tmp_path, tiny_model_factory):
    """Every server down: one line naming them, not a traceback or a cache with holes."""
    _, tok = load(str(tiny_model_factory(seed=3)))
    dead = f"http://127.0.0.1:{free_port()}/v1"
    scorer = LC.endpoint_scorer(_served(dead, max_retries=1), tok, 3)
    with pytest.raises(UserError, match=r"no top_logprobs from the server: .*gave up"):
        LC.build_cache(
            _examples(tok, 1), tmp_path / "c", scorer, fingerprint="x", top_k=3,
            temperature=1.0,
        )  # fmt: skip
    assert not list((tmp_path / "c").glob("*.npz"))


def test_served_teacher_with_another_tokenizer_is_refused(tmp_path, served_tiny_model):
    """The server's model has another vocabulary than this student's: refused, naming it."""
    url, _ = served_tiny_model
    sys.path.insert(0, str(Path(__file__).parent))
    from tiny_lm import build_tiny_model_dir as build_other_vocab

    other_dir = build_other_vocab(tmp_path / "other")
    _, other_tok = load(str(other_dir))
    examples = _examples(other_tok, 1)
    with pytest.raises(UserError, match=r"tokenizer is not the student's"):
        LC.endpoint_scorer(_served(url), other_tok, 3)(examples)


def test_logit_kd_trains_from_a_served_teacher(tmp_path, served_tiny_model, tiny_model_factory):
    """teacher.endpoint + student.kd.cache: the spec's logit-kd fills its cache from the
    server (at temperature 1) and trains; another temperature is refused by the spec."""
    url, _ = served_tiny_model
    student = tiny_model_factory(seed=4)
    spec_path = write_spec(
        tmp_path / "s.yaml",
        student,
        route="logit-kd",
        full_finetune="true",
        kd="{alpha: 0.0, beta: 1.0, temperature: 1.0, cache: {top_k: 4}}",
        train="{iters: 4, batch_size: 2, learning_rate: 1.0e-2, steps_per_eval: 2}",
    )
    text = spec_path.read_text().replace(
        f"teacher: {{model: {student}}}",
        f"teacher: {{endpoint: {{url: '{url}', model: default_model}}}}",
    )
    spec_path.write_text(text)
    spec = load_spec(spec_path)
    assert spec.teacher.endpoint is not None and spec.student.kd.cache.top_k == 4
    ds = write_dataset(tmp_path / "ds", n_train=4, n_valid=1)
    r = train(spec, ds, tmp_path / "out", progress=False)
    assert r.steps == 4 and r.best_val_loss is not None
    shards = list((ds / LC.CACHE_DIR_NAME).glob("*.npz"))
    assert len(shards) == 2  # the training rows and the validation row
    spec_path.write_text(text.replace("temperature: 1.0", "temperature: 2.0"))
    with pytest.raises(UserError, match="temperature"):
        load_spec(spec_path)
    spec_path.write_text(text.replace(", cache: {top_k: 4}", ""))
    with pytest.raises(UserError, match=r"kd\.cache"):
        load_spec(spec_path)
