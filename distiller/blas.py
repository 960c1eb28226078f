"""Put an optimized BLAS under MLX on Linux CPU.

The PyPI ``mlx[cpu]`` wheel links a bundled *reference* BLAS, far slower at float32 GEMM than
an optimized one on the same machine (``distiller doctor`` measures both). ``libmlx.so`` resolves
``cblas_sgemm`` through the dynamic linker's global scope first, so loading an optimized BLAS
with ``RTLD_GLOBAL`` *before* ``mlx.core`` is first imported makes MLX use it, unmodified.

This module must not import mlx. ``distiller/__init__.py`` calls :func:`ensure_optimized_blas`
before anything else, so ``import distiller`` is all a user needs.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import glob
import os
import platform
import subprocess
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

ENV_BLAS = "DISTILLER_BLAS"  # explicit library path, or "off" to leave MLX's BLAS alone

FIX_HINT = (
    "Install an optimized BLAS, e.g. `sudo apt-get install libopenblas0-pthread` on Debian/Ubuntu "
    "(scripts/setup.sh does this), or point DISTILLER_BLAS at a libopenblas/libblis/libmkl_rt .so."
)

# Library stems in order of preference: each exports the standard CBLAS symbols.
_CANDIDATE_NAMES = ("openblas", "openblasp", "openblaso", "blis", "mkl_rt")
_GLOB_PATTERNS = (
    "/usr/lib/*/openblas*/libopenblas*.so*",
    "/usr/lib/*/libopenblas*.so*",
    "/usr/lib64/libopenblas*.so*",
    "/usr/lib/libopenblas*.so*",
    "/usr/local/lib/libopenblas*.so*",
    "/opt/*/lib/libopenblas*.so*",
    "/usr/lib/*/libblis*.so*",
)


@dataclass
class BlasStatus:
    """What happened when distiller tried to put an optimized BLAS under MLX."""

    attempted: bool
    loaded_path: str | None = None
    reason: str = ""
    mlx_was_imported_first: bool = False

    @property
    def ok(self) -> bool:
        return self.loaded_path is not None


_status: BlasStatus | None = None
_warned = False


def _needs_optimized_blas() -> bool:
    # macOS uses Accelerate through the Metal/CPU build; only Linux wheels bundle reference BLAS.
    return sys.platform.startswith("linux") and os.environ.get(ENV_BLAS, "").lower() != "off"


def _ldconfig_paths() -> list[str]:
    for ldconfig in ("ldconfig", "/sbin/ldconfig", "/usr/sbin/ldconfig"):
        try:
            out = subprocess.run(
                [ldconfig, "-p"], capture_output=True, text=True, timeout=5, check=False
            ).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        paths = []
        for line in out.splitlines():
            name, _, path = line.partition("=>")
            if any(f"lib{stem}" in name for stem in _CANDIDATE_NAMES) and path.strip():
                paths.append(path.strip())
        return paths
    return []


def _environment_paths() -> list[str]:
    """oneMKL installed into this Python environment (``pip install "distiller[mkl]"``).

    Installing it is the opt-in, so it comes before the system's BLAS: its sgemm handles the
    one-row products of single-stream decoding as matrix-vector products, where OpenBLAS 0.3.21
    packs the whole weight matrix first (README "Decode speed" has the measured difference).
    """
    return sorted(glob.glob(os.path.join(sys.prefix, "lib", "libmkl_rt.so*")))


def candidate_blas_paths() -> list[str]:
    """Every optimized BLAS library this machine seems to have, best first, no duplicates."""
    found: list[str] = []
    explicit = os.environ.get(ENV_BLAS)
    if explicit and explicit.lower() != "off":
        found.append(explicit)
    found.extend(_environment_paths())
    for stem in _CANDIDATE_NAMES:
        name = ctypes.util.find_library(stem)
        if name:
            found.append(name)
    found.extend(_ldconfig_paths())
    prefix = os.environ.get("CONDA_PREFIX")
    if prefix:
        found.extend(sorted(glob.glob(os.path.join(prefix, "lib", "libopenblas*.so*"))))
    for pattern in _GLOB_PATTERNS:
        found.extend(sorted(glob.glob(pattern)))
    seen: set[str] = set()
    unique = []
    for path in found:
        key = os.path.realpath(path) if os.path.isabs(path) else path
        if key not in seen:
            seen.add(key)
            unique.append(path)
    return unique


def _try_load(path: str) -> bool:
    if "mkl_rt" in os.path.basename(path):
        # oneMKL's OpenMP threads spin for 200 ms after each call by default; on a machine whose
        # cores are shared (or by MLX's own stream threads) that spinning steals the cores.
        os.environ.setdefault("KMP_BLOCKTIME", "0")
    try:
        lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError:
        return False
    # A library named like BLAS that lacks CBLAS (e.g. a Fortran-only build) would not help.
    return hasattr(lib, "cblas_sgemm")


def ensure_optimized_blas() -> BlasStatus:
    """Load an optimized BLAS globally before MLX is imported; idempotent, warns once on failure."""
    global _status
    if _status is not None:
        return _status
    if not _needs_optimized_blas():
        _status = BlasStatus(attempted=False, reason=f"not needed on {platform.system()}")
        return _status
    mlx_first = "mlx.core" in sys.modules
    for path in candidate_blas_paths():
        if _try_load(path):
            _status = BlasStatus(True, path, "loaded", mlx_was_imported_first=mlx_first)
            break
    else:
        _status = BlasStatus(True, None, "no optimized BLAS found", mlx_first)
    if _status.ok and mlx_first:
        _status.reason = "mlx.core was imported before distiller; MLX may keep its reference BLAS"
    if not _status.ok or mlx_first:
        _warn_once(_status)
    return _status


def _warn_once(status: BlasStatus) -> None:
    global _warned
    if _warned:
        return
    _warned = True
    if status.mlx_was_imported_first:
        msg = (
            "distiller: mlx.core was imported before distiller, so MLX may be using its slow "
            "bundled reference BLAS (much slower float32 matmul). Import distiller first."
        )
    else:
        msg = f"distiller: no optimized BLAS found; MLX float32 matmul will be ~40x slower. {FIX_HINT}"
    warnings.warn(msg, RuntimeWarning, stacklevel=3)


def resolved_cblas_library() -> str | None:
    """The file that provides ``cblas_sgemm`` in this process's global symbol scope."""

    class _DlInfo(ctypes.Structure):
        _fields_ = [
            ("dli_fname", ctypes.c_char_p),
            ("dli_fbase", ctypes.c_void_p),
            ("dli_sname", ctypes.c_char_p),
            ("dli_saddr", ctypes.c_void_p),
        ]

    # libmlx binds cblas_sgemm through the global scope first (where RTLD_GLOBAL libraries
    # live), then through its own dependencies (the bundled reference BLAS).
    symbol = None
    for handle in (None, _loaded_libmlx()):
        try:
            symbol = ctypes.CDLL(handle).cblas_sgemm
            break
        except (OSError, AttributeError, TypeError):
            continue
    try:
        libdl = ctypes.CDLL(ctypes.util.find_library("dl") or "libc.so.6")
    except OSError:
        return None
    if symbol is None:
        return None
    info = _DlInfo()
    if libdl.dladdr(ctypes.cast(symbol, ctypes.c_void_p), ctypes.byref(info)) == 0:
        return None
    return info.dli_fname.decode() if info.dli_fname else None


def _loaded_libmlx() -> str | None:
    """Path of the libmlx shared object mapped into this process, if any."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.rstrip().split(" ")[-1]
                if os.path.basename(path).startswith("libmlx"):
                    return path
    except OSError:
        pass
    return None


def status() -> BlasStatus:
    return ensure_optimized_blas()


@functools.lru_cache(maxsize=1)
def _thread_controls() -> tuple[object, object] | None:
    """(get, set) for the loaded BLAS's thread count: OpenBLAS's or BLIS's API, else None."""
    path = status().loaded_path
    if path is None:
        return None
    try:
        lib = ctypes.CDLL(path)
    except OSError:
        return None
    for get, set_ in (
        ("openblas_get_num_threads", "openblas_set_num_threads"),
        ("bli_thread_get_num_threads", "bli_thread_set_num_threads"),
        ("MKL_Get_Max_Threads", "MKL_Set_Num_Threads"),
    ):
        if hasattr(lib, get) and hasattr(lib, set_):
            return getattr(lib, get), getattr(lib, set_)
    return None


def get_threads() -> int | None:
    """Threads the loaded BLAS uses per call, or None when it cannot be told."""
    controls = _thread_controls()
    return int(controls[0]()) if controls else None


@contextmanager
def threads(n: int) -> Iterator[bool]:
    """Run the block with the BLAS using ``n`` threads per call, then restore the setting.

    Used when several MLX CPU streams each make BLAS calls at once: each call should then take
    one core, not all of them (oversubscribed cores run slower than one thread each). Yields
    whether the count could be set (False with a BLAS we cannot control; nothing changes).
    """
    controls = _thread_controls()
    if controls is None:
        yield False
        return
    get, set_ = controls
    before = int(get())
    set_(max(1, int(n)))
    try:
        yield True
    finally:
        set_(before)
