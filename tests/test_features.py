"""Feature cache (ArmoRM stage 0): cached features equal a direct forward of each full sequence at
the response's last token and at the gating token; a killed run resumed gives identical arrays;
sharded over the mesh gives the same features; the CLI writes a readable cache."""
import json

import jax
import numpy as np
import pandas as pd
import pytest
from hf_models import save_tiny_checkpoint

from rmjax import sharding as shd
from rmjax.cli import main
from rmjax.data.chat import gate_offset, render
from rmjax.data.records import Record
from rmjax.errors import RmjaxError
from rmjax.models.loading import load_model
from rmjax.models.transformer import forward
from rmjax.runs import scan_shards
from rmjax.scoring.features import FeatureCache, FeatureSettings, cache_features


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("features_model")
    save_tiny_checkpoint(d)
    return d


@pytest.fixture(scope="module")
def tiny(model_dir):
    return load_model(str(model_dir))


def pair_records():
    out = []
    for i in range(7):
        prompt = (("user", f"Question {i} about {'rain ' * i}?"),)
        if i % 3 == 1:  # multi-turn: the gate closes the last user turn
            prompt = (("user", "Hello there."), ("assistant", "Hi!"), ("user", f"Now {i}, why?"))
        out.append(Record(f"p{i}", prompt, (f"Because {'yes ' * (i + 1)}.", f"No{'!' * i}"), "pair", i))
    out.append(Record("b", (("user", "Pick one."),), ("This one.", "That", "None of them at all"), "best_of_n", 7))
    return out


SETTINGS = FeatureSettings(max_length=96, shard_size=3, pack_length=128, batch_tokens=256)
PROV = {"model": "tiny", "data": "synthetic", "data_hash": "x"}


def direct(tiny, records):
    """Per (record, response): the hidden states of its full sequence (one padded, jitted batch) at
    the response's last token and at the gating token."""
    seqs, where = [], []
    for rec in records:
        for text in rec.responses:
            p, r = render(tiny.tokenizer, rec.prompt_messages, text)
            seqs.append(p + r)
            where.append((len(p) + len(r) - 1, len(p) - 1 - gate_offset(tiny.tokenizer, rec.prompt_messages)))
    ids = np.zeros((len(seqs), 128), np.int32)
    mask = np.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)] = s, 1
    h = np.asarray(jax.jit(lambda a, m: forward(tiny.params, tiny.config, a, m).hidden)(ids, mask))
    out, k = {}, 0
    for i, rec in enumerate(records):
        for j in range(len(rec.responses)):
            out[i, j] = h[k, where[k][0]], h[k, where[k][1]], h[k, where[k][1] + 1]
            k += 1
    return out


def test_cached_features_equal_a_direct_forward(tiny, tmp_path):
    records = pair_records()
    meta = cache_features(records, tiny, tmp_path / "c", settings=SETTINGS, provenance=PROV)
    assert meta["status"] == "complete" and meta["settings"]["responses"] == 3
    assert meta["settings"]["gating_token"].startswith("the token that closes")
    cache = FeatureCache(tmp_path / "c")
    resp, gate, tokens = cache.response(), cache.gate(), cache.response_tokens()
    assert resp.shape == (8, 3, tiny.config.hidden_size) and gate.shape == (8, tiny.config.hidden_size)
    im_end = tiny.tokenizer.token_id("<|im_end|>")
    want = direct(tiny, records)
    for i, rec in enumerate(records):
        row = cache.examples.iloc[i]
        assert row["id"] == rec.id and row["gate_offset"] > 0
        for j in range(len(rec.responses)):
            want_resp, want_gate, after_gate = want[i, j]
            np.testing.assert_allclose(resp[i, j], want_resp, rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(gate[i], want_gate, rtol=1e-4, atol=1e-4)
            assert np.abs(after_gate - gate[i]).max() > 1e-2  # a neighbouring token would not pass
            assert tokens[i, j] == len(render(tiny.tokenizer, rec.prompt_messages, rec.responses[j])[1])
        assert np.isnan(resp[i, len(rec.responses):]).all()  # pairs have no third response
        p, _ = render(tiny.tokenizer, rec.prompt_messages, rec.responses[0])
        assert p[len(p) - 1 - row["gate_offset"]] == im_end  # the gate is <|im_end|> of the user turn


class Killed(Exception):
    pass


def test_killed_run_resumes_to_identical_arrays(tiny, tmp_path):
    records = pair_records()
    cache_features(records, tiny, tmp_path / "full", settings=SETTINGS, provenance=PROV)

    def die_after_two(done, total, tok_s):
        if done >= 6:
            raise Killed()
    with pytest.raises(Killed):
        cache_features(records, tiny, tmp_path / "part", settings=SETTINGS, provenance=PROV, progress=die_after_two)
    assert set(scan_shards(tmp_path / "part")) == {0, 1}
    with pytest.raises(RmjaxError, match="different settings"):
        cache_features(records, tiny, tmp_path / "part", settings=FeatureSettings(max_length=64, shard_size=3),
                       provenance=PROV)
    cache_features(records, tiny, tmp_path / "part", settings=SETTINGS, provenance=PROV)
    a, b = FeatureCache(tmp_path / "full"), FeatureCache(tmp_path / "part")
    np.testing.assert_array_equal(a.response(), b.response())
    np.testing.assert_array_equal(a.gate(), b.gate())
    assert list(b.examples["index"]) == list(range(8))  # no duplicates, no loss
    pd.testing.assert_frame_equal(a.examples, b.examples)


def test_ratings_verbosity_and_dropped_examples(tiny, tmp_path):
    records = [Record(f"r{i}", (("user", f"Rate {i}."),), (f"Answer {'long ' * (3 * i)}",), "single", i,
                      ratings=(("helpful", float(i)), ("safe", None if i % 2 else 1.0)))
               for i in range(4)]
    settings = FeatureSettings(max_length=40, over_length="drop", shard_size=2, pack_length=64)
    meta = cache_features(records, tiny, tmp_path / "r", settings=settings, provenance=PROV)
    cache = FeatureCache(tmp_path / "r")
    assert cache.objectives == ("helpful", "safe")
    dropped = [s["index"] for s in meta["skipped"]]
    assert dropped == [2, 3] and list(cache.index) == [0, 1]
    assert np.isnan(cache._read("gate")[2:]).all()  # dropped rows stay NaN in the arrays
    want = np.array([[float(i), np.nan if i % 2 else 1.0] for i in cache.index])
    np.testing.assert_array_equal(cache.ratings(), want)
    assert np.all(np.diff(cache.response_tokens()[:, 0]) > 0)  # longer answers, more tokens


def test_sharded_features_equal_unsharded(model_dir, tiny, tmp_path):
    records = pair_records()[:4]
    cache_features(records, tiny, tmp_path / "one", settings=SETTINGS, provenance=PROV)
    mesh = shd.make_mesh("fsdp")
    assert mesh.devices.size == len(jax.devices()) > 1
    sharded = load_model(str(model_dir), mesh=mesh, strategy="fsdp")
    cache_features(records, sharded, tmp_path / "many", settings=SETTINGS, provenance=PROV, mesh=mesh,
                   strategy="fsdp")
    a, b = FeatureCache(tmp_path / "one"), FeatureCache(tmp_path / "many")
    np.testing.assert_allclose(a.response(), b.response(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(a.gate(), b.gate(), rtol=1e-5, atol=1e-5)


def test_cli_writes_a_cache_with_provenance(model_dir, tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q{i}?", "chosen": f"Yes {i}.", "rejected": "No."}) + "\n"
                            for i in range(3)))
    out = tmp_path / "cache"
    assert main(["features", "--model", str(model_dir), "--data", str(data), "--out", str(out),
                 "--shard-size", "2", "--max-length", "64", "--no-progress"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["counts"]["scored"] == 3 and printed["throughput"]["tokens"] > 0
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["settings"]["model"] == str(model_dir) and meta["settings"]["data_hash"]
    assert meta["versions"]["jax"] and FeatureCache(out).response().shape[:2] == (3, 2)
