"""Losses against float64 NumPy references, hand-computed values, extreme gaps and gradient checks."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from rmjax import losses
from rmjax.errors import ConfigError, DataError


def x64():
    """float64 context on every supported jax version."""
    if hasattr(jax, "enable_x64"):
        return jax.enable_x64(True)
    from jax.experimental import enable_x64  # older releases
    return enable_x64()


# ----------------------------------------------------------------------------- NumPy references
def np_log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def np_weighted_mean(v, w):
    if w is None:
        return v.mean()
    w = np.broadcast_to(w, v.shape)
    return (w * v).sum() / w.sum() if w.sum() > 0 else 0.0


def np_bt(c, r, margin=0.0, w=None):
    return np_weighted_mean(-np_log_sigmoid(c - r - margin), w)


def np_bt_smooth(c, r, eps, margin=0.0, w=None):
    d = c - r - margin
    return np_weighted_mean(-(1 - eps / 2) * np_log_sigmoid(d) - eps / 2 * np_log_sigmoid(-d), w)


def pairs(seed, n=64, extreme=True):
    rng = np.random.default_rng(seed)
    c, r = rng.normal(size=n) * 3, rng.normal(size=n) * 3
    if extreme:  # reward gaps of exactly +-100 and +-1000
        c[:4] = [100.0, -100.0, 1000.0, -1000.0]
        r[:4] = 0.0
    return c, r


def close(a, b, tol=1e-6):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=tol, atol=tol)


# ----------------------------------------------------------------------------- Bradley-Terry
def test_bradley_terry_hand_values():
    close(losses.bradley_terry(jnp.zeros(3), jnp.zeros(3)), math.log(2))
    close(losses.bradley_terry(jnp.array([1.0]), jnp.array([0.0]), margin=1.0), math.log(2))
    close(losses.bradley_terry(jnp.array([2.0]), jnp.array([0.0])), math.log1p(math.exp(-2)))
    close(losses.bradley_terry(jnp.array([-100.0]), jnp.array([0.0])), 100.0)
    close(losses.bradley_terry(jnp.array([100.0]), jnp.array([0.0])), math.exp(-100), tol=1e-30)


@pytest.mark.parametrize("seed", [0, 1])
def test_bradley_terry_matches_numpy(seed):
    c, r = pairs(seed)
    rng = np.random.default_rng(seed + 10)
    margin = rng.uniform(0, 2, size=c.shape)
    w = rng.uniform(0, 1, size=c.shape)
    out = losses.bradley_terry(c.astype(np.float32), r.astype(np.float32))
    assert np.isfinite(out)
    close(out, np_bt(c, r), tol=1e-5)
    close(losses.bradley_terry(c, r, margin=margin, weights=w), np_bt(c, r, margin, w), tol=1e-5)
    with x64():
        close(losses.bradley_terry(c, r, margin=margin, weights=w), np_bt(c, r, margin, w), tol=1e-12)


def test_weights_mask_equals_subset_and_zero_weights_give_zero():
    c, r = pairs(2, n=10)
    keep = np.arange(10) % 3 == 0
    close(losses.bradley_terry(c, r, weights=keep), losses.bradley_terry(c[keep], r[keep]))
    zero = losses.bradley_terry(c, r, weights=np.zeros(10))
    assert float(zero) == 0.0
    g = jax.grad(lambda x: losses.bradley_terry(x, r, weights=np.zeros(10)))(jnp.asarray(c, jnp.float32))
    assert np.all(np.asarray(g) == 0)


def test_bf16_rewards_are_computed_in_float32():
    c, r = pairs(3, n=8, extreme=False)
    out = losses.bradley_terry(jnp.asarray(c, jnp.bfloat16), jnp.asarray(r, jnp.bfloat16))
    assert out.dtype == jnp.float32
    cb = np.asarray(jnp.asarray(c, jnp.bfloat16), np.float64)
    rb = np.asarray(jnp.asarray(r, jnp.bfloat16), np.float64)
    close(out, np_bt(cb, rb), tol=1e-5)


# ----------------------------------------------------------------------------- label smoothing
@pytest.mark.parametrize("eps", [0.0, 0.1, 0.5, 1.0])
def test_label_smoothing_matches_numpy_and_identity(eps):
    c, r = pairs(4)
    with x64():
        out = losses.bradley_terry_label_smoothing(c, r, eps)
        close(out, np_bt_smooth(c, r, eps), tol=1e-12)
        # -(1 - eps/2) log s(D) - (eps/2) log s(-D) == -log s(D) + (eps/2) D, pair by pair
        for i in range(8):
            one = losses.bradley_terry_label_smoothing(c[i:i + 1], r[i:i + 1], eps)
            d = c[i] - r[i]
            close(one, -np_log_sigmoid(d) + eps / 2 * d, tol=1e-10)
            assert np.isfinite(one)
        close(out, losses.bradley_terry(c, r) + eps / 2 * np.mean(c - r), tol=1e-10)
    if eps == 0.0:
        close(losses.bradley_terry_label_smoothing(c, r, eps), losses.bradley_terry(c, r))


def test_label_smoothing_with_margin_and_weights():
    c, r = pairs(5)
    w = np.random.default_rng(5).uniform(size=c.shape)
    with x64():
        close(losses.bradley_terry_label_smoothing(c, r, 0.2, margin=0.5, weights=w),
              np_bt_smooth(c, r, 0.2, 0.5, w), tol=1e-12)


def test_label_smoothing_eps_range():
    with pytest.raises(ConfigError, match="eps"):
        losses.bradley_terry_label_smoothing(jnp.zeros(2), jnp.zeros(2), 1.5)
    with pytest.raises(ConfigError, match="eps"):
        losses.bradley_terry_label_smoothing(jnp.zeros(2), jnp.zeros(2), -0.1)


# ----------------------------------------------------------------------------- centering, MSE
def test_reward_centering():
    close(losses.reward_centering(jnp.array([1.0, 2.0]), jnp.array([-1.0, 1.0]), 0.5), 0.5 * (0 + 9) / 2)
    c, r = pairs(6)
    w = np.random.default_rng(6).uniform(size=c.shape)
    with x64():
        close(losses.reward_centering(c, r, 0.01, weights=w), 0.01 * np_weighted_mean((c + r) ** 2, w), tol=1e-12)


def np_masked_mse(p, t, m):
    obs = (m != 0) & ~np.isnan(t)
    return ((p - np.where(obs, t, 0.0)) ** 2)[obs].sum() / max(obs.sum(), 1)


def test_masked_mse_missing_labels():
    rng = np.random.default_rng(7)
    pred, target = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
    target[rng.uniform(size=target.shape) < 0.3] = np.nan
    mask = (rng.uniform(size=target.shape) < 0.8).astype(np.float32)
    with x64():
        close(losses.masked_mse(pred, target, mask), np_masked_mse(pred, target, mask), tol=1e-12)
        close(losses.masked_mse(pred, target), np_masked_mse(pred, target, np.ones_like(mask)), tol=1e-12)
        # hand value: only the two observed entries count
        close(losses.masked_mse(np.array([[1.0, 5.0], [2.0, 0.0]]), np.array([[0.0, np.nan], [np.nan, 3.0]])),
              (1.0 + 9.0) / 2)


def test_masked_mse_nothing_observed_is_zero_without_nan():
    pred = jnp.ones((3, 2))
    target = jnp.full((3, 2), jnp.nan)
    assert float(losses.masked_mse(pred, target)) == 0.0
    g = jax.grad(lambda p: losses.masked_mse(p, target))(pred)
    assert np.all(np.asarray(g) == 0)
    g = jax.grad(lambda p: losses.masked_mse(p, jnp.array([[1.0, jnp.nan]] * 3)))(pred)
    assert np.all(np.isfinite(np.asarray(g)))
    close(g, [[0.0, 0.0]] * 3)  # pred equals the observed label


# ----------------------------------------------------------------------------- metrics, DPO
def test_pairwise_metrics_ties_count_half():
    m = losses.pairwise_metrics(jnp.array([1.0, 2.0, 0.0, 5.0]), jnp.array([0.0, 2.0, 1.0, 1.0]))
    close(m["accuracy"], (1 + 0.5 + 0 + 1) / 4)
    close(m["mean_margin"], (1 + 0 - 1 + 4) / 4)
    w = losses.pairwise_metrics(jnp.array([1.0, 2.0]), jnp.array([0.0, 2.0]), weights=jnp.array([1.0, 0.0]))
    close(w["accuracy"], 1.0)


def np_dpo(pc, pr, rc, rr, beta, ls):
    d = beta * ((pc - rc) - (pr - rr))
    return np.mean(-(1 - ls) * np_log_sigmoid(d) - ls * np_log_sigmoid(-d))


@pytest.mark.parametrize("ls", [0.0, 0.1])
def test_dpo_matches_numpy(ls):
    rng = np.random.default_rng(8)
    pc, pr, rc, rr = (rng.normal(size=16) * 20 - 50 for _ in range(4))
    pc[0], rc[0] = 0.0, -1000.0  # implicit gap of 100 * beta
    with x64():
        loss, aux = losses.dpo(pc, pr, rc, rr, beta=0.1, label_smoothing=ls)
        close(loss, np_dpo(pc, pr, rc, rr, 0.1, ls), tol=1e-12)
        close(aux["chosen_rewards"], 0.1 * (pc - rc), tol=1e-12)
        close(aux["rejected_rewards"], 0.1 * (pr - rr), tol=1e-12)
        gap = 0.1 * ((pc - rc) - (pr - rr))
        close(aux["accuracy"], np.mean(gap > 0), tol=1e-12)
        close(aux["margin"], np.mean(gap), tol=1e-12)
        # cDPO flip probability e is the project's label smoothing with eps = 2e
        close(loss, losses.bradley_terry_label_smoothing(aux["chosen_rewards"], aux["rejected_rewards"], 2 * ls),
              tol=1e-12)
    assert np.isfinite(losses.dpo(pc, pr, rc, rr, beta=1.0)[0])


def test_dpo_reference_gets_no_gradient_and_bad_config():
    args = [jnp.array([-3.0, -4.0]), jnp.array([-5.0, -2.0]), jnp.array([-3.5, -4.5]), jnp.array([-4.0, -2.5])]
    grads = jax.grad(lambda *a: losses.dpo(*a, beta=0.5)[0], argnums=(0, 1, 2, 3))(*args)
    assert np.any(np.asarray(grads[0]) != 0) and np.any(np.asarray(grads[1]) != 0)
    assert np.all(np.asarray(grads[2]) == 0) and np.all(np.asarray(grads[3]) == 0)
    with pytest.raises(ConfigError, match="beta"):
        losses.dpo(*args, beta=0.0)
    with pytest.raises(ConfigError, match="label_smoothing"):
        losses.dpo(*args, beta=0.1, label_smoothing=0.7)


# ----------------------------------------------------------------------------- gradients, jit, errors
GRAD_CASES = {
    "bt": lambda c, r: losses.bradley_terry(c, r, margin=0.3),
    "bt_weighted": lambda c, r: losses.bradley_terry(c, r, weights=jnp.linspace(0.1, 1.0, c.shape[0])),
    "smooth": lambda c, r: losses.bradley_terry_label_smoothing(c, r, 0.2),
    "centering": lambda c, r: losses.reward_centering(c, r, 0.3),
    "mse": lambda c, r: losses.masked_mse(jnp.stack([c, r], 1),
                                          jnp.array([[0.5, jnp.nan]] * (c.shape[0] // 2) + [[1.0, -1.0]] * (c.shape[0] // 2))),
    # constant reference log-probs: stop_gradient on them is tested separately
    "dpo": lambda c, r: losses.dpo(c, r, jnp.linspace(-1.0, 1.0, c.shape[0]), jnp.zeros_like(r), beta=0.7,
                                   label_smoothing=0.05)[0],
}


@pytest.mark.parametrize("name", sorted(GRAD_CASES))
def test_gradients_match_finite_differences(name):
    c, r = pairs(9, n=8, extreme=False)
    with x64():
        # second derivatives too for plain BT (the Hessian a Newton/Laplace user would need)
        order = 2 if name == "bt" else 1
        check_grads(jax.jit(GRAD_CASES[name]), (jnp.asarray(c), jnp.asarray(r)), order=order, modes=["rev", "fwd"],
                    atol=1e-6, rtol=1e-6)


def test_bradley_terry_gradient_is_finite_at_extreme_gaps():
    c, r = jnp.array([100.0, -100.0, 1000.0, -1000.0]), jnp.zeros(4)
    for fn in (losses.bradley_terry, lambda a, b: losses.bradley_terry_label_smoothing(a, b, 0.1)):
        g = np.asarray(jax.grad(fn)(c, r))
        assert np.all(np.isfinite(g))
    # d/dc of -log s(c) / n is -s(-c) / n: ~0 for large positive gaps, -1/n for large negative gaps
    close(jax.grad(losses.bradley_terry)(c, r), [0.0, -0.25, 0.0, -0.25])


def test_jit_and_shape_errors():
    c, r = pairs(10, n=8)
    fn = jax.jit(lambda a, b: losses.bradley_terry(a, b) + losses.pairwise_metrics(a, b)["accuracy"])
    close(fn(c.astype(np.float32), r.astype(np.float32)), np_bt(c, r) + np.mean(c > r), tol=1e-5)
    with pytest.raises(DataError, match="shape"):
        losses.bradley_terry(jnp.zeros(3), jnp.zeros(4))
    with pytest.raises(DataError, match="shape"):
        losses.masked_mse(jnp.zeros((3, 2)), jnp.zeros((3, 3)))
