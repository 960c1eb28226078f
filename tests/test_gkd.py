"""The gkd route (on-policy distillation): generalized JSD and its limits, the fraction of
batches the student writes itself, learning, the spec, and SIGKILL + resume."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_train import _run_until_checkpoint, _train_cmd, write_dataset, write_spec

from distiller.errors import UserError
from distiller.spec import load_spec
from distiller.train import losses as L
from distiller.train import train
from distiller.train import trainer as T


def _logits(seed: int, shape=(5, 30), scale: float = 2.0) -> mx.array:
    return mx.array(np.random.default_rng(seed).normal(0, scale, shape).astype(np.float32))


# ---------------------------------------------------------------------------- the loss


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), temperature=st.floats(0.5, 3.0))
def test_generalized_jsd_limits(seed, temperature):
    """TRL's convention: beta 0 is forward KL(teacher || student), beta 1 reverse KL, beta 0.5
    the symmetric JSD. In between, convexity of KL in its second argument bounds the mixture
    form: 0 <= JSD(beta) <= beta (1 - beta) (KL + reverse KL), so it vanishes at both ends
    (why the ends are special cases); and it never exceeds the binary entropy of beta."""
    t, s = _logits(seed), _logits(seed + 1)

    def gjsd(beta):
        return np.array(L.generalized_jsd(t, s, beta, temperature))

    def div(name):
        return np.array(L.token_divergence(t, s, temperature, name))

    np.testing.assert_allclose(gjsd(0.0), div("kl"), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gjsd(1.0), div("reverse_kl"), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gjsd(0.5), div("jsd"), rtol=1e-5, atol=1e-6)
    both = div("kl") + div("reverse_kl")
    for beta in (1e-3, 0.1, 0.3, 0.7, 0.9, 1 - 1e-3):
        mid = gjsd(beta)
        assert np.all(mid >= -1e-6)
        assert np.all(mid <= beta * (1 - beta) * both * (1 + 1e-4) + 1e-6)
        entropy = -beta * np.log(beta) - (1 - beta) * np.log(1 - beta)
        assert np.all(mid <= entropy * temperature**2 * (1 + 1e-4) + 1e-6)


def test_generalized_jsd_is_zero_only_for_equal_distributions():
    t = _logits(0)
    assert float(mx.abs(L.generalized_jsd(t, t + 1.5, 0.3)).max()) < 1e-5  # shift: same softmax
    assert float(L.generalized_jsd(t, _logits(1), 0.3).min()) > 1e-3
    with pytest.raises(ValueError, match="beta"):
        L.generalized_jsd(t, t, 1.5)


# ---------------------------------------------------------------------------- the route


@pytest.fixture(scope="module")
def sharp_teacher(tmp_path_factory, tiny_model_factory) -> Path:
    """A tiny teacher whose head is scaled up: peaked next-token distributions, far from a
    random student's nearly uniform ones, so there is a large divergence to remove."""
    src = tiny_model_factory(seed=3, tie_word_embeddings=False)
    dst = tmp_path_factory.mktemp("sharp_teacher")
    for f in src.iterdir():
        shutil.copy(f, dst / f.name)
    weights = mx.load(str(dst / "model.safetensors"))
    weights["lm_head.weight"] = weights["lm_head.weight"] * 40.0
    mx.save_safetensors(str(dst / "model.safetensors"), weights, metadata={"format": "mlx"})
    return dst


def _gkd_spec(tmp_path, student, teacher, kd: str, train_cfg: str, name: str = "s.yaml"):
    return write_spec(
        tmp_path / name,
        student,
        teacher,
        route="gkd",
        full_finetune="true",
        kd=kd,
        train=train_cfg,
    )


class CountingGenerate:
    """The real ``generate_batch``, counting its calls and the tokens it returned."""

    def __init__(self) -> None:
        self.calls = 0
        self.tokens = 0
        self.real = T.generate_batch

    def __call__(self, *args, **kwargs):
        out = self.real(*args, **kwargs)
        self.calls += 1
        self.tokens += sum(g.generation_tokens for g in out)
        return out


@pytest.mark.parametrize("lmbda", [0.0, 1.0])
def test_lambda_decides_who_writes_the_answers(tmp_path, tiny_model_factory, monkeypatch, lmbda):
    student, teacher = tiny_model_factory(seed=4), tiny_model_factory(seed=3)
    counter = CountingGenerate()
    monkeypatch.setattr(T, "generate_batch", counter)
    spec = load_spec(
        _gkd_spec(
            tmp_path,
            student,
            teacher,
            f"{{lmbda: {lmbda}, jsd_beta: 0.5}}",
            "{iters: 6, batch_size: 2, learning_rate: 1.0e-3, steps_per_eval: 3}",
        )
    )
    r = train(spec, write_dataset(tmp_path / "ds"), tmp_path / "out", progress=False)
    last = r.metrics[-1]
    if lmbda == 0.0:  # never the student's samples: the data's answers only
        assert counter.calls == 0 and last["on_policy_steps"] == 0
        assert last["generated_tokens"] == 0
    else:  # every batch is the student's own: one generate call per step
        assert counter.calls == 6 and last["on_policy_steps"] == 6
        assert last["generated_tokens"] == counter.tokens > 0


def test_on_policy_choice_is_a_function_of_seed_and_step():
    draws = [T.is_on_policy_step(0.5, 0, s) for s in range(200)]
    assert draws == [T.is_on_policy_step(0.5, 0, s) for s in range(200)]
    assert 60 < sum(draws) < 140  # a fair coin over 200 steps (fixed draws: always the same)
    assert not any(T.is_on_policy_step(0.0, 1, s) for s in range(50))
    assert all(T.is_on_policy_step(1.0, 1, s) for s in range(50))


def test_gkd_learns_the_teacher(tmp_path, tiny_model_factory, sharp_teacher):
    """Full fine-tuning of a random student towards a peaked teacher: the divergence on the
    validation answers starts near its maximum and falls far beyond rounding."""
    student = tiny_model_factory(seed=4, tie_word_embeddings=False)
    spec = load_spec(
        _gkd_spec(
            tmp_path,
            student,
            sharp_teacher,
            "{lmbda: 0.5, jsd_beta: 0.5, temperature: 1.0}",
            "{iters: 12, batch_size: 4, learning_rate: 1.0e-2, steps_per_eval: 6}",
        )
    )
    r = train(spec, write_dataset(tmp_path / "ds"), tmp_path / "out", progress=False)
    vals = [m["val_loss"] for m in r.metrics if m["val_loss"] is not None]
    assert 0 < r.metrics[-1]["on_policy_steps"] < 12
    assert vals[-1] < 0.8 * vals[0], vals


def test_gkd_spec(tmp_path, tiny_model_dir):
    def spec(kd: str | None):
        extra = {"kd": kd} if kd is not None else {}
        return load_spec(write_spec(tmp_path / "s.yaml", tiny_model_dir, route="gkd", **extra))

    kd = spec("{lmbda: 0.25, jsd_beta: 0.9, temperature: 0.7}").student.kd
    assert (kd.lmbda, kd.jsd_beta, kd.temperature) == (0.25, 0.9, 0.7)
    kd = spec(None).student.kd
    assert (kd.lmbda, kd.jsd_beta, kd.temperature) == (0.5, 0.5, 1.0)
    for bad, match in [
        ("{lmbda: 1.5}", "lmbda"),
        ("{lmbda: -0.1}", "lmbda"),
        ("{jsd_beta: 2}", "jsd_beta"),
        ("{temperature: 0}", "temperature"),
        ("{alpha: 0.5}", "alpha"),  # logit-kd's weights mean nothing here
    ]:
        with pytest.raises(UserError, match=match):
            spec(bad)


def test_gkd_sigkill_then_resume_matches_uninterrupted_run(tmp_path, tiny_model_factory):
    student, teacher = tiny_model_factory(seed=4), tiny_model_factory(seed=3)
    train_cfg = (
        "{iters: 30, batch_size: 2, learning_rate: 1.0e-3, steps_per_eval: 10, "
        "checkpoint_every: 10}"
    )
    spec_path = _gkd_spec(
        tmp_path, student, teacher, "{lmbda: 0.5, jsd_beta: 0.3, temperature: 1.0}", train_cfg
    )
    ds = write_dataset(tmp_path / "ds")
    out = tmp_path / "killed"
    rc = _run_until_checkpoint(_train_cmd(spec_path, ds, out), out, 10, signal.SIGKILL)
    assert rc == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = json.loads((out / "checkpoint" / "state.json").read_text())["step"]
    assert 10 <= killed_at < 30

    r = train(load_spec(spec_path), ds, out, progress=False)
    assert r.resumed_from == killed_at and r.steps == 30
    assert [row["step"] for row in r.metrics] == list(range(10, 31, 10))

    # The run key covers the gkd settings: another lambda is another run.
    other = _gkd_spec(
        tmp_path,
        student,
        teacher,
        "{lmbda: 0.6, jsd_beta: 0.3, temperature: 1.0}",
        train_cfg,
        name="o.yaml",
    )
    with pytest.raises(UserError, match="different run"):
        train(load_spec(other), ds, out, progress=False)

    ref = train(load_spec(spec_path), ds, tmp_path / "straight", progress=False)
    assert ref.metrics[-1]["on_policy_steps"] == r.metrics[-1]["on_policy_steps"] > 0
    assert ref.metrics[-1]["generated_tokens"] == r.metrics[-1]["generated_tokens"]
    a = mx.load(str(out / "adapters.safetensors"))
    b = mx.load(str(tmp_path / "straight" / "adapters.safetensors"))
    assert a.keys() == b.keys()
    for k in a:  # the same batches, the same samples, the same weights
        np.testing.assert_allclose(np.array(a[k]), np.array(b[k]), atol=1e-5)
