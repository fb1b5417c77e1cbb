"""RLOO: its loss and KL against a hand computation on a tiny model, a tiny model learning a known
reward in a few steps, and a resumed run equal to an uninterrupted one."""
import dataclasses

import jax
import numpy as np
import pytest

from hf_models import build
from rmjax import losses
from rmjax.errors import ConfigError
from rmjax.models import forward, unembed
from rmjax.scoring.kv_path import reference_hidden
from rmjax.models.loading import StateDictCheckpoint, load_params
from rmjax.rl import rewards, rloo, sampling
from rmjax.rl.sampling import SampleConfig



@pytest.fixture(scope="module")
def tiny():
    model = build("llama_gqa_tied", vocab_size=64)
    config, params, _ = load_params(StateDictCheckpoint(model.config.to_dict(), model.state_dict()), source="tiny")
    return config, params


def prompt_set(n, vocab=64, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, vocab, rng.integers(2, 6)).astype(np.int32) for _ in range(n)]


def test_rloo_advantages_kl_and_policy_gradient_by_hand():
    r = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 4.0]])
    np.testing.assert_allclose(losses.rloo_advantages(r), [[1 - 2.5, 2 - 2, 3 - 1.5], [0 - 2, 0 - 2, 4 - 0]])
    lp, ref = np.array([[-1.0, -2.0, -9.0], [-0.5, -0.5, -0.5]]), np.array([[-1.5, -1.0, 0.0], [-1.0, -1.0, -1.0]])
    valid = np.array([[1, 1, 0], [1, 1, 1]], bool)
    total, kl = losses.kl_penalised_rewards(np.array([1.0, 2.0]), lp, ref, valid, 0.5)
    np.testing.assert_allclose(kl, [0.5 - 1.0, 1.5])
    np.testing.assert_allclose(total, [1.0 + 0.25, 2.0 - 0.75])
    np.testing.assert_allclose(losses.policy_gradient(lp, valid, np.array([2.0, -1.0])), -(2 * -3.0 - 1 * -1.5) / 2)
    with pytest.raises(ConfigError, match="at least 2 samples"):
        losses.rloo_advantages(np.ones((3, 1)))


def test_rloo_loss_and_kl_equal_a_hand_computation_on_a_tiny_model(tiny):
    config, base = tiny
    rc = rloo.RLOOConfig(samples_per_prompt=2, max_new_tokens=5, beta=0.3, lora_rank=4)
    trainable, frozen = rloo.initial_params(base, rc)
    trainable = jax.tree.map(lambda x: x + 0.05, trainable)  # B != 0: the policy differs from the reference
    ids, mask = sampling.left_pad([p for p in prompt_set(2) for _ in range(2)], 0)
    policy = rloo.policy_params(trainable, frozen, rc)
    s = sampling.generate(policy, config, ids, mask, jax.random.key(1), SampleConfig(max_new_tokens=5, stop_ids=(3,)))
    lp = jax.jit(lambda p, *a: rloo.completion_logprobs(p, config, *a))(policy, ids, mask, s.tokens, s.valid)
    np.testing.assert_allclose(np.asarray(lp), np.asarray(s.logprobs), atol=1e-5)  # sampler = teacher forcing
    rew = np.array([1.0, 0.0, 2.0, 5.0], np.float32)
    batch = {"prompt_ids": ids, "prompt_mask": mask, "tokens": s.tokens, "valid": s.valid, "rewards": rew}
    loss, metrics = jax.jit(lambda t, f, b: rloo.rloo_loss(t, f, b, config=config, rc=rc))(trainable, frozen, batch)

    def seq_logprobs(params):  # one full forward over [prompt | reply] per sample, log-softmax by hand
        seqs = [np.concatenate([ids[r][mask[r] > 0], np.asarray(s.tokens[r][:int(s.lengths[r])])])
                for r in range(ids.shape[0])]
        width = max(map(len, seqs))
        padded = np.array([np.pad(q, (0, width - len(q))) for q in seqs], np.int32)
        valid = (np.arange(width)[None] < np.array([[len(q)] for q in seqs])).astype(np.int32)
        logits = np.asarray(jax.jit(lambda p, i, m: unembed(p, config, forward(p, config, i, m).hidden))(
            params, padded, valid), np.float64)
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        out = []
        for r, q in enumerate(seqs):
            n = int(s.lengths[r])
            out.append(sum(logp[r, len(q) - n - 1 + t, q[len(q) - n + t]] for t in range(n)))
        return np.array(out)

    pol, ref = seq_logprobs(policy), seq_logprobs(base)
    kl = pol - ref
    total = rew - 0.3 * kl
    adv = np.concatenate([[a - b, b - a] for a, b in total.reshape(2, 2)])  # K = 2: r_i - r_other
    np.testing.assert_allclose(float(metrics["kl"]), kl.mean(), atol=1e-4)
    np.testing.assert_allclose(float(loss), -np.mean(adv * pol), rtol=1e-4, atol=1e-5)


def test_a_tiny_model_learns_a_known_reward(tiny, tmp_path):
    config, base = tiny
    rc = rloo.RLOOConfig(run_dir=str(tmp_path / "run"), steps=14, prompts_per_step=4, samples_per_prompt=4,
                         max_new_tokens=8, beta=0.01, trainable="full", lr=1e-2, save_every=100)
    out = rloo.train_rloo(base, config, prompt_set(8), rewards.token_utility(np.array([7, 11])), rc, log=lambda m: None)
    r = [h["reward"] for h in out["history"]]
    assert np.mean(r[-3:]) > np.mean(r[:3]) + 2.0, r  # from ~0.25 utility tokens per 8 to several


def test_a_nan_reward_skips_the_step_and_is_reported(tiny, tmp_path):
    config, base = tiny
    rc = rloo.RLOOConfig(run_dir=str(tmp_path / "nan"), steps=2, prompts_per_step=2, samples_per_prompt=2,
                         max_new_tokens=4, lora_rank=4, save_every=10)
    calls = []

    def reward(idx, samples):
        calls.append(1)
        r = np.zeros(len(idx), np.float32)
        r[0] = np.nan if len(calls) == 1 else 1.0
        return r

    logs = []
    out = rloo.train_rloo(base, config, prompt_set(2), reward, rc, log=logs.append)
    assert any("1 of 4 rewards are not finite; step skipped" in m for m in logs)
    assert [h["skipped"] for h in out["history"]] == [1.0, 0.0]
    assert "loss" not in out["history"][0] and np.isfinite(out["history"][1]["loss"])
    with pytest.raises(ConfigError, match="one reward per sample"):
        rloo.train_rloo(base, config, prompt_set(2), lambda i, s: np.zeros(3),
                        dataclasses.replace(rc, run_dir=str(tmp_path / "bad")), log=lambda m: None)


def test_a_resumed_run_equals_an_uninterrupted_one(tiny, tmp_path):
    config, base = tiny
    rc = rloo.RLOOConfig(run_dir=str(tmp_path / "straight"), steps=4, prompts_per_step=2, samples_per_prompt=2,
                         max_new_tokens=6, lora_rank=4, lr=1e-2, save_every=2)
    reward = rewards.token_utility(np.array([5]))
    straight = rloo.train_rloo(base, config, prompt_set(4), reward, rc, log=lambda m: None)
    rc2 = dataclasses.replace(rc, run_dir=str(tmp_path / "resumed"))
    rloo.train_rloo(base, config, prompt_set(4), reward, rc2, log=lambda m: None, stop_after=2)  # "killed" at 2
    logs = []
    resumed = rloo.train_rloo(base, config, prompt_set(4), reward, rc2, log=logs.append)
    assert "resumed from step 2" in logs
    assert [h["step"] for h in resumed["history"]] == [3, 4]
    for a, b in zip(straight["history"][2:], resumed["history"]):
        assert a == pytest.approx(b, abs=1e-6)
    for a, b in zip(jax.tree.leaves(straight["params"]), jax.tree.leaves(resumed["params"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    lines = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4  # every step once
    with pytest.raises(ConfigError, match="other settings"):
        rloo.train_rloo(base, config, prompt_set(4), reward, dataclasses.replace(rc2, beta=0.5), log=lambda m: None)



def test_a_reward_model_scores_the_decoded_text_with_its_own_rendering(tmp_path):
    """rm_reward re-renders each decoded reply with the RM's tokenizer and chat template: equal to a
    full forward of the RM over its own rendering of (prompt, text), at the last token."""
    from hf_models import save_tiny_checkpoint

    from rmjax.data.chat import render
    from rmjax.models.loading import load_model

    save_tiny_checkpoint(tmp_path / "rm", "llama_gqa_tied", head="seqcls", seed=2)
    rm = load_model(str(tmp_path / "rm"))
    prompts = [[{"role": "user", "content": "How do I bake bread?"}], [{"role": "user", "content": "Hi there"}]]
    texts = ["Use flour and water.", "Hello! How can I help?", "", "No."]
    reward = rewards.rm_reward(rm, prompts, decode=lambda samples: texts)
    got = reward(np.array([0, 0, 1, 1]), None)
    for i, (p, t) in enumerate(zip([0, 0, 1, 1], texts)):
        ids = sum(render(rm.tokenizer, prompts[p], t or " ", "model"), [])
        h = reference_hidden(rm.params, rm.config, ids)[-1]
        np.testing.assert_allclose(got[i], float(h @ np.asarray(rm.score_head)[:, 0]), atol=1e-4)
