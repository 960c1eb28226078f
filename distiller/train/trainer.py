"""The training loop: one compiled step, checkpoints that survive SIGKILL, early stopping.

What is trained comes from the spec alone (``student.route``, ``student.train``, ``student.kd``,
``student.dpo``, ``student.lora``): those sections are the one schema and hold the defaults.
How the run is executed (``TrainRuntime``: compilation, CPU shards, report interval) sits
apart; it never changes what the adapter means, so a resumed run may change it.

Layout of ``out_dir`` (the adapter directory ``mlx_lm.load(base, adapter_path=out_dir)`` opens):
  adapters.safetensors, adapter_config.json  the result: best adapter so far (lowest validation
                                             loss), or the final one with keep: last
  metrics.csv, metrics.json                  one row per report step
  train_result.json                          summary written when the run ends (removed when
                                             one starts: it marks the adapter as finished)
  checkpoint/state.json                      last checkpoint: step, early-stopping state, metrics
  checkpoint/step-N.{weights,optimizer}.safetensors
Modules: ``step`` (the compiled update), ``routes`` (loss per route), ``checkpoint``
(checkpoints, metrics, Ctrl-C), ``batches``, ``lora``, ``students``, ``losses``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np

from distiller.decoding import Decoding
from distiller.errors import UserError
from distiller.files import atomic_write
from distiller.generate import generate_batch
from distiller.hashing import canonical, stable_hash
from distiller.models import load_model, resolve_model
from distiller.spec import ROUTES, DPOSpec, KDSpec, StudentSpec, TaskSpec
from distiller.train import batches as B
from distiller.train import checkpoint as C
from distiller.train import distributed as D
from distiller.train import logit_cache as LC
from distiller.train import lora as LR
from distiller.train import routes as R
from distiller.train import step as ST
from distiller.train import students as S
from distiller.train.routes import sft_loss
from distiller.train.step import make_train_step

CHAT_FILES = ("train.jsonl", "valid.jsonl")
KD_ROUTES = ("logit-kd", "gkd")  # the routes that score with a local teacher
PAIR_FILES = ("pairs_train.jsonl", "pairs_valid.jsonl")


@dataclass(frozen=True)
class TrainRuntime:
    """How a run is executed, not what it trains: left out of the checkpoint's run key."""

    # mx.compile the step: one fused graph per batch shape instead of op-by-op dispatch. Each
    # new shape costs a trace, which is why batch lengths are padded to few distinct shapes.
    compile: bool = True
    # Shards of each batch computed at once on separate CPU streams (distiller.train.parallel);
    # None = one per core on the CPU, one on a GPU. The update is the whole batch's either way.
    workers: int | None = None
    # A metrics row (train loss, tokens/s, memory) every this many steps, and at every eval.
    steps_per_report: int = 10

    def __post_init__(self) -> None:
        if self.workers is not None and self.workers < 1:
            raise UserError(f"workers must be at least 1, got {self.workers}")
        if self.steps_per_report < 1:
            raise UserError(f"steps_per_report must be at least 1, got {self.steps_per_report}")


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


def run_settings(spec: TaskSpec) -> dict[str, Any]:
    """Everything that decides what a run trains (the data aside): its checkpoint's key."""
    student = spec.student
    teacher_used = student.route in KD_ROUTES or student.drop_layers is not None
    return {
        "model": student.model,
        "route": student.route,
        "full_finetune": student.full_finetune,
        "lora": None if student.full_finetune else student.lora,
        "train": student.train,
        "kd": _kd(student) if student.route in KD_ROUTES else None,
        "dpo": _dpo(student) if student.route == "dpo" else None,
        "drop_layers": student.drop_layers,
        "teacher": _teacher_identity(spec) if teacher_used else None,
    }


def _teacher_identity(spec: TaskSpec) -> Any:
    """The local teacher's name, or a served one's (url, model): never its key."""
    endpoint = spec.teacher.endpoint
    return spec.teacher.model if endpoint is None else [endpoint.url, endpoint.model]


def _kd(student: StudentSpec) -> KDSpec:
    # The parser sets kd for logit-kd and gkd; a spec built in code without it gets the
    # section defaults.
    return student.kd or KDSpec()


def _dpo(student: StudentSpec) -> DPOSpec:
    return student.dpo or DPOSpec()


# ---------------------------------------------------------------------------- models


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


# ---------------------------------------------------------------------------- data


def read_splits(dataset_dir: Path, route: str) -> tuple[list, list]:
    """The checked rows of the training and validation files the route trains on (the chat
    files, or the preference pairs for dpo), read before any model is built: bad data is
    refused at once, naming the file and line."""
    if not dataset_dir.exists():
        raise UserError(f"{dataset_dir}: no such dataset dir (run `distiller prepare` first)")
    if not dataset_dir.is_dir():
        raise UserError(f"{dataset_dir}: not a directory; expected a dataset dir from `prepare`")
    dpo = route == "dpo"
    train_file, valid_file = (dataset_dir / name for name in (PAIR_FILES if dpo else CHAT_FILES))
    if not train_file.exists():
        hint = "run `distiller prepare` with route dpo" if dpo else "run `distiller prepare` first"
        raise UserError(f"{train_file}: not found ({hint})")
    if not valid_file.exists():
        raise UserError(
            f"{valid_file}: not found; `distiller prepare` writes it (empty when the split has "
            "no validation prompts)"
        )
    read = B.read_pair_rows if dpo else B.read_chat_rows
    train_rows = read(train_file)
    if not train_rows:
        raise UserError(
            f"{train_file}: no rows to train on; expected one {B.PAIR_ROW if dpo else B.CHAT_ROW} "
            "per line"
        )
    return train_rows, read(valid_file)


def _make_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir}: a file, expected the adapter dir to write")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(
            f"{out_dir}: cannot create the adapter dir: {exc.strerror or exc}"
        ) from None


# ---------------------------------------------------------------------------- train


def _prepare_student(spec: TaskSpec, out_dir: Path) -> tuple[str, list[int] | None]:
    """The base model to train: the spec's student, or layers dropped from the teacher."""
    drop = spec.student.drop_layers
    if drop is None:
        return str(spec.student.model), None
    student_dir = out_dir / "student_base"
    kept = S.dropped_student(resolve_model(spec.teacher.model), student_dir, drop)
    return str(student_dir), kept


def _reference_logprobs(
    model: nn.Module, pairs: list[tuple[B.Example, B.Example]], batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Sequence log-probs of chosen/rejected under the frozen reference (the untrained model)."""
    model.eval()
    ch, rj = np.zeros(len(pairs), np.float32), np.zeros(len(pairs), np.float32)
    for i in range(0, len(pairs), batch_size):
        b = ST.to_mx(B.collate_pairs(pairs[i : i + batch_size]))
        lp = R.pair_logprobs(model, b)
        n = lp.shape[0] // 2
        ch[i : i + n], rj[i : i + n] = np.array(lp[:n]), np.array(lp[n:])
    model.train()
    return ch, rj


def _preference_stats(model: nn.Module, batches: list[dict], beta: float) -> dict[str, float]:
    """dpo's reward margin, preference accuracy and rewards over pair ``batches`` (with their
    reference log-probs), for the metrics rows: ``routes.preference_stats``, without dropout."""
    model.eval()
    try:
        return R.preference_stats(model, [ST.to_mx(b) for b in batches], beta)
    finally:
        model.train()


def _load_teacher(spec: TaskSpec, model: nn.Module, tokenizer: Any) -> nn.Module:
    teacher, teacher_tok = load_model(spec.teacher.model)
    teacher.freeze()
    teacher.eval()
    check_same_vocabulary(tokenizer, teacher_tok, model, teacher)
    return teacher


def _teacher_cache(
    spec: TaskSpec,
    model: nn.Module,
    tokenizer: Any,
    dataset_dir: Path,
    splits: list[list[B.Example]],
    progress: bool,
) -> list[LC.TeacherTopK]:
    """The teacher-logit cache of each split (``kd.cache``), built where missing: the teacher
    is loaded only when some shard has to be computed, and freed before training."""
    kd = _kd(spec.student)
    cache = kd.cache
    assert cache is not None
    endpoint = spec.teacher.endpoint
    teacher: list[nn.Module] = []
    served: list[Any] = []  # the served teacher's backend, once connected
    if endpoint is not None:  # a served teacher: its top_logprobs (the spec checked T = 1)
        from distiller.backends.openai_compat import OpenAICompatBackend, endpoint_fingerprint

        # Replicas of one model give the same log-probabilities: adding or dropping a server
        # keeps the cache.
        fingerprint = stable_hash(
            ["endpoint", endpoint_fingerprint(endpoint.urls, endpoint.model)], 16
        )

        def score(examples):
            # Connected only when some shard has to be computed, as the local teacher is loaded.
            if not served:
                served.append(OpenAICompatBackend.from_endpoint(endpoint))
            scorer = LC.endpoint_scorer(served[0], tokenizer, cache.top_k)
            return scorer(examples)
    else:
        fingerprint = LC.teacher_fingerprint(resolve_model(spec.teacher.model))

        def score(examples):
            if not teacher:
                teacher.append(_load_teacher(spec, model, tokenizer))
            scorer = LC.local_scorer(teacher[0], cache.top_k, kd.temperature)
            return scorer(examples)

    out = []
    try:
        for examples in splits:
            topk, _ = LC.build_cache(
                examples,
                dataset_dir / LC.CACHE_DIR_NAME,
                score,
                fingerprint=fingerprint,
                top_k=cache.top_k,
                temperature=kd.temperature,
                log=LC.print_log if progress else None,
            )
            out.append(topk)
    finally:
        for backend in served:
            backend.close()
    return out


def _loss_for_route(
    spec: TaskSpec, model: nn.Module, tokenizer: Any, kept: list[int] | None
) -> Callable:
    student = spec.student
    if student.route == "logit-kd":
        kd = _kd(student)
        if kd.cache is not None:
            return R.make_cached_kd_loss(kd)
        teacher = _load_teacher(spec, model, tokenizer)
        n_s, n_t = len(model.layers), len(teacher.layers)
        layer_map = S.layer_map_for(kd.layer_map, n_s, n_t, kept) if kd.gamma else {}
        return R.make_kd_loss(teacher, kd, layer_map)
    if student.route == "gkd":
        return R.make_gkd_loss(_load_teacher(spec, model, tokenizer), _kd(student))
    if student.route == "dpo":
        return R.make_dpo_loss(_dpo(student).beta)
    return sft_loss


def is_on_policy_step(lmbda: float, seed: int, step: int) -> bool:
    """Whether gkd's ``step`` trains on the student's own samples: a draw that is a pure
    function of (seed, step), so a resumed run makes the same choices (0 never, 1 always)."""
    return bool(np.random.default_rng([seed, step, 0x6B]).random() < lmbda)


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """The RNG seed of ``step`` (dropout) on ``rank``: rank 0 keeps the one-process seed."""
    base = seed * 1_000_003 + step
    return base if rank == 0 else int(np.random.default_rng([base, rank]).integers(2**31))


def student_samples(
    model: nn.Module,
    tokenizer: Any,
    rows: list[B.Example],
    kd: KDSpec,
    train_spec: Any,
    step: int,
) -> tuple[list[B.Example], int]:
    """The rows' prompts answered by the student itself (sampled at ``kd.temperature``, up to
    the longest answer of the rows), as training examples; and how many tokens it generated.
    The seed is a function of (seed, step), so a resumed run draws the same samples."""
    prompts = [list(e.tokens[: e.offset]) for e in rows]
    budget = max(1, max(len(e.tokens) - e.offset for e in rows))
    decoding = Decoding(
        temperature=kd.temperature, max_tokens=budget, seed=train_spec.seed * 1_000_003 + step
    )
    model.eval()  # no dropout while sampling
    try:
        gens = generate_batch(model, tokenizer, prompts, decoding, batch_size=len(prompts))
    finally:
        model.train()
    eos = tokenizer.eos_token_id
    examples = []
    for prompt, g in zip(prompts, gens, strict=True):
        answer = list(g.tokens) + ([eos] if g.finish_reason == "stop" and eos is not None else [])
        tokens = (prompt + answer)[: train_spec.max_seq_length]
        examples.append(B.Example(tokens, min(len(prompt), len(tokens))))
    return examples, sum(g.generation_tokens for g in gens)


def train(
    spec: TaskSpec,
    dataset_dir: str | Path,
    out_dir: str | Path,
    resume: bool = True,
    *,
    progress: bool = True,
    runtime: TrainRuntime | None = None,
) -> TrainResult:
    """Train the spec's student on ``dataset_dir`` (from ``prepare``) into ``out_dir``.

    Under ``mlx.launch`` every rank runs this with the same arguments: each trains on its slice
    of every batch, all hold the same weights, and rank 0 alone writes ``out_dir`` and logs
    (``distiller.train.distributed``).
    """
    runtime = runtime or TrainRuntime()
    group = D.world()
    main = D.is_main(group)
    progress = progress and main
    student, t = spec.student, spec.student.train
    route = student.route
    if route not in ROUTES:  # the parser refuses it; a spec built in code may not have been parsed
        raise UserError(f"student.route must be one of {', '.join(ROUTES)}, got {route!r}")
    dataset_dir, out_dir = Path(dataset_dir), Path(out_dir)
    train_rows, valid_rows = read_splits(dataset_dir, route)
    _make_out_dir(out_dir)

    # A checkpoint only continues the run that wrote it: same settings, same data. Checked
    # before anything is built, so a refused run leaves out_dir as it was.
    settings = run_settings(spec)
    run_key = C.run_key(settings, dataset_dir)
    previous = C.read_state(out_dir) if resume else None
    if previous is not None and previous.get("run_key") != run_key:
        raise UserError(
            f"{out_dir}: holds a checkpoint of a different run (training settings or data "
            "changed); use another output dir, or --no-resume to start over"
        )
    D.check_batch_size(t.batch_size, group, "student.train")
    # Every rank must train on the same data from the same checkpoint.
    resume_step = str(previous["step"]) if previous is not None else "none"
    D.check_same([run_key, resume_step], "dataset or checkpoint", group)
    # From here until the run ends the adapter is in the making: train_result.json says done.
    if main:
        (out_dir / C.RESULT_FILE).unlink(missing_ok=True)

    mx.random.seed(t.seed)
    base, kept = D.main_first(lambda: _prepare_student(spec, out_dir), group)
    if route == "dpo" and _dpo(student).pairs == "on_policy":
        from distiller.pairs import policy_of

        # On-policy pairs: DPO starts from (and is referenced to) the model that wrote them.
        base = policy_of(dataset_dir)
    dpo_beta = _dpo(student).beta if route == "dpo" else None
    model, tokenizer = load_model(base)

    # ---- data
    if route == "dpo":
        train_data = B.encode_pair_rows(train_rows, tokenizer, t.max_seq_length)
        valid_data = B.encode_pair_rows(valid_rows, tokenizer, t.max_seq_length)
        lengths = [max(len(a.tokens), len(b.tokens)) for a, b in train_data]
        valid_lengths = [max(len(a.tokens), len(b.tokens)) for a, b in valid_data]
    else:
        train_data = B.encode_chat_rows(train_rows, tokenizer, t.max_seq_length)
        valid_data = B.encode_chat_rows(valid_rows, tokenizer, t.max_seq_length)
        lengths = [len(e.tokens) for e in train_data]
        valid_lengths = [len(e.tokens) for e in valid_data]
    groups = B.make_batches(lengths, t.batch_size)
    total_steps = int(t.iters) if t.iters else max(1, math.ceil(float(t.epochs or 1) * len(groups)))

    # ---- model + adapter
    adapter_cfg = LR.adapter_config(model, student.lora, student.full_finetune, base)
    LR.prepare_trainable(model, adapter_cfg)
    model.train()
    loss_fn = _loss_for_route(spec, model, tokenizer, kept)

    # The reference for DPO is the model before any update: LoRA starts as an exact no-op.
    ref_train = ref_valid = None
    if route == "dpo":
        ref_train = _reference_logprobs(model, train_data, t.batch_size)
        ref_valid = _reference_logprobs(model, valid_data, t.batch_size) if valid_data else None

    # logit-kd from the teacher-logit cache: the teacher's entries ride in the batches.
    cached = route == "logit-kd" and _kd(student).cache is not None
    train_cache = valid_cache = None
    if cached:
        train_cache, valid_cache = D.main_first(
            lambda: _teacher_cache(
                spec, model, tokenizer, dataset_dir, [train_data, valid_data], progress
            ),
            group,
        )

    def make_batch(
        idx: list[int],
        data: list,
        ref: tuple[np.ndarray, np.ndarray] | None,
        cache: LC.TeacherTopK | None = None,
    ) -> dict:
        if route != "dpo":
            b = B.collate([data[i] for i in idx])
            return LC.attach(b, cache, idx) if cache is not None else b
        b = B.collate_pairs([data[i] for i in idx])
        b["ref_chosen"], b["ref_rejected"] = ref[0][idx], ref[1][idx]
        return b

    val_batches = [
        make_batch(g, valid_data, ref_valid, valid_cache)
        for g in B.make_batches(valid_lengths, t.batch_size)
    ]

    optimizer = optim.AdamW(
        learning_rate=ST.build_schedule(t, total_steps), weight_decay=t.weight_decay
    )
    optimizer.init(model.trainable_parameters())

    # ---- resume
    step, resumed_from, rows = 0, None, []
    # gkd: how many steps trained on the student's own samples, and the tokens it generated.
    on_policy = {"steps": 0, "generated_tokens": 0}
    best, best_step, bad_evals, stopped = None, None, 0, False
    state = C.load_checkpoint(out_dir, model, optimizer) if resume else None
    if state is not None:
        step, resumed_from = state["step"], state["step"]
        best, best_step = state.get("best_val"), state.get("best_step")
        bad_evals, stopped = state.get("bad_evals", 0), state.get("stopped", False)
        on_policy = dict(state.get("on_policy", on_policy))
        rows = [r for r in state.get("metrics", []) if r["step"] <= step]
    elif not resume and main and C.ckpt_dir(out_dir).exists():
        for f in C.ckpt_dir(out_dir).iterdir():
            f.unlink()

    step_fn = make_train_step(
        model,
        optimizer,
        loss_fn,
        compile=runtime.compile,
        grad_clip=t.grad_clip,
        workers=runtime.workers,
        split=B.split_pairs
        if route == "dpo"
        else (LC.split_cached_rows(train_cache) if train_cache is not None else B.split_rows),
        group=group,
    )

    def save_checkpoint() -> None:
        if main:
            C.save_checkpoint(out_dir, step, model, optimizer, checkpoint_extra())

    def checkpoint_extra() -> dict[str, Any]:
        return {
            "best_val": best,
            "best_step": best_step,
            "bad_evals": bad_evals,
            "stopped": stopped,
            "metrics": rows,
            "total_steps": total_steps,
            "run_key": run_key,
            "on_policy": on_policy,
        }

    from tqdm import tqdm

    bar = tqdm(
        total=total_steps,
        initial=step,
        desc=f"train {route}",
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
                # This rank's slice of the step's global batch (all of it on one rank).
                idx, counted = D.shard(B.batch_for_step(groups, step, t.seed), group)
                if route == "gkd" and is_on_policy_step(_kd(student).lmbda, t.seed, step):
                    examples, generated = student_samples(
                        model, tokenizer, [train_data[i] for i in idx], _kd(student), t, step
                    )
                    batch = B.collate(examples)
                    on_policy["steps"] += 1
                    on_policy["generated_tokens"] += int(D.total(generated, group))
                else:
                    batch = make_batch(idx, train_data, ref_train, train_cache)
                # dpo: a reported step's batch is also scored for its rewards, before its update
                # (where its loss is measured).
                train_stats = None
                if dpo_beta is not None and (
                    (step + 1) % runtime.steps_per_report == 0
                    or step + 1 == total_steps
                    or (val_batches and (step + 1) % t.steps_per_eval == 0)
                ):
                    train_stats = _preference_stats(model, [batch], dpo_beta)
                # Dropout randomness is a function of (seed, step, rank), so a resumed run
                # draws exactly what an uninterrupted one would (MLX cannot restore a saved
                # key), and ranks draw different masks for their different rows.
                mx.random.seed(step_seed(t.seed, step, group.rank()))
                tic = time.perf_counter()
                loss = step_fn(batch, counted=counted)
                window_time += time.perf_counter() - tic
                step += 1
                last_loss = loss.item()
                window_loss += last_loss
                window_steps += 1
                window_toks += B.token_count(batch) if counted else 0  # summed at a report
                do_eval = bool(val_batches) and (
                    step % t.steps_per_eval == 0 or step == total_steps
                )
                if do_eval or step % runtime.steps_per_report == 0 or step == total_steps:
                    row = {
                        "step": step,
                        "train_loss": window_loss / window_steps,
                        "val_loss": None,
                        "lr": float(optimizer.learning_rate.item()),
                        "tokens_per_s": D.total(window_toks, group) / max(window_time, 1e-9),
                        "peak_memory_gb": mx.get_peak_memory() / 1e9,
                        "elapsed_s": time.perf_counter() - t_start,
                    }
                    if route == "gkd":
                        row["on_policy_steps"] = on_policy["steps"]
                        row["generated_tokens"] = on_policy["generated_tokens"]
                    if train_stats is not None:
                        row.update({f"train_{k}": v for k, v in train_stats.items()})
                    if do_eval:
                        val = ST.evaluate(model, loss_fn, val_batches, group)
                        row["val_loss"] = val
                        if dpo_beta is not None:
                            stats = _preference_stats(model, val_batches, dpo_beta)
                            row.update({f"val_{k}": v for k, v in stats.items()})
                        # Only a strict improvement is a new best: ties keep the earlier one.
                        if best is None or val < best:
                            best, best_step, bad_evals = val, step, 0
                            if t.keep == "best" and main:
                                LR.save_adapter(out_dir, model, adapter_cfg)
                        else:
                            bad_evals += 1
                            patience = t.early_stopping_patience
                            if patience is not None and bad_evals >= patience:
                                stopped = True
                    rows.append(row)
                    if main:
                        C.write_metrics(out_dir, rows)
                    bar.set_postfix(
                        loss=f"{row['train_loss']:.3f}",
                        tok_s=f"{row['tokens_per_s']:.0f}",
                        **({"val": f"{row['val_loss']:.3f}"} if do_eval else {}),
                    )
                    window_loss, window_steps, window_toks, window_time = 0.0, 0, 0, 0.0
                bar.update(1)
                if step % t.checkpoint_every == 0 or stopped:
                    save_checkpoint()
                # Ctrl-C reaches the ranks at different steps: all stop at the same one.
                if D.any_rank(flag.set, group):
                    save_checkpoint()
                    raise KeyboardInterrupt
        finally:
            bar.close()

    save_checkpoint()
    if main and (best is None or t.keep == "last"):  # (without validation data: the last)
        LR.save_adapter(out_dir, model, adapter_cfg)
    if main:
        C.write_metrics(out_dir, rows)
    result = TrainResult(
        adapter_dir=str(out_dir),
        base_model=base,
        route=route,
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
    summary["settings"] = canonical(settings)
    summary["runtime"] = {**asdict(runtime), "ranks": group.size()}
    if main:
        atomic_write(out_dir / C.RESULT_FILE, json.dumps(summary, indent=2) + "\n")
    return result
