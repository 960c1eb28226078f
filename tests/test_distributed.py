"""Data-parallel training across ranks: real ``mlx.launch`` processes on loopback (ring backend).

Two ranks, each reading its share of every batch, must end with the weights one process gets on
the whole batch (up to float summation order): exactly so for the step with plain SGD
(``distributed_step.py``), and through ``distiller train`` with AdamW, whose update divides by
the gradient's own size and so turns summation noise in a near-zero gradient into a visible
difference (compared per matrix, relative to its size). A run killed on every rank and launched
again continues to the weights of an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from distributed_step import main as train_steps  # tests/ is on sys.path
from test_train import write_dataset, write_spec  # tests/ is on sys.path
from tiny_lm import build_tiny_model_dir

from distiller.spec import load_spec
from distiller.train import train

MLX_LAUNCH = Path(sys.executable).parent / "mlx.launch"
RANKS = 2
# Dropout off: its masks are drawn per shard, so only without it is the update of two half
# batches exactly the update of the whole batch.
LORA = "{rank: 4, alpha: 8, dropout: 0.0}"
STEP_SCRIPT = Path(__file__).with_name("distributed_step.py")


def free_port_run(n: int) -> int:
    """A port p with p .. p+n-1 free on loopback (the ring backend listens on one per rank)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n >= 65536:
            continue
        try:
            socks = []
            for p in range(base, base + n):
                sock = socket.socket()
                socks.append(sock)
                sock.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError("no run of free ports on loopback")


def launch(*command: str) -> list[str]:
    return [
        str(MLX_LAUNCH),
        "-n",
        str(RANKS),
        "--backend",
        "ring",
        "-p",
        str(free_port_run(RANKS)),
        "--",
        sys.executable,
        *command,
    ]


@pytest.fixture(scope="module")
def ring() -> None:
    """Skip (saying why) only when two ring ranks cannot form a group on this machine."""
    if not MLX_LAUNCH.exists():
        pytest.skip(f"{MLX_LAUNCH}: not installed (comes with mlx)")
    code = (
        "import mlx.core as mx; g = mx.distributed.init(backend='ring', strict=True); "
        "print('sum', mx.distributed.all_sum(mx.array(1.0), group=g).item())"
    )
    try:
        p = subprocess.run(
            launch("-c", code), capture_output=True, text=True, timeout=60, cwd=os.getcwd()
        )
    except subprocess.TimeoutExpired:
        pytest.skip("the ring backend cannot start here: 2 ranks on loopback hung for 60 s")
    if p.returncode != 0 or p.stdout.count(f"sum {float(RANKS)}") != RANKS:
        pytest.skip(f"the ring backend cannot start here: {(p.stderr or p.stdout).strip()[-300:]}")


def train_cmd(spec: Path, ds: Path, out: Path) -> list[str]:
    return launch("-m", "distiller.cli", "train", str(spec), "--data", str(ds), "--out", str(out))


def train_on_ranks(spec: Path, ds: Path, out: Path) -> subprocess.CompletedProcess:
    """``distiller train`` on the ranks, to the end: it exits 0 and ``out`` holds a finished run
    (checked apart: mlx.launch exits 0 even when a rank fails)."""
    p = subprocess.run(train_cmd(spec, ds, out), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert (out / "train_result.json").exists(), p.stderr[-2000:]
    return p


def adapter(out: Path) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in mx.load(str(out / "adapters.safetensors")).items()}


def assert_close(a: dict[str, np.ndarray], b: dict[str, np.ndarray], rel: float) -> None:
    """Each matrix within ``rel`` of the other's size (Frobenius norms)."""
    assert a.keys() == b.keys() and a
    for k in a:
        assert np.linalg.norm(a[k] - b[k]) <= rel * np.linalg.norm(b[k]), k


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("distributed")
    model = build_tiny_model_dir(root / "model")
    return model, write_dataset(root / "ds", n_train=16, n_valid=6)


def test_step_on_two_ranks_is_the_step_of_one_process_on_the_whole_batch(ring, setup, tmp_path):
    model, _ = setup
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    train_steps(str(model), str(one))  # here, alone: the whole batch each step
    # 2 CPU streams per rank as well: both levels of the weighted mean at once.
    p = subprocess.run(
        launch(str(STEP_SCRIPT), str(model), str(two), "2"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert two.exists(), p.stderr[-2000:]  # (mlx.launch exits 0 even when a rank fails)
    (a, meta_a), (b, meta_b) = (mx.load(str(f), return_metadata=True) for f in (one, two))
    init = mx.load(str(model / "model.safetensors"))
    assert a.keys() == b.keys() and a
    for k in a:
        np.testing.assert_allclose(np.array(b[k]), np.array(a[k]), rtol=1e-5, atol=1e-6)
        # ...while every matrix moved far beyond that tolerance
        assert np.abs(np.array(a[k]) - np.array(init[k])).max() > 1e-2
    # The loss each step reports is the whole batch's (the ranks' token-weighted mean).
    assert json.loads(meta_b["losses"]) == pytest.approx(json.loads(meta_a["losses"]), rel=1e-5)


def test_train_on_two_ranks_trains_what_one_process_does(ring, setup, tmp_path):
    model, ds = setup
    # Batches of 5 rows: the ranks get 3 and 2 rows, with different token counts, so only a
    # token-weighted sum of their gradients gives the whole batch's mean.
    spec = write_spec(
        tmp_path / "s.yaml",
        model,
        route="sft",
        lora=LORA,
        train="{iters: 6, batch_size: 5, learning_rate: 1.0e-3, steps_per_eval: 3}",
    )
    p = train_on_ranks(spec, ds, tmp_path / "ranks")
    assert p.stdout.count("trained sft") == 1  # rank 0 reports; the other rank is silent

    ref = train(load_spec(spec), ds, tmp_path / "one", progress=False)
    two, one = adapter(tmp_path / "ranks"), adapter(tmp_path / "one")
    assert_close(two, one, rel=1e-2)
    assert all(np.abs(v).max() > 1e-3 for k, v in one.items() if "lora_b" in k)  # from 0

    summary = json.loads((tmp_path / "ranks" / "train_result.json").read_text())
    assert summary["runtime"]["ranks"] == RANKS and summary["steps"] == 6
    assert summary["best_val_loss"] == pytest.approx(ref.best_val_loss, rel=1e-4)
    rows = json.loads((tmp_path / "ranks" / "metrics.json").read_text())
    ref_rows = json.loads((tmp_path / "one" / "metrics.json").read_text())
    assert [r["step"] for r in rows] == [r["step"] for r in ref_rows]
    for r, q in zip(rows, ref_rows, strict=True):  # the global batch's loss, on every row
        assert r["train_loss"] == pytest.approx(q["train_loss"], rel=1e-3)


def test_kill_every_rank_then_resume_matches_uninterrupted_ranks(ring, setup, tmp_path):
    model, ds = setup
    spec = write_spec(
        tmp_path / "s.yaml",
        model,
        route="sft",
        lora=LORA,
        train="{iters: 40, batch_size: 4, learning_rate: 1.0e-3, steps_per_eval: 20, "
        "checkpoint_every: 5}",
    )
    out = tmp_path / "killed"
    # The launcher and both ranks in one process group, killed together as a crash would.
    proc = subprocess.Popen(
        train_cmd(spec, ds, out),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    state = out / "checkpoint" / "state.json"
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            if state.exists() and json.loads(state.read_text())["step"] >= 10:
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.02)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = json.loads(state.read_text())["step"]
    assert 10 <= killed_at < 40

    train_on_ranks(spec, ds, out)  # resumed
    result = json.loads((out / "train_result.json").read_text())
    assert result["resumed_from"] == killed_at and result["steps"] == 40
    steps = [row["step"] for row in json.loads((out / "metrics.json").read_text())]
    assert steps == list(range(10, 41, 10))  # continuous: no gap, no repeat

    train_on_ranks(spec, ds, tmp_path / "straight")
    # The same ranks doing the same sums in the same order: only float noise may differ.
    assert_close(adapter(out), adapter(tmp_path / "straight"), rel=1e-5)
