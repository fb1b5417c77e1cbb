"""ArmoRM's stages on cached features, on synthetic data with a known answer: planted objectives
recovered by stage 1 (missing ratings masked), a planted verbosity confound removed by the
authors' debiasing search, a known prompt-dependent gating learned by stage 2 (BT accuracy rises;
scores equal a NumPy transcription of the authors' forward), a killed stage 2 resumed to the same
gate, and bad ratings reported with file, line, field and fix."""
import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from rmjax.errors import ConfigError, DataError, RmjaxError
from rmjax.scoring.features import FeatureCache, FeatureWriter
from rmjax.train import armorm


def write_cache(path, response, gate, rows, objectives=()):
    """A feature cache written by the real writer: response [N, R, D], gate [N, D], one row each."""
    n, r, d = response.shape
    settings = {"model": "synthetic", "template": "model", "dtype": "float32", "data_hash": "x", "max_length": 0,
                "width": d, "responses": r, "objectives": list(objectives), "data": str(path)}
    w = FeatureWriter(path, settings, num_examples=n, shard_size=64)
    for k in range(w.num_shards):
        span = w.shard_range(k)
        w.write_shard(k, [dict(rows[i], index=i) for i in span],
                      arrays={"response": response[span.start:span.stop], "gate": gate[span.start:span.stop]})
    w.finalize()
    return FeatureCache(path)


def row(kind="single", n=1, tokens=(10,), ratings=None, subset="", place=""):
    return {"id": place or "x", "place": place, "kind": kind, "subset": subset, "n_responses": n,
            "response_tokens": list(tokens), "ratings": ratings}


def np_spearman(a, b):
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return np.corrcoef(ra, rb)[0, 1]


# ----------------------------------------------------------------------------- stage 1 + debiasing
@pytest.fixture(scope="module")
def confounded(tmp_path_factory):
    """Ratings of 'helpful' = quality + 0.8 * verbosity; 'safe' = another direction, rated on half;
    the response length in tokens follows a feature direction (the verbosity)."""
    rng = np.random.default_rng(0)
    n, d = 600, 16
    x = rng.normal(size=(n, d))
    quality, verb, safe = x[:, 1:] @ rng.normal(size=d - 1), x[:, 0] * 1.5, x @ rng.normal(size=d)  # quality: not x0
    verb_z = (verb - verb.mean()) / verb.std()
    quality_z = (quality - quality.mean()) / quality.std()
    tokens = np.round(np.exp(4.0 + 0.5 * verb_z + 0.01 * rng.normal(size=n))).astype(int)
    helpful = quality_z + 0.8 * verb_z + 0.05 * rng.normal(size=n)
    rows = [row(tokens=(int(tokens[i]),), ratings=[float(helpful[i]), float(safe[i]) if i % 2 else None],
                place=f"ratings.jsonl:{i + 1}") for i in range(n)]
    cache = write_cache(tmp_path_factory.mktemp("c") / "ratings", x[:, None].astype(np.float32),
                        np.zeros((n, d), np.float32), rows, ("helpful", "safe"))
    return cache, {"quality": quality_z, "verb": verb_z, "tokens": tokens, "safe": safe, "x": x}


def test_stage1_recovers_planted_objectives_with_missing_ratings(confounded, tmp_path):
    cache, truth = confounded
    rec = armorm.regression(cache, tmp_path / "s1", verbosity="verbosity")
    assert rec["objectives"] == ["helpful", "safe", "verbosity"]
    assert rec["rated"] == {"helpful": 600, "safe": 300, "verbosity": 600}
    for name, obj in rec["per_objective"].items():
        assert obj["l2"] in armorm.L2_GRID and obj["val_mse"] < 0.05 * obj["val_target_variance"], name
    w, _ = armorm.load_regression(tmp_path / "s1")
    assert np.isfinite(w).all()
    pred = truth["x"] @ w
    assert np.corrcoef(pred[:, 1], truth["safe"])[0, 1] > 0.99  # masked objective: still recovered
    assert np.corrcoef(pred[:, 2], np.log(truth["tokens"]))[0, 1] > 0.99  # the measured verbosity


def test_debiasing_removes_a_planted_verbosity_confound(confounded, tmp_path):
    cache, truth = confounded
    armorm.regression(cache, tmp_path / "s1", verbosity="verbosity")
    rec = armorm.debias(tmp_path / "s1", cache, tmp_path / "debias", verbosity="verbosity", threshold=0.03)
    helpful = rec["per_objective"]["helpful"]
    assert helpful["spearman_before"] > 0.4  # confounded
    assert helpful["penalty"] in (0.75, 0.8) and helpful["spearman_vs_verbosity_reward"] <= 0.03
    assert rec["per_objective"]["verbosity"]["penalty"] == 1.0  # the authors' rule: r_v - r_v = 0
    m = load_file(str(tmp_path / "debias" / armorm.TRANSFORM_FILE))["reward_transform_matrix"]
    np.testing.assert_allclose(m[2], [-helpful["penalty"], -rec["per_objective"]["safe"]["penalty"], 0.0])
    np.testing.assert_allclose(m[:2], np.eye(3)[:2])
    w, _ = armorm.load_regression(tmp_path / "s1")
    adjusted = truth["x"] @ w @ m
    assert abs(np_spearman(adjusted[:, 0], truth["tokens"])) < 0.08  # length no longer drives helpful
    assert np_spearman(adjusted[:, 0], truth["quality"]) > 0.95  # quality does
    assert np_spearman((truth["x"] @ w)[:, 0], truth["tokens"]) > 0.4


def test_penalty_search_is_the_authors_rule():
    rng = np.random.default_rng(1)
    v = rng.normal(size=200)
    rewards = np.stack([0.3 * v + rng.normal(size=200), -v + 0.1 * rng.normal(size=200), 5 * v, v], 1)
    penalty, corr = armorm.verbosity_penalties(rewards, 3, threshold=0.03)
    assert penalty[1] == 0 and corr[1] < -0.9  # already negative: leaves at penalty 0 (signed test)
    assert penalty[2] == 1.0 and penalty[3] == 1.0  # never under the threshold within 0..0.95; itself
    assert 0.1 <= penalty[0] <= 0.5 and corr[0] <= 0.03
    previous = max(p for p in armorm.PENALTY_GRID if p < penalty[0])
    assert np_spearman(rewards[:, 0] - previous * v, v) > 0.03  # and it is the first one that does


def test_bad_ratings_out_of_range_or_without_data(confounded, tmp_path):
    cache, _ = confounded
    with pytest.raises(DataError, match=r"ratings.jsonl:\d+: field 'ratings.helpful' is .* outside its declared "
                                        r"range \[-1, 1\].*fix the rating .* or widen the declared range"):
        armorm.regression(cache, tmp_path / "s1", ranges={"helpful": (-1, 1)})
    with pytest.raises(ConfigError, match="objective 'helpfull'"):
        armorm.regression(cache, tmp_path / "s1", ranges={"helpfull": (0, 1)})
    rows = [row(ratings=[1.0, None], place=f"r.jsonl:{i + 1}") for i in range(20)]
    empty = write_cache(tmp_path / "empty", np.ones((20, 1, 4), np.float32), np.ones((20, 4), np.float32), rows,
                        ("helpful", "safe"))
    with pytest.raises(DataError, match="objective 'safe' has no data: none of the 20 responses is rated"):
        armorm.regression(empty, tmp_path / "s1")


# ----------------------------------------------------------------------------- stage 2
@pytest.fixture(scope="module")
def gated(tmp_path_factory):
    """Pairs whose preference follows objective 0 for prompts of one kind, objective 1 for the other;
    the prompt's kind is a direction of its gate feature. Stage 1 maps features 0 and 1 to the two
    objectives."""
    rng = np.random.default_rng(2)
    n, d = 1200, 8
    kind = rng.integers(0, 2, n)
    gate = rng.normal(size=(n, d)) * 0.3
    gate[:, 2] += np.where(kind == 0, 2.0, -2.0)
    a, b = rng.normal(size=(n, d)), rng.normal(size=(n, d))
    first_wins = np.where(kind == 0, a[:, 0] > b[:, 0], a[:, 1] > b[:, 1])
    chosen, rejected = np.where(first_wins[:, None], a, b), np.where(first_wins[:, None], b, a)
    rows = [row("pair", 2, (10, 10), subset=f"kind{kind[i]}") for i in range(n)]
    root = tmp_path_factory.mktemp("g")
    cache = write_cache(root / "pairs", np.stack([chosen, rejected], 1).astype(np.float32), gate.astype(np.float32),
                        rows)
    (root / "s1").mkdir()
    w = np.zeros((d, 2), np.float32)
    w[0, 0] = w[1, 1] = 1.0
    armorm._save(root / "s1" / armorm.REGRESSION_FILE, {"regression_layer.weight": w.T})
    (root / "s1" / "stage1.json").write_text(json.dumps({"objectives": ["a", "b"]}))
    return cache, root


SMALL = armorm.GateSettings(hidden=32, layers=2, temperature=1.0, dropout=0.1, lr=3e-3, steps=120, batch_size=128,
                            save_every=40, log_every=20)


def np_authors_forward(tensors, temperature, gate_x, rewards, transform):
    """The released model's forward, transcribed: ReLU MLP (torch [out, in] weights), softmax over the
    objectives with a temperature, times logit_scale; score = sum(gating * (rewards @ transform))."""
    x = gate_x.astype(np.float64)
    n_layers = len([k for k in tensors if k.startswith("gating.layers.") and k.endswith(".weight")])
    for i in range(n_layers):
        x = x @ tensors[f"gating.layers.{i}.weight"].T + tensors[f"gating.layers.{i}.bias"]
        if i < n_layers - 1:
            x = np.maximum(x, 0)
    z = x / temperature
    g = np.exp(z - z.max(1, keepdims=True))
    g = g / g.sum(1, keepdims=True) * tensors["gating.logit_scale"][0]
    return np.sum(g * (rewards @ transform), axis=1)


def test_gate_learns_a_known_gating_and_matches_the_authors_forward(gated):
    cache, root = gated
    rec = armorm.gate(root / "s1", None, cache, root / "s2", SMALL)
    head, settings = armorm.load_stages(root / "s1", None, root / "s2")
    uniform = dict(head, gating=dict(head["gating"], **{f"layers_{SMALL.layers}": {
        "kernel": 0 * head["gating"][f"layers_{SMALL.layers}"]["kernel"],
        "bias": 0 * head["gating"][f"layers_{SMALL.layers}"]["bias"]}}))
    before = armorm.evaluate(uniform, settings, cache)["accuracy"]
    after = armorm.evaluate(head, settings, cache)
    assert 0.6 < before < 0.85  # the mean of both objectives is right on most pairs only
    assert rec["val_accuracy"] > 0.9 and after["accuracy"] > before + 0.1
    assert set(after["subsets"]) == {"kind0", "kind1"} and after["ci95"][0] < after["accuracy"] < after["ci95"][1]
    assert rec["history"][-1]["loss"] < rec["history"][0]["loss"]
    weights = after["gating_weights"]  # prompts of kind 0 call for objective a, of kind 1 for b
    assert weights["kind0"]["a"] > 0.8 and weights["kind1"]["b"] > 0.8
    # the saved gate (torch layout) through a NumPy transcription of the authors' forward
    tensors = load_file(str(root / "s2" / armorm.GATE_FILE))
    w = np.asarray(head["regression_layer"]["kernel"])
    feats, gate_x = cache.response(), cache.gate()
    for j in range(2):
        want = np_authors_forward(tensors, SMALL.temperature, gate_x, feats[:, j] @ w, np.eye(2))
        np.testing.assert_allclose(armorm.cache_scores(head, settings, cache)[:, j], want, rtol=1e-4, atol=1e-5)


class Killed(Exception):
    pass


def test_killed_gate_training_resumes_to_the_same_gate(gated, tmp_path):
    cache, root = gated
    settings = armorm.GateSettings(**{**SMALL.__dict__, "steps": 60, "save_every": 20, "log_every": 10})
    armorm.gate(root / "s1", None, cache, tmp_path / "full", settings)

    def die(message):
        if "step 30/" in message:
            raise Killed()
    with pytest.raises(Killed):
        armorm.gate(root / "s1", None, cache, tmp_path / "part", settings, log=die)
    seen = []
    armorm.gate(root / "s1", None, cache, tmp_path / "part", settings, log=seen.append)
    assert seen[0] == "gate: resuming at step 20"
    a, b = (load_file(str(tmp_path / d / armorm.GATE_FILE)) for d in ("full", "part"))
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-6, atol=1e-7, err_msg=name)
    other = armorm.GateSettings(**{**settings.__dict__, "lr": 1e-2})
    with pytest.raises(RmjaxError, match="other inputs or settings"):
        armorm.gate(root / "s1", None, cache, tmp_path / "part", other)


@pytest.mark.parametrize("pair_loss", ["ridge", "bt"])
def test_pairwise_objectives_from_pairs(gated, tmp_path, pair_loss):
    cache, _ = gated  # kind0 pairs prefer a higher feature 0, kind1 pairs a higher feature 1
    rec = armorm.regression(cache, tmp_path / "s1", pair_objectives={"kind0": "a", "kind1": "b"}, pair_loss=pair_loss)
    w, _ = armorm.load_regression(tmp_path / "s1")
    for k, feature in ((0, 0), (1, 1)):
        assert w[feature, k] > 0 and abs(w[feature, k]) / np.linalg.norm(w[:, k]) > 0.8
    assert all(o["fit"] == pair_loss for o in rec["per_objective"].values())
    if pair_loss == "bt":
        assert rec["per_objective"]["a"]["val_accuracy"] > 0.8
    with pytest.raises(ConfigError, match=r"pair subsets \['kind1'\] have no objective"):
        armorm.regression(cache, tmp_path / "s1", pair_objectives={"kind0": "a"}, pair_loss=pair_loss)
