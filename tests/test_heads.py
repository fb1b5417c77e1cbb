"""Pooling and reward heads: right token pooled for any padding, NumPy references, sharding, jit."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
import scipy.special
from flax import linen as nn
from jax.test_util import check_grads

from rmjax import pooling
from rmjax import sharding as shd
from rmjax.errors import ConfigError, DataError
from rmjax.regression import L2_GRID, logistic_select, pairwise_logistic_fit, ridge_fit, ridge_predict, ridge_select
from rmjax.heads import (
    ArmoRMGatingHead,
    ArmoRMHead,
    GenerativeJudgeHead,
    LinearProbe,
    MultiObjectiveHead,
    ScalarHead,
    debias_rewards,
    judge_preference,
    linear_params_from_torch,
    probe_params,
    select_layer,
    verbosity_transform_matrix,
)


def x64():
    """float64 context on every supported jax version."""
    if hasattr(jax, "enable_x64"):
        return jax.enable_x64(True)
    from jax.experimental import enable_x64  # older releases
    return enable_x64()

B, T, D = 8, 6, 16
LENGTHS = [6, 1, 3, 5, 2, 6, 4, 3]


def distinct_hidden(batch=B, length=T, width=D, layers=None):
    """h[b, t, d] = 100 b + t + d / 100: every (row, position) has its own values."""
    b = np.arange(batch)[:, None, None]
    t = np.arange(length)[None, :, None]
    d = np.arange(width)[None, None, :]
    h = (100.0 * b + t + d / 100.0).astype(np.float32)
    if layers is not None:  # layer l adds 10000 l
        h = h[None] + 10000.0 * np.arange(layers)[:, None, None, None].astype(np.float32)
    return h


def make_mask(lengths, length, side):
    mask = np.zeros((len(lengths), length), np.int32)
    for i, n in enumerate(lengths):
        if side == "right":
            mask[i, :n] = 1
        else:
            mask[i, length - n:] = 1
    return mask


def np_last_index(mask):
    return np.array([np.nonzero(row)[0].max() if row.any() else 0 for row in mask])


def close(a, b, tol=1e-5):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=tol, atol=tol)


# ----------------------------------------------------------------------------- pooling
@pytest.mark.parametrize("side", ["right", "left"])
def test_last_token_pooling_picks_the_last_real_token(side):
    h, mask = distinct_hidden(), make_mask(LENGTHS, T, side)
    expected = np.array([n - 1 for n in LENGTHS]) if side == "right" else np.full(B, T - 1)
    np.testing.assert_array_equal(pooling.last_token_index(mask), expected)
    close(pooling.gather_last(h, mask), h[np.arange(B), expected], tol=0)


def test_masks_with_holes_and_empty_rows():
    mask = np.array([[1, 0, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0], [0, 1, 1, 0, 1, 0], [1, 1, 1, 1, 1, 1]])
    h = distinct_hidden(batch=4)
    np.testing.assert_array_equal(pooling.last_token_index(mask), [2, 0, 4, 5])
    np.testing.assert_array_equal(pooling.has_token(mask), [True, False, True, True])
    pooled = np.asarray(pooling.gather_last(h, mask))
    close(pooled[[0, 2, 3]], h[[0, 2, 3], [2, 4, 5]], tol=0)
    assert np.all(pooled[1] == 0)
    mean = np.asarray(pooling.masked_mean(h, mask))
    for b in (0, 2, 3):
        close(mean[b], h[b][mask[b] == 1].mean(0))
    assert np.all(mean[1] == 0)
    assert np.asarray(jax.jit(pooling.last_token_index)(mask)).tolist() == [2, 0, 4, 5]


def test_packed_segments():
    seg = np.array([[1, 1, 2, 2, 2, 0], [0, 1, 1, 1, 3, 3]])
    h = distinct_hidden(batch=2)
    index, present = pooling.segment_last_index(seg, 3)
    np.testing.assert_array_equal(index, [[1, 4, 0], [3, 0, 5]])
    np.testing.assert_array_equal(present, [[True, True, False], [True, False, True]])
    feats, _ = pooling.gather_segment_last(h, seg, 3)
    close(feats[0, :2], h[0, [1, 4]], tol=0)
    close(feats[1, [0, 2]], h[1, [3, 5]], tol=0)
    assert np.all(np.asarray(feats)[0, 2] == 0) and np.all(np.asarray(feats)[1, 1] == 0)


def test_pool_errors():
    h = jnp.zeros((2, 3, 4))
    with pytest.raises(DataError, match="attention_mask"):
        pooling.pool(h, None)
    with pytest.raises(DataError, match="attention_mask"):
        pooling.gather_last(h, jnp.ones((2, 4)))
    with pytest.raises(ConfigError, match="pooling"):
        pooling.pool(h, jnp.ones((2, 3)), "max")


# ----------------------------------------------------------------------------- scalar heads
def init_unboxed(module, *args):
    return nn.unbox(jax.jit(module.init)(jax.random.key(0), *args))


@pytest.mark.parametrize("side", ["right", "left"])
def test_scalar_head_scores_the_last_real_token(side):
    h, mask = distinct_hidden(), make_mask(LENGTHS, T, side)
    last = h[np.arange(B), np_last_index(mask)].astype(np.float64)
    variables = init_unboxed(ScalarHead(), h, mask)
    assert list(variables["params"]) == ["score"] and list(variables["params"]["score"]) == ["kernel"]
    kernel = np.asarray(variables["params"]["score"]["kernel"], np.float64)
    assert kernel.shape == (D, 1)
    reward = ScalarHead().apply(variables, h, mask)
    assert reward.shape == (B,) and reward.dtype == jnp.float32
    close(reward, last @ kernel[:, 0], tol=1e-4)

    # an HF score.weight [1, D] plus a bias; every position would give a different reward
    rng = np.random.default_rng(0)
    weight, bias = rng.normal(size=(1, D)), rng.normal(size=(1,))
    params = {"params": {"score": linear_params_from_torch(weight, bias)}}
    close(ScalarHead(use_bias=True).apply(params, h, mask), last @ weight[0] + bias[0], tol=1e-4)
    close(ScalarHead(use_bias=True).apply(params, h[np.arange(B), np_last_index(mask)]),
          last @ weight[0] + bias[0], tol=1e-4)


def test_scalar_head_mean_pooling_and_bf16_input():
    h, mask = distinct_hidden(), make_mask(LENGTHS, T, "left")
    variables = init_unboxed(ScalarHead(pooling="mean"), h, mask)
    kernel = np.asarray(variables["params"]["score"]["kernel"], np.float64)[:, 0]
    mean = np.stack([h[b][mask[b] == 1].mean(0) for b in range(B)])
    close(ScalarHead(pooling="mean").apply(variables, h, mask), mean @ kernel, tol=1e-4)
    hb = jnp.asarray(h / 100, jnp.bfloat16)
    out = ScalarHead().apply(variables, hb, mask)
    assert out.dtype == jnp.float32
    ref = np.asarray(hb, np.float64)[np.arange(B), np_last_index(mask)] @ kernel
    close(out, ref, tol=1e-4)


def test_multi_objective_head():
    h, mask = distinct_hidden(), make_mask(LENGTHS, T, "right")
    head = MultiObjectiveHead(num_objectives=5)
    variables = init_unboxed(head, h, mask)
    kernel = np.asarray(variables["params"]["regression_layer"]["kernel"], np.float64)
    assert kernel.shape == (D, 5) and "bias" not in variables["params"]["regression_layer"]
    out = head.apply(variables, h, mask)
    assert out.shape == (B, 5)
    close(out, h[np.arange(B), np_last_index(mask)] @ kernel, tol=1e-4)


# ----------------------------------------------------------------------------- ArmoRM
def np_gelu(x):
    return 0.5 * x * (1 + scipy.special.erf(x / np.sqrt(2)))


def np_armorm(params, prompt, rewards, n_layers, act, temperature, v=None, lam=None, fixed_scale=1.0):
    g = {k: (jax.tree.map(lambda a: np.asarray(a, np.float64), val)) for k, val in params.items()}
    x = prompt.astype(np.float64)
    for i in range(n_layers):
        x = x @ g[f"layers_{i}"]["kernel"] + g[f"layers_{i}"]["bias"]
        x = np.maximum(x, 0) if act == "relu" else np_gelu(x)
    logits = (x @ g[f"layers_{n_layers}"]["kernel"] + g[f"layers_{n_layers}"]["bias"]) / temperature
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    adjusted = rewards if v is None else rewards - np.asarray(lam) * rewards[:, v:v + 1]
    scale = g["logit_scale"][0] if "logit_scale" in g else fixed_scale
    return scale * (weights * adjusted).sum(-1), weights, adjusted


@pytest.mark.parametrize("act,n_layers,learn_scale", [("relu", 2, True), ("gelu", 1, True), ("relu", 0, False)])
def test_armorm_gate_matches_numpy(act, n_layers, learn_scale):
    rng = np.random.default_rng(1)
    prompt, rewards = rng.normal(size=(B, D)), rng.normal(size=(B, 4))
    lam = (0.5, 0.0, 1.0, -0.2)
    gate = ArmoRMGatingHead(4, hidden_dim=12, num_hidden_layers=n_layers, activation=act, temperature=0.7,
                            learn_scale=learn_scale, scale=2.0, verbosity_index=2, verbosity_coefficients=lam,
                            kernel_init=nn.initializers.normal(1.0))
    variables = init_unboxed(gate, prompt, rewards)
    assert ("logit_scale" in variables["params"]) == learn_scale
    if learn_scale:
        close(variables["params"]["logit_scale"], [2.0], tol=0)
    out = jax.jit(gate.apply)(variables, prompt, rewards)
    score, weights, adjusted = np_armorm(variables["params"], prompt, rewards, n_layers, act, 0.7, 2, lam, 2.0)
    close(out.score, score, tol=1e-4)
    close(out.gating_weights, weights, tol=1e-5)
    close(out.adjusted_rewards, adjusted, tol=1e-5)
    close(np.asarray(out.gating_weights).sum(-1), np.ones(B), tol=1e-6)
    assert np.asarray(out.gating_weights).std() > 0.01  # the test is not trivially uniform


def test_debiasing_hand_values_and_matrix_form():
    r = jnp.array([[1.0, 2.0, 3.0]])
    close(debias_rewards(r, 2, (0.5, 0.1, 1.0)), [[1 - 1.5, 2 - 0.3, 0.0]], tol=1e-7)
    m = verbosity_transform_matrix(3, 2, (0.5, 0.1, 1.0))
    close(r @ m, debias_rewards(r, 2, (0.5, 0.1, 1.0)), tol=1e-7)
    close(debias_rewards(r, None, None), r, tol=0)


def armorm_setup(**kw):
    h = distinct_hidden() / 100
    mask = make_mask(LENGTHS, T, "left")
    prompt_index = np.maximum(np_last_index(mask) - 1, 0)
    head = ArmoRMHead(ArmoRMGatingHead(3, hidden_dim=8, num_hidden_layers=2, kernel_init=nn.initializers.normal(1.0),
                                       temperature=1.0), kernel_init=nn.initializers.normal(1.0), **kw)
    variables = init_unboxed(head, h, mask, prompt_index)
    return head, variables, h, mask, prompt_index


def test_armorm_head_outputs_and_param_tree():
    head, variables, h, mask, prompt_index = armorm_setup()
    p = variables["params"]
    assert sorted(p) == ["gating", "regression_layer"]
    assert sorted(p["gating"]) == ["layers_0", "layers_1", "layers_2", "logit_scale"]
    assert p["gating"]["layers_0"]["kernel"].shape == (D, 8) and p["gating"]["layers_2"]["kernel"].shape == (8, 3)
    out = jax.jit(head.apply)(variables, h, mask, prompt_index)
    rewards = h[np.arange(B), np_last_index(mask)] @ np.asarray(p["regression_layer"]["kernel"], np.float64)
    close(out.objective_rewards, rewards, tol=1e-4)
    score, weights, _ = np_armorm(p["gating"], h[np.arange(B), prompt_index], rewards, 2, "relu", 1.0)
    close(out.score, score, tol=1e-4)
    close(out.gating_weights, weights, tol=1e-5)
    close(np.asarray(out.gating_weights).sum(-1), np.ones(B), tol=1e-6)


def test_armorm_gate_does_not_mix_examples():
    head, variables, h, mask, prompt_index = armorm_setup()
    apply = jax.jit(head.apply)
    batch = apply(variables, h, mask, prompt_index)
    for b in range(B):
        one = apply(variables, h[b:b + 1], mask[b:b + 1], prompt_index[b:b + 1])
        for got, want in zip(one, batch):
            close(got[0], np.asarray(want)[b], tol=1e-6)
    # chosen and rejected responses to the same prompt get the same gating weights
    rejected_h = h.copy()
    rejected_h[np.arange(B), np_last_index(mask)] += 0.37
    rejected = apply(variables, rejected_h, mask, prompt_index)
    close(rejected.gating_weights, batch.gating_weights, tol=0)
    assert np.all(np.asarray(rejected.score) != np.asarray(batch.score))


def test_armorm_gradient_reaches_regression_layer_only_when_asked():
    for flag in (False, True):
        head, variables, h, mask, prompt_index = armorm_setup(objective_gradient_from_gate=flag)
        grads = jax.jit(jax.grad(lambda v, m=head, a=(h, mask, prompt_index): m.apply(v, *a).score.sum()))(variables)
        reg = np.abs(np.asarray(grads["params"]["regression_layer"]["kernel"])).max()
        assert (reg > 0) == flag
        assert np.abs(np.asarray(grads["params"]["gating"]["layers_0"]["kernel"])).max() > 0


def test_armorm_config_errors():
    prompt, rewards = jnp.zeros((2, 4)), jnp.zeros((2, 3))
    bad = [ArmoRMGatingHead(3, verbosity_index=1), ArmoRMGatingHead(3, verbosity_index=5, verbosity_coefficients=(1,) * 3),
           ArmoRMGatingHead(3, verbosity_index=1, verbosity_coefficients=(1.0, 2.0)),
           ArmoRMGatingHead(3, activation="tanh"), ArmoRMGatingHead(3, temperature=0.0)]
    for gate in bad:
        with pytest.raises(ConfigError):
            gate.init(jax.random.key(0), prompt, rewards)
    with pytest.raises(DataError, match="objective_rewards"):
        ArmoRMGatingHead(4).init(jax.random.key(0), prompt, rewards)


def test_head_gradients_match_finite_differences():
    _, variables, h, mask, prompt_index = armorm_setup()
    head = ArmoRMHead(ArmoRMGatingHead(3, hidden_dim=8, num_hidden_layers=2, activation="gelu", temperature=1.0,
                                       dtype=jnp.float64, param_dtype=jnp.float64),
                      objective_gradient_from_gate=True, dtype=jnp.float64, param_dtype=jnp.float64)
    with x64():
        params64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables["params"])
        h64 = jnp.asarray(h, jnp.float64)
        check_grads(jax.jit(lambda p: head.apply({"params": p}, h64, mask, prompt_index).score), (params64,),
                    order=1, modes=["rev"], atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------- generative judge
def np_judge(h, mask, emb, ids, cap):
    logits = h.astype(np.float64) @ emb.T.astype(np.float64)  # the full [B, T, V] table
    if cap:
        logits = cap * np.tanh(logits / cap)
    logp = logits - scipy.special.logsumexp(logits, axis=-1, keepdims=True)
    last = logp[np.arange(len(mask)), np_last_index(mask)]
    return last[:, ids[0]], last[:, ids[1]]


@pytest.mark.parametrize("side,cap", [("left", None), ("right", 3.0)])
def test_generative_judge_matches_full_log_softmax(side, cap):
    rng = np.random.default_rng(2)
    vocab = 50
    h = rng.normal(size=(B, T, D)).astype(np.float32)
    emb = rng.normal(size=(vocab, D)).astype(np.float32)
    mask, ids = make_mask(LENGTHS, T, side), (7, 31)
    log_a, log_b = np_judge(h, mask, emb, ids, cap)
    full = GenerativeJudgeHead(ids, final_logit_softcap=cap).apply({}, h, mask, emb)
    close(full.log_odds, log_a - log_b, tol=1e-4)
    close(full.log_probs, np.stack([log_a, log_b], 1), tol=1e-4)
    close(full.p_a_full, np.exp(log_a), tol=1e-5)
    close(full.p_a_restricted, scipy.special.expit(log_a - log_b), tol=1e-5)
    restricted = GenerativeJudgeHead(ids, final_logit_softcap=cap, restrict_to_labels=True).apply({}, h, mask, emb)
    close(restricted.log_odds, full.log_odds, tol=0)
    close(np.exp(restricted.log_probs).sum(-1), np.ones(B), tol=1e-6)
    close(restricted.log_probs[:, 0], np.log(scipy.special.expit(log_a - log_b)), tol=1e-4)
    jitted = jax.jit(lambda a, m, e: judge_preference(a, m, e, ids, cap))(h, mask, emb)
    close(jitted.log_odds, full.log_odds, tol=1e-6)


def test_generative_judge_errors():
    h, mask, emb = jnp.zeros((2, 3, 4)), jnp.ones((2, 3)), jnp.zeros((10, 4))
    for ids in [(3, 3), (1, 10), (-1, 2)]:
        with pytest.raises(ConfigError, match="label_token_ids"):
            GenerativeJudgeHead(ids).apply({}, h, mask, emb)
    with pytest.raises(DataError, match="unembedding"):
        GenerativeJudgeHead((1, 2)).apply({}, h, mask, jnp.zeros((10, 5)))


# ----------------------------------------------------------------------------- probes
def np_ridge(x, y, l2, intercept, s=None):
    """Augmented normal equations with an unpenalised intercept column (no centring)."""
    s = np.ones(len(x)) if s is None else s
    xa = np.concatenate([x, np.ones((len(x), 1))], 1) if intercept else x
    penalty = l2 * np.eye(xa.shape[1])
    if intercept:
        penalty[-1, -1] = 0.0
    sol = np.linalg.solve(xa.T @ (s[:, None] * xa) + penalty, xa.T @ (s.reshape(-1, *[1] * (y.ndim - 1)) * y))
    return (sol[:-1], sol[-1]) if intercept else (sol, np.zeros(y.shape[1:]))


@pytest.mark.parametrize("intercept", [True, False])
def test_ridge_fit_matches_numpy_solve(intercept):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(40, 6)) + 2.0
    y = x @ rng.normal(size=6) + 5.0 + 0.1 * rng.normal(size=40)
    y2 = np.stack([y, -y + rng.normal(size=40)], 1)
    s = rng.uniform(0.0, 2.0, size=40)
    with x64():
        for target, weight in [(y, None), (y2, None), (y, s), (y2, s)]:
            w, b = ridge_fit(x, target, 0.7, fit_intercept=intercept, sample_weight=weight)
            w_ref, b_ref = np_ridge(x, target, 0.7, intercept, weight)
            close(w, w_ref, tol=1e-10)
            close(b, b_ref, tol=1e-10)
        # the intercept is not penalised: shifting the targets moves only b
        w1, b1 = ridge_fit(x, y, 3.0)
        w2, b2 = ridge_fit(x, y + 100.0, 3.0)
        close(w1, w2, tol=1e-9)
        close(b2 - b1, 100.0, tol=1e-9)
        # l2 = 0 is ordinary least squares
        w0, b0 = ridge_fit(x, y, 0.0)
        sol = np.linalg.lstsq(np.concatenate([x, np.ones((40, 1))], 1), y, rcond=None)[0]
        close(w0, sol[:-1], tol=1e-9)
        close(b0, sol[-1], tol=1e-9)
    w32, b32 = jax.jit(lambda a, c: ridge_fit(a, c, 0.7))(x.astype(np.float32), y.astype(np.float32))
    w_ref, b_ref = np_ridge(x, y, 0.7, True)
    close(w32, w_ref, tol=1e-3)
    close(b32, b_ref, tol=1e-3)
    with pytest.raises(ConfigError, match="l2"):
        ridge_fit(x, y, -1.0)
    with pytest.raises(DataError, match="targets"):
        ridge_fit(x, y[:5], 1.0)


def test_ridge_fit_masks_missing_labels_per_objective():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(50, 5))
    y = x @ rng.normal(size=(5, 3)) + 0.1 * rng.normal(size=(50, 3))
    y[::3, 1] = np.nan  # objective 1 is unrated on a third of the rows
    y[:10, 2] = np.nan
    with x64():
        for intercept in (False, True):
            w, b = ridge_fit(x, y, 0.5, fit_intercept=intercept)
            assert np.isfinite(np.asarray(w)).all() and np.isfinite(np.asarray(b)).all()
            for k in range(3):
                seen = ~np.isnan(y[:, k])
                w_ref, b_ref = np_ridge(x[seen], y[seen, k], 0.5, intercept)
                close(np.asarray(w)[:, k], w_ref, tol=1e-10)
                close(np.asarray(b)[k], b_ref, tol=1e-10)
        # one penalty per objective
        w, _ = ridge_fit(x, y, np.array([0.1, 10.0, 1000.0]), fit_intercept=False)
        for k, l2 in enumerate((0.1, 10.0, 1000.0)):
            seen = ~np.isnan(y[:, k])
            close(np.asarray(w)[:, k], np_ridge(x[seen], y[seen, k], l2, False)[0], tol=1e-10)
        # a 1-D target with NaNs
        w1, _ = ridge_fit(x, y[:, 1], 0.5, fit_intercept=False)
        close(w1, np_ridge(x[~np.isnan(y[:, 1])], y[~np.isnan(y[:, 1]), 1], 0.5, False)[0], tol=1e-10)
    w32, _ = jax.jit(lambda a, c: ridge_fit(a, c, 0.5))(x.astype(np.float32), y.astype(np.float32))
    assert np.isfinite(np.asarray(w32)).all()


def test_ridge_select_recovers_planted_objectives_and_picks_penalties_on_held_out_data():
    rng = np.random.default_rng(5)
    n, d = 400, 12
    x = rng.normal(size=(n, d))
    true = rng.normal(size=(d, 3))
    y = np.concatenate([x @ true + 0.05 * rng.normal(size=(n, 3)), rng.normal(size=(n, 1))], 1)  # 4th: noise
    y[rng.random(n) < 0.3, 1] = np.nan
    sel = ridge_select(x, y, objectives=("a", "b", "c", "noise"))
    assert sel.val_mse.shape == (len(L2_GRID), 4) and sel.n_train[1] < sel.n_train[0]
    np.testing.assert_allclose(sel.weights[:, :3], true, atol=0.02)  # recovered, no intercept
    assert sel.l2[:3].max() <= 1.0 and sel.l2[3] >= 100.0  # signal: small penalty; noise: large
    assert np.all(sel.val_mse[np.searchsorted(L2_GRID, sel.l2[3]), 3] <= sel.val_mse[:, 3])
    # the chosen weights are the training-part fit with the chosen penalty
    order = np.random.default_rng(42).permutation(n)[80:]
    seen = ~np.isnan(y[order, 1])
    close(sel.weights[:, 1], np_ridge(x[order][seen], y[order][seen, 1], sel.l2[1], False)[0], tol=1e-8)
    y[:, 2] = np.nan
    with pytest.raises(DataError, match="objective 'c' has 0 rated training rows"):
        ridge_select(x, y, objectives=("a", "b", "c", "noise"))


def test_logistic_select_recovers_a_planted_preference_direction():
    rng = np.random.default_rng(6)
    true = rng.normal(size=10)
    diff = rng.normal(size=(300, 10))
    diff *= np.where(rng.random(300) < 1 / (1 + np.exp(-diff @ true)), 1.0, -1.0)[:, None]  # BT-sampled winners
    sel = logistic_select(diff)
    assert sel.val_loss.shape == (len(L2_GRID),) and sel.n_train == 240 and sel.n_val == 60
    assert sel.l2 <= 10.0 and sel.val_accuracy > 0.75
    cos = sel.weights @ true / np.linalg.norm(sel.weights) / np.linalg.norm(true)
    assert cos > 0.9
    assert sel.val_loss[np.searchsorted(L2_GRID, sel.l2)] == sel.val_loss.min() < sel.val_loss[-1]


def test_linear_probe_on_a_chosen_layer():
    layers, mask = 3, make_mask(LENGTHS, T, "left")
    all_hidden = distinct_hidden(layers=layers) / 1000
    feats = select_layer(all_hidden, 1, mask)
    close(feats, all_hidden[1][np.arange(B), np_last_index(mask)], tol=0)
    close(select_layer(all_hidden, -1, mask, "mean"),
          np.stack([all_hidden[2][b][mask[b] == 1].mean(0) for b in range(B)]), tol=1e-5)
    rng = np.random.default_rng(4)
    y = rng.normal(size=(B, 2))
    w, b = ridge_fit(feats, y, 0.1)
    probe = LinearProbe(layer=1, num_outputs=2)
    assert jax.tree.map(jnp.shape, init_unboxed(probe, all_hidden, mask))["params"] == \
        {"probe": {"kernel": (D, 2), "bias": (2,)}}
    close(probe.apply({"params": probe_params(w, b)}, all_hidden, mask), ridge_predict(feats, w, b), tol=1e-5)
    w1, b1 = ridge_fit(feats, y[:, 0], 0.1)
    single = LinearProbe(layer=1).apply({"params": probe_params(w1, b1)}, all_hidden, mask)
    assert single.shape == (B,)
    close(single, ridge_predict(feats, w1, b1), tol=1e-5)
    with pytest.raises(ConfigError, match="layer"):
        select_layer(all_hidden, 3, mask)


def test_pairwise_logistic_probe_matches_scipy():
    rng = np.random.default_rng(5)
    true_w = rng.normal(size=5)
    diff = rng.normal(size=(60, 5))
    diff[diff @ true_w < 0] *= -1  # chosen-minus-rejected: mostly "first wins"
    diff[:8] *= -1  # some pairs against the true direction, so the optimum is not at infinity
    weights = rng.uniform(0.5, 1.5, size=60)
    l2 = 0.5

    def objective(w):
        return np.sum(weights * np.logaddexp(0.0, -diff @ w)) + 0.5 * l2 * w @ w

    def gradient(w):
        return -diff.T @ (weights * scipy.special.expit(-diff @ w)) + l2 * w

    ref = scipy.optimize.minimize(objective, np.zeros(5), jac=gradient, method="BFGS", options={"gtol": 1e-12}).x
    with x64():
        w = np.asarray(pairwise_logistic_fit(diff, l2, weights=weights))
    close(w, ref, tol=1e-7)
    assert np.abs(gradient(w)).max() < 1e-8
    # separable data with a tiny penalty stays finite and decreases the objective
    sep = np.abs(rng.normal(size=(20, 3)))
    w_sep = np.asarray(pairwise_logistic_fit(sep.astype(np.float32), 1e-3, num_steps=20))
    assert np.all(np.isfinite(w_sep)) and np.all(sep @ w_sep > 0)
    with pytest.raises(ConfigError, match="l2"):
        pairwise_logistic_fit(diff, 0.0)


# ----------------------------------------------------------------------------- sharding and jit
VOCAB = 64


def all_heads_fn():
    """One function applying every head, so each strategy compiles once."""
    scalar, multi = ScalarHead(use_bias=True), MultiObjectiveHead(4)
    armo = ArmoRMHead(ArmoRMGatingHead(4, hidden_dim=8, num_hidden_layers=1))
    probe = LinearProbe(layer=1, pooling="mean")
    judge = GenerativeJudgeHead((3, 9), final_logit_softcap=5.0)

    def init(rng, h, mask, prompt_index, all_hidden):
        keys = jax.random.split(rng, 4)
        return {"scalar": scalar.init(keys[0], h, mask)["params"], "multi": multi.init(keys[1], h, mask)["params"],
                "armo": armo.init(keys[2], h, mask, prompt_index)["params"],
                "probe": probe.init(keys[3], all_hidden, mask)["params"]}

    def apply(params, emb, h, mask, prompt_index, all_hidden):
        return {"scalar": scalar.apply({"params": params["scalar"]}, h, mask),
                "multi": multi.apply({"params": params["multi"]}, h, mask),
                "armo": armo.apply({"params": params["armo"]}, h, mask, prompt_index).score,
                "probe": probe.apply({"params": params["probe"]}, all_hidden, mask),
                "judge": judge.apply({}, h, mask, emb).log_odds}

    return init, apply


@pytest.fixture(scope="module")
def head_inputs():
    rng = np.random.default_rng(6)
    h = rng.normal(size=(B, T, D)).astype(np.float32)
    all_hidden = rng.normal(size=(3, B, T, D)).astype(np.float32)
    mask = make_mask(LENGTHS, T, "left")
    prompt_index = np.maximum(np_last_index(mask) - 2, 0).astype(np.int32)
    emb = rng.normal(size=(VOCAB, D)).astype(np.float32)
    init, apply = all_heads_fn()
    boxed = init(jax.random.key(1), h, mask, prompt_index, all_hidden)
    params = nn.unbox(boxed)
    ref = jax.jit(apply)(params, emb, h, mask, prompt_index, all_hidden)
    last = h[np.arange(B), np_last_index(mask)].astype(np.float64)
    close(ref["scalar"], last @ np.asarray(params["scalar"]["score"]["kernel"])[:, 0]
          + np.asarray(params["scalar"]["score"]["bias"])[0], tol=1e-5)
    return boxed, params, (emb, h, mask, prompt_index, all_hidden), apply, ref


@pytest.mark.parametrize("strategy", sorted(shd.RULES))
def test_sharded_heads_equal_unsharded(head_inputs, strategy):
    boxed, params, inputs, apply, ref = head_inputs
    emb, h, mask, prompt_index, all_hidden = inputs
    mesh = shd.make_mesh(strategy)
    abstract = jax.eval_shape(lambda: boxed)
    shardings = shd.param_shardings(abstract, mesh, strategy)
    sharded_params = jax.device_put(params, shardings)
    put = lambda x, *names: jax.device_put(x, shd.activation_sharding(mesh, strategy, *names))
    args = (put(emb, "vocab", "embed"), put(h, "batch", "length", "embed"), put(mask, "batch", "length"),
            put(prompt_index, "batch"), put(all_hidden, None, "batch", "length", "embed"))
    with shd.activate(mesh, strategy), nn.logical_axis_rules(shd.RULES[strategy]):
        out = jax.jit(apply)(sharded_params, *args)
    for k in ref:
        np.testing.assert_allclose(np.asarray(out[k]), np.asarray(ref[k]), rtol=0, atol=1e-6, err_msg=k)
    # the embed axis of the head kernels really is split where the strategy says so
    fsdp = mesh.shape["fsdp"] if dict(shd.RULES[strategy]).get("embed") == "fsdp" else 1
    assert shd.shard_fraction(sharded_params["armo"]["regression_layer"]["kernel"]) == pytest.approx(1 / fsdp)
    assert shd.shard_fraction(sharded_params["scalar"]["score"]["kernel"]) == pytest.approx(1 / fsdp)
