"""Training tokens/s of ``distiller train`` on one process or on several ranks (mlx.launch).

Runs the real trainer on a prepared dataset with a metrics row every 2 steps and prints the
median tokens/s of the rows after the first (the first holds the compile). Under mlx.launch
the figure is the global batch's tokens over rank 0's step time.

  .venv/bin/python scripts/bench_train_ranks.py SPEC DATA                # 1 process
  .venv/bin/mlx.launch -n 2 --backend ring -- \\
      .venv/bin/python scripts/bench_train_ranks.py SPEC DATA --workers 1  # 2 local ranks
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from dataclasses import replace
from pathlib import Path

import distiller  # noqa: F401  (loads the fast BLAS before mlx)

# isort: split
from distiller.spec import load_spec
from distiller.train import TrainRuntime, train
from distiller.train import distributed as D


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("spec")
    ap.add_argument("data")
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--workers", type=int, default=None, help="CPU streams per rank")
    ap.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "distiller_bench_ranks"))
    args = ap.parse_args()

    spec = load_spec(args.spec)
    t = replace(spec.student.train, iters=args.iters, epochs=None, steps_per_eval=10**9)
    spec = replace(spec, student=replace(spec.student, train=t))
    runtime = TrainRuntime(workers=args.workers, steps_per_report=2)
    r = train(spec, args.data, args.out, resume=False, progress=False, runtime=runtime)
    group = D.world()
    if D.is_main(group):
        rates = [row["tokens_per_s"] for row in r.metrics[1:]]
        print(
            f"ranks {group.size()} workers {args.workers or 'default'}: "
            f"{statistics.median(rates):.1f} tok/s (median of {len(rates)} windows of 2 steps: "
            f"{', '.join(f'{x:.1f}' for x in rates)})"
        )


if __name__ == "__main__":
    main()
