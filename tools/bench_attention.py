"""Attention at the lengths users run: rmjax blockwise vs naive vs HF torch (SDPA), one run.

    python tools/bench_attention.py [--lengths 512 1024 2048 4096 8192] [--naive-max 4096]

1. Model forward, SmolLM2-135M-Instruct (real weights), batch 1, fp32, hidden states only, at each
   length: tokens/s and peak RSS. Every (implementation, length) runs in a fresh subprocess, so its
   peak RSS is its own; the hidden states of each side are compared with HF's in the same run.
2. One attention layer (SmolLM2's shape: 9 query / 3 KV heads, head dim 64, causal), forward and
   forward + backward, at --layer-lengths, vs torch's scaled_dot_product_attention.
On a GPU (``jax.devices()`` picks it up) ``--gpu`` adds cudnn vs blockwise vs naive layer timings
and the forward / train-step MFU of a 1B-class config in bf16 at 4K-8K tokens.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))

import numpy as np  # noqa: E402

from bench_common import best_interleaved, environment, median_time, peak_rss_mb, write_result  # noqa: E402

MODEL = "smollm2-135m-instruct"


def real_token_ids(tokenizer, n: int) -> np.ndarray:
    """n token ids of real text: bundled HH-RLHF transcripts, concatenated."""
    from rmjax.data.records import read_records

    ids: list[int] = []
    for rec in read_records("hh-rlhf:helpful-base", on_error="skip"):
        text = "\n\n".join(c for _, c in rec.prompt) + "\n\n" + rec.responses[0]
        ids.extend(tokenizer.encode(text))
        if len(ids) >= n:
            return np.asarray(ids[:n], np.int32)
    raise RuntimeError("not enough bundled text")


def worker_forward(impl: str, seq: int, repeats: int, out_npy: str) -> dict:
    """One forward configuration (run in its own process)."""
    from rmjax.io import registry

    source = registry.resolve_model(MODEL)
    tok = registry.load_tokenizer(source)
    ids = real_token_ids(tok, seq)[None]
    if impl == "hf_torch":
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_grad_enabled(False)
        hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(source.path), gguf_file=os.path.basename(source.path),
                                                  dtype=torch.float32, attn_implementation="sdpa").eval()
        t_ids = torch.tensor(ids, dtype=torch.long)
        run = lambda: hf.model(input_ids=t_ids).last_hidden_state  # noqa: E731
        hidden = run().numpy()
        compile_s = 0.0
    else:
        import jax

        from rmjax.models import forward
        from rmjax.models.loading import load_params

        config, params, _ = load_params(registry.open_checkpoint(source), source=str(source.path))
        config = config.replace(attention=impl)
        fn = jax.jit(lambda p, i: forward(p, config, i).hidden)
        t0 = time.perf_counter()
        fn = fn.lower(params, ids).compile()
        compile_s = time.perf_counter() - t0
        run = lambda: fn(params, ids).block_until_ready()  # noqa: E731
        hidden = np.asarray(run())
    t = best_interleaved({impl: run}, repeats, warmup=0)[impl]  # already warm: ``hidden`` came from run()
    np.save(out_npy, hidden[0])
    return {"impl": impl, "seq": seq, "tokens_per_s": seq / t, "seconds": t, "compile_s": compile_s,
            "peak_rss_mb": peak_rss_mb()}


def forward_table(lengths: list[int], naive_max: int, repeats: int) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seq in lengths:
            impls = ["hf_torch", "blockwise"] + (["naive"] if seq <= naive_max else [])
            hidden = {}
            for impl in impls:
                npy = os.path.join(tmp, f"{impl}_{seq}.npy")
                n = 1 if impl == "naive" and seq > 2048 else min(repeats, 3)  # naive at 4K: a minute a call
                cmd = [sys.executable, __file__, "--worker", impl, "--seq", str(seq), "--repeats", str(n),
                       "--npy", npy]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode:
                    raise RuntimeError(f"{impl} at {seq}: {proc.stderr[-2000:]}")
                row = json.loads(proc.stdout.strip().splitlines()[-1])
                hidden[impl] = np.load(npy)
                rows.append(row)
                print(json.dumps(row), flush=True)
            ref = hidden["hf_torch"]
            for row in rows:
                if row["seq"] == seq and row["impl"] != "hf_torch":
                    row["max_rel_diff_vs_hf"] = float(np.abs(hidden[row["impl"]] - ref).max() / np.abs(ref).max())
                    row["ratio_vs_hf"] = row["tokens_per_s"] / next(
                        r["tokens_per_s"] for r in rows if r["seq"] == seq and r["impl"] == "hf_torch")
    return rows


def layer_table(lengths: list[int], repeats: int, backends=("blockwise",), dtype="float32") -> list[dict]:
    """One causal attention layer, SmolLM2 shape, rmjax backends vs torch SDPA (fwd, fwd+bwd), timed
    in interleaved rounds (best of each)."""
    import jax
    import jax.numpy as jnp
    import torch

    from rmjax.models import attention as attn

    hkv, g, d = 3, 3, 64
    on_cpu = jax.default_backend() == "cpu"
    rows = []
    for t in lengths:
        rng = np.random.default_rng(0)
        q, k, v = (rng.standard_normal(s).astype(np.float32) for s in ((1, t, hkv, g, d), (1, t, hkv, d), (1, t, hkv, d)))
        tok = attn.Tokens(jnp.ones((1, t), jnp.int32), jnp.arange(t, dtype=jnp.int32)[None])
        jq, jk, jv = (jnp.asarray(x, dtype) for x in (q, k, v))
        row = {"seq": t, "heads": f"{hkv * g}q/{hkv}kv", "head_dim": d, "dtype": dtype}
        fwd_fns, bwd_fns, outs = {}, {}, {}
        for backend in backends:
            spec = attn.AttentionSpec(scale=d ** -0.5, backend=backend)
            fwd = jax.jit(lambda q, k, v, spec=spec: attn.attend(q, k, v, tok, tok, spec))  # noqa: B023
            bwd = jax.jit(jax.grad(lambda q, k, v, spec=spec: jnp.sum(  # noqa: B023
                attn.attend(q, k, v, tok, tok, spec).astype(jnp.float32)), argnums=(0, 1, 2)))
            fwd_fns[backend] = lambda fwd=fwd: fwd(jq, jk, jv).block_until_ready()  # noqa: B023
            bwd_fns[backend] = lambda bwd=bwd: jax.block_until_ready(bwd(jq, jk, jv))  # noqa: B023
            outs[backend] = np.array(fwd(jq, jk, jv), np.float32).reshape(1, t, hkv * g, d)  # a copy
            # XLA's accounting of the compiled step's scratch buffers (what grows with T)
            row[f"{backend}_fwd_bwd_temp_mb"] = bwd.lower(jq, jk, jv).compile().memory_analysis().temp_size_in_bytes / 2**20
        # torch's SDPA beside them: on the CPU in fp32, on a GPU in the same dtype (its flash kernel)
        device = "cpu" if on_cpu else "cuda"
        tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
        sync = (lambda: None) if on_cpu else torch.cuda.synchronize
        tq = torch.tensor(q.reshape(1, t, hkv * g, d)).transpose(1, 2).contiguous().to(device, tdtype)
        tk, tv = (torch.tensor(x).transpose(1, 2).contiguous().to(device, tdtype) for x in (k, v))
        sdpa = lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
            q, k, v, is_causal=True, enable_gqa=True)
        leaves = [x.clone().requires_grad_() for x in (tq, tk, tv)]

        def torch_fwd():
            with torch.inference_mode():
                sdpa(tq, tk, tv)  # noqa: B023
            sync()

        def torch_fwd_bwd():
            sdpa(*leaves).float().sum().backward()  # noqa: B023
            sync()

        fwd_fns["torch_sdpa"], bwd_fns["torch_sdpa"] = torch_fwd, torch_fwd_bwd
        with torch.inference_mode():
            ref = sdpa(tq, tk, tv).transpose(1, 2).float().cpu().numpy().copy()
        slow = {n for n in backends if n == "naive" and t > 2048}  # seconds per call: fewer rounds
        for kind, fns in (("fwd", fwd_fns), ("fwd_bwd", bwd_fns)):
            best = best_interleaved({n: f for n, f in fns.items() if n not in slow}, repeats)
            best.update(best_interleaved({n: fns[n] for n in slow}, 1, warmup=1) if slow else {})
            for name, seconds in best.items():
                row[f"{name}_{kind}_s"] = seconds
        for backend in backends:  # every backend against torch, in the same dtype
            row[f"{backend}_max_abs_diff_vs_torch"] = float(np.abs(outs[backend] - ref).max())
            row[f"{backend}_fwd_ratio_vs_torch"] = row["torch_sdpa_fwd_s"] / row[f"{backend}_fwd_s"]
            row[f"{backend}_fwd_bwd_ratio_vs_torch"] = row["torch_sdpa_fwd_bwd_s"] / row[f"{backend}_fwd_bwd_s"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def gpu_mfu(lengths: list[int], repeats: int) -> list[dict]:
    """Forward and train-step MFU of a 1B-class Llama config (bf16, random weights) per backend."""
    import jax
    import jax.numpy as jnp

    from rmjax.models import forward, init_params
    from rmjax.models.config import ModelConfig
    from rmjax.models.transformer import flops_per_token

    peak = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
    kind = jax.devices()[0].device_kind
    peak_flops = next((v for k, v in peak.items() if k in kind), None)
    base = ModelConfig(family="llama", vocab_size=32000, hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=8,
                       head_dim=64, mlp_dim=8192, dtype="bfloat16", param_dtype="bfloat16", remat="full")
    params = init_params(base, jax.random.key(0))
    rows = []
    # padded: one sequence per row; packed: four segments of T/4 in the row (rmjax's packed layout:
    # attention only within a segment, so fewer FLOPs; cudnn takes such rows blockwise at run time)
    for t in lengths:
        for layout in ("padded", "packed"):
            segments = jnp.repeat(jnp.arange(1, 5, dtype=jnp.int32), t // 4)[None] if layout == "packed" else None
            for backend in ("cudnn", "blockwise", "naive"):
                cfg = base.replace(attention=backend)
                ids = jnp.ones((1, t), jnp.int32)
                fwd = jax.jit(lambda p, i, s: forward(p, cfg, i, segment_ids=s).hidden)  # noqa: B023
                loss = lambda p, i, s: jnp.mean(  # noqa: B023, E731
                    forward(p, cfg, i, segment_ids=s).hidden.astype(jnp.float32) ** 2)
                step = jax.jit(jax.grad(loss))
                try:
                    tf = median_time(lambda: fwd(params, ids, segments).block_until_ready(), repeats)  # noqa: B023
                    tb = median_time(lambda: jax.block_until_ready(step(params, ids, segments)), repeats)  # noqa: B023
                except Exception as e:  # noqa: BLE001 - report the backend that cannot run, keep going
                    rows.append({"seq": t, "layout": layout, "backend": backend, "error": str(e)[:300]})
                    continue
                flops = (flops_per_token(cfg, t // 4) if layout == "packed" else flops_per_token(cfg, t)) * t
                row = {"seq": t, "layout": layout, "backend": backend, "fwd_s": tf, "train_s": tb,
                       "fwd_tokens_per_s": t / tf, "train_tokens_per_s": t / tb}
                if peak_flops:
                    row["fwd_mfu"], row["train_mfu"] = flops / tf / peak_flops, 3 * flops / tb / peak_flops
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    ap.add_argument("--naive-max", type=int, default=4096, help="longest length for the naive rmjax forward")
    ap.add_argument("--layer-lengths", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--repeats", type=int, default=5, help="timing rounds (best of)")
    ap.add_argument("--gpu", action="store_true", help="cudnn/blockwise/naive and 1B-class MFU (needs a GPU)")
    ap.add_argument("--skip-forward", action="store_true")
    ap.add_argument("--skip-layer", action="store_true")
    ap.add_argument("--out", default="tools/results/attention_cpu.json")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--seq", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--npy", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker_forward(args.worker, args.seq, args.repeats, args.npy)))
        return
    result = {**environment(), "benchmark": "attention", "model": MODEL, "dtype": "float32"}
    if args.gpu:
        result["layer"] = layer_table(args.layer_lengths, args.repeats, ("cudnn", "blockwise", "naive"), "bfloat16")
        result["mfu_1b"] = gpu_mfu([4096, 8192], args.repeats)
        write_result(args.out, result)
        return
    if not args.skip_layer:
        result["layer"] = layer_table(args.layer_lengths, args.repeats, ("blockwise", "naive"))
        write_result(args.out, result)
    if not args.skip_forward:
        result["forward"] = forward_table(args.lengths, args.naive_max, args.repeats)
    write_result(args.out, result)


if __name__ == "__main__":
    from rmjax.cli import restart_with_hugepages

    restart_with_hugepages()  # as the rmjax command line runs
    main()
