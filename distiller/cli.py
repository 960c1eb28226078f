"""The ``distiller`` command line: one subcommand per pipeline stage.

Each subcommand lives in the module that implements its stage; that module exposes
``add_arguments(parser)`` and ``run_cli(args) -> int``. Only the chosen module is imported,
so ``distiller --help`` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from distiller.errors import UserError

# name -> (module, one-line help). Order is the order of the pipeline.
COMMANDS: dict[str, tuple[str, str]] = {
    "doctor": ("distiller.doctor", "check platform, MLX device, BLAS speed and the model cache"),
    "models": ("distiller.models.cli", "pull, import (GGUF), list and locate models"),
    "generate": ("distiller.generate", "generate text with any model (quick check)"),
    "spec": ("distiller.spec.cli", "check a task spec; run its validators on a text (--check)"),
    "teach": ("distiller.teacher", "generate validated teacher samples for a task spec"),
    "prepare": ("distiller.dataset", "turn teacher samples into train/valid/test chat data"),
    "pairs": ("distiller.pairs", "build on-policy DPO pairs from the SFT student's own failures"),
    "train": ("distiller.train", "train a student adapter (sft, seq-kd, logit-kd, dpo)"),
    "fuse": ("distiller.fuse", "fuse an adapter into a standalone (optionally quantized) model"),
    "export": ("distiller.models.export_gguf", "export a fused llama model as GGUF for llama.cpp"),
    "eval": ("distiller.evaluate", "evaluate any model on any prompt file: outputs + metrics"),
    "run": ("distiller.pipeline", "run every stage: spec -> fused student -> comparison report"),
    "serve": ("distiller.serve", "serve models: OpenAI-compatible API, side-by-side page, report"),
}

EPILOG = """\
pipeline: spec -> teacher samples -> dataset -> adapter -> fused model -> metrics -> report

examples:
  distiller doctor
  distiller models pull smollm2-135m-instruct
  distiller generate --model smollm2-135m-instruct --prompt "What is a quorum?"

--debug (anywhere on the line, or DISTILLER_DEBUG=1) shows the traceback of an unexpected error.
"""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    pass


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distiller",
        description="Distill a teacher LLM into a small, fast MLX student.",
        epilog=EPILOG,
        formatter_class=_Formatter,
    )
    from distiller import __version__

    parser.add_argument("--version", action="version", version=f"distiller {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        # Raw epilogs: the subcommands lay out their notes and examples line by line.
        sub_parser = sub.add_parser(
            name, help=help_text, description=help_text, formatter_class=_Formatter
        )
        if name == command:
            module = importlib.import_module(module_name)
            module.add_arguments(sub_parser)
            sub_parser.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # --debug may stand anywhere (before or after the subcommand): shows tracebacks.
    debug = "--debug" in argv or os.environ.get("DISTILLER_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return int(args._module.run_cli(args) or 0)
    except KeyboardInterrupt:
        print("\ninterrupted; everything finished so far is saved.", file=sys.stderr)
        return 130
    except UserError as exc:  # bad input: one clear line, no traceback
        print(f"distiller {args.command}: error: {_one_line(str(exc))}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `distiller ... | head`: the reader left; not an error of ours
        return 0
    except Exception as exc:
        # The last line of defence: bad input is reported where it enters, as a UserError;
        # anything arriving here is a gap in that, still said in one line.
        if debug:
            raise
        print(
            f"distiller {args.command}: error: {type(exc).__name__}: {_one_line(str(exc))} "
            "(unexpected; rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1


def _one_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return " | ".join(lines[:3]) + (" ..." if len(lines) > 3 else "")


if __name__ == "__main__":
    sys.exit(main())
