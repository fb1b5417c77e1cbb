"""Absolute ratings from real reward models: the bundled released scores as a ratings dataset.

    python experiments/rm_heads/make_ratings.py [--out runs/rm_heads/ratings.jsonl]

Each record is one value prompt (the 18 "in one word" prompts) with one Big Two noun as the
response, rated by three released RMs (ArmoRM-Llama3-8B, Skywork-Reward-Gemma-2-27B-v0.2,
GRM-gemma2-2B; each RM's scores z-scored over all its prompts and nouns):

    {"id": "best_ever_one:kindness", "prompt": "...", "response": "kindness",
     "ratings": {"armorm": 0.41, "skywork": null, "grm_gemma": -0.2}, "subset": "positive"}

Every third noun has no Skywork rating (null: that objective is masked), as in multi-annotator
data where not every response is rated on every objective. A multi-objective head trained on
these ratings (ArmoRM's stage 1) distils three RMs into one backbone's features.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from rmjax.data.preferences import bundled_path, load_value_prompts

RMS = {"armorm": "RLHFlow_ArmoRM-Llama3-8B-v0.1", "skywork": "Skywork_Skywork-Reward-Gemma-2-27B-v0.2",
       "grm_gemma": "Ray2333_GRM-gemma2-2B-rewardmodel-ft"}
NEGATIVE = ("worst", "bad", "terrible")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/rm_heads/ratings.jsonl")
    args = ap.parse_args(argv)
    prompts = {k: v for k, v in load_value_prompts().items() if k.endswith("_one")}
    tables = {}
    for name, file in RMS.items():
        t = pd.read_csv(bundled_path("rm_scores", "big2_nouns", f"{file}.csv"), keep_default_na=False)
        values = t[list(prompts)].to_numpy(float)
        tables[name] = (t["response"].tolist(), (values - values.mean()) / values.std())
    words = tables["armorm"][0]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as f:
        for p, (key, text) in enumerate(prompts.items()):
            for w, word in enumerate(words):
                ratings = {name: round(float(z[w, p]), 4) for name, (_, z) in tables.items()}
                if w % 3 == 0:
                    ratings["skywork"] = None
                subset = "negative" if key.startswith(NEGATIVE) else "positive"
                f.write(json.dumps({"id": f"{key}:{word}", "prompt": text, "response": word, "ratings": ratings,
                                    "subset": subset}) + "\n")
    print(f"wrote {out}: {len(prompts) * len(words)} records")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
