"""Stage: teacher samples -> dataset (train/valid/test chat JSONL + data card).

The split is over PROMPTS and depends only on the prompts and the split settings, never on what
the teacher produced: test prompts are fixed before any teacher output is looked at, and are
never written to train/valid (the evaluation harness evaluates on them even where the teacher
failed). Files use mlx-lm's chat format, so ``mlx_lm.lora --train --data DIR`` reads them too.

Split guarantees (``split_prompts``):
  * deterministic in (seed, set of prompt ids): the input order does not matter;
  * per stratum (label, when ``stratify_by: label``) the test and valid counts are
    round(n * test) and round(n * (test + valid)) - round(n * test), so every split's count is
    within 1 of its exact share (within 0.5 for test and train);
  * appending k prompts to a stratum moves at most 2 * (k + 1) of its existing prompts to a
    different split (prompts are ranked by a seeded hash of their id; only the cut points move);
  * with per-class quotas (``test_per_class``, ``valid_per_class``) every label gives exactly
    that many prompts to test and to valid (balanced held-out sets), the rest to train, and
    appending k prompts to a stratum moves at most 2 * k of its existing prompts.

Leakage (``find_leaks``): after the split, a train/valid prompt whose normalized text equals a
test prompt's, or whose character 5-gram Jaccard similarity to one is >= ``threshold`` (text
shared by every prompt, i.e. the template's fixed prefix/suffix, is ignored), is MOVED to test
(``on_leak="move"``, the default: nothing is lost and the test set stays unseen), or the stage
fails listing the pairs (``on_leak="fail"``). Moves repeat until no train/valid prompt is near
any test prompt.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import statistics
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from distiller import cli_types
from distiller.errors import UserError
from distiller.files import atomic_dir
from distiller.spec import Prompt, SplitSpec, TaskSpec, TeacherSpec

SPLITS = ("train", "valid", "test")
NGRAM = 5
DEFAULT_THRESHOLD = 0.75


@dataclass
class Splits:
    train: list[Prompt] = field(default_factory=list)
    valid: list[Prompt] = field(default_factory=list)
    test: list[Prompt] = field(default_factory=list)


@dataclass
class Leak:
    test_id: str
    other_id: str
    other_split: str
    similarity: float  # 1.0 for an exact (normalized) duplicate


@dataclass
class DatasetInfo:
    out_dir: str
    counts: dict[str, int]  # examples written per file
    leaks: list[Leak]
    card: dict[str, Any]


# ---------------------------------------------------------------------------------- split


def _rank_key(seed: int, prompt_id: str) -> str:
    return hashlib.sha256(f"{seed}\x00{prompt_id}".encode()).hexdigest()


def _round(x: float) -> int:
    # Half-up rounding (not banker's) keeps the cut points monotone in n.
    return int(x + 0.5 + 1e-9)


def split_prompts(prompts: Sequence[Prompt], split_spec: SplitSpec) -> Splits:
    """Seeded, stratified train/valid/test split of prompts (see the module docstring)."""
    ids = [p.id for p in prompts]
    if len(set(ids)) != len(ids):
        dup = next(i for i, c in Counter(ids).items() if c > 1)
        raise UserError(f"prompt ids must be unique; {dup!r} appears more than once")
    total = split_spec.train + split_spec.valid + split_spec.test
    f_test, f_valid = split_spec.test / total, split_spec.valid / total
    strata: dict[str | None, list[Prompt]] = {}
    for p in prompts:
        key = p.label if split_spec.stratify_by == "label" else None
        strata.setdefault(key, []).append(p)
    out = Splits()
    for key in sorted(strata, key=lambda k: (k is None, str(k))):
        group = sorted(strata[key], key=lambda p: _rank_key(split_spec.seed, p.id))
        n = len(group)
        if split_spec.test_per_class is not None:
            b1 = split_spec.test_per_class
            b2 = b1 + (split_spec.valid_per_class or 0)
            if b2 > n:
                raise UserError(
                    f"split: label {key!r} has {n} prompts, fewer than test_per_class + "
                    f"valid_per_class = {b2}"
                )
        else:
            b1 = _round(n * f_test)
            b2 = max(b1, min(n, _round(n * (f_test + f_valid))))
        out.test += group[:b1]
        out.valid += group[b1:b2]
        out.train += group[b2:]
    for name in SPLITS:  # a stable, readable order in the files
        getattr(out, name).sort(key=lambda p: p.id)
    return out


# ---------------------------------------------------------------------------------- leakage


def normalize(text: str) -> str:
    """Lowercase, NFKC, punctuation to spaces, whitespace collapsed."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(re.sub(r"[^\w\s]", " ", text).split())


def _common_affixes(texts: list[str]) -> tuple[int, int]:
    if len(texts) < 2:
        return 0, 0
    pre = os.path.commonprefix(texts)  # noqa: RUF071 (strings, not paths)
    suf = os.path.commonprefix([t[::-1] for t in texts])  # noqa: RUF071
    shortest = min(len(t) for t in texts)
    return len(pre), min(len(suf), shortest - len(pre))


def _shingles(text: str) -> frozenset[str]:
    if len(text) <= NGRAM:
        return frozenset([text])
    return frozenset(text[i : i + NGRAM] for i in range(len(text) - NGRAM + 1))


def jaccard(a: frozenset, b: frozenset) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def find_leaks(
    splits: Splits,
    threshold: float = DEFAULT_THRESHOLD,
    all_prompts: Sequence[Prompt] | None = None,
) -> list[Leak]:
    """Train/valid prompts that duplicate or nearly duplicate a test prompt."""
    everything = (
        list(all_prompts)
        if all_prompts is not None
        else [*splits.train, *splits.valid, *splits.test]
    )
    norm = {p.id: normalize(p.text) for p in everything}
    pre, suf = _common_affixes(list(norm.values()))

    def core(pid: str) -> str:
        t = norm[pid]
        c = t[pre : len(t) - suf] if suf else t[pre:]
        return c.strip() or t  # a prompt that IS the template: compare it whole

    cores = {pid: core(pid) for pid in norm}
    sh = {pid: _shingles(c) for pid, c in cores.items()}
    leaks = []
    for t in splits.test:
        for split_name in ("train", "valid"):
            for o in getattr(splits, split_name):
                if cores[t.id] == cores[o.id] or norm[t.id] == norm[o.id]:
                    leaks.append(Leak(t.id, o.id, split_name, 1.0))
                    continue
                a, b = sh[t.id], sh[o.id]
                if min(len(a), len(b)) < threshold * max(len(a), len(b)):
                    continue  # Jaccard <= |small| / |large|: cannot reach the threshold
                sim = jaccard(a, b)
                if sim >= threshold:
                    leaks.append(Leak(t.id, o.id, split_name, round(sim, 4)))
    return leaks


def resolve_leaks(
    splits: Splits, threshold: float = DEFAULT_THRESHOLD, on_leak: str = "move"
) -> tuple[Splits, list[Leak]]:
    """Move leaking train/valid prompts into test until none is left (or fail listing them)."""
    if on_leak not in ("move", "fail"):
        raise ValueError(f"on_leak must be 'move' or 'fail', got {on_leak!r}")
    all_prompts = [*splits.train, *splits.valid, *splits.test]
    found: list[Leak] = []
    while True:
        leaks = find_leaks(splits, threshold, all_prompts)
        if not leaks:
            return splits, found
        if on_leak == "fail":
            listing = "; ".join(
                f"test {lk.test_id} ~ {lk.other_split} {lk.other_id} ({lk.similarity:.2f})"
                for lk in leaks[:20]
            )
            more = f" (and {len(leaks) - 20} more)" if len(leaks) > 20 else ""
            raise UserError(
                f"{len(leaks)} train/valid prompt(s) duplicate a test prompt: {listing}{more}; "
                "remove them from the prompt set, or prepare with --on-leak move"
            )
        found += leaks
        moving = {lk.other_id for lk in leaks}
        splits = Splits(
            train=[p for p in splits.train if p.id not in moving],
            valid=[p for p in splits.valid if p.id not in moving],
            test=sorted(
                splits.test + [p for p in splits.train + splits.valid if p.id in moving],
                key=lambda p: p.id,
            ),
        )


# ---------------------------------------------------------------------------------- rows


def _user_messages(prompt: Prompt, record: dict | None, style: str) -> list[dict]:
    """The student's view of a prompt: the bare text, or the teacher's full scaffold."""
    if style == "scaffold" and record is not None and record.get("messages"):
        return [dict(m) for m in record["messages"]]
    return [{"role": "user", "content": prompt.text}]


def _scaffold_messages(prompt: Prompt, teacher: TeacherSpec) -> list[dict]:
    msgs = []
    if teacher.system_prompt:
        msgs.append({"role": "system", "content": teacher.system_prompt})
    for shot in teacher.few_shot:
        msgs += [
            {"role": "user", "content": shot.user},
            {"role": "assistant", "content": shot.assistant},
        ]
    return [*msgs, {"role": "user", "content": prompt.text}]


def _reference_text(ref: Any) -> str | None:
    if ref is None:
        return None
    return ref if isinstance(ref, str) else json.dumps(ref, ensure_ascii=False)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    # Into the stage's temporary directory (``atomic_dir``): no per-file rename needed.
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _length_stats(values: list[int]) -> dict[str, float] | None:
    if not values:
        return None
    q = (
        statistics.quantiles(values, n=20, method="inclusive")
        if len(values) > 1
        else [values[0]] * 19
    )
    return {
        "min": min(values),
        "mean": round(statistics.fmean(values), 2),
        "median": statistics.median(values),
        "p95": q[18],
        "max": max(values),
    }


def _load_tokenizer(name_or_path: str) -> tuple[Any, str | None]:
    """The student's tokenizer for token-length stats, or (None, why not)."""
    try:
        from distiller.models import resolve_model

        path = str(resolve_model(name_or_path, pull=False))  # stats only: never trigger a pull
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path), None
    except Exception as exc:  # token stats are informative only; word stats always exist
        return None, f"{type(exc).__name__}: {exc}"


def _file_hash(path: Path) -> str | None:
    if not path.exists():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# What ``prepare`` reads from each teacher sample record (``distiller.samples``):
# field -> (accepts the value, what was expected). Optional fields may be absent or null.
_REQUIRED_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "prompt_id": (lambda v: isinstance(v, str) and bool(v), "a non-empty string"),
    "sample_index": (
        lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
        "an integer >= 0",
    ),
    "completion": (lambda v: isinstance(v, str), "a string"),
    "accepted": (lambda v: isinstance(v, bool), "true or false"),
}
_OPTIONAL_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "score": (
        lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
        "a finite number",
    ),
    "reasons": (lambda v: isinstance(v, list), "a list"),
    "messages": (
        lambda v: (
            isinstance(v, list)
            and all(
                isinstance(m, dict)
                and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)
                for m in v
            )
        ),
        "a list of {role, content} string mappings",
    ),
}

# Every file ``prepare`` writes: an --out directory holding anything else is not replaced.
DATASET_FILES = (
    *(f"{name}.jsonl" for name in SPLITS),
    "pairs_train.jsonl",
    "pairs_valid.jsonl",
    "data_card.json",
    "DATA_CARD.md",
)


def read_sample_records(store_path: Path) -> list[dict]:
    """The teacher sample records of ``store_path``, each checked for the fields ``prepare``
    reads; a bad one is a UserError naming the file and its line."""
    from distiller.samples import SampleStore
    from distiller.spec.yamldoc import LONE_SURROGATE, describe, encodes

    if not store_path.exists():
        raise UserError(f"{store_path}: no teacher samples (run `distiller teach` first)")
    if not store_path.is_file():
        raise UserError(f"{store_path}: expected a samples.jsonl file (or its directory)")
    records = []
    for line, rec in SampleStore(store_path, readonly=True).numbered_records():
        for name, (ok, expected) in _REQUIRED_FIELDS.items():
            if name not in rec:
                raise UserError(f"{store_path}:{line}: {name}: expected {expected}, it is missing")
            if not ok(rec[name]):
                raise UserError(
                    f"{store_path}:{line}: {name}: expected {expected}, got {describe(rec[name])}"
                )
        for name, (ok, expected) in _OPTIONAL_FIELDS.items():
            if rec.get(name) is not None and not ok(rec[name]):
                raise UserError(
                    f"{store_path}:{line}: {name}: expected {expected}, got {describe(rec[name])}"
                )
        if not encodes(json.dumps(rec, ensure_ascii=False)):  # the dataset files are UTF-8
            raise UserError(f"{store_path}:{line}: expected {LONE_SURROGATE}")
        records.append(rec)
    return records


def _check_replaceable(out_dir: Path) -> None:
    """``out_dir`` is absent, empty or a dataset ``prepare`` wrote: replacing it loses nothing
    of the user's (``--out .`` must not delete a working directory)."""
    if not out_dir.is_dir():
        return
    foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in DATASET_FILES)
    if foreign:
        listing = ", ".join(foreign[:3]) + (
            f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        )
        raise UserError(
            f"{out_dir}: expected an empty directory or one `distiller prepare` wrote, but it "
            f"holds {listing}; choose another --out"
        )


def prepare_dataset(
    spec: TaskSpec,
    store_path: str | Path,
    out_dir: str | Path,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    on_leak: str = "move",
    tokenizer: Any = None,
) -> DatasetInfo:
    """Split the spec's prompts, attach each prompt's kept teacher sample, write the files.

    ``out_dir`` appears whole or not at all (``atomic_dir``): a run killed at any point leaves
    the previous dataset there, never new split files beside an old data card.
    """
    from distiller.samples import select_kept

    store_path, out_dir = Path(store_path), Path(out_dir)
    if store_path.is_dir():
        store_path = store_path / "samples.jsonl"
    _check_replaceable(out_dir)
    known = {p.id for p in spec.prompts}
    records = [r for r in read_sample_records(store_path) if r["prompt_id"] in known]

    kept = select_kept(records, spec.teacher.keep)
    by_prompt: dict[str, list[dict]] = {}
    for r in records:
        by_prompt.setdefault(r["prompt_id"], []).append(r)

    splits, leaks = resolve_leaks(split_prompts(spec.prompts, spec.split), threshold, on_leak)
    style = spec.student.prompt_style
    route = spec.student.route

    rows: dict[str, list[dict]] = {}
    pairs: dict[str, list[dict]] = {"train": [], "valid": []}
    for name in ("train", "valid"):
        rows[name] = []
        for p in getattr(splits, name):
            rec = kept.get(p.id)
            if rec is None:
                continue  # the teacher never passed validation on it: nothing to imitate
            msgs = _user_messages(p, rec, style)
            rows[name].append(
                {
                    "id": p.id,
                    "messages": [*msgs, {"role": "assistant", "content": rec["completion"]}],
                }
            )
            seen = {rec["completion"]}
            for r in sorted(by_prompt.get(p.id, []), key=lambda r: r["sample_index"]):
                if not r.get("accepted") and r.get("completion") not in seen:
                    seen.add(r["completion"])
                    prompt_field: Any = p.text if style != "scaffold" else msgs
                    pairs[name].append(
                        {
                            "id": p.id,
                            "prompt": prompt_field,
                            "chosen": rec["completion"],
                            "rejected": r["completion"],
                        }
                    )
    rows["test"] = []
    for p in splits.test:
        rec = kept.get(p.id)
        msgs = (
            _user_messages(p, rec, style)
            if rec
            else (
                _scaffold_messages(p, spec.teacher)
                if style == "scaffold"
                else _user_messages(p, None, style)
            )
        )
        answer = _reference_text(p.reference) or (rec["completion"] if rec else None)
        row = {
            "id": p.id,
            "messages": msgs + ([{"role": "assistant", "content": answer}] if answer else []),
        }
        row.update(
            {
                "prompt": p.text,
                "label": p.label,
                "reference": p.reference,
                "teacher": rec["completion"] if rec else None,
            }
        )
        rows["test"].append(row)

    # On-policy pairs are built later, from the policy's own samples (``distiller pairs``).
    on_policy = (
        route == "dpo" and spec.student.dpo is not None and spec.student.dpo.pairs == "on_policy"
    )
    if route == "dpo" and not on_policy and not pairs["train"]:
        raise UserError(
            f"{store_path}: route dpo needs preference pairs, but no train prompt has both an accepted "
            "and a rejected teacher sample (raise teacher.samples_per_prompt)"
        )

    card = _data_card(
        spec, store_path, records, kept, splits, rows, pairs, leaks, threshold, on_leak, tokenizer
    )
    with atomic_dir(out_dir) as tmp:
        for name in SPLITS:
            _write_jsonl(tmp / f"{name}.jsonl", rows[name])
        if (route == "dpo" and not on_policy) or pairs["train"]:
            for name in ("train", "valid"):
                _write_jsonl(tmp / f"pairs_{name}.jsonl", pairs[name])
        (tmp / "data_card.json").write_text(
            json.dumps(card, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        (tmp / "DATA_CARD.md").write_text(_card_markdown(card), encoding="utf-8")
    counts = {name: len(rows[name]) for name in SPLITS}
    counts.update({f"pairs_{n}": len(pairs[n]) for n in ("train", "valid")})
    return DatasetInfo(str(out_dir), counts, leaks, card)


def _data_card(
    spec: TaskSpec,
    store_path: Path,
    records: list[dict],
    kept: dict[str, dict],
    splits: Splits,
    rows: dict[str, list[dict]],
    pairs: dict[str, list[dict]],
    leaks: list[Leak],
    threshold: float,
    on_leak: str,
    tokenizer: Any,
) -> dict:
    tok_note = None
    if tokenizer is None:
        tokenizer, tok_note = _load_tokenizer(spec.student.model)
    reasons = Counter()
    for r in records:
        if not r.get("accepted"):
            for reason in r.get("reasons") or ["(no reason given)"]:
                reasons[str(reason).split(":")[0].strip()[:80]] += 1
    n_acc = sum(1 for r in records if r.get("accepted"))
    lengths: dict[str, Any] = {}
    for name in SPLITS:
        prompts = [
            next(m["content"] for m in reversed(r["messages"]) if m["role"] == "user")
            for r in rows[name]
        ]
        answers = [
            r["messages"][-1]["content"]
            for r in rows[name]
            if r["messages"][-1]["role"] == "assistant"
        ]
        entry = {
            "prompt_words": _length_stats([len(t.split()) for t in prompts]),
            "answer_words": _length_stats([len(t.split()) for t in answers]),
        }
        if tokenizer is not None:
            entry["prompt_tokens"] = _length_stats([len(tokenizer.encode(t)) for t in prompts])
            entry["answer_tokens"] = _length_stats([len(tokenizer.encode(t)) for t in answers])
        lengths[name] = entry
    labels = {}
    for name in SPLITS:
        c = Counter(p.label for p in getattr(splits, name) if p.label is not None)
        if c:
            labels[name] = dict(sorted(c.items()))
    return {
        "task": spec.name,
        "spec_hash": spec.fingerprint(),
        "samples_file": str(store_path),
        "samples_sha256": _file_hash(store_path),
        "route": spec.student.route,
        "prompt_style": spec.student.prompt_style,
        "split": {
            "train": spec.split.train,
            "valid": spec.split.valid,
            "test": spec.split.test,
            "seed": spec.split.seed,
            "stratify_by": spec.split.stratify_by,
        },
        "prompts": {name: len(getattr(splits, name)) for name in SPLITS},
        "examples": {name: len(rows[name]) for name in SPLITS},
        "preference_pairs": {name: len(pairs[name]) for name in ("train", "valid")},
        "train_valid_prompts_without_sample": sum(
            1 for name in ("train", "valid") for p in getattr(splits, name) if p.id not in kept
        ),
        "labels": labels,
        "teacher": {
            "samples": len(records),
            "accepted": n_acc,
            "acceptance_rate": round(n_acc / len(records), 4) if records else None,
            "prompts_with_kept_sample": len(kept),
            "prompt_coverage": round(len(kept) / len(spec.prompts), 4) if spec.prompts else None,
            "rejection_reasons": dict(reasons.most_common()),
        },
        "lengths": lengths,
        "token_stats_unavailable": tok_note,
        "leakage": {
            "method": f"normalized exact match or char {NGRAM}-gram Jaccard >= {threshold} (template affixes ignored)",
            "on_leak": on_leak,
            "moved_to_test": sorted({lk.other_id for lk in leaks}),
            "pairs": [asdict(lk) for lk in leaks],
            "clean": True,  # resolve_leaks only returns once no leak is left
        },
    }


def _card_markdown(card: dict) -> str:
    t = card["teacher"]
    lines = [
        f"# Data card: {card['task']}",
        "",
        f"- spec hash: `{card['spec_hash']}`",
        f"- samples: `{card['samples_file']}` (sha256 `{(card['samples_sha256'] or '')[:16]}`)",
        f"- route: {card['route']}, prompt style: {card['prompt_style']}",
        f"- split (seed {card['split']['seed']}, stratify by {card['split']['stratify_by']}): "
        + ", ".join(f"{k} {v} prompts" for k, v in card["prompts"].items()),
        "- examples written: "
        + ", ".join(f"{k} {v}" for k, v in card["examples"].items())
        + (
            f"; preference pairs: {card['preference_pairs']}"
            if any(card["preference_pairs"].values())
            else ""
        ),
        f"- train/valid prompts with no accepted teacher sample (left out): "
        f"{card['train_valid_prompts_without_sample']}",
        f"- teacher: {t['accepted']}/{t['samples']} samples accepted (rate {t['acceptance_rate']}), "
        f"{t['prompts_with_kept_sample']} prompts with a kept sample (coverage {t['prompt_coverage']})",
        "",
        "## Rejection reasons",
        "",
    ]
    lines += [f"- {k}: {v}" for k, v in t["rejection_reasons"].items()] or ["- none"]
    lines += [
        "",
        "## Lengths (words / tokens)",
        "",
        "| split | field | min | mean | median | p95 | max |",
        "|---|---|---|---|---|---|---|",
    ]
    for split, entry in card["lengths"].items():
        for fld, st in entry.items():
            if st:
                lines.append(
                    f"| {split} | {fld} | {st['min']} | {st['mean']} | {st['median']} | {st['p95']} | {st['max']} |"
                )
    if card["token_stats_unavailable"]:
        lines += ["", f"Token stats unavailable: {card['token_stats_unavailable']}"]
    lk = card["leakage"]
    lines += [
        "",
        "## Leakage check",
        "",
        f"- method: {lk['method']}; on leak: {lk['on_leak']}",
        f"- moved to test: {', '.join(lk['moved_to_test']) or 'none'}",
    ]
    if card["labels"]:
        lines += ["", "## Labels", ""] + [f"- {s}: {c}" for s, c in card["labels"].items()]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", help="task spec (YAML)")
    parser.add_argument(
        "--samples", required=True, help="teacher sample store (samples.jsonl or its dir)"
    )
    parser.add_argument(
        "--out",
        required=True,
        type=cli_types.out_dir,
        help="dataset dir to write (replaced whole: empty, or one prepare wrote)",
    )
    parser.add_argument(
        "--on-leak",
        choices=("move", "fail"),
        default="move",
        help="near-duplicates of test prompts in train/valid: move them to test (default) or fail",
    )
    parser.add_argument(
        "--threshold",
        type=cli_types.fraction,
        default=DEFAULT_THRESHOLD,
        help=f"near-duplicate Jaccard threshold in (0, 1] (default {DEFAULT_THRESHOLD})",
    )


def run_cli(args: argparse.Namespace) -> int:
    from distiller.pipeline import load_task

    info = prepare_dataset(
        load_task(args.spec), args.samples, args.out, threshold=args.threshold, on_leak=args.on_leak
    )
    moved = len({lk.other_id for lk in info.leaks})
    print(
        f"wrote {info.out_dir}: "
        + ", ".join(f"{k} {v}" for k, v in info.counts.items())
        + (f"; moved {moved} near-duplicate prompt(s) to test" if moved else "")
    )
    return 0
