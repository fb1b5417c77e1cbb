"""Write the records a run held out (data.holdout of data.train) as jsonl, for `rmjax eval-rm --data`.

    python experiments/rm_heads/holdout.py experiments/rm_heads/multi_objective_mse.yaml runs/rm_heads/mo_holdout.jsonl
"""
from __future__ import annotations

import argparse
import json

from rmjax.data.records import RecordReport
from rmjax.train.config import load_config
from rmjax.train.examples import read_inputs, split_holdout


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("config", help="the run's YAML config (its data.train and data.holdout)")
    p.add_argument("out", help="the jsonl file to write")
    args = p.parse_args(argv)
    config, out = args.config, args.out
    run = load_config(config)
    records = read_inputs(run.data.train, run.data.on_error, RecordReport(), columns=run.data.columns,
                          ratings=run.data.ratings)
    _, held = split_holdout(records, run)
    with open(out, "w") as f:
        for r in held:
            f.write(json.dumps(r.to_json()) + "\n")
    print(f"wrote {out}: {len(held)} held-out records of {list(run.data.train)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
