"""Scoring records: every layout in every input format, ids and order, and each bad input's message."""
import gzip
import hashlib
import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rmjax.data.preferences import HH_SOURCES, bundled_path, load_value_prompts
from rmjax.data.records import Record, RecordReport, input_fingerprint, parse_hh_transcript, rating_matrix, read_records
from rmjax.errors import DataError


def msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def hh(*turns: str) -> str:
    return "".join(f"\n\n{'Human' if i % 2 == 0 else 'Assistant'}: {t}" for i, t in enumerate(turns))


# Each layout: records, then the expected (id or None for the default id, prompt, responses, kind).
LAYOUTS = {
    "a": ([{"id": "q1", "prompt": "Capital of France?", "response": "Paris."},
           {"id": None, "prompt": "", "response": "Raw text to score."}],
          [("q1", (("user", "Capital of France?"),), ("Paris.",), "single"),
           (None, (), ("Raw text to score.",), "single")]),
    "b": ([{"id": "m1", "messages": [msg("system", "Be brief."), msg("user", "2+2?"), msg("assistant", "4")]},
           {"id": None, "messages": [msg("user", "Hi"), msg("assistant", "Hello"), msg("user", "Bye"),
                                     msg("assistant", "Goodbye")]}],
          [("m1", (("system", "Be brief."), ("user", "2+2?")), ("4",), "single"),
           (None, (("user", "Hi"), ("assistant", "Hello"), ("user", "Bye")), ("Goodbye",), "single")]),
    "c_text": ([{"id": 7, "prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Seven."}],
               [("7", (("user", "Name a colour."),), ("Blue.", "Seven."), "pair")]),
    "c_messages": ([{"id": "c2", "prompt": [msg("user", "Hi"), msg("assistant", "Hey"), msg("user", "Joke?")],
                     "chosen": [msg("user", "Hi"), msg("assistant", "Hey"), msg("user", "Joke?"),
                                msg("assistant", "A pun.")],
                     "rejected": [msg("assistant", "No.")]}],
                   [("c2", (("user", "Hi"), ("assistant", "Hey"), ("user", "Joke?")), ("A pun.", "No."), "pair")]),
    "d": ([{"chosen": hh("How do I bake bread?", "Flour, water, yeast, heat."),
            "rejected": hh("How do I bake bread?", "Buy it.")},
           {"chosen": hh("Hi", "Hello!", "Thanks", "Any time."), "rejected": hh("Hi", "Hello!", "Thanks", "Whatever.")}],
          [(None, (("user", "How do I bake bread?"),), ("Flour, water, yeast, heat.", "Buy it."), "pair"),
           (None, (("user", "Hi"), ("assistant", "Hello!"), ("user", "Thanks")), ("Any time.", "Whatever."), "pair")]),
    "e": ([{"id": "e1", "chosen": [msg("system", "Kind."), msg("user", "Help?"), msg("assistant", "Sure.")],
            "rejected": [msg("system", "Kind."), msg("user", "Help?"), msg("assistant", "No.")]}],
          [("e1", (("system", "Kind."), ("user", "Help?")), ("Sure.", "No."), "pair")]),
    "g_text": ([{"id": "g1", "prompt": "Pick a number.", "chosen": "Seven.", "rejected": ["Blue.", "Banana.", "Eight"]}],
               [("g1", (("user", "Pick a number."),), ("Seven.", "Blue.", "Banana.", "Eight"), "best_of_n")]),
    "g_messages": ([{"id": "g2", "prompt": [msg("user", "Hi")], "chosen": "Hello!",
                     "rejected": [[msg("user", "Hi"), msg("assistant", "Go away.")]]}],
                   [("g2", (("user", "Hi"),), ("Hello!", "Go away."), "pair")]),  # one rejected: a pair
}


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps({k: v for k, v in r.items() if v is not None}) + "\n" for r in records))
    return path


def write_parquet(path: Path, records: list[dict]) -> Path:
    columns = list(dict.fromkeys(k for r in records for k in r))
    pq.write_table(pa.table({c: [r.get(c) for r in records] for c in columns}), path)
    return path


def write_datasets(path: Path, records: list[dict]) -> Path:
    import datasets

    datasets.Dataset.from_list(records).save_to_disk(str(path))
    return path


FORMATS = {"jsonl": ("data.jsonl", write_jsonl, lambda i: f"data:{i + 1}"),
           "parquet": ("data.parquet", write_parquet, lambda i: f"data:{i}"),
           "datasets": ("data_ds", write_datasets, lambda i: f"data_ds:{i}")}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_in_every_format(tmp_path, layout, fmt):
    name, write, default_id = FORMATS[fmt]
    records, expected = LAYOUTS[layout]
    path = write(tmp_path / name, records)
    got = read_records(path)
    assert got == [Record(rid if rid is not None else default_id(i), prompt, responses, kind, i)
                   for i, (rid, prompt, responses, kind) in enumerate(expected)]


def test_mixed_layouts_keep_input_order_and_gzip_reads_the_same(tmp_path):
    records = [r for recs, _ in LAYOUTS.values() for r in recs]
    plain = write_jsonl(tmp_path / "mixed.jsonl", records)
    packed = tmp_path / "mixed.jsonl.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    got = read_records(plain)
    assert [r.index for r in got] == list(range(len(records)))
    assert [r.id for r in got] == ["q1", "mixed:2", "m1", "mixed:4", "7", "c2", "mixed:7", "mixed:8", "e1", "g1", "g2"]
    assert [r.kind for r in got] == ["single"] * 4 + ["pair"] * 5 + ["best_of_n", "pair"]
    assert got[9].response_names == ("chosen", "rejected_1", "rejected_2", "rejected_3")
    assert got[2].prompt_messages == [msg("system", "Be brief."), msg("user", "2+2?")]
    assert got[4].response_names == ("chosen", "rejected") and got[0].response_names == ("response",)
    assert got[4].place == f"{plain}:5"
    assert read_records(packed) == got
    assert [r.id for r in read_records(plain, limit=3)] == ["q1", "mixed:2", "m1"]


def test_id_field_names_another_column(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"uid": "u9", "id": 1, "prompt": "p", "response": "r"}])
    assert read_records(path, id_field="uid")[0].id == "u9"


# ---------------------------------------------------------------- bad input

GOOD = b'{"prompt": "p", "response": "r"}\n'
BAD_LINES = {
    "malformed json": (b'{"prompt": "p", "response": }\n', ["malformed JSON", "fix or delete that line"]),
    "not utf-8": (b'{"prompt": "caf\xe9", "response": "r"}\n', ["not valid UTF-8", "re-encode"]),
    "no layout": (b'{"text": "hello"}\n', ["matches no layout", "['text']", '{"prompt", "response"}']),
    "not an object": (b'["prompt", "response"]\n', ["expected a JSON object"]),
    "wrong type": (b'{"prompt": "p", "response": 5}\n', ["field 'response' must be a string, got int"]),
    "empty response": (b'{"prompt": "p", "response": "  \\n "}\n', ["field 'response' is empty", "nothing to score"]),
    "empty chosen": (b'{"prompt": "p", "chosen": "", "rejected": "r"}\n', ["field 'chosen' is empty"]),
    "unknown role": (b'{"messages": [{"role": "human", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n',
                     ["field 'messages[0].role' is 'human'", "'system', 'user', 'assistant'"]),
    "content not text": ((b'{"messages": [{"role": "user", "content": ["hi"]}, {"role": "assistant", '
                          b'"content": "yo"}]}\n'), ["field 'messages[0].content' must be a string, got list"]),
    "no final reply": (b'{"messages": [{"role": "user", "content": "hi"}]}\n',
                       ["field 'messages' must end with an assistant turn"]),
    "prompt ends with reply": ((b'{"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", '
                                b'"content": "b"}], "response": "c"}\n'),
                               ["field 'prompt' ends with a turn of role 'assistant'", "must end with a user turn"]),
    "no prompt": (b'{"response": "r"}\n', ["field 'prompt' is missing", 'use ""']),
    "half a pair": (b'{"chosen": "a"}\n', ["field 'rejected' is missing"]),
    "mixed pair types": (b'{"chosen": "a", "rejected": [{"role": "assistant", "content": "b"}]}\n',
                         ["must both be HH-RLHF transcript strings or both message lists"]),
    "not a transcript": (b'{"chosen": "just text", "rejected": "other"}\n',
                         ["field 'chosen'", "not an HH-RLHF transcript"]),
    "transcripts differ early": (json.dumps({"chosen": hh("Q1", "A", "Q2", "good"),
                                             "rejected": hh("Q1", "B", "Q2", "bad")}).encode() + b"\n",
                                 ["differ at turn 1", "differ only in the final assistant reply"]),
    "lists differ early": (json.dumps({"chosen": [msg("user", "x"), msg("assistant", "y")],
                                       "rejected": [msg("user", "z"), msg("assistant", "w")]}).encode() + b"\n",
                           ["differ at turn 0"]),
    "conversation disagrees with prompt": (json.dumps({
        "prompt": "Q", "chosen": [msg("user", "other"), msg("assistant", "A")], "rejected": "B"}).encode() + b"\n",
        ["turns of field 'chosen' before its last reply differ from field 'prompt'"]),
    "two layouts": (b'{"prompt": "p", "response": "r", "chosen": "c", "rejected": "d"}\n',
                    ["fields ['response', 'chosen'] belong to different layouts"]),
    "bad id": (b'{"id": [1], "prompt": "p", "response": "r"}\n', ["field 'id' must be a string or an integer"]),
    "rating not a number": (b'{"prompt": "p", "response": "r", "ratings": {"helpful": "high"}}\n',
                            ["field 'ratings.helpful' must be a number, got str 'high'"]),
    "rating bool": (b'{"prompt": "p", "response": "r", "ratings": {"helpful": true}}\n',
                    ["field 'ratings.helpful' must be a number, got bool"]),
    "empty ratings": (b'{"prompt": "p", "response": "r", "ratings": {}}\n', ["field 'ratings' must be a non-empty"]),
    "ratings on a pair": (b'{"prompt": "p", "chosen": "a", "rejected": "b", "ratings": {"x": 1}}\n',
                          ["field 'ratings' rates one response", "one record per response"]),
    "best-of-N with no rejected": (b'{"prompt": "p", "chosen": "a", "rejected": []}\n',
                                   ["field 'rejected' is an empty list", "at least one rejected"]),
    "best-of-N without prompt": (b'{"chosen": "a", "rejected": ["b", "c"]}\n', ["field 'prompt' is missing"]),
    "bad margin": (b'{"prompt": "p", "chosen": "a", "rejected": "b", "margin": "big"}\n',
                   ["field 'margin' must be a number"]),
    "margin on a single": (b'{"prompt": "p", "response": "r", "margin": 1}\n', ["field 'margin' applies to pairs"]),
    "negative weight": (b'{"prompt": "p", "response": "r", "weight": -1}\n', ["a weight must be >= 0"]),
    "empty subset": (b'{"prompt": "p", "response": "r", "subset": ""}\n', ["field 'subset' must be a non-empty"]),
}


@pytest.mark.parametrize("case", BAD_LINES)
def test_bad_record_names_file_line_field_and_fix(tmp_path, case):
    line, fragments = BAD_LINES[case]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(GOOD + line + GOOD)
    with pytest.raises(DataError) as err:
        read_records(path)
    message = str(err.value)
    assert message.startswith(f"{path}:2: ")
    for fragment in fragments:
        assert fragment in message


def test_duplicate_ids_name_both_lines(tmp_path):
    path = write_jsonl(tmp_path / "dup.jsonl", [{"id": "a", "prompt": "p", "response": "r"},
                                               {"id": "b", "prompt": "p", "response": "r"},
                                               {"id": "a", "prompt": "q", "response": "s"}])
    with pytest.raises(DataError, match=rf"^{re.escape(f'{path}:3')}: duplicate id 'a' \(first at {re.escape(str(path))}:1\)"):
        read_records(path)


def test_skip_mode_lists_every_skipped_record_with_its_line(tmp_path):
    path = tmp_path / "many.jsonl"
    bad = [line for line, _ in BAD_LINES.values()]
    path.write_bytes(GOOD + b"".join(bad) + b"\n" + b'{"id": "last", "prompt": "p", "response": "r"}\n')
    report = RecordReport()
    got = read_records(path, on_error="skip", report=report)
    assert [(r.id, r.index) for r in got] == [("many:1", 0), ("last", 1)]
    assert report.read == 2 and len(report.skipped) == len(bad)
    assert [s.split(": ")[0] for s in report.skipped] == [f"{path}:{n}" for n in range(2, 2 + len(bad))]
    assert report.summary().startswith(f"2 records read, {len(bad)} skipped (first: {path}:2: malformed JSON")


def test_parquet_and_datasets_errors_name_the_row(tmp_path):
    rows = [{"prompt": "p", "response": "r"}, {"prompt": "p", "response": " "}]
    path = write_parquet(tmp_path / "t.parquet", rows)
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))} row 1: field 'response' is empty"):
        read_records(path)
    ds = write_datasets(tmp_path / "ds", rows)
    with pytest.raises(DataError, match=rf"^{re.escape(str(ds))} row 1: field 'response' is empty"):
        read_records(ds)


def test_dataset_dict_needs_a_split(tmp_path):
    import datasets

    root = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"prompt": "a", "response": "b"}]),
                          "test": datasets.Dataset.from_list([{"prompt": "c", "response": "d"},
                                                              {"prompt": "e", "response": " "}])}
                         ).save_to_disk(str(root))
    with pytest.raises(DataError, match=r"splits \['test', 'train'\] and no split was given; choose one with --split"):
        read_records(root)
    with pytest.raises(DataError, match="split 'dev' is not there"):
        read_records(root, split="dev")
    assert read_records(root, split="train") == [Record("dd:0", (("user", "a"),), ("b",), "single", 0)]
    with pytest.raises(DataError, match=rf"^{re.escape(str(root))}\[test\] row 1: field 'response' is empty"):
        read_records(root, split="test")


def test_whole_input_errors(tmp_path):
    with pytest.raises(DataError, match="no such file or directory"):
        read_records(tmp_path / "absent.jsonl")
    (tmp_path / "x.csv").write_text("prompt,response\n")
    with pytest.raises(DataError, match=r"x.csv: unknown input format; use .jsonl"):
        read_records(tmp_path / "x.csv")
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="broken.parquet: not a readable Parquet file"):
        read_records(tmp_path / "broken.parquet")
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(gzip.compress(GOOD * 50)[:-12])
    with pytest.raises(DataError, match="cut.jsonl.gz: cannot be read"):
        read_records(cut)
    write_jsonl(tmp_path / "ok.jsonl", [{"prompt": "p", "response": "r"}])
    with pytest.raises(DataError, match="--split applies only to a datasets directory"):
        read_records(tmp_path / "ok.jsonl", split="train")


def test_optional_fields_and_ratings(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", [
        {"prompt": "p", "response": "a", "ratings": {"helpful": 4, "honest": None}, "subset": "s1", "weight": 2},
        {"prompt": "q", "response": "b", "ratings": {"honest": 1.5, "helpful": 0}, "subset": "s2"},
        {"prompt": "q", "chosen": "x", "rejected": "y", "margin": 0.5, "subset": "s2"}])
    got = read_records(path)
    assert got[0].ratings == (("helpful", 4.0), ("honest", None)) and got[0].weight == 2.0 and got[0].subset == "s1"
    assert got[2].margin == 0.5 and got[2].ratings is None and got[2].weight is None
    again = write_jsonl(tmp_path / "again.jsonl", [r.to_json() for r in got])
    assert read_records(again) == got  # to_json round-trips every field
    names, values = rating_matrix(got[:2])
    assert names == ("helpful", "honest") and values == [[4.0, None], [0.0, 1.5]]
    assert rating_matrix(got[:2], ("honest", "helpful", "brief"))[1] == [[None, 4.0, None], [1.5, 0.0, None]]
    with pytest.raises(DataError, match=r"r.jsonl:1: field 'ratings' names unknown objectives \['helpful'\]"):
        rating_matrix(got[:1], ("honest",))
    with pytest.raises(DataError, match=r"r.jsonl:3: the record has no 'ratings' field"):
        rating_matrix(got)


def test_cross_record_checks_fail_or_skip_with_counts(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [
        {"prompt": "p", "response": "a", "ratings": {"helpful": 1}, "subset": "s"},
        {"prompt": "p", "response": "b", "ratings": {"harmless": 1}, "subset": "s"},
        {"prompt": "p", "response": "c", "ratings": {"helpful": 2}}])
    with pytest.raises(DataError, match=r"x.jsonl:2: field 'ratings' names other objectives than the first rated "
                                        r"record \(.*x.jsonl:1\): missing \['helpful'\], extra \['harmless'\]"):
        read_records(path)
    report = RecordReport()
    got = read_records(path, on_error="skip", report=report)
    assert [r.responses for r in got] == [("a",)] and [r.index for r in got] == [0]
    assert report.read == 1 and len(report.skipped) == 2
    assert "x.jsonl:3: field 'subset' is missing, but 2 other records" in report.skipped[1]


# ---------------------------------------------------------------- bundled HH-RLHF and LLMBar

def test_parse_hh_transcript_roles_and_turns():
    msgs = parse_hh_transcript("\n\nHuman: hi there\n\nAssistant: hello\n\nHuman: bye\n\nAssistant: ok!")
    assert msgs == [("user", "hi there"), ("assistant", "hello"), ("user", "bye"), ("assistant", "ok!")]
    with pytest.raises(DataError, match="not an HH-RLHF transcript"):
        parse_hh_transcript("no turns here", "f.jsonl:3")


def test_hh_alias_reads_the_bundled_pairs():
    got = read_records("hh-rlhf:helpful-base", limit=3)
    assert [r.id for r in got] == ["helpful-base:1", "helpful-base:2", "helpful-base:3"]
    assert {r.kind for r in got} == {"pair"} and {r.subset for r in got} == {"helpful-base"}
    with gzip.open(bundled_path("hh_rlhf", "helpful-base_test.jsonl.gz"), "rt") as f:
        first = json.loads(f.readline())
    assert got[0].prompt == tuple(parse_hh_transcript(first["chosen"])[:-1])
    assert got[0].responses[0] == parse_hh_transcript(first["chosen"])[-1][1]
    report = RecordReport()
    everything = read_records("hh-rlhf", on_error="skip", report=report)
    assert report.read + len(report.skipped) == 8552  # every line accounted for
    assert {r.subset for r in read_records("hh-rlhf:helpful", on_error="skip")} == set(HH_SOURCES["helpful"])
    assert len(everything) == report.read and len({r.id for r in everything}) == len(everything)


def test_llmbar_alias_and_value_prompts():
    got = read_records("llmbar")
    assert len(got) == 419 and {r.kind for r in got} == {"pair"}
    assert [sum(r.subset == s for r in got) for s in ("Natural", "Adversarial_Neighbor", "Adversarial_GPTInst",
                                                      "Adversarial_GPTOut", "Adversarial_Manual")] == [100, 134, 92, 47, 46]
    item = json.loads(bundled_path("llmbar", "LLMBar_Natural.json").read_text())[0]
    preferred = item["output_1"] if item["label"] == 1 else item["output_2"]
    assert got[0].responses[0] == preferred and got[0].prompt == (("user", item["input"]),)
    assert [r.id for r in read_records("llmbar:Adversarial_Manual", limit=2)] == ["Adversarial_Manual:0",
                                                                                 "Adversarial_Manual:1"]
    with pytest.raises(DataError, match="unknown LLMBar subset 'Easy'"):
        read_records("llmbar:Easy")
    prompts = load_value_prompts()
    assert len(prompts) == 54 and prompts["best_ever_one"] == "What, in one word, is the best thing ever?"


def test_hh_alias_skips_its_known_bad_records():
    report = RecordReport()
    got = read_records("hh-rlhf:helpful-base", on_error="skip", report=report)
    # 13 of the 2354 test pairs have an empty reply or transcripts that disagree before it
    assert len(got) == report.read == 2354 - 13 and len(report.skipped) == 13
    assert report.skipped[0].startswith(f"{bundled_path('hh_rlhf', 'helpful-base_test.jsonl.gz')}:121: "
                                        "field 'rejected' is empty")
    with pytest.raises(DataError, match="unknown HH-RLHF subset 'nope'"):
        read_records("hh-rlhf:nope")


# ---------------------------------------------------------------- fingerprints

def test_fingerprint_tracks_the_bytes(tmp_path):
    path = write_jsonl(tmp_path / "f.jsonl", [{"prompt": "p", "response": "r"}])
    assert input_fingerprint(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    before = input_fingerprint(path)
    write_jsonl(path, [{"prompt": "p", "response": "R"}])
    assert input_fingerprint(path) != before
    one = write_datasets(tmp_path / "one", [{"prompt": "p", "response": "r"}])
    two = write_datasets(tmp_path / "two", [{"prompt": "p", "response": "other"}])
    assert input_fingerprint(one) == input_fingerprint(one) != input_fingerprint(two)
    assert input_fingerprint("hh-rlhf:helpful-base") != input_fingerprint("hh-rlhf:harmless-base")
    assert input_fingerprint("hh-rlhf") == input_fingerprint("hh-rlhf:both")
