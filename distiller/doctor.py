"""`distiller doctor`: what this machine gives MLX, measured rather than assumed."""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from distiller import blas


@dataclass
class GemmSpeed:
    size: int
    mlx_gflops: float
    numpy_gflops: float

    @property
    def ratio(self) -> float:
        return self.mlx_gflops / self.numpy_gflops if self.numpy_gflops else 0.0


REFERENCE_BLAS_RATIO = 0.3  # below this MLX/numpy GEMM ratio, MLX is not on an optimized BLAS


@dataclass
class DoctorReport:
    platform: str
    python: str
    mlx_version: str
    mlx_lm_version: str
    device: str
    blas_loaded: str | None
    blas_resolved: str | None
    blas_note: str
    gemm: GemmSpeed | None
    cache_dir: str
    cached_models: list[dict] = field(default_factory=list)
    fast_ops: bool = False  # distiller.fast_ops' CPU path (exp as a power of two) in use
    train_workers: int = 1  # shards of a training batch computed at once (train/parallel.py)
    problems: list[str] = field(default_factory=list)  # exit status 1
    notes: list[str] = field(default_factory=list)  # worth knowing, not a failure


def _best_seconds(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure_gemm(size: int = 1024, repeats: int = 8) -> GemmSpeed:
    """Float32 GEMM GFLOP/s of MLX and numpy in this process (best of `repeats`)."""
    import mlx.core as mx
    import numpy as np

    flops = 2 * size**3
    a_np = np.random.default_rng(0).standard_normal((size, size), dtype=np.float32)
    b_np = np.random.default_rng(1).standard_normal((size, size), dtype=np.float32)
    a_np @ b_np  # warm up threads and caches
    numpy_s = _best_seconds(lambda: a_np @ b_np, repeats)

    with mx.stream(mx.cpu):
        a, b = mx.array(a_np), mx.array(b_np)
        mx.eval(a @ b)
        mlx_s = _best_seconds(lambda: mx.eval(a @ b), repeats)
    return GemmSpeed(size, flops / mlx_s / 1e9, flops / numpy_s / 1e9)


def measure_bandwidth(megabytes: int = 256, repeats: int = 5) -> float:
    """One thread's memory read bandwidth in GB/s: numpy summing a float32 array far larger
    than the caches (best of ``repeats``). A decode step reads every weight once, so weight
    bytes / this is the step's floor (README "Decode speed")."""
    import numpy as np

    a = np.ones(megabytes * 2**20 // 4, dtype=np.float32)
    a.sum()  # fault the pages in
    return a.nbytes / _best_seconds(a.sum, repeats) / 1e9


def machine_figures() -> dict[str, Any]:
    """This machine's speed, measured now, for a benchmark's ``extra_info``: float32 GEMM
    GFLOP/s (MLX and numpy) and one thread's memory read GB/s, with the BLAS in use. Every
    benchmark carries these beside its tokens/s, so a figure can be read against what the
    machine gave at that moment (a shared machine's speed varies run to run). About a second."""
    gemm = measure_gemm()
    return {
        "blas": blas.resolved_cblas_library() if sys.platform.startswith("linux") else None,
        "gemm_gflops": gemm.mlx_gflops,
        "numpy_gemm_gflops": gemm.numpy_gflops,
        "read_bandwidth_gbps": measure_bandwidth(),
    }


def diagnose(measure: bool = True) -> DoctorReport:
    import mlx.core as mx

    from distiller import fast_ops
    from distiller.device import device_name
    from distiller.models.registry import cache_root, cached_models, dir_size
    from distiller.train.parallel import worker_count

    status = blas.status()
    try:
        from importlib.metadata import version

        mlx_lm_version = version("mlx-lm")
    except Exception:  # pragma: no cover - mlx-lm is a hard dependency
        mlx_lm_version = "not installed"
    report = DoctorReport(
        platform=f"{platform.system()} {platform.machine()} ({platform.platform()})",
        python=sys.version.split()[0],
        mlx_version=mx.__version__,
        mlx_lm_version=mlx_lm_version,
        device=device_name(),
        blas_loaded=status.loaded_path,
        blas_resolved=blas.resolved_cblas_library() if sys.platform.startswith("linux") else None,
        blas_note=status.reason,
        gemm=measure_gemm() if measure else None,
        cache_dir=str(cache_root()),
        cached_models=[
            {"name": name, "path": str(path), "size_mb": dir_size(path) / 1e6}
            for name, path in sorted(cached_models().items())
        ],
        fast_ops=fast_ops.enabled(),
        train_workers=worker_count(),
    )
    if status.attempted and not status.ok:
        report.problems.append(f"no optimized BLAS: {blas.FIX_HINT}")
    if report.gemm:
        problems, notes = judge_gemm(report.gemm, report.device)
        report.problems += problems
        report.notes += notes
    return report


def judge_gemm(gemm: GemmSpeed, device: str) -> tuple[list[str], list[str]]:
    """(problems, notes) about a GEMM measurement on ``device``."""
    if device != "cpu":
        return [], []
    # The reference BLAS runs at a small fraction of numpy's speed: far below what a busy
    # machine's noise does to two back-to-back measurements, so only that is a problem.
    if gemm.ratio < REFERENCE_BLAS_RATIO:
        return [
            f"MLX float32 GEMM reaches only {gemm.ratio:.2f}x numpy's speed; "
            f"MLX is probably on its reference BLAS. {blas.FIX_HINT}"
        ], []
    if gemm.ratio < 0.8:
        return [], [
            f"MLX float32 GEMM reached {gemm.ratio:.2f}x numpy's speed in this run; with an "
            "optimized BLAS it is usually ~1x. Other load on the machine skews this: rerun "
            "when it is idle."
        ]
    return [], []


def format_report(report: DoctorReport) -> str:
    lines = [
        f"platform     {report.platform}",
        f"python       {report.python}",
        f"mlx          {report.mlx_version} (mlx-lm {report.mlx_lm_version}), device: {report.device}",
        f"blas loaded  {report.blas_loaded or '-'} ({report.blas_note})",
        f"blas in use  {report.blas_resolved or '-'}  (library providing cblas_sgemm)",
    ]
    if report.gemm:
        g = report.gemm
        lines.append(
            f"gemm f32     {g.size}x{g.size}: mlx {g.mlx_gflops:.1f} GFLOP/s, "
            f"numpy {g.numpy_gflops:.1f} GFLOP/s (ratio {g.ratio:.2f})"
        )
    lines.append(
        "exp ops      "
        + (
            "fast CPU path: exp as 2**(x log2 e) (DISTILLER_FAST_OPS=0 for the stock ops)"
            if report.fast_ops
            else "stock MLX ops"
        )
    )
    lines.append(f"train step   {_workers_note(report.train_workers)}")
    lines.append(f"model cache  {report.cache_dir}")
    if not report.cached_models:
        lines.append("             (empty: `distiller models pull smollm2-135m-instruct`)")
    for m in report.cached_models:
        lines.append(f"             {m['name']:<28} {m['size_mb']:>8.1f} MB  {m['path']}")
    lines.extend(f"NOTE         {n}" for n in report.notes)
    lines.extend(f"PROBLEM      {p}" for p in report.problems)
    if not report.problems:
        lines.append("status       ok")
    return "\n".join(lines)


def _workers_note(n: int) -> str:
    if n == 1:
        return "one stream per batch (a GPU, or one core)"
    return (
        f"batches cut into {n} shards computed at once on CPU streams, one per core "
        "(`distiller train --workers 1` to turn off)"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--no-bench", action="store_true", help="skip the GEMM measurement (a second or two)"
    )


def run_cli(args: argparse.Namespace) -> int:
    report = diagnose(measure=not args.no_bench)
    if args.json:
        print(json.dumps(asdict(report), indent=2, default=str))
    else:
        print(format_report(report))
    return 1 if report.problems else 0
