"""Implicit-reward scoring throughput: rmjax vs Hugging Face transformers (torch), same pairs, one run.

    python tools/bench_scoring.py [--pairs 32] [--scan-sample 1024]

1. Bulk implicit reward on bundled HH-RLHF pairs: policy SmolLM2-135M-Instruct, reference
   Gemma-3-270M (different tokenizers: each model renders the text itself). rmjax (all paths, same
   run): packed prompt trees (prompt once, replies as attention branches, rows packed full) at
   each --pack-lengths, and length-bucketed batches with both replies on the prompt's KV cache;
   chunked log-softmax over response tokens only. HF torch: what a user writes: each full
   transcript (prompt + reply) through the model in batches, log_softmax, gather. Both fp32; the
   per-sequence log-prob sums are compared in the same run.
   The same on long pairs (``long_pairs``: 1-2K-token multi-turn transcripts stacked from whole
   HH-RLHF conversations), with SmolLM2 alone and with SmolLM2 + Gemma-3.
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


def hf_sequence_logprobs(model, seqs: list[tuple[list[int], list[int]]], batch: int, pad_id: int,
                         device: str = "cpu") -> np.ndarray:
    """Sum of log p(response | prompt) per (prompt ids, response ids), right padding, full logits, the
    model on ``device`` (the batches are built there; a GPU is synchronised before returning)."""
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
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            logp = torch.log_softmax(logits.float(), -1)
            for i, (p, r) in enumerate(chunk):
                pos = torch.arange(len(p) - 1, len(p) + len(r) - 1, device=device)
                out.append(float(logp[i, pos, torch.tensor(r, device=device)].sum()))
    if device != "cpu":
        torch.cuda.synchronize()
    return np.asarray(out)


def hh_sample(n_pairs: int, seed: int) -> list:
    """A fixed, seeded sample of the bundled HH-RLHF test pairs (short: ~250 tokens on average)."""
    from dataclasses import replace

    from rmjax.data.records import read_records

    records = read_records("hh-rlhf", on_error="skip")
    keep = np.sort(np.random.default_rng(seed).choice(len(records), n_pairs, replace=False))
    return [replace(records[i], index=j) for j, i in enumerate(keep)]


def long_pairs(n_pairs: int, seed: int, tokenizer, lo: int = 1024, hi: int = 2048) -> list:
    """Long multi-turn pairs built from the bundled HH-RLHF helpful-base pairs: in a seeded order,
    whole conversations (their turns, then the chosen reply as the assistant turn) are stacked as
    earlier turns of one conversation until its text holds ``lo``..``hi`` tokens (counted with
    ``tokenizer``); the last conversation's prompt and its chosen / rejected replies end it. A real
    1-2K-token transcript whose two replies differ only in the last turn, as in HH-RLHF."""
    from rmjax.data.records import Record, read_records

    records = read_records("hh-rlhf:helpful-base", on_error="skip")
    order = iter(np.random.default_rng(seed).permutation(len(records)))
    count = lambda turns: sum(len(tokenizer.encode(c, add_special_tokens=False)) for _, c in turns)  # noqa: E731
    out, history, size = [], [], 0
    while len(out) < n_pairs:
        rec = records[next(order)]
        turns = list(rec.prompt)
        n = count(turns) + max(count([("", r)]) for r in rec.responses)
        if size + n > hi:
            history, size = [], 0
            continue
        if size + n >= lo:
            out.append(Record(id=f"long:{len(out)}", prompt=tuple(history + turns), responses=rec.responses,
                                     kind="pair", index=len(out)))
            history, size = [], 0
        else:
            history += turns + [("assistant", rec.responses[0])]
            size += count(turns) + count([("", rec.responses[0])])
    return out


def bench_bulk(records: list, names: dict[str, str], pack_lengths: tuple[int, ...], max_length: int,
               batch_tokens: int) -> dict:
    """rmjax's bulk scorer (packed prompt trees at each of ``pack_lengths``; 0 = the KV-cache path over
    length buckets) vs HF torch computing the same per-sequence log-prob sums, on ``records``."""
    from rmjax.io import registry
    from rmjax.models.loading import load_model
    from rmjax.models.transformer import flops_per_token
    from rmjax.scoring import bulk

    n_pairs = len(records)
    slots = [bulk.ModelSlot(role, load_model(name)) for role, name in names.items()]
    modes = {}
    for pack in pack_lengths:
        mode = f"packed_{pack}" if pack else "kv_cache_buckets"
        settings = bulk.ScoreSettings(max_length=max_length, batch_size=4, shard_size=n_pairs, pack_length=pack,
                                      batch_tokens=max(batch_tokens, pack))
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
        print(mode, {k: v for k, v in modes[mode].items() if k != "rows"}, flush=True)
    rows = next(iter(modes.values()))["rows"]
    kept = {r["index"] for r in rows}

    flops = 0.0
    hf_time, max_diff, naive_tokens = 0.0, 0.0, 0
    lengths = []
    for slot in slots:
        seqs = []  # the very token ids rmjax scored (same rendering and truncation)
        for rec in records:
            if rec.index not in kept:
                continue
            enc = bulk.encode(slot, rec, settings)
            seqs.extend((list(enc.prompt), list(r)) for r in enc.responses)
        lengths.extend(len(p) + len(r) for p, r in seqs)
        naive_tokens += sum(len(p) + len(r) for p, r in seqs)
        cfg = slot.loaded.config
        flops += sum(flops_per_token(cfg, len(p) + len(r)) * (len(p) + len(r))
                     + 2 * cfg.hidden_size * cfg.vocab_size * len(r) for p, r in seqs)
        model = hf_model(registry.resolve_model(names[slot.role]))
        hf_model_time = time.perf_counter()
        # the vocabulary-sized fp32 logits of HF's forward bound its batch: [B, T, V] * 4 bytes
        batch = max(1, int(2e9 // (4 * cfg.vocab_size * max(len(p) + len(r) for p, r in seqs))))
        ref = hf_sequence_logprobs(model, seqs, batch=min(batch, 8), pad_id=slot.tokenizer.pad_id)
        hf_time += time.perf_counter() - hf_model_time
        for m in modes.values():
            ours = np.array([row[f"{slot.role}_{side}_logp_sum"] for row in m["rows"] for side in ("chosen", "rejected")])
            max_diff = max(max_diff, float(np.max(np.abs(ours - ref) / np.maximum(np.abs(ref), 1.0))))
        del model
    out = {"pairs": len(rows), "dropped": len(dropped), "models": names,
           "sequence_tokens_mean": float(np.mean(lengths)), "sequence_tokens_max": int(np.max(lengths)),
           "hf_torch_s": hf_time, "hf_torch_pairs_per_s": len(rows) / hf_time,
           "max_rel_diff_logp_vs_hf": max_diff,
           "useful_flops": flops, "hf_achieved_flops": flops / hf_time,
           "hf_sequence_tokens_per_s": naive_tokens / hf_time}
    if "reference" in names:
        out["implicit_pairwise_accuracy"] = bulk.summarise(rows).get("implicit_pairwise_accuracy")
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
    from rmjax.scoring.kv_path import bucket
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
    ap.add_argument("--pairs", type=int, default=32, help="HH-RLHF pairs (short)")
    ap.add_argument("--long-pairs", type=int, default=16, help="long multi-turn pairs (1-2K tokens); 0 skips")
    ap.add_argument("--pack-lengths", type=int, nargs="+", default=[512, 2048, 0],
                    help="packed row lengths to measure (0 = the KV-cache path)")
    ap.add_argument("--batch-tokens", type=int, default=4096)
    ap.add_argument("--scan-sample", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="tools/results/scoring_cpu.json")
    ap.add_argument("--skip-scan", action="store_true")
    args = ap.parse_args()
    from rmjax.io import registry

    policy, reference = "smollm2-135m-instruct", "gemma3-270m"
    both = {"policy": policy, "reference": reference}
    packs = tuple(args.pack_lengths)
    result = {**environment(), "benchmark": "scoring", "dtype": "float32"}
    if args.pairs:
        result["bulk_implicit_reward"] = bench_bulk(hh_sample(args.pairs, args.seed), both, packs, 768,
                                                    args.batch_tokens)
        write_result(args.out, result)  # keep finished parts if a later one is interrupted
    if args.long_pairs:
        long = long_pairs(args.long_pairs, args.seed, registry.load_tokenizer(registry.resolve_model(policy)))
        result["bulk_long_policy_only"] = bench_bulk(long, {"policy": policy}, packs, 2560, args.batch_tokens)
        write_result(args.out, result)
        result["bulk_long_implicit_reward"] = bench_bulk(long, both, packs, 2560, args.batch_tokens)
        write_result(args.out, result)
    if not args.skip_scan:
        result["vocab_scan"] = bench_scan(args.scan_sample)
    peak = matmul_peak_flops()
    result["matmul_peak_flops"] = peak
    result["peak_rss_mb"] = peak_rss_mb()
    write_result(args.out, result)


if __name__ == "__main__":
    from rmjax.cli import restart_with_hugepages

    restart_with_hugepages()  # as the rmjax command line runs
    main()
