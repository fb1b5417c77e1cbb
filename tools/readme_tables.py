"""The README's result tables, rendered from the results files the commands write.

    python tools/readme_tables.py            rewrite every table block in README.md from its files
    python tools/readme_tables.py --check    exit 1 (naming the tables) when README.md differs

A block in README.md is

    <!-- table NAME -->
    | ... the table ... |
    <!-- /table -->

and ``TABLES[NAME]`` renders it (with a last line citing the files) from results files in the
repository, each written by the command the README shows beside the table. tests/test_readme.py runs
the check, so a change that moves a number fails until the README is regenerated from the new files.
"""
from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

import yaml
from scipy import stats

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BLOCK = re.compile(r"(<!-- table (\w+) -->\n)(.*?)(<!-- /table -->)", re.DOTALL)


def _json(path: str) -> dict:
    return json.loads((ROOT / path).read_text())


def _ci(acc: float, ci: list[float]) -> str:
    return f"{acc:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def _source(*paths: str) -> str:
    return "\n\n(from " + ", ".join(f"`{p}`" for p in paths) + ")\n"


def main_job() -> str:
    default, cross = "experiments/irm/results/score.json", "experiments/irm/results/score_cross_family.json"
    d, c = _json(default), _json(cross)
    rows = [
        ("default: DPO adapter vs SmolLM2-Instruct", f"{d['implicit_pairs']} held-out", d,
         "a same-family implicit RM on unseen pairs: the preference DPO put into the adapter, relative to the "
         "model it started from"),
        ("`--cross-family`: SmolLM2-Instruct vs Gemma-3-270M base", f"{c['implicit_pairs']} sampled from all HH-RLHF",
         c, "how two families' text distributions disagree, not preference"),
    ]
    lines = ["| `rmjax score` | pairs | pairwise accuracy [95% CI] | wall (2 cores) | what it measures |",
             "|---|---|---|---|---|"]
    for name, pairs, s, what in rows:
        lines.append(f"| {name} | {pairs} | {_ci(s['implicit_pairwise_accuracy'], s['implicit_pairwise_accuracy_ci95'])}"
                     f" | {_minutes(s['run']['seconds'])} | {what} |")
    return "\n".join(lines) + _source(default, cross)


def cpu_short() -> str:
    path = "experiments/rm_ablation/results/cpu_short.json"
    ev = _json(path)["eval"]
    lines = ["| held-out subset | pairs | accuracy [95% CI] |", "|---|---|---|"]
    for key in ev:
        if key.startswith("accuracy/"):
            name = key.removeprefix("accuracy/")
            lines.append(f"| {name} | {ev['examples/' + name]} | {_ci(ev[key], ev['ci95/' + name])} |")
    wins = round(ev["accuracy"] * ev["examples"])
    p = stats.binomtest(wins, ev["examples"], 0.5, alternative="greater").pvalue
    lines.append(f"| **all** | **{ev['examples']}** | **{_ci(ev['accuracy'], ev['ci95'])}** ({wins}/{ev['examples']}; one-sided "
                 f"binomial p = {p:.2g} against chance) |")
    return "\n".join(lines) + _source(path)


RM_HEADS = {  # config: (what is trained, data)
    "scalar_bt": ("last 2 layers + norm + scalar head (7.1M)",
                  "HH-RLHF helpful, max 256 tokens; BT with label smoothing 0.05, centring 0.01"),
    "multi_objective_mse": ("3-objective regression head (1.7k), frozen backbone",
                            "18 value prompts x 265 nouns rated by 3 released RMs (ArmoRM, Skywork-Gemma-27B, "
                            "GRM-gemma-2B; z-scored; Skywork unrated on every third noun)"),
    "armorm_bt": ("the gate (2 x 64 hidden, 40k) over the frozen regression above", "HH-RLHF helpful"),
    "judge_ce": ("last 4 layers + norm (14.2M); verdict tokens \"A\" / \"B\"",
                 "HH-RLHF helpful as judge prompts, both orders, max 160 tokens per response"),
    "lm_dpo": ("last 4 layers + norm of the policy (14.2M), frozen copy as reference, beta 0.1", "HH-RLHF helpful"),
}


def _held_out(result: dict) -> str:
    ev = result["eval"]
    if "mse" in ev:  # ratings: per objective
        names = [k.removeprefix("mse/") for k in ev if k.startswith("mse/")]
        mse = " / ".join(f"{ev['mse/' + n]:.2f}" for n in names)
        r = " / ".join(f"{ev['pearson/' + n]:.2f}" for n in names)
        return f"MSE {mse}, Pearson r {r} on {ev['examples']} held-out ratings"
    kind = "implicit-reward accuracy" if result["loss"] == "dpo" else "accuracy"
    text = f"{kind} {_ci(ev['accuracy'], ev['ci95'])}, {ev['examples']} pairs"
    start = result.get("eval_start")
    if start and "accuracy" in start:
        text += f"; untrained: {_ci(start['accuracy'], start['ci95'])}"
    return text


def rm_heads() -> str:
    lines = ["| config | trained | data | steps x batch | wall | held-out result |", "|---|---|---|---|---|---|"]
    paths = []
    for name, (trained, data) in RM_HEADS.items():
        path = f"experiments/rm_heads/results/{name}.json"
        paths.append(path)
        result = _json(path)
        cfg = yaml.safe_load((ROOT / f"experiments/rm_heads/{name}.yaml").read_text())
        unit = "pairs" if result["head"] != "multi_objective" else ""
        batch = f"{result['step']} x {cfg['train']['batch_size']}" + (f" {unit}" if unit else "")
        if result["head"] == "multi_objective":
            data = f"{result['train_examples'] + result['eval_examples']:,} ratings: {data}"
        lines.append(f"| `{name}` | {trained} | {data} | {batch} | {_minutes(result['seconds'])} | {_held_out(result)} |")
    return "\n".join(lines) + _source("experiments/rm_heads/results/CONFIG.json")


def value_bias() -> str:
    path = "experiments/value_bias/results/big2_nouns/comparison.csv"
    lines = ["| prompts | category | Gemma mean rank | Llama mean rank | d | p (Bonferroni) |", "|---|---|---|---|---|---|"]
    with (ROOT / path).open() as f:
        for r in csv.DictReader(f):
            lines.append(f"| {r['framing']} | {r['category']} | {float(r['gemma_mean']):.2f} | "
                         f"{float(r['llama_mean']):.2f} | {float(r['cohens_d']):+.2f} | {float(r['p_bonferroni']):.4f} |")
    return "\n".join(lines) + _source(path)


def gram() -> str:
    path = "experiments/gram/results/summary.json"
    summary = _json(path)
    res, runs = summary["results"], summary["runs"]
    data = list(res["gram"])  # held-out HH, LLMBar Natural
    n = {d: res["gram"][d]["judge_pairs"] for d in data}
    titles = {"heldout": "held-out HH", "llmbar_natural": "LLMBar Natural"}
    lines = ["| judge | stage 1 | stage 2 | " + " | ".join(f"{titles.get(d, d)} ({n[d]} pairs)" for d in data)
             + " | position bias (" + " / ".join(titles.get(d, d) for d in data) + ") |",
             "|---" * (4 + len(data)) + "|"]
    rows = [("zero_shot", "SmolLM2-135M-Instruct zero-shot, GRAM's prompt", None, None),
            ("finetune_only", "stage 2 only", None, "finetune_only"),
            ("gram", "**GRAM (stage 1 + 2)**", "pretrain", "finetune")]
    for key, title, stage1, stage2 in rows:
        s = res[key]
        cells = [_ci(s[d]["judge_pairwise_accuracy"], s[d]["judge_pairwise_accuracy_ci95"]) for d in data]
        if key == "gram":
            cells = [f"**{c}**" for c in cells]
        wall = [_minutes(runs[st]["result"]["seconds"]) if st else "-" for st in (stage1, stage2)]
        bias = " / ".join(f"{s[d]['judge_mean_position_bias']:+.2f}" for d in data)
        lines.append(f"| {title} | {wall[0]} | {wall[1]} | " + " | ".join(cells) + f" | {bias} |")
    return "\n".join(lines) + _source(path)


TABLES: dict[str, Callable[[], str]] = {"main_job": main_job, "cpu_short": cpu_short, "rm_heads": rm_heads,
                                        "gram": gram, "value_bias": value_bias}


def render(text: str) -> tuple[str, list[str]]:
    """(README text with every block re-rendered, names of the blocks that changed)."""
    changed = []

    def block(m: re.Match) -> str:
        name = m.group(2)
        if name not in TABLES:
            raise SystemExit(f"README.md: table block {name!r} has no renderer; known: {sorted(TABLES)}")
        new = TABLES[name]()
        if new != m.group(3):
            changed.append(name)
        return m.group(1) + new + m.group(4)

    return BLOCK.sub(block, text), changed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true", help="only report tables that differ from their files")
    args = p.parse_args(argv)
    text = README.read_text()
    new, changed = render(text)
    if args.check:
        if changed:
            print(f"README.md tables out of date with their results files: {changed}; run python tools/readme_tables.py")
            return 1
        print("README.md tables match their results files")
        return 0
    README.write_text(new)
    print(f"rewrote {changed or 'nothing'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
