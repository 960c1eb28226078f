"""`distiller run` stage caching, end to end on a tiny student and a loopback HTTP teacher."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from fake_openai import FakeOpenAI

from distiller.dataset import split_prompts
from distiller.pipeline import distill, run_stage
from distiller.spec import load_spec

HEADERS = ["FAILURE MODE", "NAIVE FIXES", "MECHANISM", "TRADE-OFF"]


def four_sections(body: dict) -> str:
    user = body["messages"][-1]["content"]
    return "\n".join(
        f"{h}: {h.lower()} of {user}, point {i} with its own words {'x' * (i + 1)}."
        for i, h in enumerate(HEADERS)
    )


@pytest.fixture()
def teacher_server():
    with FakeOpenAI(responder=four_sections) as server:
        yield server


def write_spec(path: Path, server_url: str, student_dir: Path, lr: float = 1e-3) -> Path:
    spec = {
        "name": "tiny_cot",
        "prompts": {"items": [f"scenario number {i} about replica {i * 7}" for i in range(12)]},
        "teacher": {
            "endpoint": {"url": server_url, "model": "fake"},
            "decoding": {"temperature": 0.0, "max_tokens": 64},
            "samples_per_prompt": 1,
        },
        "validators": [{"type": "sections", "headers": HEADERS}],
        "student": {
            "model": str(student_dir),
            "route": "sft",
            "lora": {"rank": 4, "alpha": 8, "layers": "all"},
            "train": {
                "iters": 4,
                "batch_size": 2,
                "learning_rate": lr,
                "steps_per_eval": 2,
                "checkpoint_every": 2,
                "max_seq_length": 128,
            },
        },
        "split": {"train": 0.5, "valid": 0.25, "test": 0.25, "seed": 0},
    }
    path.write_text(yaml.safe_dump(spec))
    return path


def test_run_reuses_unchanged_stages_and_rebuilds_changed_ones(
    tmp_path, teacher_server, tiny_model_dir
):
    spec_path = write_spec(tmp_path / "tiny.yaml", teacher_server.url, tiny_model_dir)
    run_dir = tmp_path / "run"
    first = distill(load_spec(spec_path), run_dir)
    assert not any(stage.reused for stage in first.stages.values())
    assert (first.student_dir / "config.json").exists()
    # The teacher answers only train and valid prompts: held-out prompts never reach it.
    spec = load_spec(spec_path)
    splits = split_prompts(spec.prompts, spec.split)
    asked = {r["messages"][-1]["content"] for r in teacher_server.requests}
    assert asked == {p.text for p in (*splits.train, *splits.valid)}
    assert not asked & {p.text for p in splits.test}
    requests_after_first = len(teacher_server.requests)

    again = distill(load_spec(spec_path), run_dir)
    assert all(stage.reused for stage in again.stages.values())
    assert len(teacher_server.requests) == requests_after_first  # nothing regenerated

    # A training setting changed: the teacher and dataset stay, training and fusing rerun.
    write_spec(spec_path, teacher_server.url, tiny_model_dir, lr=5e-4)
    changed = distill(load_spec(spec_path), run_dir)
    reused = {name: stage.reused for name, stage in changed.stages.items()}
    assert reused == {"teacher": True, "dataset": True, "train": False, "fuse": False}
    assert len(teacher_server.requests) == requests_after_first
    stage_record = json.loads((run_dir / "train" / "stage.json").read_text())
    assert stage_record["key"] == changed.stages["train"].key != first.stages["train"].key


def test_a_stage_that_fails_to_rebuild_leaves_the_previous_one_whole(tmp_path):
    """Non-resumable stages build beside their directory and replace it whole, stage.json
    included: a failed (or killed) rebuild leaves the previous output, never a mix."""
    stage_dir = tmp_path / "run" / "dataset"

    def build_v1(out: Path) -> dict:
        (out / "old.jsonl").write_text("v1\n")
        return {}

    first = run_stage("dataset", stage_dir, {"v": 1}, build_v1, log=lambda _: None)

    def build_v2_cut_short(out: Path) -> dict:
        (out / "new.jsonl").write_text("v2\n")
        raise RuntimeError("cut short")

    with pytest.raises(RuntimeError, match="cut short"):
        run_stage("dataset", stage_dir, {"v": 2}, build_v2_cut_short, log=lambda _: None)
    assert sorted(p.name for p in stage_dir.iterdir()) == ["old.jsonl", "stage.json"]
    assert json.loads((stage_dir / "stage.json").read_text())["key"] == first.key
    assert [p.name for p in stage_dir.parent.iterdir()] == ["dataset"]  # no temporary left

    def build_v2(out: Path) -> dict:
        (out / "new.jsonl").write_text("v2\n")
        return {"file": str(out / "new.jsonl")}

    second = run_stage("dataset", stage_dir, {"v": 2}, build_v2, log=lambda _: None)
    assert sorted(p.name for p in stage_dir.iterdir()) == ["new.jsonl", "stage.json"]
    assert second.info["file"] == str(stage_dir / "new.jsonl")  # where it ended up
    assert json.loads((stage_dir / "stage.json").read_text())["info"]["file"] == second.info["file"]
