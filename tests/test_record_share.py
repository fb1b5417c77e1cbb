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
