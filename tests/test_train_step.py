"""Train step: same losses under every sharding strategy, NaN steps skipped, subsets and LoRA right."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from hf_models import build
from rmjax import sharding as shd
from rmjax.models.loading import StateDictCheckpoint, load_params
from rmjax.train import params as tparams
from rmjax.train import step as tstep
from rmjax.train.config import load_config


@pytest.fixture(scope="module")
def tiny():
    model = build("llama_gqa_tied", vocab_size=256)
    return StateDictCheckpoint(model.config.to_dict(), model.state_dict())


def batches(vocab, n_steps, accum=2, micro=8, length=16, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_steps):
        b = {}
        for side in ("chosen", "rejected"):
            ids = rng.integers(1, vocab, (accum, micro, length)).astype(np.int32)
            lens = rng.integers(4, length + 1, (accum, micro))
            mask = (np.arange(length) < lens[..., None]).astype(np.int32)
            b[f"{side}_ids"], b[f"{side}_mask"] = ids * mask, mask
        out.append(b)
    return out


def run_steps(ckpt, strategy, mode, n_steps=3, mesh_devices=None, lr=1e-3):
    run = load_config(None, [f"train.trainable={mode}", "train.last_k=1", "train.lora_rank=4",
                             f"optim.lr={lr}", "optim.warmup_steps=1", "train.steps=10",
                             "train.batch_size=16", "train.grad_accum=2"])
    mesh = shd.make_mesh(strategy) if mesh_devices is None else shd.make_mesh(
        shd.MeshConfig(strategy="dp", data=1), devices=jax.devices()[:1])
    config, backbone, _ = load_params(ckpt, mesh=mesh, strategy=strategy)
    rep = NamedSharding(mesh, P())
    head = tstep.init_head(jax.random.key(1), config.hidden_size)
    full = {"backbone": backbone, "head": jax.device_put(head, rep)}
    if mode == "lora":
        full["lora"] = jax.device_put(tparams.init_lora(backbone, 4, jax.random.key(2)), rep)
    trainable, frozen = tparams.split(full, mode, 1)
    opt = tstep.make_optimizer(run)
    with shd.activate(mesh, strategy):
        state = tstep.create_state(trainable, opt, mesh)
        fn = tstep.make_train_step(state, frozen, mesh, config=config, run=run, optimizer=opt)
        losses = []
        for b in batches(config.vocab_size, 1) * n_steps:  # one fixed batch: the loss must fall
            b = {k: jax.device_put(v, tstep.batch_sharding(mesh)) for k, v in b.items()}
            state, metrics = fn(state, frozen, b)
            losses.append(float(metrics["loss"]))
    return losses, state, frozen


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_strategies_give_single_device_losses(tiny, mode):
    ref, _, _ = run_steps(tiny, "dp", mode, mesh_devices=1)
    assert ref[-1] < ref[0]
    for strategy in ("dp", "fsdp", "tp", "fsdp_tp"):
        losses, state, _ = run_steps(tiny, strategy, mode)
        np.testing.assert_allclose(losses, ref, atol=1e-4, err_msg=strategy)
        if strategy == "fsdp" and mode == "full":  # optimizer state sharded like the params
            mu = state.opt_state[1][0].mu["backbone"]["layers"]["mlp"]["up_kernel"]
            assert shd.shard_fraction(mu) == pytest.approx(1 / 8)


def test_frozen_parts_get_no_optimizer_state_and_stay_fixed(tiny):
    _, state, frozen = run_steps(tiny, "dp", "last_k", n_steps=2, mesh_devices=1)
    mu = state.opt_state[1][0].mu
    assert set(mu) == {"backbone", "head"}
    assert "embedding" not in mu["backbone"]
    up = mu["backbone"]["layers"]["mlp"]["up_kernel__trainable_layers"]
    assert up.shape[0] == 1  # only the last layer
    assert frozen["backbone"]["layers"]["mlp"]["up_kernel__frozen_layers"].shape[0] == 2


def test_nan_batch_is_skipped(tiny):
    run = load_config(None, ["train.trainable=head", "train.batch_size=8", "train.grad_accum=1"])
    mesh = shd.make_mesh(shd.MeshConfig(strategy="dp", data=1), devices=jax.devices()[:1])
    config, backbone, _ = load_params(tiny, mesh=mesh, strategy="dp")
    head = {"score": {"kernel": jnp.full((config.hidden_size, 1), jnp.nan)}}
    trainable, frozen = tparams.split({"backbone": backbone, "head": head}, "head")
    opt = tstep.make_optimizer(run)
    state = tstep.init_state(trainable, opt)
    before = np.asarray(state.params["head"]["score"]["kernel"])
    fn = tstep.make_train_step(state, frozen, mesh, config=config, run=run, optimizer=opt)
    b = batches(config.vocab_size, 1, accum=1)[0]
    state, metrics = fn(state, frozen, b)
    assert int(metrics["skipped"]) == 1 and int(state.skipped) == 1 and int(state.step) == 1
    np.testing.assert_array_equal(np.asarray(state.params["head"]["score"]["kernel"]), before)


def test_split_merge_roundtrip_and_lora_starts_at_base(tiny):
    config, backbone, _ = load_params(tiny)
    full = {"backbone": backbone, "head": {"score": {"kernel": jnp.ones((config.hidden_size, 1))}}}
    for mode in ("head", "last_k", "full"):
        t, f = tparams.split(full, mode, 2)
        back = tparams.merge(t, f)
        for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(full)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    lora = tparams.init_lora(backbone, 4, jax.random.key(0))
    merged = tparams.apply_lora(backbone, lora, 2.0)
    np.testing.assert_array_equal(np.asarray(merged["layers"]["attn"]["q_kernel"]),
                                  np.asarray(backbone["layers"]["attn"]["q_kernel"]))
    lora["q"]["b"] = jnp.ones_like(lora["q"]["b"])
    merged = tparams.apply_lora(backbone, lora, 2.0)
    want = np.asarray(backbone["layers"]["attn"]["q_kernel"]) + 2.0 * np.einsum(
        "ldr,lrhk->ldhk", np.asarray(lora["q"]["a"]), np.ones(lora["q"]["b"].shape))
    np.testing.assert_allclose(np.asarray(merged["layers"]["attn"]["q_kernel"]), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["gemma3_window"])  # local/global layer pattern split at the cut
def test_frozen_prefix_forward_equals_forward_and_last_k_grads(case):
    from rmjax.models.transformer import forward, forward_frozen_prefix

    model = build(case, vocab_size=256)
    config, params, _ = load_params(StateDictCheckpoint(model.config.to_dict(), model.state_dict()))
    b = batches(config.vocab_size, 1, accum=1, micro=3)[0]
    ids, mask = b["chosen_ids"][0], b["chosen_mask"][0]
    n_frozen = config.num_layers - 1
    full = forward(params, config, ids, mask).hidden
    split = forward_frozen_prefix(params, config, ids, mask, n_frozen)
    np.testing.assert_allclose(np.asarray(split), np.asarray(full), rtol=1e-5, atol=1e-5)
    # gradients of the last layer's weights: the same through one scan and through the split
    def loss(layers, fn):
        return jnp.sum(fn({**params, "layers": layers}) ** 2)
    g_full = jax.grad(loss)(params["layers"], lambda p: forward(p, config, ids, mask).hidden)
    g_split = jax.grad(loss)(params["layers"], lambda p: forward_frozen_prefix(p, config, ids, mask, n_frozen))
    for a, c in zip(jax.tree.leaves(g_full), jax.tree.leaves(g_split)):
        np.testing.assert_allclose(np.asarray(c[n_frozen:]), np.asarray(a[n_frozen:]), rtol=1e-4, atol=1e-5)
        assert not np.asarray(c[:n_frozen]).any()  # no backward pass through the frozen layers
