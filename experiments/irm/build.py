"""Bundle the implicit RM that `rmjax score` uses by default.

    rmjax train --config experiments/irm/smollm2_dpo_lora.yaml      # the DPO LoRA run (CPU: about 70 min)
    python experiments/irm/build.py                                 # copy its adapter + held-out pairs

Copies RUN/final/adapter (PEFT layout: adapter_config.json naming smollm2-135m-instruct as the base,
adapter_model.safetensors) into rmjax/data/bundled/adapters/smollm2-135m-dpo-hh/ and writes beside it
heldout.jsonl.gz, the data.holdout pairs of the run's data.train that the adapter never trained on
(the same deterministic split `rmjax train` makes), and rmjax.json (how it was trained).
"""
from __future__ import annotations

import argparse
import gzip
import json
import shutil
import sys
from pathlib import Path

from rmjax.data.records import RecordReport
from rmjax.io.registry import bundled_adapter_dir
from rmjax.train.config import load_config
from rmjax.train.examples import read_inputs, split_holdout

HERE = Path(__file__).resolve().parent
CONFIG = HERE / "smollm2_dpo_lora.yaml"
NAME = "smollm2-135m-dpo-hh"


def heldout_records(config: Path = CONFIG):
    """(training records, held-out records) of the run's split."""
    run = load_config(config)
    records = read_inputs(run.data.train, run.data.on_error, RecordReport())
    return split_holdout(records, run)


def write_jsonl_gz(records, path: Path) -> None:
    lines = "".join(json.dumps(r.to_json(), ensure_ascii=False, sort_keys=True) + "\n" for r in records)
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as f:
        f.write(lines.encode("utf-8"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=CONFIG)
    ap.add_argument("--run-dir", type=Path, help="default: the config's run_dir")
    args = ap.parse_args(argv)
    run = load_config(args.config)
    run_dir = args.run_dir or Path(run.run_dir)
    result = json.loads((run_dir / "result.json").read_text())
    out = bundled_adapter_dir(NAME)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copyfile(run_dir / "final" / "adapter" / name, out / name)
    train, held = heldout_records(args.config)
    write_jsonl_gz(held, out / "heldout.jsonl.gz")
    meta = {"base_model": run.model.name, "head": {"kind": "lm", "reference": run.model.name, "beta": run.loss.beta},
            "trained_by": f"rmjax train --config experiments/irm/{args.config.name}",
            "train": {"data": list(run.data.train), "records": len(train), "examples": result["train_examples"],
                      "steps": result["step"], "batch_size": run.train.batch_size,
                      "distinct_pairs": result.get("distinct_train_examples")},
            "heldout": {"file": "heldout.jsonl.gz", "pairs": len(held),
                        "split": f"data.holdout={run.data.holdout:g} of the shuffled records "
                                 f"(data.shuffle_seed={run.data.shuffle_seed})"},
            "eval_at_end_of_training": result.get("eval", {})}
    (out / "rmjax.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {out}: adapter, {len(held)} held-out pairs, rmjax.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
