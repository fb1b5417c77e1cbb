"""Train-step throughput: rmjax's jitted BT step vs a plain PyTorch BT loop on HF transformers.

    python tools/bench_train.py [--pairs 4] [--seq 256] [--steps 3] [--trainable full last_k]

Same model (SmolLM2-135M-Instruct weights, a fresh scalar head), same batch of real HH-RLHF pairs
padded to --seq, fp32, AdamW with global-norm clipping, chosen and rejected in one forward. Reports
tokens/s (chosen + rejected tokens, padding included, as both process the same padded arrays),
the ratio, rmjax compile time, and the loss of each so the two are seen doing the same thing.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench_common import environment, median_time, peak_rss_mb, write_result  # noqa: E402


def batch_of_pairs(tok, n: int, seq: int) -> dict[str, np.ndarray]:
    from rmjax.data import pairs as pairdata
    from rmjax.data.preferences import load_hh_rlhf

    data = pairdata.tokenize_pairs(tok, load_hh_rlhf("helpful-base")[:200], seq, "truncate")
    return pairdata.make_batch(data, np.arange(n), seq, tok.pad_id)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--trainable", nargs="+", default=["full", "last_k"], choices=["full", "head", "lora", "last_k"])
    ap.add_argument("--out", default="tools/results/train_cpu.json")
    args = ap.parse_args()

    import jax

    from rmjax import sharding as shd
    from rmjax.models.loading import load_model
    from rmjax.train import step as tstep

    mesh = shd.make_mesh(shd.MeshConfig(strategy="dp", data=1), devices=jax.devices()[:1])
    loaded = load_model("smollm2-135m-instruct", mesh=mesh, strategy="dp")
    host = batch_of_pairs(loaded.tokenizer, args.pairs, args.seq)
    tokens = host["chosen_ids"].size * 2

    head = tstep.init_head(jax.random.key(0), loaded.config.hidden_size)
    result = {**environment(), "benchmark": "train_step", "model": "smollm2-135m-instruct", "pairs": args.pairs,
              "seq": args.seq, "dtype": "float32", "last_k": 4}
    for mode in args.trainable:
        result[mode] = bench_mode(mode, loaded, head, host, mesh, args.steps, tokens)
        write_result(args.out, result)  # keep finished modes if a later one is interrupted
    result["peak_rss_mb"] = peak_rss_mb()
    write_result(args.out, result)


def bench_mode(mode, loaded, head, host, mesh, steps, tokens) -> dict:
    """One trainable subset in both frameworks: full, or the last 4 layers + final norm + head
    (torch: requires_grad off below them, so autograd stops there too)."""
    from rmjax.io import registry
    from rmjax.train import params as tparams
    from rmjax.train import step as tstep
    from rmjax.train.config import load_config

    run = load_config(None, [f"train.trainable={mode}", f"train.batch_size={len(host['chosen_ids'])}",
                             "train.grad_accum=1", "model.dtype=float32", "optim.warmup_steps=1",
                             "optim.lr=1e-5", "train.lora_rank=8", "train.last_k=4"])
    full = {"backbone": loaded.params, "head": head}
    trainable, frozen = tparams.split(full, mode, 4)
    opt = tstep.make_optimizer(run)
    state = tstep.create_state(trainable, opt, mesh)
    fn = tstep.make_train_step(state, frozen, mesh, config=loaded.config, run=run, optimizer=opt)
    batch = {k: v[None] for k, v in host.items()}
    t0 = time.perf_counter()
    compiled = fn.lower(state, frozen, batch).compile()
    compile_s = time.perf_counter() - t0
    losses = []

    def rmjax_step():
        nonlocal state
        state, metrics = compiled(state, frozen, batch)
        losses.append(float(metrics["loss"]))

    t_rmjax = median_time(rmjax_step, repeats=steps)
    del state

    # PyTorch: LlamaForSequenceClassification with the same weights (transformers' GGUF reader)
    from transformers import AutoModelForSequenceClassification
    source = registry.resolve_model("smollm2-135m-instruct")
    path = str(source.path)
    model = AutoModelForSequenceClassification.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = loaded.tokenizer.pad_id
    with torch.no_grad():
        model.score.weight.copy_(torch.tensor(np.asarray(head["score"]["kernel"]).T))
    if mode == "last_k":
        model.model.embed_tokens.weight.requires_grad_(False)
        for layer in model.model.layers[:-4]:
            layer.requires_grad_(False)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)
    ids = torch.tensor(np.concatenate([host["chosen_ids"], host["rejected_ids"]]), dtype=torch.long)
    mask = torch.tensor(np.concatenate([host["chosen_mask"], host["rejected_mask"]]))
    torch_losses = []

    def torch_step():
        rewards = model(input_ids=ids, attention_mask=mask).logits[:, 0]
        r_c, r_r = rewards.chunk(2)
        loss = -torch.nn.functional.logsigmoid(r_c - r_r).mean()
        optim.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optim.step()
        torch_losses.append(float(loss.detach()))

    t_torch = median_time(torch_step, repeats=steps)
    return {"trainable_params": {"rmjax": tparams.count(trainable), "hf_torch": sum(p.numel() for p in params)},
            "rmjax_tokens_per_s": tokens / t_rmjax, "hf_torch_tokens_per_s": tokens / t_torch,
            "ratio_rmjax_over_hf": t_torch / t_rmjax, "rmjax_compile_s": compile_s,
            "first_loss": {"rmjax": losses[0], "hf_torch": torch_losses[0]}}


if __name__ == "__main__":
    main()
