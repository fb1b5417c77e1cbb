"""Every head x loss of the step's head table: its outputs on packed prompt trees equal a naive
full-sequence computation, its loss equals the loss function on those naive values, and a few
optimizer steps on one batch lower it."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hf_models import save_tiny_checkpoint
from rmjax import losses
from rmjax import sharding as shd
from rmjax.data import judge_prompts
from rmjax.data.records import Record
from rmjax.errors import ConfigError, DataError
from rmjax.heads.armorm import ArmoRMGatingHead
from rmjax.models.loading import load_model
from rmjax.models.transformer import unembed
from rmjax.scoring.kv_path import naive_response_logprobs, reference_hidden
from rmjax.train import plan as tplan
from rmjax.train import examples as texamples
from rmjax.train import objectives as tobjectives
from rmjax.train import loop as tloop
from rmjax.train import params as tparams
from rmjax.train import step as tstep
from rmjax.train.config import load_config

COMBOS = {
    "scalar+bt": ["head.kind=scalar", "loss.kind=bt", "train.trainable=last_k", "train.last_k=1",
                  "loss.label_smoothing=0.1", "loss.center_coef=0.01"],
    "multi_objective+mse": ["head.kind=multi_objective", "loss.kind=mse", "train.trainable=head"],
    "armorm+bt": ["head.kind=armorm", "loss.kind=bt", "train.trainable=head", "head.gate_hidden=16",
                  "head.gate_layers=1"],
    "judge+ce": ["head.kind=judge", "loss.kind=ce", "train.trainable=lora", "loss.label_smoothing=0.1"],
    "judge+ce/vocab": ["head.kind=judge", "loss.kind=ce", "train.trainable=lora", "loss.label_smoothing=0.1",
                       "loss.judge_normalize=vocab"],
    "lm+dpo": ["head.kind=lm", "loss.kind=dpo", "train.trainable=lora", "loss.beta=0.5"],
    # the frozen lower layers run once for policy and reference (their output is shared)
    "lm+dpo/last_k": ["head.kind=lm", "loss.kind=dpo", "train.trainable=last_k", "train.last_k=1", "loss.beta=0.5"],
    "lm+dpo/lora_layers": ["head.kind=lm", "loss.kind=dpo", "train.trainable=lora", "train.lora_layers=2",
                           "loss.beta=0.5"],
    "lm+nll": ["head.kind=lm", "loss.kind=nll", "train.trainable=lora"],
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("heads_model")
    save_tiny_checkpoint(d)
    return load_model(str(d))


def records(kind: str) -> list[Record]:
    if kind == "ratings":
        rng = np.random.default_rng(0)
        return [Record(f"q{i}", (("user", f"Question {i} about {'x' * i}?"),), (f"Answer {'yes ' * (i + 1)}",),
                       "single", i, ratings=(("helpful", float(rng.normal())), ("brief", None if i % 3 == 0 else 1.0)))
                for i in range(4)]
    out = [Record(f"p{i}", (("user", f"Tell me about {w}."),), (f"{w} is kind.", f"No {'!' * (i + 1)}"), "pair", i,
                  margin=0.1 * i, weight=1.0 + i)
           for i, w in enumerate(["love", "power", "bread", "rain"])]
    out.append(Record("b", (("user", "Pick one."),), ("This one.", "That", "None", "Both"), "best_of_n", 4))
    return out


def setup(tiny, name):
    run = load_config(None, [*COMBOS[name], "train.lora_rank=4", "optim.lr=3e-3", "optim.warmup_steps=1",
                             "train.steps=10", "data.max_length=96", "model.dtype=float32"])
    entry = tobjectives.entry(run)
    exs = texamples.build(records(entry.trees), tiny.tokenizer, run, entry.trees)
    assert len(exs) >= 4, exs.summary()
    mesh = shd.make_mesh(shd.MeshConfig(strategy="dp", data=1), devices=jax.devices()[:1])
    d = tiny.config.hidden_size
    extra = {"num_objectives": len(exs.objectives), "score_head": None,
             "regression": np.random.default_rng(1).normal(0, 0.3, (d, 3)).astype(np.float32)}
    full = tloop.model_params(run, tiny, entry, mesh, extra)
    if "lora" in full:  # adapters away from zero: the policy differs from its reference
        full["lora"] = jax.tree.map(lambda x: x + 0.02, full["lora"])
    elif "reference" in full:  # last_k: the trained top layer away from the reference's copy
        full["backbone"] = {**full["backbone"], "layers": jax.tree.map(lambda x: x.at[-1].add(0.02),
                                                                       full["backbone"]["layers"])}
    statics = tloop.statics_for(run, tiny.tokenizer, exs.objectives)
    layout = tplan.Layout(packed=True, trees=entry.trees, targets=entry.targets, pad_id=tiny.tokenizer.pad_id,
                             pack_length=192, num_objectives=len(exs.objectives))
    return run, entry, exs, full, statics, layout, mesh


def last_hidden(params, config, ids):
    return reference_hidden(params, config, ids)[-1]


def naive(name, tiny, ex, full, run, statics):
    """Per response of one example, what the head outputs, from full unpacked sequences."""
    p, c = tparams.apply_lora(full["backbone"], full["lora"], run.train.lora_alpha / 4) if "lora" in full \
        else full["backbone"], tiny.config
    seqs = [np.concatenate([ex.tree.prompt, r]) for r in ex.tree.responses]
    if name == "lm+nll":
        return {"logp": np.array([naive_response_logprobs(p, c, ex.tree.prompt, r).sum() for r in ex.tree.responses]),
                "count": np.array([len(r) for r in ex.tree.responses], np.float32)}
    if name.startswith("lm+dpo"):
        ref_params = full.get("reference", full["backbone"])
        pol = [naive_response_logprobs(p, c, ex.tree.prompt, r).sum() for r in ex.tree.responses]
        ref = [naive_response_logprobs(ref_params, c, ex.tree.prompt, r).sum() for r in ex.tree.responses]
        return {"policy": np.array(pol), "reference": np.array(ref)}
    h = np.stack([last_hidden(p, c, s) for s in seqs])
    head = full["head"]
    if name == "scalar+bt":
        return {"reward": h @ np.asarray(head["score"]["kernel"])[:, 0]}
    if name == "multi_objective+mse":
        return {"rewards": h @ np.asarray(head["regression_layer"]["kernel"])}
    if name == "armorm+bt":  # the gate reads the token that closes the user turn (ChatML: <|im_end|>)
        gate = len(ex.tree.prompt) - ex.tree.gate
        assert ex.tree.gate > 0 and ex.tree.prompt[gate - 1] == tiny.tokenizer.token_id("<|im_end|>")
        prompt_h = np.stack([last_hidden(p, c, ex.tree.prompt[:gate])] * len(seqs))
        rewards = h @ np.asarray(head["regression_layer"]["kernel"])
        gate = ArmoRMGatingHead(3, hidden_dim=16, num_hidden_layers=1)
        return {"reward": np.asarray(gate.apply({"params": head["gating"]}, prompt_h, rewards).score)}
    logits = np.asarray(unembed(p, c, jnp.asarray(h)))
    lp = jax.nn.log_softmax(logits, axis=-1)
    ids = list(statics["label_ids"])
    out = {"logits": logits[:, ids]}
    if run.loss.judge_normalize == "vocab":
        out["log_probs"] = np.asarray(lp[:, ids])
    return out


def naive_loss(name, per_example, exs, run):
    if name == "multi_objective+mse":
        pred = np.concatenate([o["rewards"] for o in per_example])
        target = np.array([[np.nan if v is None else v for v in e.targets] for e in exs])
        return losses.masked_mse(pred, target)
    if name.startswith("judge+ce"):  # GRAM: softmax over the two verdict tokens (or over the vocabulary),
        # torch-style smoothing (1 - eps/2, eps/2)
        lp = np.asarray(jax.nn.log_softmax(np.concatenate([o["logits"] for o in per_example]), axis=-1))
        if run.loss.judge_normalize == "vocab":
            lp = np.concatenate([o["log_probs"] for o in per_example])
        label = np.array([lab for e in exs for lab in e.labels])
        right, wrong = lp[np.arange(len(label)), label], lp[np.arange(len(label)), 1 - label]
        eps = run.loss.label_smoothing
        return np.mean(-(1 - eps / 2) * right - eps / 2 * wrong)
    if name == "lm+nll":
        return -sum(o["logp"].sum() for o in per_example) / sum(o["count"].sum() for o in per_example)
    pairs = [(o, e, a, b) for o, e in zip(per_example, exs) for a, b in e.pairs]
    w = np.array([e.weight for _, e, _, _ in pairs])
    if name.startswith("lm+dpo"):
        get = lambda key, i: np.array([o[key][ab[i]] for o, _, *ab in pairs])  # noqa: E731
        return losses.dpo(get("policy", 0), get("policy", 1), get("reference", 0), get("reference", 1),
                          run.loss.beta, weights=w)[0]
    a = np.array([o["reward"][x] for o, _, x, _ in pairs])
    b = np.array([o["reward"][y] for o, _, _, y in pairs])
    margin = np.array([e.margin for _, e, _, _ in pairs]) + run.loss.margin
    lc = run.loss
    loss = losses.bradley_terry_label_smoothing(a, b, lc.label_smoothing, margin=margin, weights=w)
    return loss + (losses.reward_centering(a, b, lc.center_coef, weights=w) if lc.center_coef else 0)


@pytest.mark.parametrize("name", COMBOS)
def test_head_outputs_and_loss_equal_naive_and_training_lowers_the_loss(tiny, name):
    run, entry, exs, full, statics, layout, mesh = setup(tiny, name)
    trainable, frozen = tparams.split(full, run.train.trainable, run.train.last_k, entry.frozen)
    group = exs.examples[:5]
    arrays, slots = tplan.arrays(group, layout, tplan.shapes([group], layout))
    kw = dict(config=tiny.config, run=run, entry=entry, statics=statics)
    out = jax.jit(lambda t, f, b: tstep.outputs(t, f, b, **kw))(trainable, frozen, arrays)
    flat = {k: np.asarray(v).reshape(-1, *np.asarray(v).shape[2:]) for k, v in out.items()}
    per_example = []
    for e, s in zip(group, slots):
        want = naive(name, tiny, e, full, run, statics)
        for key, value in want.items():
            np.testing.assert_allclose(flat[key][s], value, rtol=2e-4, atol=2e-4, err_msg=f"{name} {key}")
        per_example.append(want)
    loss, _ = entry.loss(out, arrays, run)
    np.testing.assert_allclose(float(loss), float(naive_loss(name, per_example, group, run)), rtol=1e-4, atol=1e-5)

    opt = tstep.make_optimizer(run)
    state = tstep.create_state(trainable, opt, mesh)
    step = tstep.make_train_step(state, frozen, mesh, layout.keys, optimizer=opt, **kw)
    batch = {k: v[None] for k, v in arrays.items()}
    seen = []
    for _ in range(4):
        state, metrics = step(state, frozen, batch)
        seen.append(float(metrics["loss"]))
    assert seen[-1] < seen[0], seen
    if name == "armorm+bt":  # stage 2 trains the gate only: the regression stays as loaded
        assert set(state.params["head"]) == {"gating"}


def test_judge_trees_share_the_prompt_and_hold_both_orders(tiny):
    run = load_config(None, COMBOS["judge+ce"] + ["data.max_length=96"])
    rec = records("pairs")[0]
    first, second = judge_prompts.judge_sequences(tiny.tokenizer, rec, ("A", "B"), "model", judge_prompts.TEMPLATES["rmjax"])
    ex = texamples.build([rec], tiny.tokenizer, run, "judge").examples[0]
    assert list(ex.tree.prompt) + list(ex.tree.responses[0]) == first
    assert list(ex.tree.prompt) + list(ex.tree.responses[1]) == second
    assert ex.labels == (0, 1)
    text = tiny.tokenizer.decode(second)
    assert text.index(rec.responses[1]) < text.index(rec.responses[0])  # rejected first in the second order


def test_an_objective_without_ratings_is_an_error(tiny):
    run = load_config(None, COMBOS["multi_objective+mse"] + ["data.max_length=96"])
    rated = [dataclasses.replace(r, ratings=(r.ratings[0], ("brief", None))) for r in records("ratings")]
    exs = texamples.build(rated, tiny.tokenizer, run, "ratings")
    with pytest.raises(DataError, match=r"here: objective 'brief' has no data: none of the 4 training examples rates "
                                        r"it \(field 'ratings.brief' is null everywhere\); rate some responses"):
        texamples.check_objectives(exs, "here")
    texamples.check_objectives(texamples.build(records("ratings"), tiny.tokenizer, run, "ratings"), "here")


@pytest.mark.parametrize("name", ["lm+dpo/last_k", "lm+dpo/lora_layers", "lm+dpo"])
def test_dpo_runs_frozen_lower_layers_once_for_policy_and_reference(tiny, name, monkeypatch):
    """The decoder passes one DPO step traces, by layer count: a frozen trunk is shared by the
    policy and the reference (the model as loaded); LoRA on every layer leaves nothing to share."""
    run, entry, exs, full, statics, layout, _ = setup(tiny, name)
    trainable, frozen = tparams.split(full, run.train.trainable, run.train.last_k, entry.frozen)
    group = exs.examples[:2]
    arrays, _ = tplan.arrays(group, layout, tplan.shapes([group], layout))
    calls, real = [], tstep.forward

    def counted(params, cfg, *args, **kwargs):
        calls.append(cfg.num_layers)
        return real(params, cfg, *args, **kwargs)

    monkeypatch.setattr(tstep, "forward", counted)
    kw = dict(config=tiny.config, run=run, entry=entry, statics=statics)
    jax.eval_shape(lambda t, f, b: tstep.outputs(t, f, b, **kw), trainable, frozen, arrays)
    layers = tiny.config.num_layers
    assert calls == {"lm+dpo/last_k": [layers - 1, 1, 1], "lm+dpo/lora_layers": [layers - 2, 2, 2],
                     "lm+dpo": [layers, layers]}[name]


@pytest.mark.parametrize("override", ["train.trainable=lora train.lora_layers=4", "train.trainable=last_k train.last_k=4"])
def test_more_trained_layers_than_the_model_has_is_an_error(tiny, override):
    run = load_config(None, ["head.kind=lm", "loss.kind=dpo", *override.split()])
    mesh = shd.make_mesh(shd.MeshConfig(strategy="dp", data=1), devices=jax.devices()[:1])
    field = override.split()[1].split("=")[0]
    with pytest.raises(ConfigError, match=rf"{field}=4 but .* has 3 layers; use at most 3"):
        tloop.model_params(run, tiny, tobjectives.entry(run), mesh, {})
