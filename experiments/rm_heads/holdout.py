"""Write the records a run held out (data.holdout of data.train) as jsonl, for `rmjax eval-rm --data`.

    python experiments/rm_heads/holdout.py experiments/rm_heads/multi_objective_mse.yaml runs/rm_heads/mo_holdout.jsonl
"""
from __future__ import annotations

import json
import sys

from rmjax.data.records import RecordReport
from rmjax.train.config import load_config
from rmjax.train.examples import read_inputs, split_holdout


def main(argv=None) -> int:
    config, out = (argv or sys.argv[1:])[:2]
    run = load_config(config)
    records = read_inputs(run.data.train, run.data.on_error, RecordReport())
    _, held = split_holdout(records, run)
    with open(out, "w") as f:
        for r in held:
            f.write(json.dumps(r.to_json()) + "\n")
    print(f"wrote {out}: {len(held)} held-out records of {list(run.data.train)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
