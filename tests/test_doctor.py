"""`distiller doctor` reports what it measured, in a fresh process, as the CLI runs it."""

import json
import subprocess
import sys


def test_doctor_json_reports_blas_gemm_and_cache(tmp_path):
    env_home = {"DISTILLER_HOME": str(tmp_path)}
    import os

    done = subprocess.run(
        [sys.executable, "-m", "distiller.cli", "doctor", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env_home},
    )
    report = json.loads(done.stdout)
    assert report["mlx_version"]
    assert report["device"] in ("cpu", "gpu (metal)", "gpu (cuda)")
    gemm = report["gemm"]
    assert gemm["mlx_gflops"] > 0 and gemm["numpy_gflops"] > 0
    assert report["cache_dir"] == str(tmp_path)
    assert report["cached_models"] == []
    assert report["fast_ops"] == (report["device"] == "cpu")
    # one training shard per core on the CPU, one on a GPU
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert report["train_workers"] == (cores if report["device"] == "cpu" else 1)
    # The exit code says whether doctor found a problem, and every problem is spelled out.
    assert (done.returncode == 0) == (report["problems"] == [])
    if sys.platform.startswith("linux") and report["blas_loaded"]:
        assert "mlx_cpu.libs" not in report["blas_resolved"]


def test_only_a_reference_blas_speed_is_a_problem():
    from distiller.doctor import GemmSpeed, judge_gemm

    problems, notes = judge_gemm(GemmSpeed(1024, mlx_gflops=4.8, numpy_gflops=200.0), "cpu")
    assert len(problems) == 1 and "reference BLAS" in problems[0] and not notes
    # A busy machine skews one of two back-to-back timings: worth a note, not a failure.
    problems, notes = judge_gemm(GemmSpeed(1024, mlx_gflops=97.0, numpy_gflops=138.0), "cpu")
    assert not problems and "0.70x" in notes[0]
    assert judge_gemm(GemmSpeed(1024, mlx_gflops=190.0, numpy_gflops=200.0), "cpu") == ([], [])
    assert judge_gemm(GemmSpeed(1024, mlx_gflops=1.0, numpy_gflops=200.0), "gpu (metal)") == (
        [],
        [],
    )


def test_measured_read_bandwidth_is_a_plausible_figure():
    from distiller.doctor import measure_bandwidth

    # Any machine this runs on reads memory faster than 0.1 GB/s and slower than 10 TB/s.
    assert 0.1 < measure_bandwidth(megabytes=32, repeats=2) < 10_000


def test_machine_figures_are_measured_figures():
    from distiller.doctor import machine_figures

    figures = machine_figures()
    assert set(figures) == {"blas", "gemm_gflops", "numpy_gemm_gflops", "read_bandwidth_gbps"}
    assert figures["gemm_gflops"] > 0 and figures["numpy_gemm_gflops"] > 0
    assert 0.1 < figures["read_bandwidth_gbps"] < 10_000
    if sys.platform.startswith("linux"):
        assert figures["blas"]  # the library providing cblas_sgemm in this process
