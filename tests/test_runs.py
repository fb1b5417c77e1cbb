"""The score writer: resumable shards, refused setting changes, crash leftovers, token log-probs."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from rmjax.errors import ConfigError, DataError, RmjaxError
from rmjax.runs import RunWriter, read_shard, read_token_logprobs, scan_shards

SETTINGS = {"models": {"policy": "smollm2-135m-instruct", "reference": None}, "beta": 0.1, "reduction": "sum",
            "template": "model", "dtype": "float32", "data_hash": "ab12"}


def rows_for(writer: RunWriter, shard: int, skip: tuple[int, ...] = ()) -> list[dict]:
    return [{"index": i, "id": f"ex{i}", "score": i / 2} for i in writer.shard_range(shard) if i not in skip]


def scores(out: Path) -> list[dict]:
    return pq.read_table(out / "scores.parquet").to_pylist()


def test_shards_in_any_order_finalize_in_index_order(tmp_path):
    w = RunWriter(tmp_path, SETTINGS, num_examples=10, shard_size=4)
    assert (w.num_shards, w.pending_shards(), w.shard_range(2)) == (3, [0, 1, 2], range(8, 10))
    for k in (2, 0, 1):
        w.write_shard(k, list(reversed(rows_for(w, k))))
    assert w.completed_shards() == {0, 1, 2} and not w.is_complete()
    w.finalize({"accuracy": 0.75})
    assert scores(tmp_path) == [{"index": i, "id": f"ex{i}", "score": i / 2} for i in range(10)]
    meta = json.loads((tmp_path / "metadata.json").read_text())
    assert meta["settings"] == SETTINGS and meta["status"] == "complete" and meta["accuracy"] == 0.75
    assert meta["counts"] == {"examples": 10, "scored": 10, "skipped": 0, "shards": 3}
    assert set(meta["versions"]) == {"rmjax", "jax", "jaxlib", "python"} and meta["completed"] >= meta["created"]
    assert w.is_complete()
    in_order = RunWriter(tmp_path / "again", SETTINGS, num_examples=10, shard_size=4)
    for k in range(3):
        in_order.write_shard(k, rows_for(in_order, k))
    in_order.finalize({"accuracy": 0.75})
    assert (tmp_path / "again" / "scores.parquet").read_bytes() == (tmp_path / "scores.parquet").read_bytes()


def test_skipped_examples_are_counted_and_listed(tmp_path):
    w = RunWriter(tmp_path, SETTINGS, num_examples=6, shard_size=3)
    w.write_shard(0, rows_for(w, 0, skip=(1,)), skipped={1: "ex1: 9000 tokens > max length 4096"})
    w.write_shard(1, [], skipped={3: "a", 4: "b", 5: "c"})
    w.finalize()
    assert [r["index"] for r in scores(tmp_path)] == [0, 2]
    meta = json.loads((tmp_path / "metadata.json").read_text())
    assert meta["counts"] == {"examples": 6, "scored": 2, "skipped": 4, "shards": 2}
    assert meta["skipped"][0] == {"index": 1, "reason": "ex1: 9000 tokens > max length 4096"}


@pytest.mark.parametrize("rows, skipped, problem", [
    ([0, 1, 1, 2], {}, "'duplicate': [1]"),
    ([0, 2], {}, "'missing': [1]"),
    ([0, 1, 2, 3], {}, "'outside the shard': [3]"),
    ([0, 1], {2: "x", 7: "y"}, "'outside the shard': [7]"),
    ([0, 1, 2], {2: "x"}, "'both scored and skipped': [2]"),
])
def test_a_shard_must_hold_exactly_its_examples(tmp_path, rows, skipped, problem):
    w = RunWriter(tmp_path, SETTINGS, num_examples=6, shard_size=3)
    with pytest.raises(ValueError, match="shard 0 \\(examples 0..2\\)") as err:
        w.write_shard(0, [{"index": i} for i in rows], skipped=skipped)
    assert problem in str(err.value)
    assert w.completed_shards() == set() and list((tmp_path / "parts").iterdir()) == []


def test_many_shards_share_a_part_file_and_the_table_is_the_same_however_they_were_stored(tmp_path):
    """40 shards of 10 rows in parts of 100 rows: 4 part files, not 40; the finalized table (streamed
    from the parts, which are then removed) is byte for byte the table of one shard per file, and of
    shards written out of order."""
    tables = []
    for name, part_rows, order in (("grouped", 100, range(40)), ("single", 1, range(40)),
                                   ("shuffled", 100, np.random.default_rng(0).permutation(40))):
        w = RunWriter(tmp_path / name, SETTINGS, num_examples=400, shard_size=10, part_rows=part_rows)
        for k in order:
            w.write_shard(int(k), rows_for(w, int(k)))
        files = sorted(p.name for p in (tmp_path / name / "parts").iterdir())
        if name == "grouped":
            assert files == ["part-00000.parquet", "part-00010.parquet", "part-00020.parquet", "part-00030.parquet"]
            assert read_shard(tmp_path / name, 13).column("index").to_pylist() == list(range(130, 140))
        if name == "single":
            assert len(files) == 40
        w.finalize()
        assert sorted(p.name for p in (tmp_path / name).iterdir()) == ["metadata.json", "scores.parquet"]
        tables.append((tmp_path / name / "scores.parquet").read_bytes())
    assert tables[0] == tables[1] == tables[2]
    assert [r["index"] for r in scores(tmp_path / "grouped")] == list(range(400))


def test_torn_tails_of_an_open_part_are_cut_off_on_resume(tmp_path):
    """What a kill leaves in the open part: half a shard's bytes, half an index line, an index line
    whose bytes never reached the disk, and an open part whose sealed copy was already written."""
    w = RunWriter(tmp_path, SETTINGS, num_examples=30, shard_size=3, part_rows=100)
    for k in range(4):
        w.write_shard(k, rows_for(w, k))
    data, index = tmp_path / "parts" / "open-00000.rows", tmp_path / "parts" / "open-00000.index"
    whole = data.stat().st_size
    with open(data, "ab") as f:
        f.write(b"PAR1 half a shard")
    with open(index, "ab") as f:
        f.write(b'{"shard": 4, "off')
    resumed = RunWriter(tmp_path, SETTINGS, num_examples=30, shard_size=3, part_rows=100)
    assert resumed.completed_shards() == {0, 1, 2, 3} and data.stat().st_size == whole
    assert index.read_bytes().endswith(b"}\n") and len(index.read_text().splitlines()) == 4
    lines = index.read_text().splitlines(keepends=True)  # the last line names bytes that are gone
    os.truncate(data, json.loads(lines[-1])["offset"] + 5)
    assert RunWriter(tmp_path, SETTINGS, num_examples=30, shard_size=3, part_rows=100).completed_shards() == {0, 1, 2}
    assert len(index.read_text().splitlines()) == 3
    stale = RunWriter(tmp_path, SETTINGS, num_examples=30, shard_size=3, part_rows=12)
    for k in range(3, 10):
        stale.write_shard(k, rows_for(stale, k))
    # shards 3..6 (12 rows) sealed into a part of their own: a new writer never appends to an old open part
    assert sorted(p.name for p in (tmp_path / "parts").iterdir()) == [
        "open-00000.index", "open-00000.rows", "open-00007.index", "open-00007.rows", "part-00003.parquet"]
    (tmp_path / "parts" / "open-00003.rows").write_bytes(b"x")  # as if the kill came after the seal
    (tmp_path / "parts" / "open-00003.index").write_text('{"shard": 3, "offset": 0, "length": 1}\n')
    last = RunWriter(tmp_path, SETTINGS, num_examples=30, shard_size=3, part_rows=100)
    assert not (tmp_path / "parts" / "open-00003.rows").exists() and last.pending_shards() == []
    last.finalize()
    assert [r["index"] for r in scores(tmp_path)] == list(range(30))


def test_a_shard_is_written_once_and_finalize_waits_for_all(tmp_path):
    w = RunWriter(tmp_path, SETTINGS, num_examples=6, shard_size=3)
    w.write_shard(1, rows_for(w, 1))
    with pytest.raises(RmjaxError, match="shard 1 is already written"):
        w.write_shard(1, rows_for(w, 1))
    with pytest.raises(RmjaxError, match=r"cannot finalize, shards \[0\] \(of 2\) are not written yet"):
        w.finalize()
    w.write_shard(0, rows_for(w, 0))
    with pytest.raises(ValueError, match=r"extra metadata keys \['status'\] are reserved"):
        w.finalize({"status": "fine"})
    assert not w.is_complete()


def test_changed_settings_are_refused_and_nothing_is_lost(tmp_path):
    w = RunWriter(tmp_path, SETTINGS, num_examples=6, shard_size=3)
    w.write_shard(0, rows_for(w, 0))
    before = (tmp_path / "metadata.json").read_bytes()
    changed = {**SETTINGS, "beta": 0.2, "models": {"policy": "other", "reference": None}}
    with pytest.raises(RmjaxError, match=r"different settings \(beta, models.policy\); use another --out, or "
                                         "--overwrite"):
        RunWriter(tmp_path, changed, num_examples=6, shard_size=3)
    with pytest.raises(RmjaxError, match=r"different settings \(shard_size\)"):
        RunWriter(tmp_path, SETTINGS, num_examples=6, shard_size=2)
    with pytest.raises(RmjaxError, match=r"different settings \(num_examples, token_logprobs\)"):
        RunWriter(tmp_path, SETTINGS, num_examples=7, shard_size=3, token_logprobs=True)
    assert (tmp_path / "metadata.json").read_bytes() == before
    assert RunWriter(tmp_path, dict(reversed(SETTINGS.items())), num_examples=6, shard_size=3
                       ).completed_shards() == {0}  # key order is not a difference


def test_overwrite_replaces_only_the_writers_files(tmp_path):
    w = RunWriter(tmp_path, SETTINGS, num_examples=4, shard_size=2, token_logprobs=True)
    for k in (0, 1):
        w.write_shard(k, rows_for(w, k), token_logprobs=[np.zeros(3)] * 2)
    (tmp_path / "parts" / "README").write_text("also mine")
    w.finalize()
    (tmp_path / "notes.txt").write_text("mine")
    fresh = RunWriter(tmp_path, {**SETTINGS, "beta": 0.5}, num_examples=4, shard_size=2, overwrite=True)
    assert fresh.completed_shards() == set() and not fresh.is_complete()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metadata.json", "notes.txt", "parts"]
    assert [p.name for p in (tmp_path / "parts").iterdir()] == ["README"]
    assert (tmp_path / "notes.txt").read_text() == "mine"
    meta = json.loads((tmp_path / "metadata.json").read_text())
    assert meta["settings"]["beta"] == 0.5 and meta["status"] == "running" and meta["counts"] is None


def test_foreign_or_orphaned_directories_are_refused(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "metadata.json").write_text('{"experiment": 3}')
    for overwrite in (False, True):
        with pytest.raises(RmjaxError, match="not the metadata of an rmjax score run"):
            RunWriter(tmp_path / "a", SETTINGS, num_examples=1, overwrite=overwrite)
    (tmp_path / "b" / "parts").mkdir(parents=True)
    (tmp_path / "b" / "parts" / "part-00000.parquet").write_bytes(b"")
    with pytest.raises(RmjaxError, match="no metadata.json, so it is no run that can be resumed"):
        RunWriter(tmp_path / "b", SETTINGS, num_examples=1)
    with pytest.raises(ConfigError, match=r"score settings lack \['data_hash'\]"):
        RunWriter(tmp_path / "c", {k: v for k, v in SETTINGS.items() if k != "data_hash"}, num_examples=1)


def test_resume_after_a_crash_removes_leftovers_and_completes(tmp_path):
    w = RunWriter(tmp_path, SETTINGS, num_examples=9, shard_size=3, token_logprobs=True)
    for k in (0, 2):
        w.write_shard(k, rows_for(w, k), token_logprobs=[np.full(2, k, np.float32)] * 3)
    # what a kill mid-shard 1 leaves: a half-written temp part and a token array without its part
    stray_part = tmp_path / "parts" / ".part-00001.parquet.4242.tmp"
    stray_part.write_bytes(b"PAR1 half")
    stray_meta = tmp_path / ".metadata.json.4242.tmp"
    stray_meta.write_text("{")
    w.tokens.write_shard(1, [np.ones(5)])
    resumed = RunWriter(tmp_path, SETTINGS, num_examples=9, shard_size=3, token_logprobs=True)
    assert resumed.completed_shards() == {0, 2} and resumed.pending_shards() == [1]
    assert not stray_part.exists() and not stray_meta.exists() and resumed.tokens.shards() == {0, 2}
    resumed.write_shard(1, rows_for(resumed, 1), token_logprobs=[np.full(4, 1, np.float32)] * 3)
    resumed.finalize()
    got = scores(tmp_path)
    assert [r["index"] for r in got] == list(range(9)) and [r["id"] for r in got] == [f"ex{i}" for i in range(9)]
    assert read_token_logprobs(tmp_path, 4).tolist() == [1.0] * 4
    again = RunWriter(tmp_path, SETTINGS, num_examples=9, shard_size=3, token_logprobs=True)
    assert again.is_complete() and again.pending_shards() == []


KILLED_WRITER = """
import sys, numpy as np
from rmjax.runs import RunWriter
w = RunWriter(sys.argv[1], {settings}, num_examples=4000, shard_size=100, token_logprobs=True, part_rows=300)
rng = np.random.default_rng(0)
for k in w.pending_shards():
    w.write_shard(k, [{{"index": i, "text": rng.bytes(20000).hex()}} for i in w.shard_range(k)],
                  token_logprobs=[np.arange(50, dtype=np.float32)] * 100)
"""


@pytest.mark.parametrize("kill_at", [4, 7])  # 4: mid-shard in an open part; 7: as the second part seals
def test_kill_9_mid_run_leaves_only_whole_shards(tmp_path, kill_at):
    script = KILLED_WRITER.format(settings=repr(SETTINGS))
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)])
    try:
        deadline = time.monotonic() + 20
        while len(scan_shards(tmp_path)) < kill_at and time.monotonic() < deadline:
            time.sleep(0.001)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    w = RunWriter(tmp_path, SETTINGS, num_examples=4000, shard_size=100, token_logprobs=True, part_rows=300)
    done = w.completed_shards()
    assert kill_at <= len(done) < 40 and done == set(range(len(done)))  # a prefix: nothing torn, nothing lost
    for k in done:
        assert read_shard(tmp_path, k).column("index").to_pylist() == list(w.shard_range(k))
    assert w.tokens.shards() == done and not list((tmp_path / "parts").glob(".*.tmp"))


def test_token_logprobs_round_trip_per_stream(tmp_path):
    w = RunWriter(tmp_path, SETTINGS, num_examples=5, shard_size=2, token_logprobs=True)
    rng = np.random.default_rng(0)
    tokens = {0: {"chosen": rng.normal(size=3), "rejected": rng.normal(size=7)},
              1: {"chosen": rng.normal(size=1), "rejected": np.zeros(0)},
              3: rng.normal(size=4), 4: rng.normal(size=9)}
    for k in range(w.num_shards):
        indices = [i for i in w.shard_range(k) if i in tokens]
        w.write_shard(k, [{"index": i} for i in indices], token_logprobs=[tokens[i] for i in indices],
                      skipped={i: "too long" for i in w.shard_range(k) if i not in tokens})
    w.finalize()
    for i, value in tokens.items():
        for stream, array in (value.items() if isinstance(value, dict) else [(None, value)]):
            got = read_token_logprobs(tmp_path, i, stream)
            assert got.dtype == np.float32 and np.array_equal(got, array.astype(np.float32))
    row = scores(tmp_path)[1]
    assert (row["token_shard"], row["token_offset_chosen"], row["token_count_chosen"]) == (0, 10, 1)
    assert row["token_offset"] is None
    with pytest.raises(DataError, match=r"example 1 has no token stream None; it has \['chosen', 'rejected'\]"):
        read_token_logprobs(tmp_path, 1)
    with pytest.raises(DataError, match="example 2 has no row; it was skipped"):
        read_token_logprobs(tmp_path, 2)
    with pytest.raises(ValueError, match="must be given with per-token arrays"):
        RunWriter(tmp_path / "other", SETTINGS, num_examples=2, token_logprobs=True).write_shard(
            0, [{"index": 0}, {"index": 1}])
