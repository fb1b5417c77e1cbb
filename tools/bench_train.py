"""Train-step throughput: rmjax's jitted BT step, packed prompt trees vs padded rows, vs a plain PyTorch
BT loop on HF transformers, in one run on the same pairs.

    python tools/bench_train.py [--pairs 8] [--max-length 256] [--steps 2] [--trainable full last_k]
                                [--data hh-rlhf:helpful-base] [--long]

Same model (SmolLM2-135M-Instruct weights, a fresh scalar head), the same real HH-RLHF pairs (a
fixed seeded sample; ``--long`` takes the pairs with the longest conversations instead), fp32,
AdamW with global-norm clipping, one optimizer step per batch of ``--pairs`` pairs:

    rmjax packed     each pair one tree [prompt | chosen | rejected] in rows of 2 x max-length tokens
    rmjax unpacked   chosen and rejected as padded rows [2b, T] (T bucketed)
    HF torch         ``*ForSequenceClassification`` on the same padded rows (T = the batch's longest)

rmjax packed and HF torch are timed in interleaved rounds (each round gives each side a step to
settle, then a timed step; ``--steps`` rounds after a warm-up step each; the best round counts), so
a host whose speed drifts affects both alike; rmjax unpacked is timed before them, on its own
(three full-model train states at once would not fit a 24 GiB host).

Throughput is in *sequence tokens*: prompt + response of every chosen and rejected sequence, the
work all three do (packing computes the shared prompt once, so it gets through it faster). The
first losses of the three agree (same weights, same pairs); rmjax compile time is reported apart.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench_common import environment, peak_rss_mb, timed_sides, train_step_runner, write_result  # noqa: E402

LAST_K = 4


def sample_examples(tok, data: str, n: int, max_length: int, long: bool, seed: int = 0):
    from rmjax.data.records import read_records
    from rmjax.train.config import load_config
    from rmjax.train.examples import build

    run = load_config(None, [f"data.max_length={max_length}"])
    records = read_records(data, on_error="skip")
    if long:
        records = sorted(records, key=lambda r: -sum(len(c) for _, c in r.prompt))[:4 * n]
    else:
        records = [records[i] for i in np.sort(np.random.default_rng(seed).choice(len(records), 4 * n, False))]
    examples = build(records, tok, run, "pairs").examples[:n]
    if len(examples) < n:
        raise SystemExit(f"only {len(examples)} usable pairs")
    return examples


def attention_backend(config) -> str:
    import jax
    platform = jax.devices()[0].platform
    if config.attention == "auto" and platform == "cpu":
        return "auto (blockwise on cpu)"
    return f"{config.attention} on {platform}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--steps", type=int, default=2, help="timed rounds")
    ap.add_argument("--data", default="hh-rlhf:helpful-base")
    ap.add_argument("--long", action="store_true", help="the pairs with the longest conversations")
    ap.add_argument("--trainable", nargs="+", default=["full", "last_k"], choices=["full", "last_k"])
    ap.add_argument("--out", default="tools/results/train_cpu.json")
    args = ap.parse_args()

    import jax

    from rmjax import sharding as shd
    from rmjax.models.loading import load_model
    from rmjax.train import objectives as tobjectives
    from rmjax.train.config import load_config

    mesh = shd.make_mesh(shd.MeshConfig(strategy="dp", data=1), devices=jax.devices()[:1])
    loaded = load_model("smollm2-135m-instruct", mesh=mesh, strategy="dp")
    examples = sample_examples(loaded.tokenizer, args.data, args.pairs, args.max_length, args.long)
    seq_tokens = sum(e.tree.unshared_tokens for e in examples)
    head = tobjectives.init_scalar(jax.random.key(0), loaded.config.hidden_size, None, {})
    result = {**environment(), "benchmark": "train_step", "model": "smollm2-135m-instruct", "data": args.data,
              "long": args.long, "pairs": args.pairs, "max_length": args.max_length, "dtype": "float32",
              "last_k": LAST_K, "sequence_tokens_per_step": seq_tokens,
              "tree_tokens_per_step": sum(e.tree.tree_length for e in examples),
              "attention": attention_backend(loaded.config), "attention_block_q": loaded.config.attention_block_q,
              "attention_block_k": loaded.config.attention_block_k,
              "remat": load_config(None, []).model.remat}
    for mode in args.trainable:
        result[mode] = bench_mode(mode, loaded, head, examples, mesh, args)
        write_result(args.out, result)  # keep finished modes if a later one is interrupted
    result["peak_rss_mb"] = peak_rss_mb()
    write_result(args.out, result)


def rmjax_step(mode, loaded, head, examples, mesh, args, packed: bool) -> tuple:
    import jax

    from rmjax.train import plan as tplan
    from rmjax.train import objectives as tobjectives
    from rmjax.train import params as tparams
    from rmjax.train import step as tstep
    from rmjax.train.config import load_config

    run = load_config(None, [f"train.trainable={mode}", f"train.batch_size={len(examples)}", "train.grad_accum=1",
                             "model.dtype=float32", "optim.warmup_steps=1", "optim.lr=1e-5",
                             f"train.last_k={LAST_K}", f"data.max_length={args.max_length}"])
    entry = tobjectives.entry(run)
    layout = tplan.Layout(packed=packed, trees="pairs", targets=False, pad_id=loaded.tokenizer.pad_id,
                             pack_length=2 * args.max_length)
    batch = tplan.step_arrays(examples, [np.arange(len(examples))], layout)
    trainable, frozen = tparams.split({"backbone": loaded.params, "head": head}, mode, LAST_K)
    opt = tstep.make_optimizer(run)
    state = tstep.create_state(jax.tree.map(lambda x: x.copy(), trainable), opt, mesh)
    fn = tstep.make_train_step(state, frozen, mesh, layout.keys, config=loaded.config, run=run, optimizer=opt,
                               entry=entry)
    step, compile_s, losses = train_step_runner(fn, state, frozen, batch)
    return step, {"compile_s": compile_s, "padded_tokens": int(batch["input_ids"].size),
                  "trainable_params": tparams.count(trainable)}, losses


def torch_step(mode, loaded, head, examples, args) -> tuple:
    """A plain PyTorch BT loop: LlamaForSequenceClassification on padded [2b, T] rows."""
    from transformers import AutoModelForSequenceClassification

    from rmjax.io import registry

    path = str(registry.resolve_model("smollm2-135m-instruct").path)
    model = AutoModelForSequenceClassification.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = loaded.tokenizer.pad_id
    with torch.no_grad():
        model.score.weight.copy_(torch.tensor(np.asarray(head["score"]["kernel"]).T))
    if mode == "last_k":  # requires_grad off below the last k layers: autograd stops there too
        model.model.embed_tokens.weight.requires_grad_(False)
        for layer in model.model.layers[:-LAST_K]:
            layer.requires_grad_(False)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)
    seqs = [np.concatenate([e.tree.prompt, r]) for j in (0, 1) for e in examples for r in e.tree.responses[j:j + 1]]
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), loaded.tokenizer.pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)] = torch.tensor(s), 1
    losses = []

    def step():
        rewards = model(input_ids=ids, attention_mask=mask).logits[:, 0]
        r_c, r_r = rewards.chunk(2)
        loss = -torch.nn.functional.logsigmoid(r_c - r_r).mean()
        optim.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optim.step()
        losses.append(float(loss.detach()))

    return step, {"padded_tokens": int(ids.numel()), "trainable_params": sum(p.numel() for p in params)}, losses


def bench_mode(mode, loaded, head, examples, mesh, args) -> dict:
    seq_tokens = sum(e.tree.unshared_tokens for e in examples)
    # padded rows first, alone, and freed: three full-model train states at once need more memory
    # than this host has; the comparison that matters, packed vs torch, is interleaved
    out = timed_sides({"rmjax_unpacked": rmjax_step(mode, loaded, head, examples, mesh, args, packed=False)},
                      args.steps)
    gc.collect()
    out.update(timed_sides({"rmjax_packed": rmjax_step(mode, loaded, head, examples, mesh, args, packed=True),
                            "hf_torch": torch_step(mode, loaded, head, examples, args)}, args.steps))
    for side in out.values():
        side["sequence_tokens_per_s"] = seq_tokens / side["seconds_per_step"]
    torch_s = out["hf_torch"]["seconds_per_step"]
    out["ratio_packed_over_torch"] = torch_s / out["rmjax_packed"]["seconds_per_step"]
    out["ratio_unpacked_over_torch"] = torch_s / out["rmjax_unpacked"]["seconds_per_step"]
    out["ratio_packed_over_unpacked"] = (out["rmjax_unpacked"]["seconds_per_step"]
                                         / out["rmjax_packed"]["seconds_per_step"])
    return out


if __name__ == "__main__":
    from rmjax.cli import restart_with_hugepages

    restart_with_hugepages()  # as the rmjax command line runs
    main()
