"""Train step: packed prompt trees give the losses and gradients of padded rows under every sharding
strategy; the optimizer step is the same on every mesh; NaN steps skipped; subsets and LoRA right."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hf_models import build
from rmjax import sharding as shd
from rmjax.data.batching import Encoded
from rmjax.data.records import Record
from rmjax.models.loading import StateDictCheckpoint, load_params
from rmjax.train import plan as tplan
from rmjax.train import objectives as tobjectives
from rmjax.train import params as tparams
from rmjax.train import step as tstep
from rmjax.train.config import load_config
from rmjax.train.examples import Example


@pytest.fixture(scope="module")
def tiny():
    model = build("llama_gqa_tied", vocab_size=256)
    return StateDictCheckpoint(model.config.to_dict(), model.state_dict())


def examples(n, seed=0, vocab=256, best_of=(1, 1, 3)):
    """Pairs (and best-of-N trees) of random ids, with per-pair margins and weights."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        k = 1 + int(rng.choice(best_of))
        prompt = rng.integers(1, vocab, rng.integers(2, 12)).astype(np.int32)
        responses = tuple(rng.integers(1, vocab, rng.integers(1, 9)).astype(np.int32) for _ in range(k))
        rec = Record(f"r{i}", (), ("x",) * k, "pair" if k == 2 else "best_of_n", i, margin=float(rng.uniform(0, 1)),
                     weight=float(rng.uniform(0.5, 2)))
        out.append(Example(Encoded(prompt, responses), rec, pairs=tuple((0, j) for j in range(1, k))))
    return out


def overrides(*extra):
    return load_config(None, ["train.lora_rank=4", "optim.warmup_steps=1", "train.steps=10", "train.batch_size=16",
                              "train.grad_accum=2", "loss.label_smoothing=0.1", "loss.center_coef=0.01",
                              "loss.margin=0.2", *extra])


def host_batch(exs, packed, mesh, side="right", accum=2):
    layout = tplan.Layout(packed=packed, trees="pairs", targets=False, pad_id=0, pack_length=48,
                             row_multiple=shd.batch_shards(mesh), side=side)
    micro = np.array_split(np.arange(len(exs)), accum)
    return layout, tplan.step_arrays(exs, micro, layout)


def params_on(ckpt, mesh, strategy, mode, **model_kw):
    config, backbone, _ = load_params(ckpt, mesh=mesh, strategy=strategy, **model_kw)
    rep = shd.replicated(mesh)
    head = tobjectives.init_scalar(jax.random.key(1), config.hidden_size, None, {})
    full = {"backbone": backbone, "head": jax.device_put(head, rep)}
    if mode == "lora":
        lora = tparams.init_lora(backbone, 4, jax.random.key(2))
        lora = jax.tree.map(lambda x: x + 0.05, lora)  # B != 0: gradients reach A as well
        full["lora"] = jax.device_put(lora, rep)
    return config, full


def loss_and_grads(ckpt, strategy, mode, packed, exs, run, side="right", **model_kw):
    mesh = shd.make_mesh(strategy) if strategy else shd.make_mesh(
        shd.MeshConfig(strategy="dp", data=1), devices=jax.devices()[:1])
    strategy = strategy or "dp"
    config, full = params_on(ckpt, mesh, strategy, mode, **model_kw)
    trainable, frozen = tparams.split(full, mode, run.train.last_k)
    layout, host = host_batch(exs, packed, mesh, side)
    sh = tstep.batch_shardings(mesh, layout.keys)
    entry = tobjectives.entry(run)

    def total(t, f, b):
        def one(i):
            mb = {k: v[i] for k, v in b.items()}
            return tstep.loss_fn(t, f, mb, config=config, run=run, entry=entry, statics={})[0]
        return one(0) + one(1)

    with shd.activate(mesh, strategy):
        batch = {k: jax.device_put(v, sh[k]) for k, v in host.items()}
        loss, grads = jax.jit(jax.value_and_grad(total))(trainable, frozen, batch)
    return float(loss), jax.tree.map(np.asarray, jax.device_get(grads))


# one device, and the strategy that splits both the batch and the params (every strategy against one
# device: test_strategies_give_single_device_losses)
@pytest.mark.parametrize("strategy", [None, "fsdp_tp"])
def test_packed_equals_unpacked_losses_and_gradients(tiny, strategy):
    exs = examples(16)
    run = overrides("train.trainable=full")
    ref_loss, ref_grads = loss_and_grads(tiny, strategy, "full", False, exs, run)
    loss, grads = loss_and_grads(tiny, strategy, "full", True, exs, run)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-6)
    flat_ref, flat = jax.tree.leaves(ref_grads), jax.tree.leaves(grads)
    assert len(flat) == len(flat_ref) and max(np.abs(g).max() for g in flat_ref) > 1e-4
    for g, r in zip(flat, flat_ref):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
def test_blockwise_attention_train_step_equals_naive(tiny, packed):
    """The whole train-step loss and every gradient with the blockwise kernel (small blocks, so rows
    span several) equal the naive attention reference, on a sharded mesh."""
    exs = examples(16, seed=7)
    run = overrides("train.trainable=full")
    ref_loss, ref_grads = loss_and_grads(tiny, "fsdp_tp", "full", packed, exs, run, attention="naive")
    loss, grads = loss_and_grads(tiny, "fsdp_tp", "full", packed, exs, run, attention="blockwise",
                                 attention_block_q=8, attention_block_k=16)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)


def test_packed_equals_unpacked_for_lora_last_k_and_left_padding(tiny):
    exs = examples(16, seed=3)
    for mode, extra in (("lora", []), ("last_k", ["train.last_k=1"])):
        run = overrides(f"train.trainable={mode}", *extra)
        ref_loss, ref_grads = loss_and_grads(tiny, None, mode, False, exs, run, side="left")
        loss, grads = loss_and_grads(tiny, None, mode, True, exs, run)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-6)
        for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
            np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


def test_packing_computes_fewer_tokens_and_keeps_every_pair():
    exs = examples(32, seed=5)
    mesh = shd.make_mesh(shd.MeshConfig(strategy="dp", data=1), devices=jax.devices()[:1])
    packed = tplan.Layout(packed=True, trees="pairs", targets=False, pad_id=0, pack_length=48)
    flat = tplan.Layout(packed=False, trees="pairs", targets=False, pad_id=0, pack_length=48)
    t_packed, t_flat = tplan.tokens(exs, packed), tplan.tokens(exs, flat)
    assert t_packed["real"] == sum(e.tree.tree_length for e in exs)  # the prompt once per tree
    assert t_flat["real"] == sum(e.tree.unshared_tokens for e in exs)
    assert t_packed["padded"] < t_flat["padded"]
    a, _ = tplan.arrays(exs, packed, tplan.shapes([exs], packed))
    n_pairs = sum(len(e.pairs) for e in exs)
    assert a["pair_weight"][:n_pairs].min() > 0 and not a["pair_weight"][n_pairs:].any()
    del mesh


def run_steps(ckpt, strategy, mode, n_steps=3, single=False):
    run = load_config(None, [f"train.trainable={mode}", "train.last_k=1", "train.lora_rank=4", "optim.lr=1e-3",
                             "optim.warmup_steps=1", "train.steps=10", "train.batch_size=16", "train.grad_accum=2"])
    mesh = shd.make_mesh(shd.MeshConfig(strategy="dp", data=1), devices=jax.devices()[:1]) if single \
        else shd.make_mesh(strategy)
    config, full = params_on(ckpt, mesh, strategy, mode)
    trainable, frozen = tparams.split(full, mode, 1)
    opt = tstep.make_optimizer(run)
    layout, host = host_batch(examples(16, seed=1), True, mesh)
    entry = tobjectives.entry(run)
    with shd.activate(mesh, strategy):
        state = tstep.create_state(trainable, opt, mesh)
        fn = tstep.make_train_step(state, frozen, mesh, layout.keys, config=config, run=run, optimizer=opt,
                                   entry=entry)
        sh = tstep.batch_shardings(mesh, layout.keys)
        losses = []
        for _ in range(n_steps):  # one fixed batch: the loss must fall
            state, metrics = fn(state, frozen, {k: jax.device_put(v, sh[k]) for k, v in host.items()})
            losses.append(float(metrics["loss"]))
    return losses, state, frozen


# every strategy for full training; LoRA on the two that shard both the batch and the params
@pytest.mark.parametrize("mode,strategies", [("full", ("dp", "fsdp", "tp", "fsdp_tp", "fsdp_sp")),
                                             ("lora", ("fsdp_tp", "fsdp_sp"))])
def test_strategies_give_single_device_losses(tiny, mode, strategies):
    ref, _, _ = run_steps(tiny, "dp", mode, single=True)
    assert ref[-1] < ref[0]
    for strategy in strategies:
        losses, state, _ = run_steps(tiny, strategy, mode)
        np.testing.assert_allclose(losses, ref, atol=1e-4, err_msg=strategy)
        if strategy == "fsdp" and mode == "full":  # optimizer state sharded like the params
            mu = state.opt_state[1][0].mu["backbone"]["layers"]["mlp"]["up_kernel"]
            assert shd.shard_fraction(mu) == pytest.approx(1 / 8)


def test_frozen_parts_get_no_optimizer_state_and_stay_fixed(tiny):
    _, state, frozen = run_steps(tiny, "dp", "last_k", n_steps=2, single=True)
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
    layout, host = host_batch(examples(8), True, mesh, accum=1)
    fn = tstep.make_train_step(state, frozen, mesh, layout.keys, config=config, run=run, optimizer=opt,
                               entry=tobjectives.entry(run))
    state, metrics = fn(state, frozen, host)
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
    t, f = tparams.split({**full, "head": {"regression_layer": {"kernel": 1.0}, "gating": {"w": 2.0}}}, "head",
                         frozen_head=("regression_layer",))
    assert set(t["head"]) == {"gating"} and set(f["head"]) == {"regression_layer"}
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
    from rmjax.models.transformer import forward

    model = build(case, vocab_size=256)
    config, params, _ = load_params(StateDictCheckpoint(model.config.to_dict(), model.state_dict()))
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 256, (3, 16)).astype(np.int32)
    mask = (np.arange(16) < np.array([[16], [9], [4]])).astype(np.int32)
    batch = {"input_ids": ids * mask, "attention_mask": mask}
    n_frozen = config.num_layers - 1
    full = forward(params, config, batch["input_ids"], mask).hidden
    split = tstep.hidden_states(params, config, batch, n_frozen)
    np.testing.assert_allclose(np.asarray(split), np.asarray(full), rtol=1e-5, atol=1e-5)

    def loss(layers, n):  # gradients of the last layer's weights: the same through one scan and the split
        return jnp.sum(tstep.hidden_states({**params, "layers": layers}, config, batch, n) ** 2)
    g_full = jax.grad(loss)(params["layers"], 0)
    g_split = jax.grad(loss)(params["layers"], n_frozen)
    for a, c in zip(jax.tree.leaves(g_full), jax.tree.leaves(g_split)):
        np.testing.assert_allclose(np.asarray(c[n_frozen:]), np.asarray(a[n_frozen:]), rtol=1e-4, atol=1e-5)
        assert not np.asarray(c[:n_frozen]).any()  # no backward pass through the frozen layers
