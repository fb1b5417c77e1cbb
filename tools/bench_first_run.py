"""A small job's whole command, first and second run: ``rmjax score`` processes vs HF torch compute.

    python tools/bench_first_run.py [--pairs 16] [--out tools/results/first_run_cpu.json]

The job: 16 long pairs (``bench_scoring.long_pairs``: real 1-2K-token HH-RLHF transcripts) scored
with SmolLM2-135M-Instruct alone (its log-probs of both replies), fp32, as a user runs it: the
whole ``python -m rmjax.cli score`` process, from start to exit (imports, loading, compiling,
scoring, writing), wall time. First run: an empty persistent compilation cache
(``RMJAX_COMPILE_CACHE`` set to a fresh directory). Second run: the same command into another
output directory, the cache now holding the first run's programs. Against it: HF transformers
computing the same per-sequence log-prob sums of the same token ids, timed over the compute alone
(model already loaded: the most favourable reading for torch). The ratio is HF compute / rmjax
whole process; the run summary's compile counts say what the second run compiled.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, os.path.dirname(__file__))

from bench_common import environment, write_result  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--out", default=str(ROOT / "tools" / "results" / "first_run_cpu.json"))
    args = ap.parse_args()
    import numpy as np

    from bench_scoring import hf_model, hf_sequence_logprobs, long_pairs
    from rmjax.io import registry
    from rmjax.models.loading import load_model
    from rmjax.scoring import bulk

    model = "smollm2-135m-instruct"
    loaded = load_model(model)
    records = long_pairs(args.pairs, 0, registry.load_tokenizer(registry.resolve_model(model)))
    work = Path(tempfile.mkdtemp(prefix="rmjax-first-run-"))
    data = work / "pairs.jsonl"
    with open(data, "w") as f:
        for r in records:
            f.write(json.dumps({"id": r.id, "prompt": r.prompt_messages, "chosen": r.responses[0],
                                "rejected": r.responses[1]}) + "\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT), RMJAX_COMPILE_CACHE=str(work / "xla"))
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    runs = {}
    for name in ("first", "second"):
        cmd = [sys.executable, "-m", "rmjax.cli", "score", "--policy", model, "--reference", "", "--data", str(data),
               "--sample", "0", "--max-length", "2560", "--dtype", "float32", "--out", str(work / name),
               "--no-progress"]
        t0 = time.perf_counter()
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        if done.returncode:
            raise SystemExit(f"rmjax score failed:\n{done.stderr[-3000:]}")
        meta = json.loads((work / name / "metadata.json").read_text())
        runs[name] = {"process_s": round(seconds, 1), **meta["summary"]["run"]}
        print(name, runs[name], flush=True)
    slot = bulk.ModelSlot("policy", loaded)
    settings = bulk.ScoreSettings(max_length=2560)
    seqs = []
    for rec in records:
        enc = bulk.encode(slot, rec, settings)
        seqs.extend((list(enc.prompt), list(r)) for r in enc.responses)
    hf = hf_model(registry.resolve_model(model))
    t0 = time.perf_counter()
    ref = hf_sequence_logprobs(hf, seqs, batch=4, pad_id=loaded.tokenizer.pad_id)
    hf_s = time.perf_counter() - t0
    import pandas as pd

    rows = pd.read_parquet(work / "second" / "scores.parquet")
    ours = np.array([v for _, row in rows.iterrows()
                     for v in (row["policy_chosen_logp_sum"], row["policy_rejected_logp_sum"])])
    result = {**environment(), "benchmark": "first_run", "pairs": len(records), "model": model,
              "sequence_tokens": int(sum(len(p) + len(r) for p, r in seqs)), "runs": runs, "hf_compute_s": hf_s,
              "ratio_first": hf_s / runs["first"]["process_s"], "ratio_second": hf_s / runs["second"]["process_s"],
              "max_rel_diff_logp_vs_hf": float(np.max(np.abs(ours - ref) / np.maximum(np.abs(ref), 1.0)))}
    write_result(args.out, result)


if __name__ == "__main__":
    main()
