"""Forward throughput: rmjax vs Hugging Face transformers (torch), same model, same batch, one run.

    python tools/bench_forward.py [--model smollm2-135m-instruct] [--batch 8] [--seq 256]

Both compute the full next-token logits for every position in fp32 (what a plain HF forward does);
rmjax's hidden-state-only forward (what its scoring kernels consume) is reported too. Compile time
is reported separately and excluded from tokens/s.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench_common import environment, matmul_peak_flops, median_time, peak_rss_mb, write_result  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="tools/results/forward_cpu.json")
    args = ap.parse_args()

    from rmjax.io import registry
    from rmjax.models import forward, unembed
    from rmjax.models.loading import load_params
    from rmjax.models.transformer import flops_per_token
    from transformers import AutoModelForCausalLM

    source = registry.resolve_model(args.model)
    t0 = time.perf_counter()
    ckpt = registry.open_checkpoint(source)
    config, params, _ = load_params(ckpt, source=str(source.path))
    load_rmjax = time.perf_counter() - t0
    t0 = time.perf_counter()
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(source.path), gguf_file=os.path.basename(source.path),
                                              dtype=torch.float32).eval()
    load_hf = time.perf_counter() - t0

    rng = np.random.default_rng(0)
    ids = rng.integers(0, config.vocab_size, (args.batch, args.seq)).astype(np.int32)
    mask = np.ones_like(ids)
    tokens = ids.size

    logits_fn = jax.jit(lambda p, i, m: unembed(p, config, forward(p, config, i, m).hidden))
    hidden_fn = jax.jit(lambda p, i, m: forward(p, config, i, m).hidden)
    t0 = time.perf_counter()
    logits_fn.lower(params, ids, mask).compile()
    compile_s = time.perf_counter() - t0
    t_logits = median_time(lambda: logits_fn(params, ids, mask).block_until_ready(), args.repeats)
    t_hidden = median_time(lambda: hidden_fn(params, ids, mask).block_until_ready(), args.repeats)

    t_ids, t_mask = torch.tensor(ids, dtype=torch.long), torch.tensor(mask)
    with torch.inference_mode():
        t_hf = median_time(lambda: hf(input_ids=t_ids, attention_mask=t_mask).logits, args.repeats)
        ref = hf(input_ids=t_ids[:1, :32]).logits.numpy()
    ours = np.asarray(logits_fn(params, ids[:1, :32], mask[:1, :32]))
    max_rel = float(np.abs(ours - ref).max() / np.abs(ref).max())

    peak = matmul_peak_flops()
    fpt = flops_per_token(config, args.seq) + 2 * config.hidden_size * config.vocab_size
    result = {
        **environment(),
        "benchmark": "forward", "model": args.model, "batch": args.batch, "seq": args.seq, "dtype": "float32",
        "rmjax_tokens_per_s": tokens / t_logits,
        "rmjax_hidden_only_tokens_per_s": tokens / t_hidden,
        "hf_torch_tokens_per_s": tokens / t_hf,
        "ratio_rmjax_over_hf": t_hf / t_logits,
        "rmjax_compile_s": compile_s,
        "load_s": {"rmjax": load_rmjax, "hf_torch": load_hf},
        "flops_per_token": fpt,
        "achieved_flops": {"rmjax": fpt * tokens / t_logits, "hf_torch": fpt * tokens / t_hf},
        "matmul_peak_flops": peak,
        "roofline_fraction": {"rmjax": fpt * tokens / t_logits / peak["jax"],
                              "hf_torch": fpt * tokens / t_hf / peak["torch"]},
        "max_rel_logit_diff_vs_hf": max_rel,
        "peak_rss_mb": peak_rss_mb(),
    }
    write_result(args.out, result)


if __name__ == "__main__":
    from rmjax.cli import restart_with_hugepages

    restart_with_hugepages()  # as the rmjax command line runs
    main()
