"""Hostile model directories and model files: every case is one clear line, never a traceback.

Each case damages a copy of a real (tiny) model directory in one way and runs a real command
on it (``generate``, ``eval``, ``fuse``, ``models import``).
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from hostile import refused, run

from distiller.models.check import safetensors_header


@pytest.fixture()
def model_copy(tiny_model_dir: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "model"
    shutil.copytree(tiny_model_dir, dest)
    return dest


def _write(name: str, text: str | bytes) -> Callable[[Path], None]:
    def damage(d: Path) -> None:
        target = d / name
        if isinstance(text, bytes):
            target.write_bytes(text)
        else:
            target.write_text(text)

    return damage


def _truncate(d: Path) -> None:
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])


def _config(**changes) -> Callable[[Path], None]:
    def damage(d: Path) -> None:
        config = json.loads((d / "config.json").read_text())
        config.update(changes)
        (d / "config.json").write_text(json.dumps(config))

    return damage


def _remove(*names: str) -> Callable[[Path], None]:
    def damage(d: Path) -> None:
        for name in names:
            (d / name).unlink()

    return damage


# (case, damage, fragments the one-line message must contain)
CASES = [
    ("config not json", _write("config.json", "{ nope"), ["config.json:1", "not valid JSON"]),
    ("config a list", _write("config.json", "[1, 2]"), ["config.json", "expected a JSON object"]),
    ("config not utf-8", _write("config.json", b"\xff\xfe{}"), ["config.json", "not UTF-8"]),
    ("no config", _remove("config.json"), ["no config.json"]),
    ("unknown model type", _config(model_type="no-such-arch"), ["config.json", "no-such-arch"]),
    ("model type not a string", _config(model_type=7), ["config.json", "model_type"]),
    ("truncated weights", _truncate, ["model.safetensors", "truncated", "the file has"]),
    (
        "garbage weights",
        _write("model.safetensors", b"\x00" * 3),
        ["model.safetensors", "truncated"],
    ),
    (
        "huge header length",
        _write("model.safetensors", struct.pack("<Q", 1 << 40) + b"{}"),
        ["model.safetensors", "header says"],
    ),
    (
        "header not json",
        _write("model.safetensors", struct.pack("<Q", 4) + b"!!!!"),
        ["model.safetensors", "damaged safetensors header"],
    ),
    ("no weights", _remove("model.safetensors"), ["no weights"]),
    ("no tokenizer", _remove("tokenizer.json"), ["no tokenizer"]),
    ("shapes disagree", _config(vocab_size=1000), ["model.safetensors", "vocab_size=1000"]),
    ("layers disagree", _config(num_hidden_layers=3), ["cannot load the model"]),
]


@pytest.mark.parametrize(("case", "damage", "fragments"), CASES, ids=[c[0] for c in CASES])
def test_generate_refuses_a_damaged_model_dir(model_copy, case, damage, fragments):
    damage(model_copy)
    line = refused(["generate", "--model", str(model_copy), "--prompt", "hi", "--max-tokens", "2"])
    assert str(model_copy) in line
    for fragment in fragments:
        assert fragment in line, line


def test_every_stage_that_takes_a_model_refuses_it_alike(model_copy, tmp_path):
    _truncate(model_copy)
    spec = tmp_path / "task.yaml"
    spec.write_text(
        f"name: t\nprompts: [a, b, c, d]\nteacher: {{model: {model_copy}}}\n"
        "validators: [{type: regex, must_match: ['x']}]\n"
    )
    commands = [
        ["eval", "--model", str(model_copy), "--task", str(spec), "--prompts", "all"],
        ["teach", str(spec), "--out", str(tmp_path / "teacher"), "--no-progress"],
    ]
    for argv in commands:
        assert "model.safetensors" in refused(argv)


def test_a_missing_adapter_is_named(tiny_model_dir, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    line = refused(
        [
            "fuse",
            "--base",
            str(tiny_model_dir),
            "--adapter",
            str(adapter),
            "--out",
            str(tmp_path / "f"),
        ]
    )
    assert "adapter" in line


def test_safetensors_header_accepts_a_whole_file(tiny_model_dir):
    header = safetensors_header(tiny_model_dir / "model.safetensors")
    assert "model.embed_tokens.weight" in header


@pytest.mark.parametrize("cut", [3, 100, 5_000, 200_000])
def test_a_truncated_gguf_says_truncated_and_leaves_no_lock(tmp_path, monkeypatch, cut):
    from distiller.models import registry

    source = registry.cached_gguf("smollm2-135m-instruct")
    if source is None:
        pytest.skip("the embedded model's GGUF is not in the cache (distiller models pull)")
    monkeypatch.setenv("DISTILLER_HOME", str(tmp_path / "home"))
    bad = tmp_path / "bad.gguf"
    with open(source, "rb") as f:
        bad.write_bytes(f.read(cut))
    line = refused(["models", "import", str(bad), "--name", "bad-model"])
    assert "bad.gguf" in line and ("truncated" in line or "not a GGUF" in line)
    leftovers = (
        [p.name for p in registry.models_dir().glob("*")] if registry.models_dir().exists() else []
    )
    assert leftovers == [], leftovers


def test_a_file_that_is_not_gguf_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILLER_HOME", str(tmp_path / "home"))
    bad = tmp_path / "notes.gguf"
    bad.write_text("hello, not a model")
    assert "not a GGUF file" in refused(["models", "import", str(bad), "--name", "x"])


def test_the_last_line_of_defence_names_the_error_and_the_debug_flag(monkeypatch, tmp_path):
    """An exception nobody turned into a UserError still becomes one line, exit 1, with the
    hint; --debug shows the traceback instead."""
    import distiller.doctor as doctor

    def broken(args):
        raise ZeroDivisionError("a gap in input checking")

    monkeypatch.setattr(doctor, "run_cli", broken)
    outcome = run(["doctor"])
    assert outcome.code == 1 and "Traceback" not in outcome.stderr
    assert "ZeroDivisionError: a gap in input checking" in outcome.stderr
    assert "--debug" in outcome.stderr
    with pytest.raises(ZeroDivisionError):
        run(["doctor", "--debug"])
