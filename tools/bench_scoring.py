"""Implicit-reward scoring throughput: rmjax vs Hugging Face transformers (torch), same pairs, one run.

    python tools/bench_scoring.py [--pairs 32] [--scan-sample 1024]

1. Bulk implicit reward on bundled HH-RLHF pairs: policy SmolLM2-135M-Instruct, reference
   Gemma-3-270M (different tokenizers: each model renders the text itself). rmjax (both paths, same
   run): packed prompt trees (the default: prompt once, replies as attention branches, rows packed
   full) and length-bucketed batches with both replies on the prompt's KV cache; chunked
   log-softmax over response tokens only. HF torch: what a user writes: each full
   transcript (prompt + reply) through the model in the same batches, log_softmax, gather. Both
   fp32; the per-sequence log-prob sums are compared in the same run.
2. Exhaustive scan of one value prompt over SmolLM2's 49,152 tokens (token + end-of-turn suffix):
   rmjax's prefix-cache path over the whole vocabulary vs naive full-sequence scoring (rmjax's own
   forward and HF torch) over a sample of tokens, extrapolated per token.
3. Achieved FLOP/s vs the measured matmul peak (roofline fraction).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench_common import environment, matmul_peak_flops, peak_rss_mb, write_result  # noqa: E402


def hf_model(source):
    from transformers import AutoModelForCausalLM
    path = str(source.path)
    return AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                dtype=torch.float32).eval()


def hf_sequence_logprobs(model, seqs: list[tuple[list[int], list[int]]], batch: int, pad_id: int) -> np.ndarray:
    """Sum of log p(response | prompt) per (prompt ids, response ids), right padding, full logits."""
    out = []
    with torch.inference_mode():
        for start in range(0, len(seqs), batch):
            chunk = seqs[start:start + batch]
            length = max(len(p) + len(r) for p, r in chunk)
            ids = torch.full((len(chunk), length), pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), length), dtype=torch.long)
            for i, (p, r) in enumerate(chunk):
                ids[i, :len(p) + len(r)] = torch.tensor(p + r)
                mask[i, :len(p) + len(r)] = 1
            logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
            for i, (p, r) in enumerate(chunk):
                pos = torch.arange(len(p) - 1, len(p) + len(r) - 1)
                out.append(float(logp[i, pos, torch.tensor(r)].sum()))
    return np.asarray(out)


def bench_bulk(n_pairs: int, seed: int) -> dict:
    from rmjax.data.records import read_records
    from rmjax.io import registry
    from rmjax.models.loading import load_model
    from rmjax.models.transformer import flops_per_token
    from rmjax.scoring import bulk

    records = read_records("hh-rlhf", on_error="skip")
    keep = np.sort(np.random.default_rng(seed).choice(len(records), n_pairs, replace=False))
    from dataclasses import replace
    records = [replace(records[i], index=j) for j, i in enumerate(keep)]
    names = {"policy": "smollm2-135m-instruct", "reference": "gemma3-270m"}
    slots = [bulk.ModelSlot(role, load_model(name)) for role, name in names.items()]
    modes = {}
    # the default (packed prompt trees) and the KV-cache path over length-bucketed batches
    for mode, pack in (("packed", 512), ("kv_cache_buckets", 0)):
        settings = bulk.ScoreSettings(max_length=768, batch_size=4, shard_size=n_pairs, pack_length=pack)
        scorer = bulk.Scorer(slots, settings)
        t0 = time.perf_counter()
        scorer.score_shard(records)  # first pass: includes compilation
        first = time.perf_counter() - t0
        scorer.real_tokens = scorer.padded_tokens = scorer.naive_tokens = 0
        t0 = time.perf_counter()
        rows, dropped, _ = scorer.score_shard(records)
        steady = time.perf_counter() - t0
        modes[mode] = {"first_pass_s": first, "steady_s": steady, "rows": rows,
                       "tokens_computed_vs_full_sequences": scorer.real_tokens / max(scorer.naive_tokens, 1),
                       "padding_efficiency": scorer.real_tokens / max(scorer.padded_tokens, 1)}
    rows = modes["packed"]["rows"]
    kept = {r["index"] for r in rows}

    flops = 0.0
    hf_time, max_diff, naive_tokens = 0.0, 0.0, 0
    for slot in slots:
        seqs = []  # the very token ids rmjax scored (same rendering and truncation)
        for rec in records:
            if rec.index not in kept:
                continue
            enc = bulk.encode(slot, rec, settings)
            seqs.extend((list(enc.prompt), list(r)) for r in enc.responses)
        naive_tokens += sum(len(p) + len(r) for p, r in seqs)
        cfg = slot.loaded.config
        flops += sum(flops_per_token(cfg, len(p) + len(r)) * (len(p) + len(r))
                     + 2 * cfg.hidden_size * cfg.vocab_size * len(r) for p, r in seqs)
        model = hf_model(registry.resolve_model(names[slot.role]))
        hf_model_time = time.perf_counter()
        # 2 sequences (one pair) per batch for Gemma keeps its [B, T, 262144] fp32 logits near 2 GB
        ref = hf_sequence_logprobs(model, seqs, batch=2 if cfg.vocab_size > 100_000 else 8,
                                   pad_id=slot.tokenizer.pad_id)
        hf_time += time.perf_counter() - hf_model_time
        for m in modes.values():
            ours = np.array([row[f"{slot.role}_{side}_logp_sum"] for row in m["rows"] for side in ("chosen", "rejected")])
            max_diff = max(max_diff, float(np.max(np.abs(ours - ref) / np.maximum(np.abs(ref), 1.0))))
        del model
    summary = bulk.summarise(rows)
    out = {"pairs": len(rows), "dropped": len(dropped), "hf_torch_s": hf_time,
           "hf_torch_pairs_per_s": len(rows) / hf_time,
           "max_rel_diff_logp_vs_hf": max_diff,
           "implicit_pairwise_accuracy": summary.get("implicit_pairwise_accuracy"),
           "useful_flops": flops, "hf_achieved_flops": flops / hf_time,
           "hf_sequence_tokens_per_s": naive_tokens / hf_time}
    for mode, m in modes.items():
        out[mode] = {
            "first_pass_s": m["first_pass_s"], "steady_s": m["steady_s"], "pairs_per_s": len(rows) / m["steady_s"],
            "ratio_over_hf": hf_time / m["steady_s"], "ratio_over_hf_including_compile": hf_time / m["first_pass_s"],
            "sequence_tokens_per_s": naive_tokens / m["steady_s"],
            "tokens_computed_vs_full_sequences": m["tokens_computed_vs_full_sequences"],
            "padding_efficiency": m["padding_efficiency"], "achieved_flops": flops / m["steady_s"]}
    return out


def bench_scan(sample: int) -> dict:
    import jax

    from rmjax.data.preferences import load_value_prompts
    from rmjax.io import registry
    from rmjax.models.loading import load_model
    from rmjax.scoring import vocab_scan as vs
    from rmjax.scoring.engine import bucket
    from rmjax.models import forward, unembed

    loaded = load_model("smollm2-135m-instruct")
    prompt = load_value_prompts()["greatest_ever_one"]
    prompt_ids, cands = vs.token_responses(loaded, prompt)
    vs.scan_responses(loaded, prompt_ids, cands[:1024], chunk=1024)  # compile
    t0 = time.perf_counter()
    full = vs.scan_responses(loaded, prompt_ids, cands, chunk=1024)
    t_cache = time.perf_counter() - t0

    rng = np.random.default_rng(0)
    sample_ids = np.sort(rng.choice(len(cands), sample, replace=False))
    seq_len = len(prompt_ids) + len(cands[0])
    length = bucket(seq_len)
    config = loaded.config

    @jax.jit
    def naive(params, ids, mask):
        logits = unembed(params, config, forward(params, config, ids, mask).hidden)
        return jax.nn.log_softmax(logits, axis=-1)

    batch = 64
    def run_naive():
        sums = []
        for start in range(0, sample, batch):
            chunk = sample_ids[start:start + batch]
            ids = np.zeros((batch, length), np.int32)
            mask = np.zeros((batch, length), np.int32)
            for i, t in enumerate(chunk):
                ids[i, :seq_len] = prompt_ids + cands[t]
                mask[i, :seq_len] = 1
            lp = np.asarray(naive(loaded.params, ids, mask))
            pos = np.arange(len(prompt_ids) - 1, seq_len - 1)
            for i, t in enumerate(chunk):
                sums.append(lp[i, pos, cands[t]].sum())
        return np.asarray(sums)

    run_naive()  # compile
    t0 = time.perf_counter()
    naive_sums = run_naive()
    t_naive = (time.perf_counter() - t0) * len(cands) / sample

    model = hf_model(registry.resolve_model("smollm2-135m-instruct"))
    seqs = [(prompt_ids, cands[t]) for t in sample_ids]
    t0 = time.perf_counter()
    hf_sums = hf_sequence_logprobs(model, seqs, batch=64, pad_id=loaded.tokenizer.pad_id)
    t_hf = (time.perf_counter() - t0) * len(cands) / sample
    return {
        "vocab": len(cands), "prompt_tokens": len(prompt_ids), "response_tokens": len(cands[0]),
        "rmjax_prefix_cache_s": t_cache, "rmjax_naive_s_extrapolated": t_naive, "hf_torch_naive_s_extrapolated": t_hf,
        "ratio_prefix_cache_over_naive_rmjax": t_naive / t_cache, "ratio_prefix_cache_over_hf_torch": t_hf / t_cache,
        "max_abs_diff_vs_naive": float(np.abs(full["sum"][sample_ids] - naive_sums).max()),
        "max_abs_diff_vs_hf": float(np.abs(full["sum"][sample_ids] - hf_sums).max()),
        "naive_sample": sample,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=32)
    ap.add_argument("--scan-sample", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="tools/results/scoring_cpu.json")
    ap.add_argument("--skip-scan", action="store_true")
    args = ap.parse_args()
    result = {**environment(), "benchmark": "scoring", "dtype": "float32"}
    result["bulk_implicit_reward"] = bench_bulk(args.pairs, args.seed)
    write_result(args.out, result)  # keep the first part if the scan is interrupted
    if not args.skip_scan:
        result["vocab_scan"] = bench_scan(args.scan_sample)
    peak = matmul_peak_flops()
    result["matmul_peak_flops"] = peak
    b = result["bulk_implicit_reward"]
    result["roofline_fraction"] = {"rmjax_packed": b["packed"]["achieved_flops"] / peak["jax"],
                                   "rmjax_kv_cache_buckets": b["kv_cache_buckets"]["achieved_flops"] / peak["jax"],
                                   "hf_torch": b["hf_achieved_flops"] / peak["torch"]}
    result["peak_rss_mb"] = peak_rss_mb()
    write_result(args.out, result)


if __name__ == "__main__":
    main()
