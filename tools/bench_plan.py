"""Reward-model training sized for TPU topologies ahead of time (``rmjax plan``), from this CPU host.

    python tools/bench_plan.py [--grid small|gemma27|full] [--out tools/results/plan_tpu.json]
    python tools/bench_plan.py --grid score [--out tools/results/plan_score_tpu.json]

Each row compiles the real train step of a Bradley-Terry scalar RM (packed prompt trees, pairs of
--max-length tokens per sequence, bf16 compute, fp32 master weights and AdamW moments) for a
topology and records ``rmjax.planning.plan_train``'s figures: per-chip memory against HBM, the
analytic and compiled FLOPs, XLA's step-time estimate scaled by the loop trip counts it counts
once, tokens/s and MFU. All are estimates from the compiler, not measurements on a TPU.
``--grid score``: one batch of ``rmjax score``'s engine instead (``plan_score``: a reward head or the
policy's log-probs, packed trees or the KV-cache path, bf16 weights), trees of --max-length tokens
(a prompt and one response; two responses per tree), 16,384 tokens per batch.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

from bench_common import write_result  # noqa: E402

GRIDS = {
    "small": [("llama-3.1-8b", "v5p:2x2x1", "full"), ("llama-3.1-8b", "v5p:2x2x1", "lora"),
              ("llama-3.1-8b", "v5e:4x4", "full"), ("llama-3.1-8b", "v6e:2x4", "full")],
}
GRIDS["gemma27"] = [("gemma-2-27b", "v5p:2x2x1", "lora"), ("gemma-2-27b", "v5p:4x4x4", "full")]
GRIDS["full"] = GRIDS["small"] + GRIDS["gemma27"]
# scoring: (model, topology, role, layout)
GRIDS["score"] = [("llama-3.1-8b", "v5e:2x4", "rm", "packed"), ("llama-3.1-8b", "v5e:2x4", "policy", "packed"),
                  ("llama-3.1-8b", "v5e:2x4", "rm", "kv"), ("gemma-2-27b", "v5p:2x2x1", "rm", "packed"),
                  ("llama-3.1-70b", "v5p:2x2x2", "rm", "packed")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--grid", default="small", choices=sorted(GRIDS))
    p.add_argument("--max-length", type=int, default=4096)
    p.add_argument("--batch-size", type=int, default=16, help="pairs per step")
    p.add_argument("--remat", default="full")
    p.add_argument("--out", default="tools/results/plan_tpu.json")
    args = p.parse_args()
    from rmjax import config as rconfig
    from rmjax.jobs import plan
    from rmjax.jobs.plan import PlanConfig

    rows = []
    if args.grid == "score":
        for model, topology, role, layout in GRIDS["score"]:
            config = rconfig.load(PlanConfig, None, [
                f"model.name={model}", f"topology={topology}", "job=score", f"score_role={role}",
                f"score_layout={layout}", f"data.max_length={args.max_length}", "model.dtype=bfloat16",
                "model.param_dtype=bfloat16"])
            t0 = time.perf_counter()
            record = plan.run(config)[0]
            record["compile_seconds"] = round(time.perf_counter() - t0, 1)
            rows.append(record)
        write_result(args.out, {"rows": rows})
        return
    for model, topology, trainable in GRIDS[args.grid]:
        config = rconfig.load(PlanConfig, None, [
            f"model.name={model}", f"topology={topology}", f"train.trainable={trainable}",
            f"data.max_length={args.max_length}", f"train.batch_size={args.batch_size}",
            f"model.remat={args.remat}", "model.dtype=bfloat16", "model.param_dtype=float32"])
        t0 = time.perf_counter()
        record = plan.run(config)[0]
        record["compile_seconds"] = round(time.perf_counter() - t0, 1)
        rows.append(record)
    write_result(args.out, {"rows": rows})


if __name__ == "__main__":
    main()
