"""SampleStore: durable appends, torn-tail repair, resume, kept-sample selection."""

from __future__ import annotations

import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distiller.errors import UserError
from distiller.samples import SampleStore, sample_id, select_kept


def _rec(i: int, prompt_id: str = "p0", accepted: bool = True, score: float = 1.0, text="t"):
    return {
        "id": sample_id(f"prompt {prompt_id}", "cfg", i),
        "prompt_id": prompt_id,
        "sample_index": i,
        "completion": text,
        "accepted": accepted,
        "score": score,
    }


def test_sample_id_is_stable_and_distinct():
    a = sample_id("hello", "cfg1", 0)
    assert a == sample_id("hello", "cfg1", 0)
    assert (
        len(
            {
                a,
                sample_id("hello", "cfg1", 1),
                sample_id("hello", "cfg2", 0),
                sample_id("hello!", "cfg1", 0),
            }
        )
        == 4
    )


def test_append_reopen_and_duplicates(tmp_path):
    path = tmp_path / "s" / "samples.jsonl"
    with SampleStore(path) as store:
        for i in range(3):
            store.append(_rec(i, accepted=i == 1))
        with pytest.raises(ValueError, match="duplicate"):
            store.append(_rec(1))
    store = SampleStore(path)
    assert len(store) == 3 and store.notes == []
    assert store.done_ids() == {_rec(i)["id"] for i in range(3)}
    assert [r["sample_index"] for r in store.accepted()] == [1]
    store.close()
    assert path.read_bytes().count(b"\n") == 3


def test_single_writer_lock(tmp_path):
    path = tmp_path / "samples.jsonl"
    with SampleStore(path):
        with pytest.raises(UserError, match="another process"):
            SampleStore(path)
        assert len(SampleStore(path, readonly=True)) == 0  # readers are not blocked
    SampleStore(path).close()  # released on close


def test_corrupt_middle_line_is_a_clear_error(tmp_path):
    path = tmp_path / "samples.jsonl"
    with SampleStore(path) as store:
        store.append(_rec(0))
        store.append(_rec(1))
    lines = path.read_text().splitlines()
    path.write_text(lines[0] + "\n{oops\n" + lines[1] + "\n")
    with pytest.raises(UserError, match=r"samples.jsonl:2: expected one JSON record"):
        SampleStore(path)


def test_select_kept_first_and_best():
    recs = [
        _rec(0, "a", accepted=False, score=0.5),
        _rec(1, "a", score=0.8),
        _rec(2, "a", score=0.95),
        _rec(3, "a", score=0.95),
        _rec(0, "b", accepted=False),
    ]
    assert select_kept(recs, "first")["a"]["sample_index"] == 1
    assert select_kept(recs, "best")["a"]["sample_index"] == 2  # tie -> lower index
    assert select_kept(reversed(recs), "best")["a"]["sample_index"] == 2  # order-independent
    assert "b" not in select_kept(recs, "first")


texts = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    batches=st.lists(st.lists(texts, min_size=0, max_size=5), min_size=1, max_size=4),
    cut=st.floats(min_value=0.0, max_value=1.0, exclude_max=True),
    torn_kind=st.sampled_from(["partial", "garbage_line", "none"]),
)
def test_torn_tail_reopens_to_consistent_prefix(tmp_path_factory, batches, cut, torn_kind):
    path = tmp_path_factory.mktemp("store") / "samples.jsonl"
    written: list[dict] = []
    n = 0
    for batch in batches:  # several sessions, each reopening the store
        with SampleStore(path) as store:
            assert [r["id"] for r in store.records()] == [r["id"] for r in written]
            for text in batch:
                rec = _rec(n, text=text)
                store.append(rec)
                written.append(rec)
                n += 1
    # a kill mid-write leaves a prefix of the next record's bytes (never its newline)
    nxt = (json.dumps(_rec(n, text="next"), ensure_ascii=False) + "\n").encode()
    with open(path, "ab") as f:
        if torn_kind == "partial":
            f.write(nxt[: int(cut * (len(nxt) - 1))])
        elif torn_kind == "garbage_line":
            f.write(b"\x00" * (1 + int(cut * 20)) + b"\n")  # zero-filled block after a crash
    size_before = os.path.getsize(path)
    reader = SampleStore(path, readonly=True)  # a reader sees the complete prefix, changes nothing
    assert [r["id"] for r in reader.records()] == [r["id"] for r in written]
    assert os.path.getsize(path) == size_before
    with SampleStore(path) as store:
        assert list(store.records()) == written
        assert store.done_ids() == {r["id"] for r in written}
        torn = os.path.getsize(path) != size_before
        assert bool(store.notes) == torn
        store.append(_rec(n, text="after"))  # resumes cleanly after the repair
    data = path.read_bytes()
    assert data.endswith(b"\n")
    assert [json.loads(x)["sample_index"] for x in data.splitlines()] == list(range(n + 1))
