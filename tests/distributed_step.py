"""``make_train_step`` on a tiny model, with plain SGD, over a fixed list of global batches.

Run alone it trains on each whole batch; under ``mlx.launch`` each rank trains on its shard
(``distributed.shard``) and the ranks' gradients are summed. Rank 0 saves the trained weights
and the step losses. SGD (no Adam normalisation) makes the result a smooth function of the
gradients, so one process and several ranks must agree to float summation error.

  python tests/distributed_step.py MODEL_DIR OUT.safetensors [WORKERS]
"""

from __future__ import annotations

import json
import sys

import distiller  # noqa: F401  (loads the fast BLAS before mlx)

# isort: split
import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_flatten

from distiller.models import load_model
from distiller.train import batches as B
from distiller.train import distributed as D
from distiller.train.routes import sft_loss
from distiller.train.step import make_train_step

QA = [
    (f"What is {a} times {b}?", f"It is {a * b}: {a} x {b} = {a * b}.")
    for a in range(3)
    for b in range(4)
]
# Global batches of 5 (ranks get 3 + 2 rows), 4 and 1 row(s) (a rank with none).
BATCHES = [[0, 1, 2, 3, 4], [5, 6, 7, 8], [9], [10, 11, 0, 3, 7]]


def main(model_dir: str, out: str, workers: int = 1) -> None:
    group = D.world()
    model, tok = load_model(model_dir)
    model.freeze()
    for layer in model.layers:  # a few full matrices: plenty of weights, a quick step
        layer.self_attn.q_proj.unfreeze()
        layer.mlp.down_proj.unfreeze()
    examples = [
        B.encode_chat(
            tok, [{"role": "user", "content": q}, {"role": "assistant", "content": a}], 128
        )
        for q, a in QA
    ]
    step = make_train_step(
        model, optim.SGD(learning_rate=0.5), sft_loss, workers=workers, group=group
    )
    losses = []
    for idx in BATCHES:
        mine, counted = D.shard(idx, group)
        loss = step(B.collate([examples[i] for i in mine]), counted=counted)
        losses.append(loss.item())
    if D.is_main(group):
        weights = dict(tree_flatten(model.trainable_parameters()))
        mx.save_safetensors(out, weights, metadata={"losses": json.dumps(losses)})


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 1)
