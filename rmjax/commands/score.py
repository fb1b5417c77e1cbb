"""`rmjax score` and `rmjax vocab-scan`: flags mapped onto ``rmjax.jobs.score.ScoreConfig`` and
``rmjax.jobs.vocab_scan.VocabScanConfig``."""
from __future__ import annotations

import argparse
import json

from rmjax.commands.options import (
    CORPUS_FLAGS,
    NUMERICS_FLAGS,
    Flag,
    add_config_arguments,
    config_from_args,
    no_progress,
)
from rmjax.jobs import score, vocab_scan
from rmjax.jobs.score import ScoreConfig
from rmjax.jobs.vocab_scan import VocabScanConfig


def _pack_length(value: int) -> list:
    """--pack-length N: packed rows of N tokens; 0: the KV layout."""
    if value < 0:
        return [("batch.row_length", value)]  # rejected by the config's checks
    return [("batch.layout", "kv")] if value == 0 else [("batch.layout", "packed"), ("batch.row_length", value)]


SCORE_FLAGS = {
    **{k: v for k, v in CORPUS_FLAGS.items() if k != "--model"},  # the models: --policy, --reference, --rm, --judge
    "--policy": "model.policy", "--reference": "model.reference", "--rm": "model.rm", "--judge": "model.judge",
    "--cross-family": Flag("model.cross_family", action="store_true"),
    "--judge-labels": Flag("model.judge_labels", nargs=2, metavar=("FIRST", "SECOND")),
    "--judge-template": "model.judge_template", "--beta": "beta", "--reduction": "reduction",
    "--reference-template": "reference_template",
    "--pack-length": Flag("batch.row_length", convert=_pack_length, metavar="N",
                          help="packed rows of this many tokens (each prompt once, its responses as attention "
                               "branches); 0: the KV layout (prompts once, their responses on their KV cache)"),
    "--layout": "batch.layout", "--batch-tokens": "batch.batch_tokens", "--batch-size": "batch.batch_size",
    "--shard-size": "shard_size", "--strategy": "mesh.strategy", "--mesh-scope": "mesh.scope",
    "--token-logprobs": Flag("token_logprobs", action="store_true"), "--out": "out",
    "--overwrite": Flag("overwrite", action="store_true"),
    "--no-progress": no_progress("no progress bar"),
    **NUMERICS_FLAGS,
}

VOCAB_FLAGS = {
    "--model": "model.name", "--reference": "reference", "--rm": "rm", "--prompts": "prompts",
    "--prompt-keys": Flag("prompt_keys", nargs="*"), "--mode": "mode", "--words": "words",
    "--template": "template", "--reference-template": "reference_template", "--mwlr-join": "mwlr_join",
    "--chunk": "chunk", "--out": "out", **NUMERICS_FLAGS,
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("score", help="score a corpus with implicit rewards and/or a reward model (resumable)",
                       description="Score every example of a corpus (rmjax.jobs.score). Re-running the same command "
                                   "resumes it. Default: the implicit RM rmjax ships (SmolLM2-135M-Instruct + its DPO "
                                   "LoRA adapter against SmolLM2-135M-Instruct) on the adapter's held-out HH-RLHF "
                                   "pairs; --rm or --judge alone scores the bundled LLMBar pairs.")
    add_config_arguments(p, ScoreConfig, SCORE_FLAGS)
    p.set_defaults(func=run_score)

    v = sub.add_parser("vocab-scan", help="score every vocabulary token (or every word of a list) as a response",
                       description="Exhaustive scoring over the value prompts (rmjax.jobs.vocab_scan); one table per "
                                   "mode.")
    add_config_arguments(v, VocabScanConfig, VOCAB_FLAGS)
    v.set_defaults(func=run_vocab_scan)


def run_score(args) -> int:
    print(json.dumps(score.run(config_from_args(ScoreConfig, args)), indent=2))
    return 0


def run_vocab_scan(args) -> int:
    print(f"wrote {vocab_scan.run(config_from_args(VocabScanConfig, args))}")
    return 0
