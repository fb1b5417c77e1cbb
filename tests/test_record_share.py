"""read_share: N processes each parse only their part of an input and, after their exchanges, hold
exactly what one process reading everything would (records, indices, errors, skips, samples), and
the shards they own cover every record once. The processes are threads here, exchanging through a
barrier; tests/test_multiprocess.py runs the same code in real processes."""
import json
import threading

import pytest

from rmjax.data import records as rec
from rmjax.data.formats import row_count
from rmjax.data.records import RecordReport, read_records, read_share, sample_records
from rmjax.errors import DataError, RmjaxError


def in_threads(n, fn):
    """fn(i, exchange) on n threads; [result or the exception raised] per thread."""
    barrier = threading.Barrier(n, timeout=60)
    slots = [None] * n

    def exchanger(i):
        def exchange(what, f):
            try:
                slots[i] = (f(), None)
            except RmjaxError as e:
                slots[i] = (None, e)
            barrier.wait()
            got = list(slots)
            barrier.wait()
            failed = [f"process {j}: {e}" for j, (_, e) in enumerate(got) if e is not None]
            if failed:
                raise RmjaxError(f"{what} failed on {len(failed)} of {n} processes: " + "; ".join(failed))
            return [out for out, _ in got]
        return exchange

    results = [None] * n

    def run(i):
        try:
            results[i] = fn(i, exchanger(i))
        except Exception as e:  # noqa: BLE001 -- returned to the test
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,), name=f"process{i}") for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


def shares(path, n, **kwargs):
    reports = [RecordReport() for _ in range(n)]
    got = in_threads(n, lambda i, ex: read_share(path, process=(i, n), exchange=ex, report=reports[i], **kwargs))
    return got, reports


def as_tuples(records):
    return [(r.index, r.id, r.place, json.dumps(r.to_json(), sort_keys=True)) for r in records]


def messy_jsonl(path, n=23):
    """Pairs with blank lines, bad JSON, an empty response, and duplicate ids far apart."""
    lines = []
    for i in range(n):
        if i in (3, 11):
            lines.append("")
        elif i == 7:
            lines.append("{not json")
        elif i == 9:
            lines.append(json.dumps({"id": f"r{i}", "prompt": "p", "chosen": " ", "rejected": "b"}))
        else:
            rid = "r2" if i in (15, 20) else f"r{i}"  # r2 again on a later process's part
            lines.append(json.dumps({"id": rid, "prompt": f"q{i}", "chosen": f"a{i}", "rejected": f"b{i}"}))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("n", [1, 2, 3, 5, 30])  # 30: more processes than lines (empty parts)
def test_shares_put_together_are_what_one_process_reads(tmp_path, n):
    path = messy_jsonl(tmp_path / "pairs.jsonl")
    one = RecordReport()
    want = read_records(path, on_error="skip", report=one)
    got, reports = shares(path, n, on_error="skip")
    assert not any(isinstance(g, Exception) for g in got), got
    assert as_tuples([r for share in got for r in share.records]) == as_tuples(want)
    assert all(share.total == len(want) for share in got)
    for report in reports:  # every process reports the whole input's reading
        assert report.read == one.read and report.skipped == one.skipped
    lines = row_count(path)
    assert n == 1 or [share.units for share in got] == [(lines * i // n, lines * (i + 1) // n) for i in range(n)]
    assert any("duplicate id 'r2'" in s for s in one.skipped)


def test_each_process_parses_only_its_rows(tmp_path, monkeypatch):
    path = messy_jsonl(tmp_path / "pairs.jsonl")
    parsed, lock = [], threading.Lock()
    real = rec.parse_record

    def counting(record, where):
        with lock:
            parsed.append((threading.current_thread().name, int(where.rsplit(":", 1)[1]) - 1))
        return real(record, where)

    monkeypatch.setattr(rec, "parse_record", counting)
    got, _ = shares(path, 3, on_error="skip")
    for i, share in enumerate(got):
        lo, hi = share.units
        mine = [line for name, line in parsed if name == f"process{i}"]
        assert mine and all(lo <= line < hi for line in mine)
    assert len(parsed) == len({line for _, line in parsed})  # no row parsed twice


@pytest.mark.parametrize("n", [2, 4])
def test_the_first_error_is_the_one_process_would_raise(tmp_path, n):
    path = messy_jsonl(tmp_path / "pairs.jsonl")
    with pytest.raises(DataError) as one:
        read_records(path)
    got, _ = shares(path, n)
    assert all(isinstance(g, DataError) and str(g) == str(one.value) for g in got), got
    # a duplicate whose first occurrence another process parsed names that place
    clean = tmp_path / "dup.jsonl"
    clean.write_text("".join(json.dumps({"id": "same" if i in (1, 18) else f"x{i}", "prompt": "q",
                                         "chosen": "a", "rejected": "b"}) + "\n" for i in range(20)))
    with pytest.raises(DataError) as one:
        read_records(clean)
    assert f"{clean}:2" in str(one.value)
    got, _ = shares(clean, n)
    assert all(isinstance(g, DataError) and str(g) == str(one.value) for g in got), got


@pytest.mark.parametrize("on_error", ["fail", "skip"])
def test_checks_across_records_span_processes(tmp_path, on_error):
    path = tmp_path / "ratings.jsonl"
    rows = [{"prompt": f"q{i}", "response": f"a{i}", "ratings": {"help": i, "honest": None}} for i in range(12)]
    rows[9]["ratings"] = {"help": 1, "verbose": 2}  # other objectives than the first rated record
    rows[4]["subset"] = "s"  # a subset on one record only
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    one = RecordReport()
    try:
        want = read_records(path, on_error=on_error, report=one)
    except DataError as e:
        want = e
    got, reports = shares(path, 3, on_error=on_error)
    if on_error == "fail":
        assert isinstance(want, DataError) and all(str(g) == str(want) for g in got), got
        return
    assert as_tuples([r for share in got for r in share.records]) == as_tuples(want)
    assert reports[2].skipped == one.skipped and len(one.skipped) == 11


@pytest.mark.parametrize("n", [1, 2, 3])
def test_samples_are_drawn_as_one_process_draws_them(tmp_path, n):
    path = messy_jsonl(tmp_path / "pairs.jsonl", 40)
    want = sample_records(read_records(path, on_error="skip"), 9, 3)
    got, _ = shares(path, n, on_error="skip", sample=9, seed=3)
    assert as_tuples([r for share in got for r in share.records]) == as_tuples(want)
    assert all(share.total == 9 for share in got)


@pytest.mark.parametrize("shard_size", [1, 3, 4, 7, 100])
@pytest.mark.parametrize("n", [2, 3, 8])
def test_owned_shards_cover_every_record_once_in_order(tmp_path, n, shard_size):
    path = messy_jsonl(tmp_path / "pairs.jsonl")
    want = read_records(path, on_error="skip")
    got, _ = shares(path, n, on_error="skip", shard_size=shard_size)
    shards = -(-len(want) // shard_size)
    owners = [[i for i, share in enumerate(got) if share.owned(k)] for k in range(shards)]
    assert all(len(o) == 1 for o in owners), owners
    scored = [r for k in range(shards) for r in got[owners[k][0]].shard_records(k)]
    assert as_tuples(scored) == as_tuples(want)
    assert all(len(share.overhang) < shard_size for share in got)


def test_parquet_and_datasets_parts_read_only_their_rows(tmp_path):
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    frame = pd.DataFrame({"id": [f"r{i}" for i in range(17)], "prompt": [f"q{i}" for i in range(17)],
                          "chosen": [f"a{i}" for i in range(17)], "rejected": [f"b{i}" for i in range(17)]})
    pq.write_table(pa.Table.from_pandas(frame), tmp_path / "pairs.parquet", row_group_size=3)
    want = read_records(tmp_path / "pairs.parquet")
    got, _ = shares(tmp_path / "pairs.parquet", 4)
    assert as_tuples([r for share in got for r in share.records]) == as_tuples(want)
    assert [share.units for share in got] == [(0, 4), (4, 8), (8, 12), (12, 17)]

    import datasets

    datasets.Dataset.from_pandas(frame).save_to_disk(str(tmp_path / "ds"))
    want = read_records(tmp_path / "ds")
    got, _ = shares(tmp_path / "ds", 3)
    assert as_tuples([r for share in got for r in share.records]) == as_tuples(want)


def test_bundled_sets_split_the_same_way():
    want = read_records("llmbar:Natural")
    got, _ = shares("llmbar:Natural", 3)
    assert as_tuples([r for share in got for r in share.records]) == as_tuples(want)


def test_processes_that_see_different_inputs_stop_with_the_counts(tmp_path):
    a, b = messy_jsonl(tmp_path / "a.jsonl"), messy_jsonl(tmp_path / "b.jsonl", 30)
    got = in_threads(2, lambda i, ex: read_share(a if i == 0 else b, process=(i, 2), exchange=ex))
    assert all(isinstance(g, DataError) for g in got), got
    assert "the input differs between processes (23 rows on process 0, 30 rows on process 1)" in str(got[0])
    got = in_threads(2, lambda i, ex: read_share(a if i == 0 else tmp_path / "gone.jsonl", process=(i, 2),
                                                 exchange=ex))
    assert all(isinstance(g, RmjaxError) and "failed on 1 of 2 processes: process 1:" in str(g)
               and "gone.jsonl: no such file" in str(g) for g in got), got


# ---------------------------------------------------------------- lazy shares

def messy_rows(n=41):
    """Pairs with an empty response, a rating-free mix of subsets none, and ids repeated far apart."""
    out = []
    for i in range(n):
        rid = {17: "r2", 30: "r2", 33: "r5"}.get(i, f"r{i}")
        out.append({"id": rid, "prompt": f"q{i}", "chosen": " " if i in (9, 26) else f"a{i}", "rejected": f"b{i}"})
    return out


def write_input(tmp_path, fmt, rows):
    """``rows`` as jsonl (with blank and malformed lines), jsonl.gz (the same) or Parquet (row groups of 4)."""
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = tmp_path / "pairs.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=4)
        return path
    import gzip

    lines = [json.dumps(r) for r in rows]
    lines[5:5] = ["", "{not json"]
    lines[20:20] = ["[1, 2]", ""]
    text = "\n".join(lines) + "\n"
    if fmt == "jsonl.gz":
        path = tmp_path / "pairs.jsonl.gz"
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path = tmp_path / "pairs.jsonl"
        path.write_text(text)
    return path


def with_places(records):
    return [(r, r.place) for r in records]  # Record equality leaves the place out


@pytest.mark.parametrize("fmt", ["jsonl", "jsonl.gz", "parquet"])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("sample", [0, 13])
def test_lazy_shards_are_the_records_one_process_reads(tmp_path, fmt, n, sample):
    path = write_input(tmp_path, fmt, messy_rows())
    one = RecordReport()
    want = sample_records(read_records(path, on_error="skip", report=one), sample, 5)
    size = 4
    got, reports = shares(path, n, on_error="skip", shard_size=size, sample=sample, seed=5)
    assert not any(isinstance(g, Exception) for g in got), got
    assert all(share._records is None and share._rows.held.dtype == "int64" for share in got)  # rows, not records
    opened = [share._rows.cursor.openings for share in got]
    shards = -(-len(want) // size)
    owners = [[i for i, share in enumerate(got) if share.owned(k)] for k in range(shards)]
    assert all(len(o) == 1 for o in owners), owners
    scored = [r for k in range(shards) for r in got[owners[k][0]].shard_records(k)]
    assert with_places(scored) == with_places(want) and as_tuples(scored) == as_tuples(want)
    # going through its shards in order reads the input forward once
    assert all(share._rows.cursor.openings - o <= 1 for share, o in zip(got, opened))
    assert with_places([r for share in got for r in share.records]) == with_places(want)
    assert all(share.total == len(want) for share in got)
    for report in reports:
        assert report.read == one.read and report.skipped == one.skipped
    assert sum("duplicate id 'r2'" in s for s in one.skipped) == 2 and any("duplicate id 'r5'" in s for s in one.skipped)
    # an earlier shard again opens the input again and gives the same records
    k = shards - 1
    assert with_places(got[owners[0][0]].shard_records(0)) == with_places(want[:size])
    assert with_places(got[owners[k][0]].shard_records(k)) == with_places(want[k * size:])


@pytest.mark.parametrize("n", [1, 3])
def test_hash_collisions_make_no_duplicates(tmp_path, monkeypatch, n):
    path = write_input(tmp_path, "jsonl", messy_rows())
    one = RecordReport()
    want = read_records(path, on_error="skip", report=one)
    clean = write_input(tmp_path, "parquet", [{"id": "r2" if i in (3, 17) else f"r{i}", "prompt": "q",
                                               "chosen": "a", "rejected": "b"} for i in range(25)])
    with pytest.raises(DataError, match="duplicate id 'r2'") as first:
        read_records(clean)
    monkeypatch.setattr(rec, "_id_hash", lambda rid: 7)  # every id collides with every other
    got, reports = shares(path, n, on_error="skip", shard_size=3)
    assert not any(isinstance(g, Exception) for g in got), got
    assert with_places([r for share in got for r in share.records]) == with_places(want)
    assert all(report.skipped == one.skipped for report in reports)  # the real duplicates, and only those
    assert sum("duplicate id" in s for s in one.skipped) == 3
    assert with_places(read_records(path, on_error="skip")) == with_places(want)
    got, _ = shares(clean, n)  # on_error="fail": the same first error
    assert all(isinstance(g, DataError) and str(g) == str(first.value) for g in got), got
    unique = tmp_path / "unique.jsonl"
    unique.write_text("".join(json.dumps({"id": f"u{i}", "prompt": "q", "chosen": "a", "rejected": "b"}) + "\n"
                              for i in range(25)))
    got, reports = shares(unique, n)
    assert [r.id for share in got for r in share.records] == [f"u{i}" for i in range(25)]
    assert not any(report.skipped for report in reports)


def test_what_crosses_processes_per_row_is_arrays(tmp_path):
    import numpy as np

    path = write_input(tmp_path, "jsonl", messy_rows(60))
    sent, lock = [], threading.Lock()

    def recording(i, ex):
        def exchange(what, f):
            def g():
                out = f()
                with lock:
                    sent.append((what, out))
                return out
            return ex(what, g)
        return read_share(path, process=(i, 3), exchange=exchange, on_error="skip", shard_size=4)

    got = in_threads(3, recording)
    assert not any(isinstance(g, Exception) for g in got), got
    reading = [out for what, out in sent if what.startswith("reading") and isinstance(out, tuple)]
    assert len(reading) == 3 and all(isinstance(a, np.ndarray) for out in reading for a in out)
    assert sum(len(out[0]) for out in reading) == 62  # a hash a row
    names = [out for what, out in sent if what == "naming duplicate ids"]
    assert sum(len(out) for out in names) == 5  # only the rows of the ids seen twice: r2 x3, r5 x2
    heads = [out for what, out in sent if what == "handing shards over"]
    assert all(isinstance(out[1], np.ndarray) and len(out[1]) < 4 for out in heads)


def test_a_share_made_of_records_still_holds_them():
    recs = [rec.Record(f"r{i}", (("user", "q"),), ("a", "b"), "pair", i) for i in range(10)]
    share = rec.Share(recs, 10, 0, (0, 10), 4)
    assert share.records is recs and share.held == 10 and share.overhang == []
    assert [share.owned(k) for k in range(3)] == [True, True, True]
    assert [[r.index for r in share.shard_records(k)] for k in range(3)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
