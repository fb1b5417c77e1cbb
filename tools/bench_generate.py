"""Generation and RL-step throughput: rmjax's KV-cache sampler vs Hugging Face ``generate``, one run.

    python tools/bench_generate.py [--batch 32] [--prompt-tokens 48] [--new-tokens 64]

1. Greedy generation with SmolLM2-135M-Instruct (fp32, the same GGUF weights for both): a batch of
   left-padded chat prompts from the bundled HH-RLHF pairs, ``--new-tokens`` new tokens each (no
   stop token, so both produce exactly that many). rmjax: ``rmjax.rl.sampling.generate`` (prefill
   once, then one token per step against a fixed-size cache, one jitted program); HF torch:
   ``model.generate(do_sample=False, use_cache=True)``. Generated tokens/s and the fraction of
   rows whose greedy tokens agree.
2. One RLOO step of ``rmjax.rl.rloo`` (LoRA rank 8, K = 4) split into sampling / reward / update.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench_common import environment, write_result  # noqa: E402


def prompts(tok, n: int, max_tokens: int) -> list[list[int]]:
    from rmjax.data.chat import render
    from rmjax.data.records import read_records

    out = []
    for rec in read_records("hh-rlhf:helpful-base", on_error="skip"):
        p, _ = render(tok, rec.prompt_messages[:1], "", "model")
        if len(p) <= max_tokens:
            out.append(p)
        if len(out) == n:
            return out
    raise SystemExit(f"only {len(out)} prompts of at most {max_tokens} tokens")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=48, help="longest prompt (left-padded to it)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default="tools/results/generate.json")
    args = p.parse_args(argv)

    import jax

    from rmjax.io.registry import resolve_model
    from rmjax.models.loading import load_model
    from rmjax.rl import rewards, rloo
    from rmjax.rl.sampling import SampleConfig, generate, left_pad
    from bench_scoring import hf_model

    loaded = load_model("smollm2-135m-instruct")
    tok = loaded.tokenizer
    seqs = prompts(tok, args.batch, args.prompt_tokens)
    ids, mask = left_pad([np.asarray(s, np.int32) for s in seqs], tok.pad_id)
    sc = SampleConfig(max_new_tokens=args.new_tokens, temperature=0.0, pad_id=tok.pad_id)
    key = jax.random.key(0)
    result = {"environment": environment(), "batch": args.batch, "prompt_length": int(ids.shape[1]),
              "new_tokens": args.new_tokens}

    t0 = time.perf_counter()
    ours = jax.block_until_ready(generate(loaded.params, loaded.config, ids, mask, key, sc))
    result["rmjax_first_call_s"] = time.perf_counter() - t0
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        ours = jax.block_until_ready(generate(loaded.params, loaded.config, ids, mask, key, sc))
        times.append(time.perf_counter() - t0)
    result["rmjax_s"] = min(times)

    hf = hf_model(resolve_model("smollm2-135m-instruct"))
    hf.generation_config.pad_token_id = tok.pad_id
    t_ids, t_mask = torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)
    times = []
    with torch.inference_mode():
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            theirs = hf.generate(input_ids=t_ids, attention_mask=t_mask, max_new_tokens=args.new_tokens,
                                 min_new_tokens=args.new_tokens, do_sample=False, use_cache=True, eos_token_id=None)
            times.append(time.perf_counter() - t0)
    result["hf_s"] = min(times)
    generated = args.batch * args.new_tokens
    result["rmjax_tokens_per_s"] = generated / result["rmjax_s"]
    result["hf_tokens_per_s"] = generated / result["hf_s"]
    result["ratio_rmjax_over_hf"] = result["hf_s"] / result["rmjax_s"]
    hf_new = theirs[:, ids.shape[1]:].numpy()
    result["rows_identical"] = float(np.mean(np.all(hf_new == np.asarray(ours.tokens), axis=1)))
    result["first_token_agreement"] = float(np.mean(hf_new[:, 0] == np.asarray(ours.tokens)[:, 0]))
    write_result(args.out, result)

    # one RL step, split
    rc = rloo.RLOOConfig(samples_per_prompt=4, max_new_tokens=args.new_tokens, lora_rank=8)
    trainable, frozen = rloo.initial_params(loaded.params, rc)
    step = rloo.make_step(loaded.config, rc, rloo.make_optimizer(rc))
    state = rloo.RLState(jax.numpy.zeros((), jax.numpy.int32), trainable, rloo.make_optimizer(rc).init(trainable))
    merge = jax.jit(lambda t, f: rloo.policy_params(t, f, rc))
    reward = rewards.token_utility(np.arange(100, 200))
    sample_cfg = SampleConfig(max_new_tokens=args.new_tokens, pad_id=tok.pad_id)
    rep_ids, rep_mask = np.repeat(ids[:args.batch // 4], 4, 0), np.repeat(mask[:args.batch // 4], 4, 0)
    split = {}
    for attempt in range(2):  # the first compiles
        t0 = time.perf_counter()
        smp = jax.block_until_ready(generate(merge(state.params, frozen), loaded.config, rep_ids, rep_mask, key,
                                             sample_cfg))
        t1 = time.perf_counter()
        r = reward(None, jax.device_get(smp))
        t2 = time.perf_counter()
        state, metrics = step(state, frozen, {"prompt_ids": rep_ids, "prompt_mask": rep_mask, "tokens": smp.tokens,
                                              "valid": smp.valid, "rewards": r})
        jax.block_until_ready(metrics)
        t3 = time.perf_counter()
        split = {"sampling_s": t1 - t0, "reward_s": t2 - t1, "update_s": t3 - t2}
    result["rl_step"] = {"samples": len(rep_ids), **split}
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    from rmjax.cli import restart_with_hugepages

    restart_with_hugepages()  # as the rmjax command line runs
    sys.exit(main())
