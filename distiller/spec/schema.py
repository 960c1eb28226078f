"""The spec's frozen dataclasses, one per section, and the constants they default to."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from distiller.decoding import GREEDY, Decoding
from distiller.hashing import stable_hash

LORA_KEYS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ROUTES = ("sft", "seq-kd", "logit-kd", "dpo", "gkd")


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str  # the bare user prompt, after template expansion
    label: str | None = None  # class label (classification tasks; stratified splits)
    reference: Any = None  # optional expected answer (a string, or a JSON value)
    meta: dict[str, Any] = field(default_factory=dict, hash=False)  # the entry's other fields


class FewShot(NamedTuple):
    user: str
    assistant: str


# The teacher samples by default (rejection sampling needs distinct draws); evaluation is greedy.
TEACHER_DECODING = Decoding(temperature=0.7, seed=0)


@dataclass(frozen=True)
class EndpointSpec:
    """OpenAI-compatible chat completions servers: one (``url:``) or several replicas serving
    the same model (``urls:``), each with its own ``max_concurrency`` requests in flight."""

    urls: tuple[str, ...]  # at least one, no repeats, in the spec's order
    model: str
    api_key_env: str | None = None  # the NAME of the env var holding the key, never the key
    timeout_s: float = 120.0
    max_concurrency: int = 4  # per server
    max_retries: int = 3  # per request and server
    # A server that stops answering is left out of the rotation this long before it is tried
    # again (only while another one answers).
    cooldown_s: float = 30.0

    @property
    def url(self) -> str:
        """The first server (the one a single-server consumer, such as the logit cache, uses)."""
        return self.urls[0]


@dataclass(frozen=True)
class TeacherSpec:
    model: str | None = None  # registry name, model dir (resolved) or hub id; or ...
    endpoint: EndpointSpec | None = None  # ... a server (exactly one of the two)
    system_prompt: str | None = None
    few_shot: tuple[FewShot, ...] = ()
    decoding: Decoding = TEACHER_DECODING
    samples_per_prompt: int = 1  # rejection-sampling budget N per prompt
    keep: str = "first"  # "first" passing sample, or "best" by validator score
    batch_size: int = 8
    # The prompts' own answers (reference, else label) as the samples: supervised fine-tuning
    # on gold, no model (exactly one of model, endpoint, gold).
    gold: bool = False
    # The teacher is another spec's distilled student (``teacher.task``): that spec is run first
    # (each stage reused when unchanged) and ``model`` becomes its fused model, once built.
    task: Path | None = None


@dataclass(frozen=True)
class ValidatorSpec:
    type: str
    params: dict[str, Any] = field(default_factory=dict, hash=False)  # defaults filled in


@dataclass(frozen=True)
class LoraSpec:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    layers: int | str = "all"  # how many layers from the top, or "all"
    keys: tuple[str, ...] = LORA_KEYS


@dataclass(frozen=True)
class TrainSpec:
    iters: int | None = 200  # exactly one of iters / epochs is set
    epochs: float | None = None
    batch_size: int = 4
    learning_rate: float = 1e-4
    schedule: str = "cosine"  # constant | cosine | linear
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0  # max global grad norm; None = off
    max_seq_length: int = 512
    steps_per_eval: int = 50
    early_stopping_patience: int | None = None  # evals without improvement; None = off
    checkpoint_every: int = 100
    seed: int = 0
    # The adapter that is the result: "best" (lowest validation loss) or "last" (final step).
    keep: str = "best"


@dataclass(frozen=True)
class LogitCacheSpec:
    """``student.kd.cache``: logit-kd against the teacher's cached top-k log-probabilities
    (``distiller.train.logit_cache``) instead of a teacher forward in every step."""

    top_k: int = 32
    # What happens to the probability outside the top-k: "tail" (one extra bucket holding it)
    # or "renormalize" (both distributions restricted to the k tokens).
    missing: str = "tail"


@dataclass(frozen=True)
class KDSpec:
    """logit-kd: loss = alpha * CE(labels) + beta * divergence(teacher, student) + gamma *
    hidden MSE. gkd: loss = JSD(jsd_beta)(teacher, student) at ``temperature``, on the data's
    answers or, for a fraction ``lmbda`` of the batches, on the student's own samples."""

    alpha: float = 0.5
    beta: float = 0.5
    gamma: float = 0.0
    temperature: float = 2.0
    divergence: str = "kl"  # kl | reverse_kl | jsd
    layer_map: str | tuple[tuple[int, int], ...] = "auto"  # or ((student, teacher), ...)
    cache: LogitCacheSpec | None = None  # logit-kd from a teacher-logit cache
    lmbda: float = 0.5  # gkd: fraction of batches that are the student's own generations
    jsd_beta: float = 0.5  # gkd: 0 = forward KL, 1 = reverse KL (TRL's convention)


@dataclass(frozen=True)
class DropLayersSpec:
    """Make the student from the teacher by keeping a subset of its layers."""

    keep_every: int | None = None  # keep layers 0, k, 2k, ... and always the last one
    keep: tuple[int, ...] | None = None  # or these layer indices
    count: int | None = None  # or this many, spread evenly (first and last included)

    def layers_to_keep(self, n_layers: int) -> list[int]:
        if self.count is not None:
            if not 1 <= self.count <= n_layers:
                raise ValueError(
                    f"drop_layers.count: {self.count} layers to keep, the model has {n_layers}"
                )
            if self.count == 1:
                return [n_layers - 1]
            return sorted({round(i * (n_layers - 1) / (self.count - 1)) for i in range(self.count)})
        if self.keep is not None:
            bad = [i for i in self.keep if i >= n_layers]
            if bad:
                raise ValueError(
                    f"drop_layers.keep: layers {bad} do not exist (model has {n_layers})"
                )
            return sorted(self.keep)
        kept = set(range(0, n_layers, self.keep_every or 1)) | {n_layers - 1}
        return sorted(kept)


DPO_PAIRS = ("teacher", "on_policy")


@dataclass(frozen=True)
class DPOSpec:
    """``student.dpo``. ``pairs: teacher``: an accepted teacher sample against a rejected one
    of the same prompt (``distiller prepare``). ``pairs: on_policy``: the dataset's answer (the
    kept teacher sample, or gold) against the policy's own sample where that fails the
    validators or the gold answer (``distiller pairs``); the policy is also the model DPO
    starts from and its frozen reference."""

    beta: float = 0.1
    pairs: str = "teacher"  # teacher | on_policy
    # on_policy: "sft" (an SFT student: ``policy_task``'s, or <run dir>/fuse/model for the
    # stage commands) or a model (registry name, directory, hub id).
    policy: str | None = None
    # policy: sft: the task spec whose fused student is the policy; ``distiller run`` builds it
    # first (beside the run, as ``teacher.task``), then the pairs, DPO and the fuse.
    policy_task: Path | None = None
    samples_per_prompt: int = 1  # the policy's samples per train/valid prompt
    # 0: the eval decoding itself (greedy), the answer the student gives when measured;
    # > 0: that decoding sampled at this temperature, seeded per (prompt, sample).
    temperature: float = 0.0


@dataclass(frozen=True)
class QuantizeSpec:
    bits: int = 4
    group_size: int = 64


@dataclass(frozen=True)
class StudentSpec:
    model: str  # "": the model of a teacher.task, known once that task is built
    route: str = "sft"  # sft | seq-kd | logit-kd | dpo | gkd
    prompt_style: str = "bare"  # bare: the student sees only the prompt | scaffold: as the teacher
    lora: LoraSpec | None = LoraSpec()  # None iff full_finetune
    full_finetune: bool = False
    train: TrainSpec = TrainSpec()
    kd: KDSpec | None = None  # set iff route is logit-kd or gkd
    drop_layers: DropLayersSpec | None = None
    dpo: DPOSpec | None = None  # set iff route == "dpo"
    quantize: QuantizeSpec | None = None


@dataclass(frozen=True)
class SplitSpec:
    train: float = 0.7
    valid: float = 0.1
    test: float = 0.2
    seed: int = 0
    stratify_by: str | None = None  # "label"
    # Per-class quotas (with stratify_by: label) replace the test/valid fractions: each label
    # gives exactly this many prompts to test and to valid, the rest to train.
    test_per_class: int | None = None
    valid_per_class: int | None = None


CLASSIFY_DECODERS = ("ranking", "generate")
CONTENT_FREE = ("N/A", "", "[MASK]")


@dataclass(frozen=True)
class ClassifySpec:
    """How a classification task's answer is read (``eval.classify``; ``distiller.classify``).

    ``ranking``: every label is scored as the assistant's whole answer (mean log-likelihood of
    its tokens); with ``calibrate`` the mean score of the content-free prompts is subtracted
    (contextual calibration); ``bias`` then adds a constant per label. ``generate``: greedy
    generation, the text normalized to a label (the ``label`` validator's rule).
    """

    labels: tuple[str, ...]  # the ``label`` validator's labels, in its order
    decoder: str = "ranking"
    calibrate: bool = True
    # The user texts of the content-free prompts: each value put through the prompts template.
    content_free: tuple[str, ...] = CONTENT_FREE
    bias: dict[str, float] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class EvalSpec:
    # Greedy, the same for every model evaluated (and for latency): YAML keys eval.max_tokens,
    # eval.no_repeat_ngram, eval.repetition_penalty, eval.stop.
    decoding: Decoding = GREEDY
    thresholds: dict[str, float] = field(default_factory=dict, hash=False)
    prompt_sets: dict[str, tuple[Prompt, ...]] = field(default_factory=dict, hash=False)
    batch_size: int = 8
    # Prompts for choosing settings (decoding, training): evaluated only when asked for
    # (``distiller eval --prompts dev``), never in reports or gates, never trained on.
    dev: tuple[Prompt, ...] = field(default=(), hash=False)
    classify: ClassifySpec | None = None  # set for classification tasks that rank labels


@dataclass(frozen=True)
class TaskSpec:
    name: str
    description: str
    path: Path
    prompts: tuple[Prompt, ...]
    teacher: TeacherSpec
    validators: tuple[ValidatorSpec, ...]
    student: StudentSpec
    split: SplitSpec
    eval: EvalSpec

    @property
    def labels(self) -> list[str]:
        """Sorted distinct prompt labels (empty for unlabeled tasks)."""
        return sorted({p.label for p in self.prompts if p.label is not None})

    def fingerprint(self, *parts: Any) -> str:
        """``stable_hash`` of ``parts``; with none, of the whole spec except path/description.

        Stages key their caches on the pieces that determine their output, e.g.
        ``spec.fingerprint(spec.teacher, prompt.text)``.
        """
        if parts:
            return stable_hash(list(parts))
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d.pop("path"), d.pop("description")
        return stable_hash(d)
