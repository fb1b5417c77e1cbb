"""DPO train-step throughput with LoRA: rmjax's jitted step vs a plain PyTorch + peft DPO loop, in one
run on the same pairs and the same adapter.

    python tools/bench_dpo.py [--pairs 8] [--max-length 256] [--steps 2] [--lora-layers 0 8]

SmolLM2-135M-Instruct (the same GGUF weights for both), fp32, LoRA rank 8 / alpha 16 on q/k/v/o of
every layer (``--lora-layers 0``) or of the last n layers only (PEFT's ``layers_to_transform``), DPO
with beta 0.1 against the model without its adapters, AdamW with global-norm clipping, one optimizer
step per batch of ``--pairs`` real HH-RLHF helpful pairs (a fixed seeded sample):

    rmjax      the packed step (each pair one tree [prompt | chosen | rejected]); with adapters on
               the last n layers only, the layers below run once for policy and reference and get
               no backward pass
    torch      what a TRL-style loop computes: chosen and rejected as padded rows through the peft
               model (log-softmax over the vocabulary, gather, sum over the reply), the reference
               under ``disable_adapter()`` and ``no_grad``, the sigmoid DPO loss, backward, AdamW

Both start from the same adapter (rmjax's initial factors, B moved off zero so that the policy
differs from the reference, exported in PEFT's layout and loaded by ``peft``); their first losses
are compared. The two are timed in interleaved rounds (each round gives each side a step to settle,
then a timed step; ``--steps`` rounds after a warm-up step each; the best round counts).
Throughput is in sequence tokens (prompt + reply of every chosen and rejected sequence).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench_common import environment, peak_rss_mb, timed_sides, train_step_runner, write_result  # noqa: E402
from bench_train import sample_examples  # noqa: E402

MODEL = "smollm2-135m-instruct"
RANK, ALPHA, BETA = 8, 16.0, 0.1


def run_config(args, lora_layers: int):
    from rmjax.train.config import load_config

    return load_config(None, ["head.kind=lm", "loss.kind=dpo", f"loss.beta={BETA}", "train.trainable=lora",
                              f"train.lora_rank={RANK}", f"train.lora_alpha={ALPHA}", f"train.lora_layers={lora_layers}",
                              f"train.batch_size={args.pairs}", "train.grad_accum=1", "model.dtype=float32",
                              "optim.warmup_steps=1", "optim.lr=1e-5", f"data.max_length={args.max_length}"])


def rmjax_side(loaded, examples, mesh, args, lora_layers: int, adapter_dir: str) -> tuple:
    import jax

    from rmjax.io import adapters, registry
    from rmjax.train import plan as tplan
    from rmjax.train import objectives as tobjectives
    from rmjax.train import loop as tloop
    from rmjax.train import params as tparams
    from rmjax.train import step as tstep
    from rmjax.train.export import LORA_MODULES, lora_to_peft

    run = run_config(args, lora_layers)
    entry = tobjectives.entry(run)
    full = tloop.model_params(run, loaded, entry, mesh, {})
    rng = np.random.default_rng(0)  # B off zero: the policy differs from the reference at the first step
    full["lora"] = jax.tree.map(lambda x: x + rng.normal(0, 0.02, x.shape).astype(np.float32), full["lora"])
    layers = loaded.config.num_layers
    adapted = tparams.lora_layers(full["lora"])
    tensors = lora_to_peft(jax.device_get(full["lora"]), registry.open_checkpoint(registry.resolve_model(MODEL)),
                           loaded.config)
    adapters.write(adapter_dir, tensors, rank=RANK, alpha=ALPHA, targets=list(LORA_MODULES.values()), base=MODEL,
                   task_type="CAUSAL_LM", layers=list(range(layers - adapted, layers)) if adapted < layers else None)
    layout = tplan.Layout(packed=True, trees="pairs", targets=True, pad_id=loaded.tokenizer.pad_id,
                             pack_length=2 * args.max_length)
    batch = tplan.step_arrays(examples, [np.arange(len(examples))], layout)
    trainable, frozen = tparams.split(full, "lora", run.train.last_k, entry.frozen)
    opt = tstep.make_optimizer(run)
    state = tstep.create_state(trainable, opt, mesh)
    fn = tstep.make_train_step(state, frozen, mesh, layout.keys, config=loaded.config, run=run, optimizer=opt,
                               entry=entry, statics=tloop.statics_for(run, loaded.tokenizer, ()))
    step, compile_s, losses = train_step_runner(fn, state, frozen, batch)
    return step, {"compile_s": compile_s, "positions": int(batch["input_ids"].size),
                  "trainable_params": tparams.count(trainable)}, losses


def torch_side(loaded, examples, args, adapter_dir: str) -> tuple:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from rmjax.io import registry

    path = str(registry.resolve_model(MODEL).path)
    base = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_dir, is_trainable=True)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)
    seqs = [(e.tree.prompt, e.tree.responses[j]) for j in (0, 1) for e in examples]  # chosen rows, then rejected
    length = max(len(p) + len(r) for p, r in seqs)
    pad = loaded.tokenizer.pad_id
    ids = torch.full((len(seqs), length), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    reply = torch.zeros((len(seqs), length), dtype=torch.float32)  # 1 at the reply's tokens
    for i, (p, r) in enumerate(seqs):
        n = len(p) + len(r)
        ids[i, :n], mask[i, :n] = torch.tensor(np.concatenate([p, r])), 1
        reply[i, len(p):n] = 1

    def logps(m):
        logits = m(input_ids=ids, attention_mask=mask).logits[:, :-1]
        lp = torch.log_softmax(logits.float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
        return (lp * reply[:, 1:]).sum(-1)

    losses = []

    def step():
        policy = logps(model)
        with torch.no_grad(), model.disable_adapter():
            reference = logps(model)
        pc, pr = policy.chunk(2)
        rc, rr = reference.chunk(2)
        loss = -torch.nn.functional.logsigmoid(BETA * ((pc - rc) - (pr - rr))).mean()
        optim.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optim.step()
        losses.append(float(loss.detach()))

    return step, {"positions": int(ids.numel()), "trainable_params": sum(p.numel() for p in params)}, losses


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--steps", type=int, default=2, help="timed rounds")
    ap.add_argument("--data", default="hh-rlhf:helpful-base")
    ap.add_argument("--lora-layers", type=int, nargs="+", default=[0, 8])
    ap.add_argument("--out", default="tools/results/dpo_cpu.json")
    args = ap.parse_args()

    import jax

    from rmjax import sharding as shd
    from rmjax.models.loading import load_model

    mesh = shd.make_mesh(shd.MeshConfig(strategy="dp", data=1), devices=jax.devices()[:1])
    loaded = load_model(MODEL, mesh=mesh, strategy="dp")
    examples = sample_examples(loaded.tokenizer, args.data, args.pairs, args.max_length, long=False)
    seq_tokens = sum(e.tree.unshared_tokens for e in examples)
    result = {**environment(), "benchmark": "dpo_step", "model": MODEL, "data": args.data, "pairs": args.pairs,
              "max_length": args.max_length, "dtype": "float32", "lora_rank": RANK, "lora_alpha": ALPHA,
              "beta": BETA, "sequence_tokens_per_step": seq_tokens,
              "tree_tokens_per_step": sum(e.tree.tree_length for e in examples)}
    for n in args.lora_layers:
        with tempfile.TemporaryDirectory() as adapter_dir:
            sides = timed_sides({"rmjax": rmjax_side(loaded, examples, mesh, args, n, adapter_dir),
                                 "torch_peft": torch_side(loaded, examples, args, adapter_dir)}, args.steps)
        ours, theirs = sides["rmjax"], sides["torch_peft"]
        for side in (ours, theirs):
            side["sequence_tokens_per_s"] = seq_tokens / side["seconds_per_step"]
        result[f"lora_layers_{n or 'all'}"] = {
            "rmjax": ours, "torch_peft": theirs, "ratio_rmjax_over_torch": theirs["seconds_per_step"] / ours["seconds_per_step"],
            "first_loss_rel_diff": abs(ours["first_loss"] - theirs["first_loss"]) / abs(theirs["first_loss"])}
        print(n or "all", {k: v for k, v in result[f"lora_layers_{n or 'all'}"].items()}, flush=True)
        write_result(args.out, result)
    result["peak_rss_mb"] = peak_rss_mb()
    write_result(args.out, result)


if __name__ == "__main__":
    from rmjax.cli import restart_with_hugepages

    restart_with_hugepages()  # as the rmjax command line runs
    main()
