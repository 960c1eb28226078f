"""Stage: dataset -> adapter. Train a student with sft, seq-kd, logit-kd, dpo or gkd.

``train(spec, dataset_dir, out_dir, resume=True, runtime=TrainRuntime()) -> TrainResult`` is
the stage function: what it trains comes from the spec's student sections, how it runs from
``TrainRuntime``. ``make_train_step`` builds the compiled update used by the loop and by the
benchmarks.
"""

from __future__ import annotations

import argparse

from distiller.cli_types import out_dir, positive_int
from distiller.train import distributed as D
from distiller.train.step import make_train_step
from distiller.train.trainer import TrainResult, TrainRuntime, train

__all__ = [
    "TrainResult",
    "TrainRuntime",
    "add_arguments",
    "make_train_step",
    "run_cli",
    "train",
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", help="task spec (YAML)")
    parser.add_argument("--data", required=True, help="dataset dir written by `distiller prepare`")
    parser.add_argument(
        "--out", required=True, type=out_dir, help="adapter dir to write (checkpoints, metrics)"
    )
    parser.add_argument(
        "--no-resume", action="store_true", help="ignore an existing checkpoint in --out"
    )
    parser.add_argument("--iters", type=positive_int, help="override student.train.iters")
    parser.add_argument("--no-compile", action="store_true", help="run the step without mx.compile")
    parser.add_argument(
        "--workers",
        type=positive_int,
        metavar="N",
        help="batch shards computed at once on separate CPU streams (default: one per core on "
        "the CPU, one on a GPU; 1 = no sharding). The update is the same either way.",
    )
    parser.epilog = (
        "A checkpoint is written every student.train.checkpoint_every steps and on Ctrl-C; running\n"
        "the same command again resumes from it. The adapter in --out is the one with the lowest\n"
        "validation loss, or the final one with student.train.keep: last. --no-compile and\n"
        "--workers change how the run computes, not what it trains: a resumed run may change them.\n"
        "train_result.json in --out marks a finished run; `distiller fuse` refuses an unfinished one.\n\n"
        "Across processes or hosts (data parallel, mlx.distributed): launch one per rank with\n"
        "  mlx.launch -n 2 --backend ring -- distiller train SPEC --data D --out O\n"
        "  mlx.launch --hostfile hosts.json -- distiller train SPEC --data D --out O\n"
        "Each rank trains on its slice of every batch; rank 0 writes --out and logs; the update\n"
        "is the whole batch's. --data and --out must be the same on every host (shared or copied)."
    )


def run_cli(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from distiller.pipeline import load_task

    spec = load_task(args.spec)
    if args.iters is not None:
        train_spec = replace(spec.student.train, iters=args.iters, epochs=None)
        spec = replace(spec, student=replace(spec.student, train=train_spec))
    runtime = TrainRuntime(compile=not args.no_compile, workers=args.workers)
    r = train(spec, args.data, args.out, resume=not args.no_resume, runtime=runtime)
    if not D.is_main(D.world()):  # rank 0 reports for every rank
        return 0
    val = f"{r.best_val_loss:.4f} at step {r.best_step}" if r.best_val_loss is not None else "n/a"
    print(
        f"trained {r.route}: {r.steps}/{r.total_steps} steps, best val loss {val}"
        f"{' (early stop)' if r.stopped_early else ''}; adapter in {r.adapter_dir}"
    )
    return 0
