"""Implicit reward models of an RLHF-tuned LM (Marks et al. 2024), a controlled run on CPU.

    python experiments/irm/rlhf.py --out runs/irm_rlhf            # all stages; resumable stage by stage

1. rl        SmolLM2-135M-Instruct tuned by RLOO (LoRA) against a *known* reward: the number of agency
             tokens (the expanded Big Two dictionary's agency words that are single tokens) in the reply (``rmjax.rl.rewards.token_utility``), KL penalty to the start,
             on one-word questions about people and groups (18 questions; 6 more held out).
2. values    the implicit reward log pi_tuned(w|x) - log pi_start(w|x) of every Big Two noun as the
             one-word reply to the 54 value prompts (the seed-0 implicit RM on a same-family pair):
             do the agency words rank above the communion words? (AUC per prompt, its mean and a
             Wilcoxon signed-rank test over prompts against 0.5.)
3. samples   K replies of the tuned model to the held-out questions, their true reward, their implicit
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
from rmjax.models.loading import load_model
from rmjax.rl import rewards, rloo
from rmjax.rl.sampling import SampleConfig, generate, left_pad


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# One-word questions for training and for the held-out IRM samples: a design of their own, disjoint
# from the paper's 54 value prompts (which stage 2 scores).
TEMPLATES = ("What, in one word, matters most in {s}?",
             "Name the one quality you admire most in {s}. Answer in one word.",
             "In one word, what does {s} need most?")
SUBJECTS = ("a person", "a leader", "a friend", "a student", "a team", "a family", "a community", "a career")
HELD_OUT = ("a friend", "a career")  # subjects only the IRM samples see


def question_prompts(tokenizer, held_out: bool) -> tuple[list[np.ndarray], list[str]]:
    """The training (or held-out) questions rendered with the chat template, the assistant turn open."""
    texts = [t.format(s=s) for s in SUBJECTS for t in TEMPLATES if (s in HELD_OUT) == held_out]
    return [np.asarray(render(tokenizer, [{"role": "user", "content": q}], "", "model")[0], np.int32)
            for q in texts], texts


def stage_rl(args, loaded, utility) -> dict:
    rc = rloo.RLOOConfig(run_dir=str(Path(args.out) / "rl"), steps=args.steps, prompts_per_step=args.prompts_per_step,
                         samples_per_prompt=args.k, max_new_tokens=args.new_tokens, temperature=1.0, beta=args.beta,
                         trainable="lora", lora_rank=8, lora_alpha=16.0, lr=args.lr, seed=0, save_every=5)
    prompts, _ = question_prompts(loaded.tokenizer, held_out=False)
    tok = loaded.tokenizer
    out = rloo.train_rloo(loaded.params, loaded.config, prompts, rewards.token_utility(utility), rc,
                          stop_ids=tuple(tok.end_of_turn_ids), pad_id=tok.pad_id, log=log)
    history = [json.loads(ln) for ln in (Path(rc.run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {"params": out["params"], "frozen": out["frozen"], "rc": rc, "history": history}


def tuned_model(loaded, rl: dict):
    """The tuned policy as a loaded model (the adapters merged into the starting weights)."""
    merged = jax.jit(lambda p, f: rloo.policy_params(p, f, rl["rc"]))(rl["params"], rl["frozen"])
    return dataclasses.replace(loaded, params=merged, source=f"{loaded.source}+rloo")


def stage_values(args, loaded, tuned, big2) -> dict:
    """Implicit reward of every Big Two noun as the one-word reply to the 54 value prompts."""
    import pandas as pd
    import yaml
    from importlib import resources

    from scipy.stats import wilcoxon

    from rmjax.scoring.vocab_scan import word_scores

    prompts = yaml.safe_load((resources.files("rmjax.data") / "bundled" / "prompts" / "value_prompts.yaml").read_text())
    words = big2.words
    path = Path(args.out) / "value_implicit_reward.parquet"
    if path.exists():
        table = pd.read_parquet(path)
    else:
        a = word_scores(tuned, prompts, words, template="model")
        b = word_scores(loaded, prompts, words, template="model")
        table = a.set_index("response") - b.set_index("response")
        table = table.reset_index()
        table.to_parquet(path)
    agency = table["response"].isin(big2.words_in("Agency")).to_numpy()
    aucs = []
    for key in prompts:
        x = table[key].to_numpy()
        diff = x[agency][:, None] - x[~agency][None, :]
        aucs.append(float(np.mean((diff > 0) + 0.5 * (diff == 0))))
    aucs = np.array(aucs)
    return {"prompts": len(aucs), "agency_words": int(agency.sum()), "communion_words": int((~agency).sum()),
            "auc_mean": float(aucs.mean()), "auc_mean_ci95": mean_ci(aucs), "auc_min": float(aucs.min()), "auc_max": float(aucs.max()),
            "prompts_auc_above_half": int((aucs > 0.5).sum()),
            "wilcoxon_p": float(wilcoxon(aucs - 0.5).pvalue),
            "mean_implicit_reward_agency": float(table.loc[agency, list(prompts)].to_numpy().mean()),
            "mean_implicit_reward_communion": float(table.loc[~agency, list(prompts)].to_numpy().mean())}


def stage_samples(args, loaded, tuned, utility) -> dict:
    """K replies of the tuned model to each held-out prompt: true reward, implicit reward, and the
    layer-``args.layer`` residual activations of both models at every real token."""
    path = Path(args.out) / "samples.npz"
    if path.exists():
        return dict(np.load(path))
    from rmjax.sae.activations import residual_fn

    tok, config = loaded.tokenizer, loaded.config
    prompts, _ = question_prompts(tok, held_out=True)
    width = max(len(p) for p in prompts)
    sc = SampleConfig(max_new_tokens=args.new_tokens, stop_ids=tuple(tok.end_of_turn_ids), pad_id=tok.pad_id)
    layer = residual_fn(config, args.layer)  # runs only the first args.layer layers
    logp = jax.jit(lambda params, ids, mask, t, v: rloo.completion_logprobs(params, config, ids, mask, t, v).sum(1))
    parts: dict[str, list] = {k: [] for k in ("prompt", "tokens", "valid", "implicit", "act_base", "act_tuned",
                                              "row_sample", "row_is_reply", "row_token")}
    chunk = 2  # prompts per generation batch
    for start in range(0, len(prompts), chunk):
        chosen = np.repeat(np.arange(start, min(start + chunk, len(prompts))), args.eval_k)
        ids, mask = left_pad([prompts[i] for i in chosen], tok.pad_id, length=width)
        smp = generate(tuned.params, config, ids, mask, jax.random.fold_in(jax.random.key(123), start), sc)
        t, v = np.asarray(smp.tokens), np.asarray(smp.valid)
        parts["implicit"].append(np.asarray(logp(tuned.params, ids, mask, t, v) - logp(loaded.params, ids, mask, t, v)))
        full_ids, full_mask = np.concatenate([ids, t], 1), np.concatenate([mask, v.astype(np.int32)], 1)
        real = full_mask > 0
        rows = {"input_ids": full_ids, "segment_ids": full_mask, "branch_ids": np.zeros_like(full_mask),
                "positions": np.maximum(np.cumsum(full_mask, 1) - 1, 0).astype(np.int32)}
        for name, model in (("act_base", loaded), ("act_tuned", tuned)):
            parts[name].append(np.asarray(layer(model.params, rows))[real])
        n_before = sum(len(x) for x in parts["prompt"])
        sample, column = np.nonzero(real)  # row-major, as [real] orders the rows
        parts["row_sample"].append(sample + n_before)
        parts["row_is_reply"].append(column >= width)
        parts["row_token"].append(full_ids[real])
        parts["prompt"].append(chosen)
        parts["tokens"].append(t)
        parts["valid"].append(v)
        log(f"samples: {start + len(chosen) // args.eval_k}/{len(prompts)} prompts")
    out = {k: np.concatenate(v) for k, v in parts.items()}
    out["reward"] = rewards.token_utility(utility)(None, rloo.Samples(out["tokens"], None, out["valid"], None, None))
    np.savez(path, **out)
    return out


def bootstrap_tau(prediction, truth, n: int = 1000, seed: int = 0) -> list[float]:
    """95% percentile-bootstrap interval of Kendall tau over the held-out replies."""
    from rmjax.sae import kendall_tau

    rng = np.random.default_rng(seed)
    taus = [kendall_tau(prediction[i], truth[i]) for i in (rng.integers(0, len(truth), len(truth)) for _ in range(n))]
    return [float(np.nanpercentile(taus, 2.5)), float(np.nanpercentile(taus, 97.5))]


def mean_ci(values) -> list[float]:
    v = np.asarray(values, np.float64)
    half = 1.959964 * v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else float("nan")
    return [float(v.mean() - half), float(v.mean() + half)]


def stage_sae(args, loaded, samples: dict) -> dict:
    """SAEs on both models' activations, the dictionaries matched, and the two IRMs."""
    import pandas as pd

    from rmjax.sae import SAEConfig, fit_irm, kendall_tau, match_dictionaries, pairwise_agreement, top_activations
    from rmjax.sae import model as sae_model
    from rmjax.sae.train import activation_scale, train_sae

    out = Path(args.out)
    # each sequence's first token (<|im_start|>) is an attention sink whose residual norm is ~150x the
    # others' (23,666 vs 153 at layer 15): it would dominate the SAE's loss, so it is left out
    first = np.r_[True, samples["row_sample"][1:] != samples["row_sample"][:-1]]
    samples = {k: (v[~first] if k.startswith(("act_", "row_")) else v) for k, v in samples.items()}
    cfg = SAEConfig(d=samples["act_tuned"].shape[1], num_features=args.sae_features, kind="relu", l1_coef=5.0,
                    steps=args.sae_steps, batch_size=256, resample_every=args.sae_steps // 4, log_every=250, seed=0)
    saes, metrics = {}, {}
    for name in ("base", "tuned"):
        x = samples[f"act_{name}"]
        scale = activation_scale(x)
        params, history = train_sae(x * scale, cfg)
        last = history["metrics"][-1]
        codes = np.asarray(sae_model.jitted("encode", cfg.kind, cfg.k)(params, x * scale))
        saes[name] = (params, scale, codes)
        metrics[name] = {"fvu": last["fvu"], "l0": last["l0"], "dead_fraction": last["dead_fraction"],
                         "features_that_fire": int((codes > 0).any(axis=0).sum()),
                         "resampled": sum(r["features"] for r in history["resampled"])}
        log(f"sae {name}: {metrics[name]}")
    match = match_dictionaries(saes["base"][0], saes["tuned"][0], shared=0.9, lo=0.5)
    match.to_parquet(out / "dictionary_match.parquet")
    status = match.groupby(["dictionary", "status"]).size().unstack(fill_value=0).to_dict(orient="index")

    # the linear IRM over the tuned SAE's features, mean-pooled over each reply's tokens
    reply = samples["row_is_reply"].astype(bool)
    n = len(samples["reward"])
    codes = saes["tuned"][2]
    pooled = np.zeros((n, codes.shape[1]))
    np.add.at(pooled, samples["row_sample"][reply], codes[reply])
    counts = np.bincount(samples["row_sample"][reply], minlength=n)
    pooled /= np.maximum(counts, 1)[:, None]
    fit = fit_irm(pooled, samples["reward"], test_fraction=0.5, seed=0, top=10, min_active=5)
    held = fit.test_index
    truth = samples["reward"][held]
    implicit = {"kendall_tau": kendall_tau(samples["implicit"][held], truth),
                "kendall_tau_ci95": bootstrap_tau(samples["implicit"][held], truth),
                "pairwise_agreement": pairwise_agreement(samples["implicit"][held], truth)}
    decode = lambda t: loaded.tokenizer.decode([int(t)])  # noqa: E731
    tops = []
    for f in fit.top["feature"][:5]:
        t = top_activations(codes[reply], samples["row_token"][reply], samples["row_sample"][reply], int(f), k=8,
                            decode=decode)  # in the replies, where the features were pooled
        tops.append({"feature": int(f), "status": match.query("dictionary == 'tuned' and feature == @f")["status"].iloc[0],
                     "top_tokens": t["text"].tolist()})
    fit.top.to_csv(out / "irm_top_features.csv", index=False)
    pd.DataFrame(tops).to_json(out / "irm_top_feature_tokens.json", orient="records", indent=1)
    return {"sae": metrics, "match": status,
            "irm_sae": fit.summary() | {"kendall_tau_ci95": bootstrap_tau(fit.test_prediction, truth)},
            "irm_implicit": implicit,
            "reward_held_out": {"mean": float(samples["reward"][held].mean()),
                                "nonzero_fraction": float((samples["reward"][held] > 0).mean())},
            "irm_top_features": tops}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/irm_rlhf")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--prompts-per-step", type=int, default=6)
    p.add_argument("--k", type=int, default=8, help="samples per prompt")
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--beta", type=float, default=0.05)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--eval-k", type=int, default=32, help="samples per held-out question (IRM)")
    p.add_argument("--sae-features", type=int, default=1024)
    p.add_argument("--sae-steps", type=int, default=2000)
    p.add_argument("--layer", type=int, default=15, help="residual stream after this layer (0 = embeddings)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    loaded = load_model("smollm2-135m-instruct")
    big2 = load_dictionary("big2_nouns")  # the paper's value words (stage 2)
    utility = rewards.utility_token_ids(loaded.tokenizer, load_dictionary("big2_expanded").words_in("Agency"))
    log(f"utility: {len(utility)} agency tokens of {loaded.tokenizer.source}")
    t0 = time.perf_counter()
    rl = stage_rl(args, loaded, utility)
    log(f"rl: {args.steps} steps in {(time.perf_counter() - t0) / 60:.1f} min")
    hist = rl["history"]
    window = max(1, len(hist) // 5)
    mean = lambda rows, k: float(np.mean([h[k] for h in rows]))  # noqa: E731
    results = {"rl": {"steps": len(hist), "first_reward": mean(hist[:window], "reward"),
                      "last_reward": mean(hist[-window:], "reward"),
                      "first_reward_ci95": mean_ci([h["reward"] for h in hist[:window]]),
                      "last_reward_ci95": mean_ci([h["reward"] for h in hist[-window:]]),
                      "last_kl": mean(hist[-window:], "kl"), "last_kl_ci95": mean_ci([h["kl"] for h in hist[-window:]]),
                      "max_kl": max(h["kl"] for h in hist), "window": window}}
    log(f"rl: {results['rl']}")
    tuned = tuned_model(loaded, rl)
    t0 = time.perf_counter()
    results["values"] = stage_values(args, loaded, tuned, big2)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    log(f"values ({(time.perf_counter() - t0) / 60:.1f} min): {results['values']}")
    t0 = time.perf_counter()
    samples = stage_samples(args, loaded, tuned, utility)
    log(f"samples ({(time.perf_counter() - t0) / 60:.1f} min): {len(samples['reward'])} replies, "
        f"{len(samples['row_token'])} token rows, mean reward {samples['reward'].mean():.3f}")
    t0 = time.perf_counter()
    results.update(stage_sae(args, loaded, samples))
    log(f"sae + irm ({(time.perf_counter() - t0) / 60:.1f} min): irm {results['irm_sae']}, implicit "
        f"{results['irm_implicit']}")
    (out / "results.json").write_text(json.dumps(results, indent=1, default=float))
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
