"""``rmjax score`` at corpus scale: records/s, peak memory, files on disk, and kill -9 + resume.

    python tools/bench_corpus.py [--sizes 100000,1000000] [--out tools/results/corpus_cpu.json]

A synthetic pair corpus (seeded; a 6-word prompt, 3-word chosen and rejected replies from a
16-word vocabulary) is scored with a tiny random Llama-layout checkpoint (tests/hf_models.py: 2
layers, d=64, a 416-token BPE tokenizer with a ChatML template), reference-free, by the real
command (``python -m rmjax.cli score``) in a child process. Per corpus size: records/s, the child's
peak RSS (``getrusage``: the largest resident set the scoring process had), the most files the
output directory held at once while scoring (polled every 0.2 s) and the files it holds at the
end, against the shards a one-file-per-shard layout would have written. Then one corpus (``--resume-size``)
once more, killed with SIGKILL when a third of its shards are done and resumed by the same
command: every record scored exactly once, and its rows equal the uninterrupted run's.
The memory claim is peak RSS flat in the corpus size: the reading pass keeps a few bytes per
record, the scoring keeps one shard, the writer one part, the final table is streamed.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, str(ROOT / "tests"))

from bench_common import write_result  # noqa: E402

WORDS = "the a reward model score answer good bad helpful kind true false short long clear vague".split()


def corpus(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    say = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"r{i}", "prompt": say(6), "chosen": say(3), "rejected": say(3)}) + "\n")


def command(model: Path, data: Path, out: Path, shard_size: int) -> list[str]:
    return [sys.executable, "-m", "rmjax.cli", "score", "--policy", str(model), "--reference", "", "--data",
            str(data), "--sample", "0", "--out", str(out), "--shard-size", str(shard_size), "--no-progress"]


def files_under(path: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(path))


def run(cmd: list[str], out: Path, kill_at: float | None = None, num_shards: int = 0) -> dict:
    """Run ``cmd`` to the end (or SIGKILL it once ``kill_at`` of the shards are done); its wall time,
    peak RSS and the most files ``out`` held."""
    from rmjax.runs import scan_shards

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    most, killed = 0, False
    while proc.poll() is None:
        time.sleep(0.2)
        if out.exists():
            most = max(most, files_under(out))
            if kill_at is not None and len(scan_shards(out)) >= kill_at * num_shards:
                os.kill(proc.pid, signal.SIGKILL)
                killed = True
    err = proc.stderr.read()
    proc.wait()
    if not killed and proc.returncode != 0:
        raise SystemExit(f"rmjax score failed ({proc.returncode}):\n{err[-3000:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"seconds": time.perf_counter() - t0, "peak_rss_mb": round(peak / 1024, 1) if peak > before else None,
            "most_files": most, "killed": killed}


def kill_and_resume(model: Path, work: Path, n: int, shard_size: int) -> dict:
    """The corpus of ``n`` records scored again, SIGKILLed a third of the way, resumed: compared with
    the uninterrupted run's table."""
    import pandas as pd

    from rmjax.runs import scan_shards

    data, straight, out = work / f"corpus_{n}.jsonl", work / f"scores_{n}", work / f"killed_{n}"
    num_shards = -(-n // shard_size)
    first = run(command(model, data, out, shard_size), out, kill_at=1 / 3, num_shards=num_shards)
    done_at_kill = len(scan_shards(out))
    second = run(command(model, data, out, shard_size), out)
    a = pd.read_parquet(straight / "scores.parquet")
    b = pd.read_parquet(out / "scores.parquet")
    numeric = [c for c in a.columns if a[c].dtype.kind == "f"]
    return {"records": n, "killed": first["killed"], "shards_done_at_kill": done_at_kill, "shards": num_shards,
            "seconds_before_kill": round(first["seconds"], 1), "seconds_resumed": round(second["seconds"], 1),
            "rows": len(b), "every_record_once": b["index"].tolist() == list(range(n)),
            "max_abs_difference": float((a[numeric] - b[numeric]).abs().max().max())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="100000,1000000", help="corpus sizes, comma-separated")
    p.add_argument("--shard-size", type=int, default=32, help="examples per shard (rmjax score's default)")
    p.add_argument("--resume-size", type=int, default=0, help="corpus size of the kill -9 + resume run "
                                                                 "(default: the smallest of --sizes)")
    p.add_argument("--work", default="", help="working directory (default: a temporary one)")
    p.add_argument("--out", default=str(ROOT / "tools" / "results" / "corpus_cpu.json"))
    args = p.parse_args()
    from hf_models import save_tiny_checkpoint

    work = Path(args.work or tempfile.mkdtemp(prefix="rmjax-corpus-"))
    model = work / "tiny"
    if not (model / "config.json").exists():
        save_tiny_checkpoint(model)
    sizes = [int(s) for s in args.sizes.split(",")]
    result = {"shard_size": args.shard_size, "runs": []}
    for n in sizes:
        data = work / f"corpus_{n}.jsonl"
        if not data.exists():
            corpus(data, n)
        out = work / f"scores_{n}"
        got = run(command(model, data, out, args.shard_size), out)
        meta = json.loads((out / "metadata.json").read_text())
        row = {"records": n, "records_per_s": round(n / got["seconds"], 1), **got,
               "files_at_end": files_under(out), "one_file_per_shard": meta["num_shards"] + 1,
               "scored": meta["counts"]["scored"], "compile": meta["summary"]["run"]}
        result["runs"].append(row)
        print(json.dumps(row), flush=True)
        if n == (args.resume_size or sizes[0]):
            result["kill_and_resume"] = kill_and_resume(model, work, n, args.shard_size)
            print(json.dumps(result["kill_and_resume"]), flush=True)
    write_result(args.out, result)


if __name__ == "__main__":
    main()
