"""What the default implicit RM's accuracy is worth: simple rules on the same pairs, and a length split.

    rmjax score                                        # writes runs/score/scores.parquet
    python experiments/irm/baselines.py runs/score/scores.parquet

Reads the table `rmjax score` wrote for a policy and a reference and prints, each as pairwise
accuracy with a 95% Wilson interval (ties count 0.5):
    implicit RM (sum)      the score the main job prints: sum over reply tokens of log pi - log pi_ref
    implicit RM (mean)     the same, length-normalised (`rmjax score --reduction mean`)
    longer reply wins      a rule that reads only the reply lengths (in the policy's tokens)
    reference, mean logp   the reference model alone: higher mean token log-prob wins
    reference, sum logp    the reference model alone: higher total log-prob wins (favours short replies)
and the implicit RM's accuracy on the pairs whose chosen reply is longer, and on those where it is
shorter: an RM that only learned "longer is better" would be right on the first and wrong on the second.
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import pandas as pd

from rmjax.metrics import pairwise_accuracy, wilson


def accuracy(margins) -> dict:
    margins = np.asarray(margins, np.float64)
    acc = pairwise_accuracy(margins)
    return {"accuracy": acc, "ci95": list(wilson(acc, len(margins))), "pairs": len(margins)}


def baselines(table: pd.DataFrame) -> dict:
    """Accuracies of the implicit RM and of the simple rules over one `rmjax score` table (pairs only)."""
    need = [f"{m}_{s}_{x}" for m in ("policy", "reference") for s in ("chosen", "rejected")
            for x in ("logp_sum", "logp_mean")] + ["policy_chosen_tokens", "policy_rejected_tokens"]
    missing = [c for c in need if c not in table.columns]
    if missing:
        raise SystemExit(f"the table has no column(s) {missing}: score with both --policy and --reference")
    t = table[table["kind"] == "pair"] if "kind" in table.columns else table

    def diff(model: str, x: str) -> np.ndarray:
        return t[f"{model}_chosen_{x}"].to_numpy(np.float64) - t[f"{model}_rejected_{x}"].to_numpy(np.float64)

    implicit = diff("policy", "logp_sum") - diff("reference", "logp_sum")
    length = diff("policy", "tokens")
    return {
        "implicit RM (sum)": accuracy(implicit),
        "implicit RM (mean)": accuracy(diff("policy", "logp_mean") - diff("reference", "logp_mean")),
        "longer reply wins": accuracy(length),
        "reference, mean logp": accuracy(diff("reference", "logp_mean")),
        "reference, sum logp": accuracy(diff("reference", "logp_sum")),
        "implicit RM (sum), chosen longer": accuracy(implicit[length > 0]),
        "implicit RM (sum), chosen shorter": accuracy(implicit[length < 0]),
        "implicit RM prefers the longer reply": float(np.mean((implicit > 0) == (length > 0))),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("table", nargs="?", default="runs/score/scores.parquet", help="scores.parquet of `rmjax score`")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    out = baselines(pd.read_parquet(args.table))
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    for name, value in out.items():
        if isinstance(value, dict):
            lo, hi = value["ci95"]
            print(f"{name:36s} {value['accuracy']:.3f} [{lo:.3f}, {hi:.3f}]  ({value['pairs']} pairs)")
        else:
            print(f"{name:36s} {value:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
