"""``rmjax serve`` under load vs a plain transformers + FastAPI reward server, same run, same checkpoint.

    python tools/bench_serve.py [--prompts 48] [--concurrency 1,8,64] [--out tools/results/serve_cpu.json]

The reward model: SmolLM2-135M-Instruct's real weights as a 1-label LlamaForSequenceClassification
with a seeded score head (``bench_eval_rm.classifier_dir``). The load: an RL trainer's, as OpenRLHF's
remote reward function sends it: one POST /get_reward per sampled response ({"query": [prompt +
response, chat template applied], "prompts": [prompt]}), ``--samples`` (4) per prompt (the chosen and
rejected replies of seeded bundled HH-RLHF helpful-base conversations, multi-turn prompts, and the two
of the next conversation), sent by
1, 8 and 64 concurrent clients that take the next text from one shared list. Each side runs alone
(the other server stopped). Reported per concurrency: requests/s, p50 / p99 latency, the ratio to the
baseline; the largest reward difference between the two servers; rmjax's warm-up (compiling every row
shape before it listens); and the cost of serving: the server's tokens/s at the highest concurrency
against ``rmjax score --rm`` over the same records (each prompt once for its replies in both).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))

import numpy as np  # noqa: E402
import requests  # noqa: E402

from bench_common import environment, write_result  # noqa: E402
from bench_eval_rm import classifier_dir  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def workload(rm_dir: Path, prompts: int, samples: int, seed: int = 0) -> tuple[list[dict], list[tuple[str, str]]]:
    """(records: each prompt with its sampled replies, (full text, prompt text) per reply, the replies
    of a prompt adjacent). Replies: the conversation's chosen and rejected, then (``samples`` 4) the
    two of the next conversation in the seeded order, as best-of-4 records."""
    from transformers import AutoTokenizer

    from rmjax.data.records import read_records

    tok = AutoTokenizer.from_pretrained(rm_dir)
    records = read_records("hh-rlhf:helpful-base", on_error="skip")
    order = np.random.default_rng(seed).permutation(len(records))
    rows, texts = [], []
    for n in range(prompts):
        rec, other = records[int(order[2 * n])], records[int(order[2 * n + 1])]
        replies = [*rec.responses, *other.responses][:samples]
        rows.append({"id": rec.id, "prompt": rec.prompt_messages, "chosen": replies[:1], "rejected": replies[1:]})
        prompt = tok.apply_chat_template(rec.prompt_messages, add_generation_prompt=True, tokenize=False)
        for reply in replies:
            full = tok.apply_chat_template(rec.prompt_messages + [{"role": "assistant", "content": reply}],
                                           tokenize=False)
            texts.append((full, prompt))
    return rows, texts


def start(cmd: list[str], port: int, log: Path, timeout: float = 1800) -> tuple[subprocess.Popen, float]:
    """A server process, and the seconds until /health answered."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"{cmd[:3]} exited:\n{log.read_text()[-3000:]}")
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).ok:
                return proc, time.perf_counter() - t0
        except requests.ConnectionError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"{cmd[:3]} did not start in {timeout} s")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def load(url: str, texts: list[tuple[str, str]], clients: int, total: int) -> dict:
    """``total`` requests (one text each, the list cycled) from ``clients`` threads."""
    lock, cursor = threading.Lock(), [0]
    latencies, rewards, errors = [], {}, []

    def client():
        with requests.Session() as session:
            while True:
                with lock:
                    if cursor[0] >= total:
                        return
                    i = cursor[0]
                    cursor[0] += 1
                full, prompt = texts[i % len(texts)]
                t0 = time.perf_counter()
                r = session.post(f"{url}/get_reward", json={"query": [full], "prompts": [prompt]}, timeout=600)
                latencies.append(time.perf_counter() - t0)
                if r.status_code != 200:
                    errors.append(r.text[:300])
                else:
                    rewards[i % len(texts)] = r.json()["rewards"][0]

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = np.asarray(latencies)
    return {"clients": clients, "requests": total, "errors": len(errors), "first_error": errors[:1],
            "seconds": round(wall, 2), "requests_per_s": round(total / wall, 2),
            "p50_ms": round(1000 * float(np.quantile(lat, 0.5)), 1),
            "p99_ms": round(1000 * float(np.quantile(lat, 0.99)), 1), "rewards": rewards}


def metric(url: str, name: str) -> float:
    for line in requests.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise KeyError(name)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompts", type=int, default=48)
    p.add_argument("--samples", type=int, default=4, choices=(2, 3, 4), help="sampled replies per prompt")
    p.add_argument("--concurrency", default="1,8,64")
    p.add_argument("--requests", type=int, default=0, help="requests per concurrency (default: every text once, "
                                                            "at least 2 per client)")
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--out", default="tools/results/serve_cpu.json")
    args = p.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    result: dict = {"environment": environment(), "prompts": args.prompts, "samples_per_prompt": args.samples}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rm_dir = classifier_dir(tmp / "smollm2-135m-rm")
        pairs, texts = workload(rm_dir, args.prompts, args.samples)
        result["texts"] = len(texts)
        sides = {
            "rmjax": [sys.executable, "-m", "rmjax.cli", "serve", "--rm", str(rm_dir), "--max-length",
                      str(args.max_length), "--over-length", "truncate", "--batch-tokens", "4096", "batch.min_row_length=256",
                      "--port"],
            "hf_transformers_fastapi": [sys.executable, str(ROOT / "tools" / "hf_reward_server.py"), str(rm_dir),
                                        "--max-length", str(args.max_length), "--port"],
        }
        runs: dict = {}
        for name, cmd in sides.items():
            port = 5600 + len(runs)
            url = f"http://127.0.0.1:{port}"
            proc, started = start([*cmd, str(port)], port, tmp / f"{name}.log")
            runs[name] = {"start_s": round(started, 1), "levels": []}
            try:
                for clients in levels:
                    total = args.requests or max(len(texts), 2 * clients)
                    if name == "rmjax":
                        tokens0, t0 = metric(url, "rmjax_tokens_total"), time.perf_counter()
                    out = load(url, texts, clients, total)
                    if name == "rmjax":
                        out["tokens_per_s"] = round((metric(url, "rmjax_tokens_total") - tokens0)
                                                    / (time.perf_counter() - t0), 1)
                    runs[name]["levels"].append(out)
                    print(name, {k: v for k, v in out.items() if k != "rewards"}, flush=True)
                if name == "rmjax":
                    runs[name]["health"] = requests.get(f"{url}/health", timeout=30).json()
            finally:
                stop(proc)
        data = tmp / "pairs.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in pairs))
        score = subprocess.run([sys.executable, "-m", "rmjax.cli", "score", "--rm", str(rm_dir), "--data", str(data),
                                "--sample", "0", "--max-length", str(args.max_length), "--out", str(tmp / "score"),
                                "--no-progress"], env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True,
                               text=True, check=True)
        summary = json.loads(score.stdout)
    ours, theirs = runs["rmjax"], runs["hf_transformers_fastapi"]
    diffs = [abs(a["rewards"][k] - b["rewards"][k]) for a, b in zip(ours["levels"], theirs["levels"])
             for k in a["rewards"] if k in b["rewards"]]
    result["max_abs_reward_diff"] = float(max(diffs))
    for side in runs.values():
        for level in side["levels"]:
            level.pop("rewards")
    for a, b in zip(ours["levels"], theirs["levels"]):
        a["ratio_requests_per_s"] = round(a["requests_per_s"] / b["requests_per_s"], 2)
    result["servers"] = runs
    result["rmjax_score"] = {"tokens_per_s": summary["run"]["tokens_per_s"], "seconds": summary["run"]["seconds"],
                             "programs_compiled": summary["run"]["programs_compiled"]}
    result["serving_vs_score_tokens_per_s"] = round(ours["levels"][-1]["tokens_per_s"]
                                                    / summary["run"]["tokens_per_s"], 2)
    write_result(args.out, result)


if __name__ == "__main__":
    main()
