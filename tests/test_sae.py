"""Sparse autoencoders and the linear IRM (rmjax.sae): planted directions recovered (ReLU + L1 and
top-k, tied and untied), FVU falls, top-k keeps k features, dead features revived by resampling, the
step compiled once and deterministic; dictionary matching on a planted case; the linear IRM on a
planted reward; Kendall tau and pairwise agreement by hand and against scipy; the activation cache
equals a direct forward at the chosen layer, resumes after a kill, and streams every row once."""
import numpy as np
import pytest
from hf_models import save_tiny_checkpoint
from scipy.stats import kendalltau

import jax
import jax.numpy as jnp

from rmjax.data.chat import render
from rmjax.data.records import Record
from rmjax.errors import ConfigError, DataError, RmjaxError
from rmjax.models.loading import load_model
from rmjax.models.transformer import forward
from rmjax.sae import model
from rmjax.sae.activations import ActivationCache, ActivationSettings, cache_activations, text_records
from rmjax.metrics import kendall_tau
from rmjax.sae.irm import fit_irm, pairwise_agreement, response_features
from rmjax.sae.matching import match_dictionaries, top_activations
from rmjax.sae.train import SAEConfig, activation_scale, firing_counts, load_sae, save_sae, step_fn, train_sae


def planted(n=20000, d=24, g=32, p=0.08, seed=0, noise=0.01):
    """x = sparse nonnegative codes @ a planted unit dictionary [g, d] + noise."""
    rng = np.random.default_rng(seed)
    directions = rng.normal(size=(g, d))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    codes = (rng.random((n, g)) < p) * rng.uniform(0.5, 2.0, (n, g))
    return (codes @ directions + noise * rng.normal(size=(n, d))).astype(np.float32), directions


@pytest.fixture(scope="module")
def data():
    return planted()


LOSS = jax.jit(model.loss, static_argnums=(2, 3, 4))


def best_cosines(params, directions):
    w = np.asarray(model.decoder(params))
    w = w / np.linalg.norm(w, axis=1, keepdims=True)
    return (directions @ w.T).max(axis=1)


# ---------------------------------------------------------------- the SAE

@pytest.mark.parametrize("kind,tied,l1", [("relu", False, 0.5), ("relu", True, 1.0), ("topk", False, 0.0),
                                          ("topk", True, 0.0)])
def test_sae_recovers_planted_directions(data, kind, tied, l1):
    x, directions = data
    config = SAEConfig(d=24, num_features=48, kind=kind, k=3 if kind == "topk" else None, l1_coef=l1, tied=tied,
                       lr=3e-3, steps=1500, batch_size=128, log_every=100, resample_every=500)
    params, history = train_sae(x, config)
    assert (best_cosines(params, directions) > 0.9).mean() >= 0.9
    fvu = [h["fvu"] for h in history["metrics"]]
    assert [h["step"] for h in history["metrics"]] == list(range(100, 1501, 100))
    assert fvu[-1] < 0.7 * fvu[0] and fvu[-1] < 0.3
    if not tied:
        np.testing.assert_allclose(np.linalg.norm(params["W_dec"], axis=1), 1.0, rtol=1e-5)
    else:
        assert "W_dec" not in params
    codes = np.asarray(model.jitted("encode", kind, config.k)(params, x[:2000]))
    active = (codes > 0).sum(axis=1)
    if kind == "topk":
        assert active.max() <= 3 and active.mean() > 2.9
        assert abs(history["metrics"][-1]["l0"] - active.mean()) < 0.1
    else:
        assert active.mean() < 6  # sparse: about the planted 2.6 active directions per row


def test_topk_keeps_exactly_k_features():
    params = model.init(jax.random.key(0), 8, 20)
    params["b_enc"] = params["b_enc"] + 100.0  # every pre-activation positive
    x = jax.random.normal(jax.random.key(1), (50, 8))
    codes = np.asarray(model.jitted("encode", "topk", 5)(params, x))
    assert ((codes > 0).sum(axis=1) == 5).all()
    pre = np.asarray(jax.jit(model.pre_activations)(params, x))
    kept = np.sort(np.argsort(-pre, axis=1)[:, :5], axis=1)
    np.testing.assert_array_equal(np.sort(np.nonzero(codes)[1].reshape(50, 5), axis=1), kept)
    rows = np.arange(50)[:, None]
    np.testing.assert_allclose(codes[rows, kept], pre[rows, kept], rtol=1e-6)
    _, metrics = LOSS(params, x, "topk", 0.0, 5)
    assert float(metrics["l0"]) == 5.0


def test_loss_metrics_and_decoder_constraint():
    key = jax.random.key(2)
    params = model.init(key, 6, 10)
    x = jax.random.normal(jax.random.key(3), (32, 6)) * 2.0
    total, m = LOSS(params, x, "relu", 0.1)
    p, xn = jax.device_get(params), np.asarray(x)
    codes = np.maximum((xn - p["b_dec"]) @ p["W_enc"] + p["b_enc"], 0.0)
    err = (((codes @ p["W_dec"] + p["b_dec"]) - xn) ** 2).sum(axis=1)
    np.testing.assert_allclose(float(m["mse"]), err.mean() / 6, rtol=1e-5)
    np.testing.assert_allclose(float(m["fvu"]), err.sum() / ((xn - xn.mean(0)) ** 2).sum(), rtol=1e-5)
    np.testing.assert_allclose(float(m["l0"]), (codes > 0).sum(1).mean(), rtol=1e-6)
    np.testing.assert_allclose(float(total), err.mean() + 0.1 * float(m["l1"]), rtol=1e-5)
    # tied: the L1 is weighted by the decoder row norms, so shrinking codes by growing rows does not pay
    tied = {k: v for k, v in params.items() if k != "W_dec"}
    grown = {**tied, "W_enc": tied["W_enc"] * 3.0}
    _, a = LOSS(tied, x, "relu", 0.1)
    _, b = LOSS(grown, x, "relu", 0.1)
    np.testing.assert_allclose(float(b["l1"]), 9.0 * float(a["l1"]), rtol=1e-5)  # codes x3, norms x3
    grads = jax.jit(jax.grad(lambda p: model.loss(p, x, "relu", 0.1)[0]))(params)
    projected = jax.jit(model.project_decoder_grads)(params, grads)
    np.testing.assert_allclose(np.sum(projected["W_dec"] * params["W_dec"], axis=1), 0.0, atol=1e-5)


def test_step_compiles_once_training_is_deterministic_and_saves(data, tmp_path):
    x, _ = data
    config = SAEConfig(d=24, num_features=16, l1_coef=0.3, steps=60, batch_size=64, log_every=20,
                       resample_every=25, seed=7)
    a, history = train_sae(x, config)
    b, _ = train_sae(iter(np.array_split(x[:5000], 37)), config)  # a stream of odd-sized chunks
    c, again = train_sae(x, config)
    assert step_fn(config.kind, config.k, config.l1_coef, config.lr)._cache_size() == 1
    for name in a:
        np.testing.assert_array_equal(a[name], c[name])
    assert history == again and len(history["metrics"]) == 3
    assert not np.allclose(a["W_enc"], b["W_enc"])  # other rows, other SAE
    path = save_sae(tmp_path / "sae.npz", a, config)
    loaded, loaded_config = load_sae(path)
    assert loaded_config == config and set(loaded) == set(a)
    np.testing.assert_array_equal(loaded["W_dec"], a["W_dec"])
    with pytest.raises(DataError, match="stream ended after 3 of SAEConfig.steps=60"):
        train_sae(iter([x[:128], x[128:200]]), config)


def test_dead_features_are_resampled(data):
    x, _ = data
    config = SAEConfig(d=24, num_features=32, l1_coef=0.3, lr=3e-3, steps=300, batch_size=128, log_every=100,
                       resample_every=100)
    start = model.init(jax.random.key(0), 24, 32)
    start["b_enc"] = start["b_enc"].at[:8].set(-1e3)  # these eight can never fire
    kept, history = train_sae(x, SAEConfig(**{**config.__dict__, "resample_every": 0}), init_params=start)
    assert (firing_counts(kept, x[:4000])[:8] == 0).all() and history["resampled"] == []
    assert history["metrics"][0]["dead_fraction"] >= 8 / 32
    revived, history = train_sae(x, config, init_params=start)
    assert history["resampled"][0]["step"] == 100 and history["resampled"][0]["features"] >= 8
    assert (firing_counts(revived, x[:4000])[:8] > 0).all()
    assert history["metrics"][-1]["dead_fraction"] < 0.25
    assert step_fn(config.kind, config.k, config.l1_coef, config.lr)._cache_size() == 1  # resampling recompiles nothing


def test_config_and_width_errors(data):
    x, _ = data
    with pytest.raises(ConfigError, match="SAEConfig.num_features"):
        SAEConfig(d=24, num_features=0)
    with pytest.raises(ConfigError, match="topk.*needs k"):
        SAEConfig(d=24, num_features=8, kind="topk")
    with pytest.raises(ConfigError, match="resample_every"):
        SAEConfig(d=24, num_features=8, resample_every=-1)
    params = model.init(jax.random.key(0), 24, 8)
    with pytest.raises(DataError, match=r"do not fit this SAE: its width .* is 24"):
        model.encode(params, jnp.zeros((4, 32)))
    with pytest.raises(DataError, match=r"SAEConfig.d = 16"):
        train_sae(x, SAEConfig(d=16, num_features=8, steps=2))
    with pytest.raises(DataError, match=r"batch 1 has shape \(10, 12\).*SAEConfig.d = 24"):
        train_sae(iter([x[:50], x[:10, :12]]), SAEConfig(d=24, num_features=8, steps=5, batch_size=100))
    with pytest.raises(ConfigError, match="init_params are an SAE of width 24 with 8 features"):
        train_sae(x, SAEConfig(d=24, num_features=16, steps=2), init_params=params)
    s = activation_scale(x[:1000] * 50.0)
    assert np.mean(np.sum((x[:1000] * 50.0 * s) ** 2, axis=1)) == pytest.approx(24.0, rel=1e-5)


# ---------------------------------------------------------------- matching

def test_matching_classifies_a_planted_case():
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(32, 32)))
    e = q.T  # orthonormal directions
    base = np.stack([e[0], e[1], e[2], e[3], e[4], e[5], e[6], e[7]])
    turned = lambda a, b, c: c * a + np.sqrt(1 - c * c) * b  # noqa: E731
    tuned = np.stack([e[0] + 0.01 * e[20], e[1], e[2], e[3],  # shared
                      turned(e[4], e[10], 0.7), turned(e[5], e[11], 0.75),  # moved
                      e[12], e[13], e[14]])  # new; e[6] and e[7] vanish
    table = match_dictionaries({"W_enc": base.T * 2.0, "b_enc": 0, "b_dec": 0}, tuned, shared=0.9, lo=0.5)
    status = {(r.dictionary, r.feature): r.status for r in table.itertuples()}
    assert [status["base", i] for i in range(8)] == ["shared"] * 4 + ["moved"] * 2 + ["vanished"] * 2
    assert [status["tuned", i] for i in range(9)] == ["shared"] * 4 + ["moved"] * 2 + ["new"] * 3
    base_rows = table[table.dictionary == "base"].set_index("feature")
    assert list(base_rows.best_match[:6]) == [0, 1, 2, 3, 4, 5]
    np.testing.assert_allclose(base_rows.best_cos[4], 0.7, atol=1e-9)
    assert list(base_rows.assigned[:6]) == [0, 1, 2, 3, 4, 5]  # one-to-one: 8 base x 9 tuned
    tuned_rows = table[table.dictionary == "tuned"].set_index("feature")
    assert (tuned_rows.assigned == -1).sum() == 1 and np.isnan(tuned_rows.assigned_cos).sum() == 1
    by_assignment = match_dictionaries(base, tuned, by="assignment")
    assert (by_assignment.status.to_numpy() == table.status.to_numpy()).all()
    with pytest.raises(DataError, match="widths 32 \\(base\\) and 16 \\(tuned\\)"):
        match_dictionaries(base, tuned[:, :16])
    with pytest.raises(ConfigError, match="lo <= shared"):
        match_dictionaries(base, tuned, shared=0.4, lo=0.5)


def test_top_activations():
    codes = np.zeros((6, 3))
    codes[:, 1] = [0.0, 2.0, 0.5, 3.0, 0.0, 1.0]
    top = top_activations(codes, token_ids=np.arange(10, 16), example_index=np.array([0, 0, 1, 1, 2, 2]),
                          feature=1, k=5, positions=np.array([0, 1, 0, 1, 0, 1]), decode=lambda t: f"<{t}>")
    assert list(top.row) == [3, 1, 5, 2] and list(top.example) == [1, 0, 2, 1]
    assert list(top.token) == [13, 11, 15, 12] and list(top.text) == ["<13>", "<11>", "<15>", "<12>"]
    assert list(top.activation) == [3.0, 2.0, 1.0, 0.5] and list(top.position) == [1, 1, 1, 0]
    with pytest.raises(ConfigError, match="feature must be in 0..2"):
        top_activations(codes, np.arange(6), np.arange(6), feature=3)


# ---------------------------------------------------------------- rank statistics and the IRM

def test_kendall_tau_and_pairwise_agreement():
    assert kendall_tau([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)  # 5 concordant, 1 discordant
    assert pairwise_agreement([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(5 / 6)
    # a ties pair (0, 1): 0.5; b ties pair (2, 3): left out; the other four agree
    assert pairwise_agreement([1, 1, 2, 3], [1, 2, 3, 3]) == pytest.approx(4.5 / 5)
    assert kendall_tau([1, 1, 2, 3], [1, 2, 3, 3]) == pytest.approx(4 / 5)  # 4 / sqrt((6 - 1) (6 - 1))
    assert np.isnan(kendall_tau([1, 1, 1], [1, 2, 3])) and np.isnan(pairwise_agreement([1, 2, 3], [5, 5, 5]))
    rng = np.random.default_rng(0)
    for n in (7, 300, 1100):  # with ties, across row blocks
        a, b = rng.integers(0, 6, n), rng.integers(0, 6, n) + 0.3 * rng.integers(0, 2, n)
        assert kendall_tau(a, b) == pytest.approx(kendalltau(a, b).statistic, abs=1e-12)
        x, y = rng.normal(size=n), rng.normal(size=n)
        assert kendall_tau(x, y) == pytest.approx(kendalltau(x, y).statistic, abs=1e-12)
        assert pairwise_agreement(x, y) == pytest.approx((1 + kendall_tau(x, y)) / 2, abs=1e-12)  # no ties
    with pytest.raises(DataError, match="same length"):
        kendall_tau([1, 2], [1, 2, 3])


def test_linear_irm_recovers_a_planted_reward():
    rng = np.random.default_rng(1)
    n, f = 1500, 40
    features = (rng.random((n, f)) < 0.5) * rng.exponential(1.0, (n, f))
    features[:, 30] = 0.0  # a dead feature is left out
    reward = 3.0 * features[:, 0] - 2.0 * features[:, 5] + 1.5 * features[:, 9] + 0.05 * rng.normal(size=n)
    fit = fit_irm(features, reward, names=[f"f{i}" for i in range(f)], top=5)
    assert fit.kendall_tau > 0.9 and fit.pairwise_agreement > 0.9 and fit.r2 > 0.95
    assert set(fit.top.feature[:3]) == {0, 5, 9} and list(fit.top.name[:3]) == [f"f{i}" for i in fit.top.feature[:3]]
    np.testing.assert_allclose(fit.weights[[0, 5, 9]], [3.0, -2.0, 1.5], atol=0.05)
    assert not fit.used[30] and fit.weights[30] == 0
    assert len(fit.test_index) == 300 and not set(fit.test_index) & set(fit.train_index)
    np.testing.assert_allclose(fit.predict(features[fit.test_index]), fit.test_prediction)
    assert fit.summary()["n_train"] == 1200
    with pytest.raises(DataError, match="same N"):
        fit_irm(features, reward[:-1])


# ---------------------------------------------------------------- the activation cache

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("sae_model")
    save_tiny_checkpoint(d)
    return load_model(str(d))


def records():
    out = text_records([(f"Question {i} about {'rain ' * i}?", f"Because {'yes ' * (i + 1)}.") for i in range(5)])
    out.append(Record("pair", (("user", "Hello."), ("assistant", "Hi!"), ("user", "Which?")), ("This one.", "No"),
                      "pair", 5))
    return out


SETTINGS = ActivationSettings(max_length=96, shard_size=2, pack_length=128, batch_tokens=256)
PROV = {"model": "tiny", "data_hash": "x"}


def direct_hidden(tiny, recs):
    """all_hidden [L+1, D] of each (record, response) full sequence, from one padded, jitted batch."""
    seqs = {}
    for rec in recs:
        for j, text in enumerate(rec.responses):
            p, r = render(tiny.tokenizer, rec.prompt_messages, text)
            seqs[rec.index, j] = (p + r, len(p))
    ids = np.zeros((len(seqs), 128), np.int32)
    mask = np.zeros_like(ids)
    for i, (s, _) in enumerate(seqs.values()):
        ids[i, :len(s)], mask[i, :len(s)] = s, 1
    h = np.asarray(jax.jit(lambda a, m: forward(tiny.params, tiny.config, a, m, return_all_hidden=True).all_hidden)(
        ids, mask))
    return {key: (h[:, i, :len(s)], np.asarray(s), p) for i, (key, (s, p)) in enumerate(seqs.items())}


def test_activation_cache_equals_a_direct_forward(tiny, tmp_path):
    recs = records()
    want = direct_hidden(tiny, recs)
    for layer, tokens in ((2, "all"), (0, "response")):
        meta = cache_activations(recs, tiny, tmp_path / f"c{layer}", layer=layer,
                                 settings=ActivationSettings(**{**SETTINGS.__dict__, "tokens": tokens}),
                                 provenance=PROV)
        cache = ActivationCache(tmp_path / f"c{layer}")
        x, pos = cache.array(), cache.positions()
        assert cache.layer == layer and meta["rows"] == len(x) == cache.num_rows and x.shape[1] == 64
        expected = 0
        for rec in recs:
            for j in ([-1] if tokens == "all" else []) + list(range(len(rec.responses))):
                hidden, ids, p = want[rec.index, max(j, 0)]
                span = np.arange(p) if j == -1 else np.arange(p, len(ids))
                sel = ((pos.example == rec.index) & (pos.response == j)).to_numpy()
                assert list(pos.position[sel]) == list(span)
                np.testing.assert_array_equal(pos.token[sel], ids[span])
                np.testing.assert_allclose(x[sel], hidden[layer, span], rtol=1e-4, atol=1e-4)
                expected += len(span)
        assert expected == len(x)  # nothing else: no padding rows
        assert list(cache.examples["rows"].groupby(cache.examples["index"] // 2).sum()) == meta["shard_rows"]
    assert not np.allclose(want[0, 0][0][0], want[0, 0][0][2])  # layers differ: the check is specific


class Killed(Exception):
    pass


def test_killed_cache_resumes_and_streams_every_row_once(tiny, tmp_path):
    recs = records()
    cache_activations(recs, tiny, tmp_path / "full", layer=-2, settings=SETTINGS, provenance=PROV)

    def die_after_one_shard(done, total, tokens_per_s):
        raise Killed()
    with pytest.raises(Killed):
        cache_activations(recs, tiny, tmp_path / "part", layer=-2, settings=SETTINGS, provenance=PROV,
                          progress=die_after_one_shard)
    with pytest.raises(DataError, match="not complete"):
        ActivationCache(tmp_path / "part")
    with pytest.raises(RmjaxError, match="different settings .*layer"):
        cache_activations(recs, tiny, tmp_path / "part", layer=1, settings=SETTINGS, provenance=PROV)
    cache_activations(recs, tiny, tmp_path / "part", layer=2, settings=SETTINGS, provenance=PROV)
    a, b = ActivationCache(tmp_path / "full"), ActivationCache(tmp_path / "part")
    np.testing.assert_array_equal(a.array(), b.array())
    np.testing.assert_array_equal(a.positions().to_numpy(), b.positions().to_numpy())
    assert b.layer == 2 and list(b.examples["index"]) == list(range(6))

    x = b.array()
    seen = [(batch, rows) for batch, rows in b.batches(16, seed=3, buffer_shards=2, with_rows=True)]
    rows = np.concatenate([r for _, r in seen])
    np.testing.assert_array_equal(np.sort(rows), np.arange(b.num_rows))  # every row exactly once
    np.testing.assert_array_equal(np.concatenate([v for v, _ in seen]), x[rows])
    assert all(len(v) == 16 for v, _ in seen[:-1]) and not (rows == np.arange(b.num_rows)).all()  # shuffled
    again = np.concatenate([r for _, r in b.batches(16, seed=3, buffer_shards=2, with_rows=True)])
    np.testing.assert_array_equal(rows, again)  # seeded
    two = np.concatenate([r for _, r in b.batches(16, seed=3, epochs=2, with_rows=True)])
    assert (np.bincount(two) == 2).all()

    # streamed into the trainer and pooled per response; an SAE of another width is refused
    params, history = train_sae(b.batches(32, epochs=None), SAEConfig(d=64, num_features=32, steps=20,
                                                                       batch_size=32, log_every=10))
    keys, feats = response_features(b, params, pooling="mean", batch_size=8)  # groups cross chunks
    _, peak = response_features(b, params, pooling="max", batch_size=8)
    assert len(keys) == 7 and feats.shape == (7, 32)
    pos, codes = b.positions(), np.asarray(model.jitted("encode")(params, x))
    for i, (e, j) in enumerate(keys.itertuples(index=False)):
        sel = ((pos.example == e) & (pos.response == j)).to_numpy()
        np.testing.assert_allclose(feats[i], codes[sel].mean(axis=0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(peak[i], codes[sel].max(axis=0), rtol=1e-5, atol=1e-6)
    with pytest.raises(DataError, match="SAE has width 24 but the activation cache .* width 64"):
        response_features(b, model.init(jax.random.key(0), 24, 8))


def test_layer_out_of_range_is_a_clear_error(tiny, tmp_path):
    for layer in (4, -5):
        with pytest.raises(ConfigError, match=rf"layer {layer} is outside the 4 hidden states .*0 = the embeddings"):
            cache_activations(records(), tiny, tmp_path / "bad", layer=layer, settings=SETTINGS, provenance=PROV)
    assert not (tmp_path / "bad").exists()
