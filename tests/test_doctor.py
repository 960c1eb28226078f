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
    # The exit code says whether doctor found a problem, and every problem is spelled out.
    assert (done.returncode == 0) == (report["problems"] == [])
    if sys.platform.startswith("linux") and report["blas_loaded"]:
        assert "mlx_cpu.libs" not in report["blas_resolved"]
