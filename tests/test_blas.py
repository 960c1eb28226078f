"""The optimized-BLAS loader: checked in fresh interpreters, since it acts at import time."""

import json
import subprocess
import sys

import pytest

from distiller import blas

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux-only concern")

PROBE = """
import json, sys
{first}
import mlx.core as mx
from distiller import blas
st = blas.status()
print(json.dumps({{"loaded": st.loaded_path, "resolved": blas.resolved_cblas_library(),
                  "mlx_first": st.mlx_was_imported_first}}))
"""


def probe(first: str = "import distiller", env: dict | None = None) -> tuple[dict, str]:
    import os

    full_env = {**os.environ, **(env or {})}
    done = subprocess.run(
        [sys.executable, "-W", "always", "-c", PROBE.format(first=first)],
        capture_output=True,
        text=True,
        env=full_env,
        check=True,
        timeout=120,
    )
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


have_optimized_blas = bool(blas.candidate_blas_paths())


@pytest.mark.skipif(not have_optimized_blas, reason="no optimized BLAS on this machine")
def test_import_distiller_puts_optimized_blas_under_mlx():
    result, stderr = probe()
    assert result["loaded"], stderr
    # The library that serves cblas_sgemm must be the one we loaded, not MLX's bundled reference.
    assert "mlx_cpu.libs" not in (result["resolved"] or "")
    assert "blas" in (result["resolved"] or "").lower()
    assert "RuntimeWarning" not in stderr


def test_opt_out_leaves_mlx_reference_blas():
    result, _ = probe(env={"DISTILLER_BLAS": "off"})
    assert result["loaded"] is None
    assert "mlx_cpu.libs" in (result["resolved"] or "")


def test_importing_mlx_first_warns_with_the_fix():
    result, stderr = probe(first="import mlx.core; import distiller")
    assert result["mlx_first"] is True
    assert "imported before distiller" in stderr


def test_missing_blas_warns_once_with_fix(tmp_path):
    # An explicit path that does not exist, and a search that finds nothing: simulate by pointing
    # the loader at a bogus library and clearing the other candidates.
    code = (
        "import warnings, distiller.blas as b\n"
        "b.candidate_blas_paths = lambda: ['/nonexistent/libopenblas.so']\n"
        "b._status = None\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    b.ensure_optimized_blas(); b.ensure_optimized_blas()\n"
        "print(len(w)); print(w[0].message)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    count, message = out.strip().split("\n", 1)
    assert count == "1"
    assert "no optimized BLAS" in message and "apt-get install" in message


def test_mkl_installed_in_the_environment_comes_first(tmp_path, monkeypatch):
    """``pip install "distiller[mkl]"`` puts libmkl_rt in the environment's lib/: installing it
    is the opt-in, so it is tried before the system's BLAS (but after DISTILLER_BLAS)."""
    (tmp_path / "lib").mkdir()
    mkl = tmp_path / "lib" / "libmkl_rt.so.2"
    mkl.write_bytes(b"")
    monkeypatch.setattr(sys, "prefix", str(tmp_path))
    monkeypatch.delenv(blas.ENV_BLAS, raising=False)
    assert blas.candidate_blas_paths()[0] == str(mkl)
    monkeypatch.setenv(blas.ENV_BLAS, "/some/libopenblas.so")
    assert blas.candidate_blas_paths()[:2] == ["/some/libopenblas.so", str(mkl)]


@pytest.mark.skipif(blas.get_threads() is None, reason="a BLAS whose threads cannot be set")
def test_threads_sets_and_restores_the_blas_thread_count():
    before = blas.get_threads()
    with blas.threads(1) as ok:
        assert ok and blas.get_threads() == 1
    assert blas.get_threads() == before
