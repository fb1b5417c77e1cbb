"""``rmjax eval-rm`` throughput on a RewardBench 2-shaped file vs Hugging Face transformers, same run.

    python tools/bench_eval_rm.py [--prompts 48] [--out tools/results/eval_rm_cpu.json]

The reward model: SmolLM2-135M-Instruct (its real weights, from the bundled GGUF) as a
``LlamaForSequenceClassification`` with a seeded random score head, saved once as an HF directory so
both sides load the same checkpoint. The data: best-of-4 records in RewardBench 2's layout (``prompt``,
``chosen: [1]``, ``rejected: [3]``, ``subset``), built from bundled HH-RLHF helpful-base conversations:
each prompt with its chosen and rejected reply and two replies to neighbouring prompts (multi-turn
prompts; replies of every length). rmjax: ``evaluate_rm(..., benchmark="rewardbench2")`` (packed prompt
trees: each prompt once for its four completions), timed on a second call after a first that
compiles. transformers: what the reward-bench script does, every completion rendered with the chat
template and run through the classifier in padded batches of ``--hf-batch``, sorted by length. Both
fp32; the rewards are compared.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench_common import environment, peak_rss_mb, write_result  # noqa: E402


def classifier_dir(out: Path) -> Path:
    """SmolLM2-135M-Instruct's GGUF weights as a 1-label LlamaForSequenceClassification (seeded head)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForSequenceClassification

    from rmjax.io import registry

    path = registry.resolve_model("smollm2-135m-instruct").path
    lm = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    config = lm.config
    config.num_labels, config.pad_token_id = 1, tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    config.architectures = ["LlamaForSequenceClassification"]
    rm = LlamaForSequenceClassification(config).eval()
    rm.model.load_state_dict(lm.model.state_dict())
    torch.manual_seed(0)
    with torch.no_grad():
        rm.score.weight.normal_(0, 0.05)
    rm.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def rb2_file(path: Path, prompts: int, seed: int = 0) -> list[dict]:
    from rmjax.data.records import read_records

    records = read_records("hh-rlhf:helpful-base", on_error="skip")
    order = np.random.default_rng(seed).permutation(len(records))
    rows = []
    for i in range(prompts):
        rec, other = records[order[2 * i]], records[order[2 * i + 1]]
        rows.append({"id": str(i), "prompt": rec.prompt_messages, "chosen": [rec.responses[0]],
                     "rejected": [rec.responses[1], *other.responses], "subset": "Focus"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def hf_rewards(directory: Path, rows: list[dict], batch: int, max_length: int) -> tuple[np.ndarray, float]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(directory, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(directory)
    texts = [tok.apply_chat_template(r["prompt"] + [{"role": "assistant", "content": c}], tokenize=False)
             for r in rows for c in r["chosen"] + r["rejected"]]
    ids = [tok(t, add_special_tokens=False)["input_ids"][-max_length:] for t in texts]
    order = np.argsort([len(x) for x in ids])
    out = np.zeros(len(ids))
    t0 = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(ids), batch):
            idx = order[start:start + batch]
            length = max(len(ids[i]) for i in idx)
            x = torch.full((len(idx), length), tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(idx), length), dtype=torch.long)
            for j, i in enumerate(idx):  # left padding: transformers' classifier pools at the last non-pad token
                x[j, length - len(ids[i]):], mask[j, length - len(ids[i]):] = torch.tensor(ids[i]), 1
            out[idx] = model(input_ids=x, attention_mask=mask).logits[:, 0].double().numpy()
    return out, time.perf_counter() - t0


def main() -> None:
    from rmjax.cli import restart_with_hugepages

    restart_with_hugepages()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompts", type=int, default=48)
    p.add_argument("--hf-batch", type=int, default=8)
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--pack-length", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=4, help="rmjax: packed rows per batch")
    p.add_argument("--out", default="tools/results/eval_rm_cpu.json")
    args = p.parse_args()

    from rmjax.jobs.eval_rm import evaluate_rm

    with tempfile.TemporaryDirectory() as tmp:
        rm_dir = classifier_dir(Path(tmp) / "smollm2-135m-rm")
        data = Path(tmp) / "rb2_focus.jsonl"
        rows = rb2_file(data, args.prompts)
        kw = dict(data=(str(data),), benchmark="rewardbench2", max_length=args.max_length,
                  pack_length=args.pack_length, batch_size=args.batch_size, log=lambda m: None)
        t0 = time.perf_counter()
        evaluate_rm(str(rm_dir), **kw)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        report = evaluate_rm(str(rm_dir), **kw)
        steady = time.perf_counter() - t0
        ours = np.array([[r[f"rm_{n}"] for n in ("chosen", "rejected_1", "rejected_2", "rejected_3")]
                         for r in report["per_example"]]).reshape(-1)
        ref, hf_time = hf_rewards(rm_dir, rows, args.hf_batch, args.max_length)
    completions = 4 * len(rows)
    result = {
        "environment": environment(), "prompts": len(rows), "completions": completions,
        "rmjax": {"first_call_s": round(first, 2), "steady_s": round(steady, 2),
                  "completions_per_s": round(completions / steady, 2), "score": report["score"],
                  "truncated": report["truncated"], "pack_length": args.pack_length},
        "hf_transformers": {"s": round(hf_time, 2), "completions_per_s": round(completions / hf_time, 2),
                            "batch": args.hf_batch},
        "ratio_over_hf": round(hf_time / steady, 2), "ratio_over_hf_including_compile": round(hf_time / first, 2),
        "max_abs_reward_diff": float(np.max(np.abs(ours - ref))), "peak_rss_mb": round(peak_rss_mb()),
    }
    write_result(args.out, result)


if __name__ == "__main__":
    main()
