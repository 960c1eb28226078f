"""The per-section parsers, their cross-checks, and ``load_spec`` that ties them together."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from distiller.decoding import Decoding
from distiller.errors import SpecError
from distiller.spec.prompts import load_prompts, norm_text
from distiller.spec.schema import (
    CLASSIFY_DECODERS,
    CONTENT_FREE,
    DPO_PAIRS,
    LORA_KEYS,
    ROUTES,
    TEACHER_DECODING,
    ClassifySpec,
    DPOSpec,
    DropLayersSpec,
    EndpointSpec,
    EvalSpec,
    FewShot,
    KDSpec,
    LogitCacheSpec,
    LoraSpec,
    Prompt,
    QuantizeSpec,
    SplitSpec,
    StudentSpec,
    TaskSpec,
    TeacherSpec,
    TrainSpec,
    ValidatorSpec,
)
from distiller.spec.yamldoc import (
    Doc,
    Map,
    describe,
    looks_like_path,
    read_doc,
    real_path,
    resolve_path,
)

# Task and prompt-set names become directory and file names: short, portable characters
# (at most 64, as model names).
NAME_MAX = 64
_NAME = re.compile(rf"[A-Za-z0-9][A-Za-z0-9_.-]{{0,{NAME_MAX - 1}}}")


def _clip(value: object, n: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= n else f"{text[: n - 5]}...' ({len(str(value))} characters)"


# The keys each mapping allows, in the order an unknown-key error lists them.
_TOP = ("name", "description", "prompts", "teacher", "validators", "student", "split", "eval")
_TEACHER = (
    "model", "endpoint", "system_prompt", "few_shot", "decoding", "samples_per_prompt", "keep", "batch_size",
    "gold", "task",
)  # fmt: skip
_ENDPOINT = (
    "url", "urls", "model", "api_key_env", "api_key", "timeout_s", "max_concurrency",
    "max_retries", "cooldown_s",
)  # fmt: skip
_DECODING = (
    "temperature", "top_p", "max_tokens", "seed", "no_repeat_ngram", "repetition_penalty", "stop",
    "json_schema",
)  # fmt: skip
_STUDENT = (
    "model", "route", "prompt_style", "lora", "full_finetune", "train", "kd", "drop_layers", "dpo", "quantize",
)  # fmt: skip
_TRAIN = (
    "iters", "epochs", "batch_size", "learning_rate", "schedule", "warmup_steps",
    "weight_decay", "grad_clip", "max_seq_length", "steps_per_eval",
    "early_stopping_patience", "checkpoint_every", "seed", "keep",
)  # fmt: skip
_LORA = ("rank", "alpha", "dropout", "layers", "keys")
_KD = ("alpha", "beta", "gamma", "temperature", "divergence", "layer_map", "cache")
_KD_CACHE = ("top_k", "missing")
_GKD = ("lmbda", "jsd_beta", "temperature")
_DROP_LAYERS = ("keep_every", "keep", "count")
_QUANTIZE = ("bits", "group_size")
_DPO = ("beta", "pairs", "policy", "policy_task", "samples_per_prompt", "temperature")
_SPLIT = ("train", "valid", "test", "seed", "stratify_by", "test_per_class", "valid_per_class")
_EVAL = (
    "max_tokens", "no_repeat_ngram", "repetition_penalty", "stop", "json_schema", "thresholds",
    "prompt_sets", "batch_size", "dev", "classify",
)  # fmt: skip
_CLASSIFY = ("decoder", "calibrate", "content_free", "bias")


# ---------------------------------------------------------------------------------------------
# teacher


def _teacher(m: Map, base: Path) -> TeacherSpec:
    model = endpoint = task = None
    gold = m.bool("gold", False)
    sources = m.has("model") + m.has("endpoint") + m.has("task")
    # gold + task: the samples are the gold answers; the task's student is the model that
    # logit-kd matches and layers are dropped from.
    if (sources != 1 and not (gold and sources == 0)) or (gold and sources and not m.has("task")):
        raise m.doc.error(
            m.key,
            "exactly one of 'model' (local), 'endpoint' (a server), 'task' (another spec's "
            "distilled student) or 'gold: true' (the prompts' own answers; it combines only "
            "with 'task')",
        )
    if m.has("task"):
        task = _task_ref(m, "task", base, "its student becomes the teacher")
    elif m.has("model"):
        model = m.str("model")
        if looks_like_path(model):
            model = str(resolve_path(base, model))
    elif m.has("endpoint"):
        endpoint = _endpoint(m.sub("endpoint", _ENDPOINT))
    d = m.sub("decoding", _DECODING)
    decoding = _teacher_decoding(d)
    if endpoint is not None and decoding.no_repeat_ngram:
        raise d.err(
            "no_repeat_ngram",
            "0 with an endpoint teacher (the OpenAI chat API has no such parameter; "
            "it works with a local teacher model)",
        )
    system_prompt = m.raw("system_prompt")
    if system_prompt is not None and not isinstance(system_prompt, str):
        raise m.err("system_prompt", f"a string, got {describe(system_prompt)}")
    few_shot = _few_shot(m, base)
    return TeacherSpec(
        model=model,
        endpoint=endpoint,
        system_prompt=system_prompt.strip() if system_prompt else None,
        few_shot=few_shot,
        decoding=decoding,
        samples_per_prompt=m.int("samples_per_prompt", 1, lo=1),
        keep=m.str("keep", "first", choices=("first", "best")),
        batch_size=m.int("batch_size", 8, lo=1),
        gold=gold,
        task=task,
    )


# Specs whose task references (teacher.task, student.dpo.policy_task) are being read: a chain
# that comes back to one of them is a cycle.
_READING: list[Path] = []


def _task_ref(m: Map, key: str, base: Path, role: str) -> Path:
    """A key naming another task spec whose fused student this one uses (``teacher.task``,
    ``student.dpo.policy_task``): its path, the spec read (and so checked) now."""
    from distiller.errors import SpecError

    value = m.str(key)
    path = real_path(resolve_path(base, value))
    if not path.is_file():
        raise m.err(key, f"a task spec file ({role}); {path} is not one")
    if path == real_path(m.doc.path) or path in _READING:
        raise m.err(key, f"another spec than this one, not a cycle back to it ({path.name})")
    _READING.append(real_path(m.doc.path))
    try:
        load_spec(path)
    except SpecError as exc:
        raise m.err(key, f"a valid task spec; {exc}") from None
    finally:
        _READING.pop()
    return path


def _endpoint(e: Map) -> EndpointSpec:
    if "api_key" in e.data:
        raise e.err(
            "api_key",
            "not a key in a spec file: put the NAME of an environment variable in api_key_env",
        )
    urls = _endpoint_urls(e)
    env = e.raw("api_key_env")
    if env is not None and (
        not isinstance(env, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", env)
    ):
        raise e.err("api_key_env", f"an environment variable name like OPENAI_API_KEY, got {env!r}")
    return EndpointSpec(
        urls=urls,
        model=e.str("model"),
        api_key_env=env,
        timeout_s=e.float("timeout_s", 120.0, lo=0, lo_open=True),
        max_concurrency=e.int("max_concurrency", 4, lo=1),
        max_retries=e.int("max_retries", 3, lo=0),
        cooldown_s=e.float("cooldown_s", EndpointSpec.cooldown_s, lo=0),
    )


def _endpoint_urls(e: Map) -> tuple[str, ...]:
    """``url: U`` (one server) or ``urls: [U, ...]`` (replicas of one model), each checked."""
    from distiller.backends.openai_compat import chat_url

    if e.has("url") and e.has("urls"):
        raise e.err("urls", "either 'url' (one server) or 'urls' (a list of them), not both")
    if not e.has("urls"):
        if not e.has("url"):
            raise e.err("url", "required: one server's URL, or 'urls': a list of them")
        return (_http_url(e, "url", e.str("url")),)
    raw = e.raw("urls")
    if not isinstance(raw, list) or not raw:
        raise e.err("urls", f"a non-empty list of http:// or https:// URLs, got {describe(raw)}")
    urls: list[str] = []
    seen: dict[str, int] = {}
    for i, u in enumerate(raw):
        url = _http_url(e, f"urls[{i}]", u)
        same = seen.setdefault(chat_url(url), i)
        if same != i:
            raise e.err(f"urls[{i}]", f"a server not listed before (it is urls[{same}])")
        urls.append(url)
    return tuple(urls)


def _http_url(e: Map, key: str, value: Any) -> str:
    """``value`` if it is an http(s) URL with a host (and a valid port), else an error at ``key``."""
    from urllib.parse import urlsplit

    expected = "an http:// or https:// URL with a host, like http://10.0.0.5:8000/v1"
    if not isinstance(value, str) or not value.strip():
        raise e.err(key, f"{expected}, got {describe(value)}")
    value = value.strip()
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number in range
    except ValueError:
        raise e.err(key, f"{expected}, got {_clip(value)}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or re.search(r"\s", value):
        raise e.err(key, f"{expected}, got {_clip(value)}")
    return value


def _teacher_decoding(d: Map) -> Decoding:
    # An explicit `seed: null` means unseeded sampling; a missing seed means 0.
    seed = None if d.is_null("seed") else d.int("seed", 0, lo=0)
    decoding = Decoding(
        temperature=d.float("temperature", TEACHER_DECODING.temperature, lo=0),
        top_p=d.float("top_p", 1.0, lo=0, hi=1, lo_open=True),
        max_tokens=d.int("max_tokens", 256, lo=1),
        seed=seed,
    )
    return _with_logit_shaping(d, decoding)


def _with_logit_shaping(m: Map, decoding: Decoding) -> Decoding:
    """``decoding`` with ``m``'s ``no_repeat_ngram`` (0 or >= 2), ``repetition_penalty`` (> 0 or
    absent), ``stop`` (a string or a list of them) and ``json_schema``."""
    n = m.int("no_repeat_ngram", 0, lo=0)
    if n == 1:
        raise m.err("no_repeat_ngram", "0 (off) or an n-gram length >= 2, got 1")
    penalty = m.float("repetition_penalty", None, lo=0, lo_open=True)
    stop = m.raw("stop", [])
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(x, str) and x for x in stop):
        raise m.err("stop", f"a non-empty string or a list of them, got {describe(stop)}")
    return dataclasses.replace(
        decoding,
        no_repeat_ngram=n,
        repetition_penalty=penalty,
        stop=tuple(stop),
        json_schema=_json_schema(m),
    )


def _json_schema(m: Map) -> str | None:
    """``m``'s ``json_schema`` (a schema file relative to the spec, or an inline mapping), read
    and checked as the json_schema validator's schema is, as the text ``Decoding`` holds."""
    from distiller import validators as V
    from distiller.constrain import canonical_schema, schema_problem

    value = m.raw("json_schema")
    if value is None:
        return None
    if isinstance(value, str):
        params = {"schema_file": str(resolve_path(m.doc.path.parent, value))}
    elif isinstance(value, dict):
        params = {"schema": value}
    else:
        raise m.err(
            "json_schema", f"a schema file or an inline schema mapping, got {describe(value)}"
        )
    try:
        schema = V.check_params("json_schema", params)["schema"]
        text = canonical_schema(schema)
    except V.ParamError as e:
        where = e.key.removeprefix("schema_file").removeprefix("schema")
        raise m.err(f"json_schema{where}", e.expected) from None
    except (TypeError, ValueError) as e:  # a YAML value JSON cannot hold (a date, nan)
        raise m.err("json_schema", f"a schema of plain JSON values ({e})") from None
    problem = schema_problem(text)
    if problem is not None:
        raise m.err("json_schema", problem)
    return text


def _few_shot(m: Map, base: Path) -> tuple[FewShot, ...]:
    value, doc, key = m.raw("few_shot", []), m.doc, m.k("few_shot")
    if isinstance(value, str):
        doc = read_doc(resolve_path(base, value), what="few-shot file")
        value, key = doc.data, ""
    if not isinstance(value, list):
        raise doc.error(key, "a list of {user, assistant} mappings, or a file holding one")
    out = []
    for i, ex in enumerate(value):
        em = Map(doc, f"{key}[{i}]", ex, ("user", "assistant"))
        out.append(FewShot(em.str("user").strip(), em.str("assistant").strip()))
    return tuple(out)


# ---------------------------------------------------------------------------------------------
# validators


def _validators(
    doc: Doc, value: Any, base: Path, prompts: tuple[Prompt, ...]
) -> tuple[ValidatorSpec, ...]:
    from distiller import validators as V

    if value is None:
        return ()
    if not isinstance(value, list):
        raise doc.error("validators", "a list of {type: ..., <params>} mappings")
    specs = []
    for i, entry in enumerate(value):
        key = f"validators[{i}]"
        if not isinstance(entry, dict) or "type" not in entry:
            raise doc.error(key, f"a mapping with a 'type' (one of {', '.join(V.VALIDATOR_TYPES)})")
        type_ = entry["type"]
        params = {k: v for k, v in entry.items() if k != "type"}
        if type_ == "json_schema" and isinstance(params.get("schema_file"), str):
            params["schema_file"] = str(resolve_path(base, params["schema_file"]))
        if (
            type_ == "label"
            and params.get("labels") is None
            and prompts
            and all(p.label for p in prompts)
        ):
            params["labels"] = sorted(
                {p.label for p in prompts}
            )  # default: the curriculum's labels
        if type_ == "label" and params.get("labels") is None and prompts:
            unlabelled = [p.id for p in prompts if not p.label]
            if unlabelled:
                raise doc.error(
                    f"{key}.labels",
                    "a list of labels: they default to the prompts' only when every prompt has "
                    f"one ({len(unlabelled)} of {len(prompts)} have none, e.g. {unlabelled[0]!r})",
                )
        try:
            params = V.check_params(str(type_), params)
        except V.ParamError as e:
            k = key if e.key == "type" and "type" not in params else f"{key}.{e.key}"
            raise doc.error(k, e.expected) from None
        if type_ == "json_schema":
            params.pop("schema_file")  # loaded into 'schema': hashes by content, not by path
        specs.append(ValidatorSpec(str(type_), params))
    try:
        V.build_validator(specs)  # cross-validator defaults (headers) are resolved here
    except V.ParamError as e:
        raise doc.error(f"validators[{e.index}].{e.key}", e.expected) from None
    return tuple(specs)


# ---------------------------------------------------------------------------------------------
# student


def _student(m: Map, teacher: TeacherSpec) -> StudentSpec:
    local_teacher = teacher.model is not None or teacher.task is not None
    if m.has("model"):
        model = m.str("model")
    elif teacher.model is not None:
        model = teacher.model  # distilling into the teacher's own base model (or a cut of it)
    elif teacher.task is not None:
        model = ""  # the teacher task's student: filled in once it is built (pipeline)
    else:
        raise m.err("model", "required when the teacher is an endpoint or gold (no local model)")
    if looks_like_path(model):
        model = str(resolve_path(m.doc.path.parent, model))
    route = m.str("route", "sft", choices=ROUTES)
    full = m.bool("full_finetune", False)
    lora = None
    if full and m.has("lora"):
        raise m.err("lora", "absent when full_finetune is true (they are exclusive)")
    if not full:
        lora = _lora(m.sub("lora", _LORA))
    train = _train(m.sub("train", _TRAIN))

    kd = None
    if m.has("kd") and route not in ("logit-kd", "gkd"):
        raise m.err("kd", f"absent unless route is logit-kd or gkd (route is {route})")
    if route in ("logit-kd", "gkd"):
        kd = _kd(m.sub("kd", _KD)) if route == "logit-kd" else _gkd(m.sub("kd", _GKD))
        # A served teacher reaches logit-kd only through the cache (its top_logprobs).
        served = teacher.endpoint is not None and route == "logit-kd" and kd.cache is not None
        if not local_teacher and not served:
            raise m.err(
                "route",
                f"a route other than {route}: it needs a local teacher model, not an endpoint"
                + (" (or kd.cache, filled from the endpoint)" if route == "logit-kd" else ""),
            )
        if served and kd.temperature != 1.0:
            raise m.sub("kd", _KD).err(
                "temperature", "1.0 with a served teacher (its top_logprobs are at temperature 1)"
            )

    drop = None
    if m.has("drop_layers"):
        if not local_teacher:
            raise m.err(
                "drop_layers",
                "absent when the teacher is an endpoint (layers come from a local teacher)",
            )
        drop = _drop_layers(m.sub("drop_layers", _DROP_LAYERS))

    dpo = None
    if m.has("dpo") and route != "dpo":
        raise m.err("dpo", f"absent unless route is dpo (route is {route})")
    if route == "dpo":
        dpo = _dpo(m.sub("dpo", _DPO))
        if dpo.pairs == "on_policy" and drop is not None:
            raise m.err(
                "drop_layers", "absent with dpo.pairs: on_policy (DPO starts from dpo.policy)"
            )

    quant = _quantize(m.sub("quantize", _QUANTIZE)) if m.has("quantize") else None

    return StudentSpec(
        model=model,
        route=route,
        prompt_style=m.str("prompt_style", "bare", choices=("bare", "scaffold")),
        lora=lora,
        full_finetune=full,
        train=train,
        kd=kd,
        drop_layers=drop,
        dpo=dpo,
        quantize=quant,
    )


def _dpo(dm: Map) -> DPOSpec:
    pairs = dm.str("pairs", "teacher", choices=DPO_PAIRS)
    if pairs != "on_policy":
        for name in ("policy", "policy_task", "samples_per_prompt", "temperature"):
            if dm.has(name):
                raise dm.err(name, "absent unless pairs is on_policy")
    if pairs == "on_policy" and not dm.has("policy") and not dm.has("policy_task"):
        raise dm.err(
            "policy",
            "required with pairs: on_policy: 'sft' (an SFT student, e.g. policy_task's) or a model",
        )
    # policy_task names the SFT student: policy is 'sft' by default then, and nothing else.
    default = "sft" if dm.has("policy_task") else None
    policy = dm.str("policy", default) if pairs == "on_policy" else None
    task = None
    if dm.has("policy_task"):
        if policy != "sft":
            raise dm.err(
                "policy_task", f"absent unless policy is sft (the policy is the model {policy})"
            )
        task = _task_ref(dm, "policy_task", dm.doc.path.parent, "its student is the policy")
    if policy is not None and policy != "sft" and looks_like_path(policy):
        policy = str(resolve_path(dm.doc.path.parent, policy))
    n = dm.int("samples_per_prompt", 1, lo=1)
    temperature = dm.float("temperature", 0.0, lo=0)
    if n > 1 and temperature == 0:
        raise dm.err(
            "temperature", "above 0 with samples_per_prompt > 1 (greedy samples are all alike)"
        )
    return DPOSpec(
        beta=dm.float("beta", 0.1, lo=0, lo_open=True),
        pairs=pairs,
        policy=policy,
        policy_task=task,
        samples_per_prompt=n,
        temperature=temperature,
    )


def _lora(lm: Map) -> LoraSpec:
    layers = lm.raw("layers", "all")
    if layers != "all":
        layers = lm.int("layers", lo=1)
    keys = lm.raw("keys", list(LORA_KEYS))
    if not isinstance(keys, list) or not keys or not all(isinstance(k, str) and k for k in keys):
        raise lm.err("keys", f"a non-empty list of projection names like {', '.join(LORA_KEYS)}")
    if len(set(keys)) != len(keys):
        raise lm.err("keys", "distinct projection names")
    return LoraSpec(
        rank=lm.int("rank", 8, lo=1),
        alpha=lm.float("alpha", 16.0, lo=0, lo_open=True),
        dropout=lm.float("dropout", 0.0, lo=0, hi=1, hi_open=True),
        layers=layers,
        keys=tuple(keys),
    )


def _train(tm: Map) -> TrainSpec:
    if tm.has("iters") and tm.has("epochs"):
        raise tm.err("epochs", "absent when iters is set (give exactly one of iters / epochs)")
    epochs = tm.float("epochs", None, lo=0, lo_open=True)
    iters = tm.int("iters", None if epochs else 200, lo=1)
    grad_clip = None if tm.is_null("grad_clip") else tm.float("grad_clip", 1.0, lo=0, lo_open=True)
    train = TrainSpec(
        iters=iters,
        epochs=epochs,
        batch_size=tm.int("batch_size", 4, lo=1),
        learning_rate=tm.float("learning_rate", 1e-4, lo=0, lo_open=True),
        schedule=tm.str("schedule", "cosine", choices=("constant", "cosine", "linear")),
        warmup_steps=tm.int("warmup_steps", 0, lo=0),
        weight_decay=tm.float("weight_decay", 0.0, lo=0),
        grad_clip=grad_clip,
        max_seq_length=tm.int("max_seq_length", 512, lo=16),
        steps_per_eval=tm.int("steps_per_eval", 50, lo=1),
        early_stopping_patience=tm.int("early_stopping_patience", None, lo=1),
        checkpoint_every=tm.int("checkpoint_every", 100, lo=1),
        seed=tm.int("seed", 0, lo=0),
        keep=tm.str("keep", "best", choices=("best", "last")),
    )
    if iters is not None and train.warmup_steps >= iters:
        raise tm.err("warmup_steps", f"fewer than iters ({iters}), got {train.warmup_steps}")
    return train


def _kd(km: Map) -> KDSpec:
    layer_map = km.raw("layer_map", "auto")
    if layer_map != "auto":
        ok = (
            isinstance(layer_map, list)
            and layer_map
            and all(
                isinstance(p, list)
                and len(p) == 2
                and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in p)
                for p in layer_map
            )
        )
        if not ok:
            raise km.err(
                "layer_map", "'auto' or a list of [student_layer, teacher_layer] index pairs"
            )
        layer_map = tuple((int(a), int(b)) for a, b in layer_map)
    kd = KDSpec(
        alpha=km.float("alpha", 0.5, lo=0),
        beta=km.float("beta", 0.5, lo=0),
        gamma=km.float("gamma", 0.0, lo=0),
        temperature=km.float("temperature", 2.0, lo=0, lo_open=True),
        divergence=km.str("divergence", "kl", choices=("kl", "reverse_kl", "jsd")),
        layer_map=layer_map,
        cache=_kd_cache(km.sub("cache", _KD_CACHE)) if km.has("cache") else None,
    )
    if kd.alpha + kd.beta + kd.gamma == 0:
        raise km.err("alpha", "at least one of alpha, beta, gamma > 0")
    if kd.cache is not None and kd.gamma:
        raise km.err(
            "gamma", "0 with cache (the cache holds the teacher's logits, not its hidden states)"
        )
    return kd


def _kd_cache(cm: Map) -> LogitCacheSpec:
    return LogitCacheSpec(
        top_k=cm.int("top_k", 32, lo=1),
        missing=cm.str("missing", "tail", choices=("tail", "renormalize")),
    )


def _gkd(km: Map) -> KDSpec:
    return KDSpec(
        temperature=km.float("temperature", 1.0, lo=0, lo_open=True),
        lmbda=km.float("lmbda", 0.5, lo=0, hi=1),
        jsd_beta=km.float("jsd_beta", 0.5, lo=0, hi=1),
    )


def _drop_layers(dm: Map) -> DropLayersSpec:
    if dm.has("keep_every") + dm.has("keep") + dm.has("count") != 1:
        raise dm.doc.error(
            dm.key,
            "exactly one of keep_every (an integer >= 2), keep (a list of layer indices) or "
            "count (how many layers to keep, spread evenly)",
        )
    keep = dm.raw("keep")
    if keep is not None:
        if (
            not isinstance(keep, list)
            or not keep
            or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in keep)
        ):
            raise dm.err("keep", "a non-empty list of layer indices (integers >= 0)")
        if len(set(keep)) != len(keep):
            raise dm.err("keep", "distinct layer indices")
        keep = tuple(sorted(keep))
    return DropLayersSpec(
        keep_every=dm.int("keep_every", None, lo=2), keep=keep, count=dm.int("count", None, lo=1)
    )


def _quantize(qm: Map) -> QuantizeSpec:
    bits, gs = qm.int("bits", 4), qm.int("group_size", 64)
    if bits not in (2, 3, 4, 5, 6, 8):
        raise qm.err("bits", f"one of 2, 3, 4, 5, 6, 8; got {bits}")
    if gs not in (32, 64, 128):
        raise qm.err("group_size", f"one of 32, 64, 128; got {gs}")
    return QuantizeSpec(bits, gs)


# ---------------------------------------------------------------------------------------------
# split and eval


def _split(m: Map, prompts: tuple[Prompt, ...]) -> SplitSpec:
    s = SplitSpec(
        train=m.float("train", 0.7, lo=0, hi=1, lo_open=True, hi_open=True),
        valid=m.float("valid", 0.1, lo=0, hi=1, hi_open=True),
        test=m.float("test", 0.2, lo=0, hi=1, lo_open=True, hi_open=True),
        seed=m.int("seed", 0, lo=0),
        stratify_by=m.str("stratify_by", None, choices=("label",)),
    )
    quotas = m.has("test_per_class") or m.has("valid_per_class")
    for name in ("train", "valid", "test") if quotas else ():
        if m.has(name):
            raise m.err(
                name, "absent with test_per_class / valid_per_class (quotas replace fractions)"
            )
    if abs(s.train + s.valid + s.test - 1.0) > 1e-6:
        raise m.doc.error(m.key, f"train + valid + test = 1, got {s.train + s.valid + s.test:g}")
    if s.stratify_by == "label":
        missing = [p.id for p in prompts if p.label is None]
        if missing:
            raise m.err(
                "stratify_by",
                f"labels on every prompt ({len(missing)} have none, e.g. {missing[0]})",
            )
    if quotas:
        s = _split_quotas(m, s, prompts)
    return s


def _split_quotas(m: Map, s: SplitSpec, prompts: tuple[Prompt, ...]) -> SplitSpec:
    """``s`` with per-class quotas, which every label has enough prompts to fill."""
    if s.stratify_by != "label":
        raise m.err("stratify_by", "'label' with per-class quotas (a quota is per label)")
    s = dataclasses.replace(
        s,
        test_per_class=m.int("test_per_class", lo=1),
        valid_per_class=m.int("valid_per_class", 0, lo=0),
    )
    wanted = s.test_per_class + s.valid_per_class
    counts: dict[str, int] = {}
    for p in prompts:
        counts[str(p.label)] = counts.get(str(p.label), 0) + 1
    for label, n in sorted(counts.items()):
        if n < wanted:
            raise m.err(
                "test_per_class",
                f"a quota each label can fill: label {label!r} has {n} prompts, fewer than "
                f"test_per_class + valid_per_class = {wanted}",
            )
    return s


def _eval(m: Map, base: Path, template: str | None, fld: str) -> EvalSpec:
    th = m.raw("thresholds", {})
    if not isinstance(th, dict):
        raise m.err("thresholds", "a mapping of metric name -> number")
    tm = m.sub("thresholds", tuple(str(x) for x in th))
    thresholds = {str(k): tm.float(str(k)) for k in th}
    ps = m.raw("prompt_sets", {})
    if not isinstance(ps, dict):
        raise m.err("prompt_sets", "a mapping of set name -> prompts file (or prompts section)")
    sets = {}
    for name, value in ps.items():
        if not re.fullmatch(rf"[A-Za-z0-9_.-]{{1,{NAME_MAX}}}", str(name)):
            raise m.err(
                f"prompt_sets.{name}",
                f"a set name of letters, digits, _ . - (at most {NAME_MAX} characters)",
            )
        sets[str(name)] = load_prompts(
            value,
            base,
            m.doc,
            m.k(f"prompt_sets.{name}"),
            inherit_template=template,
            inherit_field=fld,
        )
    dev: tuple[Prompt, ...] = ()
    if m.has("dev"):
        dev = load_prompts(
            m.raw("dev"), base, m.doc, m.k("dev"), inherit_template=template, inherit_field=fld
        )
    return EvalSpec(
        decoding=_with_logit_shaping(m, Decoding(max_tokens=m.int("max_tokens", 256, lo=1))),
        thresholds=thresholds,
        prompt_sets=sets,
        batch_size=m.int("batch_size", 8, lo=1),
        dev=dev,
    )


class _EveryField(dict):
    """A template mapping that gives every field the same value."""

    def __init__(self, value: str):
        super().__init__()
        self.value = value

    def __missing__(self, key: str) -> str:
        return self.value


def _classify(
    cm: Map,
    template: str | None,
    validators: tuple[ValidatorSpec, ...],
    labelled: dict[str, tuple[Prompt, ...]],
) -> ClassifySpec:
    """``eval.classify``. The labels are the ``label`` validator's; every prompt of ``labelled``
    (key in the spec -> prompts) must carry one of them; a bias must name one. Content-free
    values are put through the prompts template, as a prompt's text is."""
    for key, prompts in labelled.items():
        missing = [p.id for p in prompts if p.label is None]
        if missing:
            raise cm.doc.error(
                key,
                f"a label on every prompt, for eval.classify ({len(missing)} have none, e.g. "
                f"{missing[0]!r})",
            )
    validator = next((v for v in validators if v.type == "label"), None)
    if validator is None or not validator.params.get("labels"):
        raise cm.doc.error(
            cm.key, "a `label` validator naming the labels to rank (validators: [{type: label}])"
        )
    labels = tuple(str(x) for x in validator.params["labels"])
    for key, prompts in labelled.items():
        for p in prompts:
            if p.label not in labels:
                raise cm.doc.error(
                    key,
                    f"labels among the label validator's ({', '.join(labels)}); {p.id!r} is "
                    f"labelled {p.label!r}",
                )
    decoder = cm.str("decoder", "ranking", choices=CLASSIFY_DECODERS)
    if decoder == "generate":
        for name in ("calibrate", "content_free", "bias"):
            if name in cm.data:
                raise cm.err(name, "absent with decoder: generate (it acts on ranking scores)")
    values = cm.raw("content_free", list(CONTENT_FREE))
    if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
        raise cm.err(
            "content_free",
            f"a non-empty list of strings (field values such as 'N/A'), got {describe(values)}",
        )
    bm = cm.sub("bias", labels)  # an unknown label is an unknown key
    return ClassifySpec(
        labels=labels,
        decoder=decoder,
        calibrate=cm.bool("calibrate", True),
        content_free=tuple(
            (template.format_map(_EveryField(v)) if template else v).strip() for v in values
        ),
        bias={label: bm.float(label) for label in labels if bm.has(label)},
    )


# ---------------------------------------------------------------------------------------------
# cross-checks and the whole spec


def _check_few_shot_passes(
    doc: Doc, teacher: TeacherSpec, validators: tuple[ValidatorSpec, ...]
) -> None:
    """The teacher imitates its few-shot answers: ones that fail the task's own checks teach it
    to fail."""
    if not (validators and teacher.few_shot):
        return
    from distiller.validators import build_validator

    check = build_validator(validators)
    for i, ex in enumerate(teacher.few_shot):
        verdict = check(ex.assistant, Prompt(id=f"few_shot[{i}]", text=ex.user))
        if not verdict.passed:
            raise doc.error(
                f"teacher.few_shot[{i}].assistant",
                "an answer that passes the validators: " + "; ".join(verdict.reasons),
            )


def _check_held_out(doc: Doc, prompts: tuple[Prompt, ...], ev: EvalSpec) -> None:
    """Eval prompt sets and the dev set share no prompt text with the curriculum."""
    train_texts = {norm_text(p.text): p.id for p in prompts}
    held_out = {f"eval.prompt_sets.{k}": v for k, v in ev.prompt_sets.items()}
    held_out["eval.dev"] = ev.dev
    for key, set_prompts in held_out.items():
        for p in set_prompts:
            if norm_text(p.text) in train_texts:
                raise doc.error(
                    key,
                    f"prompts not in the curriculum; {p.id!r} is the curriculum's {train_texts[norm_text(p.text)]!r}",
                )


# error(key in the spec, prompt, key inside its entry, expected) -> the error to raise: at the
# entry's own file and line where it is known (``load_prompts``' origins), else at the key.
_PromptError = Callable[[str, Prompt, str, str], SpecError]


def _prompt_errors(doc: Doc, origins: dict[str, dict[str, tuple[Doc, str]]]) -> _PromptError:
    """``_PromptError`` for prompts whose entries ``origins`` (key -> prompt id -> (document,
    entry key)) locates; others are reported at the spec key that holds them."""

    def error(key: str, prompt: Prompt, sub: str, expected: str) -> SpecError:
        found = origins.get(key, {}).get(prompt.id)
        if found is None:
            return doc.error(key, expected)
        src, entry = found
        return src.error(f"{entry}.{sub}" if sub else entry, expected)

    return error


def _check_labels(
    doc: Doc,
    validators: tuple[ValidatorSpec, ...],
    sets: dict[str, tuple[Prompt, ...]],
    error: _PromptError,
) -> None:
    """A ``label`` validator and the prompts' labels agree: every label a prompt of ``sets``
    (key in the spec -> prompts) carries is one of the validator's (else a gold answer fails
    its own check, and a model can never be right on that prompt), and, when every curriculum
    prompt is labelled, every validator label labels one of them (a class no prompt has is
    learned from nothing and measured on nothing)."""
    from distiller.validators import normalize_label

    for i, v in enumerate(validators):
        if v.type != "label":
            continue
        labels, cs = v.params["labels"], v.params["case_sensitive"]
        for key, prompts in sets.items():
            for p in prompts:
                if p.label is not None and normalize_label(p.label, labels, cs) is None:
                    raise error(
                        key, p, "label", f"a label among validators[{i}].labels "
                        f"({', '.join(labels)}); {p.id!r} is labelled {p.label!r}",
                    )  # fmt: skip
        curriculum = sets.get("prompts", ())
        if curriculum and all(p.label is not None for p in curriculum):
            carried = {normalize_label(str(p.label), labels, cs) for p in curriculum}
            unused = [y for y in labels if y not in carried]
            if unused:
                raise doc.error(
                    f"validators[{i}].labels",
                    f"labels the prompts carry; {unused[0]!r} labels none of the "
                    f"{len(curriculum)} prompts (theirs: {', '.join(sorted(carried))})",
                )


def _check_span_references(
    doc: Doc,
    validators: tuple[ValidatorSpec, ...],
    sets: dict[str, tuple[Prompt, ...]],
    error: _PromptError | None = None,
) -> None:
    """With a ``span`` validator, every prompt of ``sets`` (key in the spec -> prompts) has the
    passage field, and a prompt's gold answers (``reference``: a string or a list of them, the
    first being the span as the passage writes it, the others accepted variants such as "3" for
    "three") are non-empty after SQuAD normalization, the first a span of the passage: a gold
    answer the passage does not hold would score every model wrong."""
    from distiller.metrics import normalize_answer
    from distiller.validators import is_span, span_source

    span = next((v for v in validators if v.type == "span"), None)
    if span is None:
        return
    error = error or _prompt_errors(doc, {})
    field_name = span.params["field"]
    for key, prompts in sets.items():
        for p in prompts:
            if field_name not in p.meta:
                raise error(
                    key, p, "", f"a {field_name!r} field on every prompt (the span validator's passage); "
                    f"{p.id!r} has none",
                )  # fmt: skip
            if p.reference is None:
                continue
            refs = [p.reference] if isinstance(p.reference, str) else p.reference
            if not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
                raise error(
                    key, p, "reference", f"gold answers as a string or a non-empty list of strings; {p.id!r} has "
                    f"{_clip(p.reference)}",
                )  # fmt: skip
            empty = next((r for r in refs if not normalize_answer(r)), None)
            if empty is not None:
                raise error(
                    key, p, "reference", f"gold answers with words left after SQuAD normalization; {p.id!r} has "
                    f"{empty!r}",
                )  # fmt: skip
            if not is_span(refs[0], span_source(p, field_name) or ""):
                raise error(
                    key, p, "reference", f"gold answers found in their {field_name}; {p.id!r}'s answer "
                    f"{refs[0]!r} is not in its {field_name}",
                )  # fmt: skip


def _check_policy_holds_out(
    doc: Doc, student: StudentSpec, prompts: tuple[Prompt, ...], split: SplitSpec
) -> None:
    """A ``dpo.policy_task`` student must not have trained on this spec's held-out prompts:
    the SFT policy is compared with the DPO student on them."""
    from distiller.dataset import split_prompts
    from distiller.errors import UserError

    task = student.dpo.policy_task if student.dpo else None
    if task is None:
        return
    policy = load_spec(task)
    try:
        test = {p.text for p in split_prompts(prompts, split).test}
        seen = split_prompts(policy.prompts, policy.split)
    except UserError:
        return  # a split that cannot be made is reported by the stage that makes it
    leaked = [p.id for p in (*seen.train, *seen.valid) if p.text in test]
    if leaked:
        raise doc.error(
            "student.dpo.policy_task",
            f"a task that holds out this spec's test prompts; {len(leaked)} are in its "
            f"train/valid split (e.g. {leaked[0]!r}: give both specs the same prompts and split)",
        )


def load_spec(path: str | Path) -> TaskSpec:
    """Read and validate a task spec; raises ``SpecError`` (file, key, expected, line)."""
    path = real_path(Path(path).expanduser())
    doc = read_doc(path, what="task spec")
    top = Map(doc, "", doc.data, _TOP)
    base = path.parent
    name = top.str("name", path.stem)
    if not _NAME.fullmatch(name):
        raise top.err(
            "name",
            f"letters, digits, _ . - starting with a letter or digit, at most {NAME_MAX} "
            f"characters (it names directories), got {_clip(name)}",
        )
    description = top.raw("description", "")
    if not isinstance(description, str):
        raise top.err("description", "a string")

    if not top.has("prompts"):
        raise top.err("prompts", "required: a prompts file, a list, or {file, template, ...}")
    pv = top.data["prompts"]
    origins: dict[str, tuple[Doc, str]] = {}
    prompts = load_prompts(pv, base, doc, "prompts", origins=origins)
    prompt_error = _prompt_errors(doc, {"prompts": origins})
    template = pv.get("template") if isinstance(pv, dict) else None
    fld = (pv.get("field") or "text") if isinstance(pv, dict) else "text"

    if not top.has("teacher"):
        raise top.err("teacher", "required: {model: ...} or {endpoint: {url, model}}")
    teacher = _teacher(top.sub("teacher", _TEACHER), base)
    validators = _validators(doc, top.data.get("validators"), base, prompts)
    if teacher.keep == "best" and not validators:
        raise top.err("teacher.keep", "'first' when no validators are given (nothing to rank by)")
    _check_few_shot_passes(doc, teacher, validators)
    if teacher.gold:
        from distiller.backends.gold import gold_answer

        missing = [p.id for p in prompts if gold_answer(p) is None]
        if missing:
            raise top.err(
                "teacher.gold",
                f"a reference or a label on every prompt ({len(missing)} have neither, e.g. "
                f"{missing[0]!r})",
            )

    student = _student(top.sub("student", _STUDENT), teacher)
    split = _split(top.sub("split", _SPLIT), prompts)
    _check_policy_holds_out(doc, student, prompts, split)
    em = top.sub("eval", _EVAL)
    ev = _eval(em, base, template, fld)
    _check_held_out(doc, prompts, ev)
    every_set = {"prompts": prompts, "eval.dev": ev.dev}
    every_set |= {f"eval.prompt_sets.{k}": v for k, v in ev.prompt_sets.items()}
    _check_span_references(doc, validators, every_set, prompt_error)
    _check_labels(doc, validators, every_set, prompt_error)
    if em.has("classify"):
        labelled = {"prompts": prompts, "eval.dev": ev.dev}
        labelled |= {f"eval.prompt_sets.{k}": v for k, v in ev.prompt_sets.items()}
        classify = _classify(em.sub("classify", _CLASSIFY), template, validators, labelled)
        ev = dataclasses.replace(ev, classify=classify)

    return TaskSpec(
        name=name,
        description=description.strip(),
        path=path,
        prompts=prompts,
        teacher=teacher,
        validators=validators,
        student=student,
        split=split,
        eval=ev,
    )
