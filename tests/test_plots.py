"""distiller.plots: the report's PNG plots, drawn from a report document and a train log."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from distiller.plots import read_train_metrics, write_plots
from distiller.report import write_reports


def _report() -> dict:
    return {
        "created": "2026-01-01T00:00:00",
        "commit": None,
        "entries": {
            f"t/split:test/{m}": {
                "task": "t",
                "prompt_set": "split:test",
                "model": m,
                "n": 10,
                "format": {"k": k, "n": 10, "value": k / 10, "lo": 0.0, "hi": 1.0},
                "task_metrics": {"accuracy": k / 10},
                "batch_decode_tps": 100.0 + k,
                "peak_memory_mb": 300.0,
                "latency": {"decode_tps": 50.0},
            }
            for m, k in (("teacher", 9), ("vanilla", 2), ("distilled", 8))
        },
        "extra": {},
    }


ROWS = [
    {"step": 1, "train_loss": 3.0, "val_loss": 3.2},
    {"step": 2, "train_loss": 2.5, "val_loss": None},
    {"step": 3, "train_loss": 2.0, "val_loss": 2.4},
]


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_every_plot_is_written_as_a_png(tmp_path: Path) -> None:
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps(ROWS), encoding="utf-8")
    written = write_plots(_report(), tmp_path / "plots", train_metrics=metrics)
    assert [p.name for p in written] == [
        "format_rate.png", "task_metrics.png", "throughput_memory.png", "train_loss.png",
    ]  # fmt: skip
    for p in written:
        width, height = _png_size(p)
        assert width >= 300 and height >= 200


def test_nothing_to_draw_writes_nothing(tmp_path: Path) -> None:
    assert write_plots({"entries": {}}, tmp_path) == []
    assert list(tmp_path.iterdir()) == []


def test_train_metrics_csv_and_json_read_alike(tmp_path: Path) -> None:
    (tmp_path / "metrics.json").write_text(json.dumps(ROWS), encoding="utf-8")
    with open(tmp_path / "metrics.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["step", "train_loss", "val_loss"])
        w.writeheader()
        w.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in ROWS)
    from_json = read_train_metrics(tmp_path / "metrics.json")
    assert from_json == read_train_metrics(tmp_path / "metrics.csv")
    assert from_json[1] == {"step": 2.0, "train_loss": 2.5, "val_loss": None}


def test_write_reports_puts_the_plots_beside_the_markdown(tmp_path: Path) -> None:
    write_reports(_report(), "# report\n", tmp_path)
    assert (tmp_path / "latest.md").is_file()
    assert _png_size(tmp_path / "format_rate.png")[0] > 0
    assert not (tmp_path / "train_loss.png").exists()  # no train log given


@pytest.mark.parametrize("entries", [{"x": {"model": "m"}}, {"x": "not a dict"}, []])
def test_partial_entries_do_not_break_the_writer(tmp_path: Path, entries) -> None:
    assert write_plots({"entries": entries}, tmp_path) == []
