"""The training loop: one compiled step, checkpoints that survive SIGKILL, early stopping.

Layout of ``out_dir`` (the adapter directory ``mlx_lm.load(base, adapter_path=out_dir)`` opens):
  adapters.safetensors, adapter_config.json  the result: best adapter so far (lowest validation
                                             loss), or the final one with keep: last
  metrics.csv, metrics.json                  one row per report step
  train_result.json                          summary written when the run ends
  checkpoint/state.json                      last checkpoint: step, early-stopping state, metrics
  checkpoint/step-N.{weights,optimizer}.safetensors
Modules: ``step`` (the compiled update), ``routes`` (loss per route), ``checkpoint``
(checkpoints, metrics, Ctrl-C), ``batches``, ``lora``, ``students``, ``losses``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np

from distiller.errors import UserError
from distiller.train import batches as B
from distiller.train import checkpoint as C
from distiller.train import lora as LR
from distiller.train import routes as R
from distiller.train import step as ST
from distiller.train import students as S
from distiller.train.routes import make_dpo_loss, make_kd_loss, sft_loss  # noqa: F401
from distiller.train.step import build_schedule, evaluate, make_train_step  # noqa: F401

ROUTES = ("sft", "seq-kd", "logit-kd", "dpo")
PAIR_FILES = ("pairs_train.jsonl", "pairs_valid.jsonl")


@dataclass
class TrainConfig:
    """Flat training settings (from the spec's student section, with efficient defaults)."""

    route: str = "sft"
    iters: int | None = None
    epochs: float | None = None
    batch_size: int = 4
    learning_rate: float = 2e-4
    schedule: str = "cosine"  # "cosine" (to 10% of peak) | "constant" | "linear" (to 0)
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0  # max global gradient norm; None = off
    max_seq_length: int = 512
    steps_per_eval: int = 50
    steps_per_report: int = 10
    val_batches: int = 25
    early_stopping_patience: int = 0  # evals without improvement before stopping; 0 = never
    # The result: "best" = lowest validation loss, "last" = the final step's weights. Validation
    # loss is the cross-entropy on the teacher's answers; when a format is what is distilled it
    # can rise (the content overfits) while the format is still being learned.
    keep: str = "best"
    checkpoint_every: int = 50
    seed: int = 0
    grad_accumulation: int = 1
    pad_to: int = 32
    # mx.compile the step: 118 vs 104 tok/s on CPU (scripts/bench_train.py); each new batch
    # shape costs one trace, so batch lengths are padded to few distinct shapes.
    compile: bool = True
    # Shards of each batch computed at once on separate CPU streams (distiller.train.parallel);
    # None = one per core on the CPU, one on a GPU. The update is the whole batch's either way.
    workers: int | None = None
    full_finetune: bool = False
    # logit-kd
    alpha: float = 0.5
    beta: float = 0.5
    gamma: float = 0.0
    temperature: float = 2.0
    divergence: str = "kl"
    layer_map: Any = "auto"
    # dpo
    dpo_beta: float = 0.1


@dataclass
class TrainResult:
    adapter_dir: str
    base_model: str
    route: str
    steps: int
    total_steps: int
    best_val_loss: float | None
    best_step: int | None
    final_train_loss: float | None
    stopped_early: bool
    resumed_from: int | None
    metrics: list[dict] = field(default_factory=list, repr=False)


def _get(obj: Any, name: str, default: Any = None) -> Any:
    if obj is None:
        return default
    value = obj.get(name, default) if isinstance(obj, dict) else getattr(obj, name, default)
    return default if value is None else value


def config_from_spec(spec: Any) -> TrainConfig:
    student = spec.student
    t, kd, dpo = _get(student, "train"), _get(student, "kd"), _get(student, "dpo")
    c = TrainConfig(route=_get(student, "route", "sft"))
    for name in (
        "iters",
        "epochs",
        "batch_size",
        "learning_rate",
        "schedule",
        "warmup_steps",
        "weight_decay",
        "max_seq_length",
        "steps_per_eval",
        "steps_per_report",
        "val_batches",
        "early_stopping_patience",
        "checkpoint_every",
        "seed",
        "grad_accumulation",
        "keep",
    ):
        setattr(c, name, _get(t, name, getattr(c, name)))
    c.grad_clip = _get(t, "grad_clip", None)
    c.full_finetune = bool(_get(student, "full_finetune", False))
    for name in ("alpha", "beta", "gamma", "temperature", "divergence", "layer_map"):
        setattr(c, name, _get(kd, name, getattr(c, name)))
    c.dpo_beta = float(_get(dpo, "beta", c.dpo_beta))
    if c.route not in ROUTES:
        raise UserError(f"student.route must be one of {', '.join(ROUTES)}, got {c.route!r}")
    if c.keep not in ("best", "last"):
        raise UserError(f"student.train.keep must be best or last, got {c.keep!r}")
    return c


# ---------------------------------------------------------------------------- models


def load_model(name_or_path: str) -> tuple[nn.Module, Any]:
    """(model, tokenizer) via distiller.models (registry names, compute dtype, quantized kept)."""
    from distiller.models import load_model as _load

    return _load(str(name_or_path))


def model_path(name_or_path: str, pull: bool = True) -> str:
    """A local model directory for a registry name, cached import or path."""
    from distiller.models import resolve_model

    return str(resolve_model(str(name_or_path), pull=pull))


def _vocab(tokenizer: Any) -> dict[str, int]:
    tok = getattr(tokenizer, "_tokenizer", tokenizer)
    return tok.get_vocab()


def check_same_vocabulary(
    student_tok: Any, teacher_tok: Any, student: nn.Module, teacher: nn.Module
) -> None:
    """Logit distillation compares distributions token by token: the vocabularies must match."""
    sv, tv = _vocab(student_tok), _vocab(teacher_tok)
    s_out = student.args.vocab_size if hasattr(student, "args") else None
    t_out = teacher.args.vocab_size if hasattr(teacher, "args") else None
    if len(sv) != len(tv) or s_out != t_out:
        raise UserError(
            f"logit-kd needs teacher and student to share a vocabulary: student has "
            f"{len(sv)} tokens (head {s_out}), teacher {len(tv)} (head {t_out}); use seq-kd instead"
        )
    inv_t = {i: s for s, i in tv.items()}
    ids = sorted(sv.values())
    sample = ids[:: max(1, len(ids) // 64)] + ids[-8:]
    inv_s = {i: s for s, i in sv.items()}
    diff = [(i, inv_s.get(i), inv_t.get(i)) for i in sample if inv_s.get(i) != inv_t.get(i)]
    if diff:
        i, a, b = diff[0]
        raise UserError(
            f"logit-kd needs teacher and student to share a vocabulary: token id {i} is {a!r} "
            f"for the student but {b!r} for the teacher ({len(diff)} of {len(sample)} sampled "
            "ids differ); use seq-kd instead"
        )


# ---------------------------------------------------------------------------- train


def _prepare_student(spec: Any, cfg: TrainConfig, out_dir: Path) -> tuple[str, list[int] | None]:
    """The base model to train: the spec's student, or layers dropped from the teacher."""
    drop = _get(spec.student, "drop_layers", None)
    if not drop:
        return str(spec.student.model), None
    student_dir = out_dir / "student_base"
    if (student_dir / "config.json").exists():
        kept = json.loads((student_dir / "config.json").read_text())["distiller_kept_layers"]
        return str(student_dir), kept
    kept = S.make_dropped_student(model_path(spec.teacher.model), student_dir, drop)
    return str(student_dir), kept


def _reference_logprobs(model, pairs, cfg) -> tuple[np.ndarray, np.ndarray]:
    """Sequence log-probs of chosen/rejected under the frozen reference (the untrained model)."""
    model.eval()
    ch, rj = np.zeros(len(pairs), np.float32), np.zeros(len(pairs), np.float32)
    for i in range(0, len(pairs), cfg.batch_size):
        b = ST.to_mx(B.collate_pairs(pairs[i : i + cfg.batch_size], cfg.pad_to))
        lp = R.pair_logprobs(model, b)
        n = lp.shape[0] // 2
        ch[i : i + n], rj[i : i + n] = np.array(lp[:n]), np.array(lp[n:])
    model.train()
    return ch, rj


def train(
    spec: Any,
    dataset_dir: str | Path,
    out_dir: str | Path,
    resume: bool = True,
    *,
    progress: bool = True,
    config: TrainConfig | None = None,
) -> TrainResult:
    """Train the spec's student on ``dataset_dir`` (from ``prepare``) into ``out_dir``."""
    cfg = config or config_from_spec(spec)
    dataset_dir, out_dir = Path(dataset_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mx.random.seed(cfg.seed)

    base, kept = _prepare_student(spec, cfg, out_dir)
    model, tokenizer = load_model(base)

    # ---- data
    if cfg.route == "dpo":
        files = [dataset_dir / f for f in PAIR_FILES]
        if not files[0].exists():
            raise UserError(
                f"{files[0]}: no preference pairs (run `distiller prepare` with route dpo)"
            )
        train_pairs = B.load_pair_examples(files[0], tokenizer, cfg.max_seq_length)
        valid_pairs = (
            B.load_pair_examples(files[1], tokenizer, cfg.max_seq_length)
            if files[1].exists()
            else []
        )
        lengths = [max(len(a.tokens), len(b.tokens)) for a, b in train_pairs]
        n_train = len(train_pairs)
    else:
        train_file, valid_file = dataset_dir / "train.jsonl", dataset_dir / "valid.jsonl"
        if not train_file.exists():
            raise UserError(f"{train_file}: not found (run `distiller prepare` first)")
        train_ex = B.load_chat_examples(train_file, tokenizer, cfg.max_seq_length)
        valid_ex = (
            B.load_chat_examples(valid_file, tokenizer, cfg.max_seq_length)
            if valid_file.exists()
            else []
        )
        lengths = [len(e.tokens) for e in train_ex]
        n_train = len(train_ex)
    if n_train == 0:
        raise UserError(f"{dataset_dir}: the training split is empty")
    groups = B.make_batches(lengths, cfg.batch_size)
    accum = max(1, int(cfg.grad_accumulation))
    if cfg.iters:
        total_steps = int(cfg.iters)
    else:
        total_steps = max(1, math.ceil(float(cfg.epochs or 1) * len(groups) / accum))

    # ---- model + adapter
    adapter_cfg = LR.adapter_config(model, _get(spec.student, "lora"), cfg.full_finetune, base)
    LR.prepare_trainable(model, adapter_cfg)
    model.train()

    if cfg.route == "logit-kd":
        teacher, teacher_tok = load_model(spec.teacher.model)
        teacher.freeze()
        teacher.eval()
        check_same_vocabulary(tokenizer, teacher_tok, model, teacher)
        n_s, n_t = len(model.layers), len(teacher.layers)
        lmap = S.layer_map_for(cfg.layer_map, n_s, n_t, kept) if cfg.gamma else {}
        loss_fn = R.make_kd_loss(teacher, cfg, lmap)
    elif cfg.route == "dpo":
        loss_fn = R.make_dpo_loss(cfg.dpo_beta)
    else:
        loss_fn = R.sft_loss

    def make_batch(idx: list[int], data, ref=None) -> dict:
        if cfg.route != "dpo":
            return B.collate([data[i] for i in idx], cfg.pad_to)
        b = B.collate_pairs([data[i] for i in idx], cfg.pad_to)
        b["ref_chosen"], b["ref_rejected"] = ref[0][idx], ref[1][idx]
        return b

    # The reference for DPO is the model before any update: LoRA starts as an exact no-op.
    if cfg.route == "dpo":
        ref_train = _reference_logprobs(model, train_pairs, cfg)
        ref_valid = _reference_logprobs(model, valid_pairs, cfg) if valid_pairs else None
        train_data, valid_data = train_pairs, valid_pairs
    else:
        ref_train = ref_valid = None
        train_data, valid_data = train_ex, valid_ex
    valid_lengths = [
        len(e[0].tokens) if isinstance(e, tuple) else len(e.tokens) for e in valid_data
    ]
    val_batches = [
        make_batch(g, valid_data, ref_valid) for g in B.make_batches(valid_lengths, cfg.batch_size)
    ]

    optimizer = optim.AdamW(
        learning_rate=ST.build_schedule(cfg, total_steps), weight_decay=cfg.weight_decay
    )
    optimizer.init(model.trainable_parameters())

    # ---- resume
    step, rows, best, best_step, bad_evals, stopped, resumed_from = (
        0,
        [],
        None,
        None,
        0,
        False,
        None,
    )
    # A checkpoint only continues the run that wrote it: same settings, same data.
    run_key = C.run_key(cfg, adapter_cfg, dataset_dir)
    state_file = C.ckpt_dir(out_dir) / "state.json"
    if (
        resume
        and state_file.exists()
        and json.loads(state_file.read_text()).get("run_key") != run_key
    ):
        raise UserError(
            f"{out_dir}: holds a checkpoint of a different run (training settings or data "
            "changed); use another output dir, or --no-resume to start over"
        )
    state = C.load_checkpoint(out_dir, model, optimizer) if resume else None
    if state is not None:
        step, resumed_from = state["step"], state["step"]
        best, best_step = state.get("best_val"), state.get("best_step")
        bad_evals, stopped = state.get("bad_evals", 0), state.get("stopped", False)
        rows = [r for r in state.get("metrics", []) if r["step"] <= step]
    elif not resume and C.ckpt_dir(out_dir).exists():
        for f in C.ckpt_dir(out_dir).iterdir():
            f.unlink()

    step_fn = ST.make_train_step(
        model,
        optimizer,
        loss_fn,
        compile=cfg.compile,
        grad_accumulation=accum,
        grad_clip=cfg.grad_clip,
        workers=cfg.workers,
        split=B.split_pairs if cfg.route == "dpo" else B.split_rows,
    )

    def checkpoint_extra():
        return {
            "best_val": best,
            "best_step": best_step,
            "bad_evals": bad_evals,
            "stopped": stopped,
            "metrics": rows,
            "total_steps": total_steps,
            "run_key": run_key,
        }

    from tqdm import tqdm

    bar = tqdm(
        total=total_steps,
        initial=step,
        desc=f"train {cfg.route}",
        unit="step",
        disable=not progress,
        dynamic_ncols=True,
    )
    window_loss, window_steps, window_toks, window_time = 0.0, 0, 0, 0.0
    t_start = time.perf_counter()
    last_loss = None
    with C.StopFlag() as flag:
        try:
            while step < total_steps and not stopped:
                micro = [
                    make_batch(
                        B.batch_for_step(groups, step * accum + j, cfg.seed), train_data, ref_train
                    )
                    for j in range(accum)
                ]
                # Dropout randomness is a function of (seed, step), so a resumed run draws
                # exactly what an uninterrupted one would (MLX cannot restore a saved key).
                mx.random.seed(cfg.seed * 1_000_003 + step)
                tic = time.perf_counter()
                loss = step_fn(*micro)
                window_time += time.perf_counter() - tic
                step += 1
                last_loss = loss.item()
                window_loss += last_loss
                window_steps += 1
                window_toks += sum(B.token_count(b) for b in micro)
                do_eval = bool(val_batches) and (
                    step % cfg.steps_per_eval == 0 or step == total_steps
                )
                if do_eval or step % cfg.steps_per_report == 0 or step == total_steps:
                    row = {
                        "step": step,
                        "train_loss": window_loss / window_steps,
                        "val_loss": None,
                        "lr": float(optimizer.learning_rate.item()),
                        "tokens_per_s": window_toks / max(window_time, 1e-9),
                        "peak_memory_gb": mx.get_peak_memory() / 1e9,
                        "elapsed_s": time.perf_counter() - t_start,
                    }
                    if do_eval:
                        val = ST.evaluate(model, loss_fn, val_batches, cfg.val_batches)
                        row["val_loss"] = val
                        if best is None or val < best:
                            best, best_step, bad_evals = val, step, 0
                            if cfg.keep == "best":
                                LR.save_adapter(out_dir, model, adapter_cfg)
                        else:
                            bad_evals += 1
                            if (
                                cfg.early_stopping_patience
                                and bad_evals >= cfg.early_stopping_patience
                            ):
                                stopped = True
                    rows.append(row)
                    C.write_metrics(out_dir, rows)
                    bar.set_postfix(
                        loss=f"{row['train_loss']:.3f}",
                        tok_s=f"{row['tokens_per_s']:.0f}",
                        **({"val": f"{row['val_loss']:.3f}"} if do_eval else {}),
                    )
                    window_loss, window_steps, window_toks, window_time = 0.0, 0, 0, 0.0
                bar.update(1)
                if cfg.checkpoint_every and (step % cfg.checkpoint_every == 0 or stopped):
                    C.save_checkpoint(out_dir, step, model, optimizer, checkpoint_extra())
                if flag.set:
                    C.save_checkpoint(out_dir, step, model, optimizer, checkpoint_extra())
                    raise KeyboardInterrupt
        finally:
            bar.close()

    C.save_checkpoint(out_dir, step, model, optimizer, checkpoint_extra())
    if best is None or cfg.keep == "last":  # (without validation data the last is all there is)
        LR.save_adapter(out_dir, model, adapter_cfg)
    C.write_metrics(out_dir, rows)
    result = TrainResult(
        adapter_dir=str(out_dir),
        base_model=base,
        route=cfg.route,
        steps=step,
        total_steps=total_steps,
        best_val_loss=best,
        best_step=best_step,
        final_train_loss=last_loss
        if last_loss is not None
        else (rows[-1]["train_loss"] if rows else None),
        stopped_early=stopped,
        resumed_from=resumed_from,
        metrics=rows,
    )
    summary = {k: v for k, v in asdict(result).items() if k != "metrics"}
    summary["config"] = asdict(cfg)
    LR.atomic_write_text(
        out_dir / "train_result.json", json.dumps(summary, indent=2, default=str) + "\n"
    )
    return result
