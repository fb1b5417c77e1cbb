"""``rmjax score`` vs Hugging Face transformers on one GPU: long pairs, a 1B-class Llama, bf16.

    python3 tools/bench_gpu_scoring.py [--pairs 16] [--lo 2048] [--hi 4096] [--out OUT.json]

The checkpoint: a Llama-layout causal LM of 1B-class shape (d=2048, 16 layers, 32 / 8 heads, MLP
8192), random weights in bf16, with the small BPE tokenizer and ChatML template of the test
checkpoints (``tests/hf_models.py``; a 416-token vocabulary, so the LM head is a small share of the
work). The pairs: real HH-RLHF conversations stacked into ``--lo``..``--hi``-token transcripts
(``bench_scoring.long_pairs``), two replies each. rmjax: the bulk scorer (packed prompt trees, the
default layout; the backend ``auto`` picks for the GPU), timed on a second pass after a first that
compiles. HF: what a user writes: each full transcript through ``AutoModelForCausalLM`` (sdpa
attention, bf16) in batches, log_softmax, gather. Both in one process on the same GPU, the same
token ids; reported: sequence tokens/s of each, the ratio, and the largest relative difference of
the per-sequence log-prob sums (bf16: about 1e-2 is expected).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, str(ROOT / "tests"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench_common import environment, write_result  # noqa: E402


def checkpoint(directory: Path) -> None:
    from hf_models import save_tiny_checkpoint
    from transformers import LlamaConfig, LlamaForCausalLM

    _, tok = save_tiny_checkpoint(directory)
    config = LlamaConfig(vocab_size=416, hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, intermediate_size=8192, max_position_embeddings=8192,
                         tie_word_embeddings=False, pad_token_id=tok.pad_token_id, torch_dtype="bfloat16")
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(directory, safe_serialization=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--lo", type=int, default=2048)
    ap.add_argument("--hi", type=int, default=4096)
    ap.add_argument("--hf-batch", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "tools" / "results" / "scoring_gpu.json"))
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench_scoring import hf_sequence_logprobs, long_pairs
    from rmjax.models.config import Numerics
    from rmjax.models.loading import load_model
    from rmjax.scoring import bulk

    directory = Path(tempfile.mkdtemp(prefix="rmjax-gpu-rm-"))
    checkpoint(directory)
    records = long_pairs(args.pairs, 0, AutoTokenizer.from_pretrained(directory), args.lo, args.hi)
    slot = bulk.ModelSlot("policy", load_model(str(directory), Numerics(dtype="bfloat16", param_dtype="bfloat16")))
    settings = bulk.ScoreSettings(max_length=args.hi + 512, shard_size=len(records), pack_length=args.hi + 512,
                                  batch_tokens=2 * (args.hi + 512))
    scorer = bulk.Scorer([slot], settings)
    t0 = time.perf_counter()
    scorer.score_shard(records)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    rows, dropped, _ = scorer.score_shard(records)
    steady = time.perf_counter() - t0
    seqs = []
    for rec in records:
        enc = bulk.encode(slot, rec, settings)
        seqs.extend((list(enc.prompt), list(r)) for r in enc.responses)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16, attn_implementation="sdpa").cuda()
    model.eval()
    hf_sequence_logprobs(model, seqs[:2], args.hf_batch, slot.tokenizer.pad_id, "cuda")  # warm-up
    t0 = time.perf_counter()
    ref = hf_sequence_logprobs(model, seqs, args.hf_batch, slot.tokenizer.pad_id, "cuda")
    hf_s = time.perf_counter() - t0
    ours = np.array([row[f"policy_{side}_logp_sum"] for row in rows for side in ("chosen", "rejected")])
    tokens = sum(len(p) + len(r) for p, r in seqs)
    import jax

    result = {**environment(), "benchmark": "scoring_gpu", "pairs": len(rows), "dropped": len(dropped),
              "sequence_tokens": tokens, "sequence_tokens_max": max(len(p) + len(r) for p, r in seqs),
              "platform": jax.devices()[0].platform,
              "rmjax_first_pass_s": first, "rmjax_steady_s": steady, "hf_s": hf_s,
              "rmjax_sequence_tokens_per_s": tokens / steady, "hf_sequence_tokens_per_s": tokens / hf_s,
              "ratio_over_hf": hf_s / steady,
              "max_rel_diff_logp_vs_hf": float(np.max(np.abs(ours - ref) / np.maximum(np.abs(ref), 1.0)))}
    write_result(args.out, result)


if __name__ == "__main__":
    main()
