"""Implicit reward models of an RLHF-tuned LM (Marks et al. 2024), a controlled run on CPU.

    python experiments/irm/rlhf.py --out runs/irm_rlhf            # all stages; resumable stage by stage

1. rl        SmolLM2-135M-Instruct tuned by RLOO (LoRA) against a *known* reward: the number of Big Two
             agency tokens in the reply (``rmjax.rl.rewards.token_utility``), KL penalty to the start.
2. values    the implicit reward log pi_tuned(w|x) - log pi_start(w|x) of every Big Two noun as the
             one-word reply to the 54 value prompts (the seed-0 implicit RM on a same-family pair):
             do the agency words rank above the communion words? (AUC per prompt, its mean and a
             Wilcoxon signed-rank test over prompts against 0.5.)
3. samples   K replies of the tuned model to held-out prompts, their true reward, their implicit
             reward, and layer-L activations of the tuned and the starting model on them.
4. sae       a sparse autoencoder on each model's activations; dictionaries matched by decoder
             cosine; the linear IRM (SAE features -> true reward, fitted on half the prompts) and
             the implicit reward as a second IRM, both scored by Kendall tau with the true reward on
             the held-out half.
Results: ``OUT/results.json`` and the tables beside it; numbers in experiments/irm/README.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np

from rmjax.analysis.dictionary import load_dictionary
from rmjax.data.chat import render
from rmjax.data.records import read_records
from rmjax.models.loading import load_model
from rmjax.rl import rewards, rloo
from rmjax.rl.sampling import SampleConfig, generate, left_pad


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def prompts_of(tokenizer, n: int, skip: int = 0, max_tokens: int = 64) -> tuple[list[np.ndarray], list[str]]:
    """First-turn prompts of bundled HH-RLHF helpful pairs, rendered with the chat template (and the
    assistant turn opened), at most ``max_tokens`` long: ``n`` of them after the first ``skip``."""
    ids, texts = [], []
    for rec in read_records("hh-rlhf:helpful-base", on_error="skip"):
        first = [rec.prompt_messages[0]]
        p, _ = render(tokenizer, first, "", "model")
        if len(p) <= max_tokens:
            ids.append(np.asarray(p, np.int32))
            texts.append(first[0]["content"])
    if len(ids) < skip + n:
        raise SystemExit(f"only {len(ids)} short prompts, need {skip + n}")
    return ids[skip:skip + n], texts[skip:skip + n]


def stage_rl(args, loaded, utility) -> dict:
    rc = rloo.RLOOConfig(run_dir=str(Path(args.out) / "rl"), steps=args.steps, prompts_per_step=args.prompts_per_step,
                         samples_per_prompt=args.k, max_new_tokens=args.new_tokens, temperature=1.0, beta=args.beta,
                         trainable="lora", lora_rank=8, lora_alpha=16.0, lr=args.lr, seed=0, save_every=5)
    prompts, _ = prompts_of(loaded.tokenizer, args.train_prompts)
    tok = loaded.tokenizer
    out = rloo.train_rloo(loaded.params, loaded.config, prompts, rewards.token_utility(utility), rc,
                          stop_ids=tuple(tok.end_of_turn_ids), pad_id=tok.pad_id, log=log)
    history = [json.loads(ln) for ln in (Path(rc.run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {"params": out["params"], "frozen": out["frozen"], "rc": rc, "history": history}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/irm_rlhf")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--prompts-per-step", type=int, default=8)
    p.add_argument("--k", type=int, default=4, help="samples per prompt")
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--beta", type=float, default=0.02)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--train-prompts", type=int, default=240)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    loaded = load_model("smollm2-135m-instruct")
    big2 = load_dictionary("big2_nouns")
    utility = rewards.utility_token_ids(loaded.tokenizer, big2.words_in("Agency"))
    log(f"utility: {len(utility)} agency tokens of {loaded.tokenizer.source}")
    t0 = time.perf_counter()
    rl = stage_rl(args, loaded, utility)
    log(f"rl: {args.steps} steps in {(time.perf_counter() - t0) / 60:.1f} min")
    results = {"rl": {"first": rl["history"][0], "last": rl["history"][-1]}}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
