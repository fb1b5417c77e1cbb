import gzip
import json

import pytest

from rmjax.data.preferences import (HH_SOURCES, LoadReport, load_hh_rlhf, load_llmbar, load_value_prompts,
                                    parse_hh_transcript)
from rmjax.errors import DataError


def test_parse_hh_transcript_roles_and_turns():
    msgs = parse_hh_transcript("\n\nHuman: hi there\n\nAssistant: hello\n\nHuman: bye\n\nAssistant: ok!")
    assert msgs == [("user", "hi there"), ("assistant", "hello"), ("user", "bye"), ("assistant", "ok!")]
    with pytest.raises(DataError, match="not an HH-RLHF transcript"):
        parse_hh_transcript("no turns here", "f.jsonl:3")


def test_bundled_hh_rlhf_counts_and_shared_prompt():
    report = LoadReport()
    pairs = load_hh_rlhf(report=report)
    assert report.read + len(report.skipped) == 8552  # every line accounted for
    assert len(pairs) == report.read and len(report.skipped) < 50
    assert all(p.prompt[-1][0] == "user" and p.chosen != p.rejected or p.chosen == p.rejected for p in pairs)
    assert len({p.id for p in pairs}) == len(pairs)
    helpful = load_hh_rlhf("helpful")
    assert {p.subset for p in helpful} == set(HH_SOURCES["helpful"])


def test_malformed_lines_name_file_and_line(tmp_path):
    path = tmp_path / "harmless-base_test.jsonl.gz"
    good = {"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant: b"}
    lines = [json.dumps(good).encode(), b"{not json", json.dumps({"chosen": "x"}).encode(), b"\xff\xfe"]
    with gzip.open(path, "wb") as f:
        f.write(b"\n".join(lines) + b"\n")
    report = LoadReport()
    pairs = load_hh_rlhf(("harmless-base",), root=tmp_path, report=report)
    assert len(pairs) == 1 and pairs[0].chosen == "a" and pairs[0].prompt == (("user", "q"),)
    assert len(report.skipped) == 3
    assert f"{path}:2: malformed JSON" in report.skipped[0]
    assert "field 'rejected' is missing" in report.skipped[1] and f"{path}:3" in report.skipped[1]
    assert "not valid UTF-8" in report.skipped[2]
    with pytest.raises(DataError, match=":2: malformed JSON"):
        load_hh_rlhf(("harmless-base",), root=tmp_path, on_error="fail")


def test_llmbar_and_prompts():
    pairs = load_llmbar()
    assert len(pairs) == 419
    assert {p.subset for p in pairs} == {"Natural", "Adversarial_Neighbor", "Adversarial_GPTInst",
                                         "Adversarial_GPTOut", "Adversarial_Manual"}
    prompts = load_value_prompts()
    assert len(prompts) == 54 and prompts["best_ever_one"] == "What, in one word, is the best thing ever?"
