"""Stage: dataset -> adapter. Train a student with sft, seq-kd, logit-kd or dpo.

``train(spec, dataset_dir, out_dir, resume=True) -> TrainResult`` is the stage function;
``make_train_step`` builds the compiled update used by the loop and by the benchmarks.
"""

from __future__ import annotations

import argparse

from distiller.train.trainer import (
    TrainConfig,
    TrainResult,
    config_from_spec,
    make_train_step,
    train,
)

__all__ = [
    "TrainConfig",
    "TrainResult",
    "add_arguments",
    "config_from_spec",
    "make_train_step",
    "run_cli",
    "train",
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", help="task spec (YAML)")
    parser.add_argument("--data", required=True, help="dataset dir written by `distiller prepare`")
    parser.add_argument("--out", required=True, help="adapter dir to write (checkpoints, metrics)")
    parser.add_argument(
        "--no-resume", action="store_true", help="ignore an existing checkpoint in --out"
    )
    parser.add_argument("--iters", type=int, help="override student.train.iters")
    parser.add_argument("--no-compile", action="store_true", help="run the step without mx.compile")
    parser.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="batch shards computed at once on separate CPU streams (default: one per core on "
        "the CPU, one on a GPU; 1 = no sharding). The update is the same either way.",
    )
    parser.epilog = (
        "A checkpoint is written every student.train.checkpoint_every steps and on Ctrl-C; running\n"
        "the same command again resumes from it. The adapter in --out is the one with the lowest\n"
        "validation loss, or the final one with student.train.keep: last."
    )


def run_cli(args: argparse.Namespace) -> int:
    from distiller.errors import UserError
    from distiller.spec import load_spec

    spec = load_spec(args.spec)
    cfg = config_from_spec(spec)
    if args.iters:
        cfg.iters = args.iters
    if args.no_compile:
        cfg.compile = False
    if args.workers is not None:
        if args.workers < 1:
            raise UserError(f"--workers must be at least 1, got {args.workers}")
        cfg.workers = args.workers
    r = train(spec, args.data, args.out, resume=not args.no_resume, config=cfg)
    val = f"{r.best_val_loss:.4f} at step {r.best_step}" if r.best_val_loss is not None else "n/a"
    print(
        f"trained {r.route}: {r.steps}/{r.total_steps} steps, best val loss {val}"
        f"{' (early stop)' if r.stopped_early else ''}; adapter in {r.adapter_dir}"
    )
    return 0
