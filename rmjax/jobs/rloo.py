"""The RLOO job (``rmjax rloo``): a policy tuned by RLOO (``rmjax.rl.rloo``) on the prompts of a corpus
(each record's prompt turns, rendered with the policy's chat template; its responses are not used)
against a reward model (``reward.kind: rm``, any RM ``rmjax score --rm`` loads, with its own tokenizer
and template) or a known reward (``reward.kind: words``: per generated token that spells one of
``reward.words``); resumable from the run directory's last checkpoint. The tuned policy (adapters
merged) is written to ``rloo.run_dir/final``, an HF causal-LM directory that ``rmjax score --policy``
and ``transformers`` load.

    config = rmjax.config.load(RLOOJobConfig, None, ["data.path=hh-rlhf:helpful", "reward.rm=DIR"])
    result = run(config)     # also rloo.run_dir/result.json
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np

from rmjax.config import knob, section
from rmjax.data.chat import render
from rmjax.data.records import RecordReport, read_records, sample_records
from rmjax.errors import RmjaxError
from rmjax.jobs.features import FeaturesData
from rmjax.models.loading import load_model
from rmjax.rl import rewards, rloo
from rmjax.runs import write_json
from rmjax.scoring import bulk
from rmjax.sections import ModelSection
from rmjax.train import export


@dataclasses.dataclass(kw_only=True)
class RewardSection:
    kind: str = knob("rm", "rm: a reward model's score of the decoded reply; words: a known reward, per generated "
                           "token that spells one of `words`", ("rm", "words"))
    rm: str = knob("", "rm: registry name, HF checkpoint dir or .gguf of the reward model")
    max_length: int = knob(1024, "rm: tokens per scored sequence (prompt + reply)")
    words: tuple[str, ...] = knob((), "words: the utility words (each must be one token of the policy's tokenizer)")
    per_token: float = knob(1.0, "words: reward per utility token")
    cap: int = knob(0, "words: utility tokens counted per reply at most (0 = no cap)")

    def check(self) -> list[tuple[bool, str]]:
        return [(self.kind != "rm" or bool(self.rm), "reward.kind rm needs the reward model (--rm / reward.rm)"),
                (self.kind != "words" or bool(self.words), "reward.kind words needs reward.words=[w1,w2,...]")]


@dataclasses.dataclass(kw_only=True)
class RLOOJobConfig:
    model: ModelSection = section(ModelSection)
    data: FeaturesData = section(FeaturesData, path="hh-rlhf:helpful", sample=64)
    reward: RewardSection = section(RewardSection)
    rloo: rloo.RLOOConfig = section(rloo.RLOOConfig)
    progress: bool = knob(True, "a log line per step")


def prompts_of(config: RLOOJobConfig, tokenizer) -> tuple[list[np.ndarray], list[list[dict]]]:
    """The corpus's prompts as token ids (the assistant turn open) and as messages, longer ones dropped."""
    d = config.data
    report = RecordReport()
    records = sample_records(read_records(d.path, on_error=d.on_error, report=report, **d.read_options()),
                             d.sample, d.seed)
    ids, messages, long = [], [], 0
    for rec in records:
        prompt = [{"role": role, "content": text} for role, text in rec.prompt]
        if not prompt:
            continue
        tokens = render(tokenizer, prompt, "", d.template)[0]
        if len(tokens) + config.rloo.max_new_tokens > d.max_length:
            long += 1
            continue
        ids.append(np.asarray(tokens, np.int32))
        messages.append(prompt)
    print(f"data: {report.summary()}; {len(ids)} prompts ({long} longer than data.max_length="
          f"{d.max_length} minus rloo.max_new_tokens left out)", file=sys.stderr)
    if not ids:
        raise RmjaxError(f"{d.path}: no prompt fits data.max_length={d.max_length} with "
                         f"rloo.max_new_tokens={config.rloo.max_new_tokens}")
    return ids, messages


def run(config: RLOOJobConfig) -> dict:
    """Tune the policy (or resume); returns the result (also written to rloo.run_dir/result.json):
    the first and last logged steps and the steps' mean reward, KL and length."""
    loaded = load_model(config.model.name, config.model)
    tok = loaded.tokenizer
    prompts, messages = prompts_of(config, tok)
    r = config.reward
    if r.kind == "words":
        reward_fn = rewards.token_utility(rewards.utility_token_ids(tok, r.words), r.per_token, r.cap or None)
    else:
        rm = load_model(r.rm, config.model)
        reward_fn = rewards.rm_reward(rm, messages, lambda samples: rloo.samples_text(tok, samples),
                                      bulk.ScoreSettings(max_length=r.max_length))

    def log(message: str) -> None:
        if config.progress:
            print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    out = rloo.train_rloo(loaded.params, loaded.config, prompts, reward_fn, config.rloo,
                          stop_ids=tuple(tok.end_of_turn_ids), pad_id=tok.pad_id if tok.pad_id is not None else 0, log=log)
    final = Path(config.rloo.run_dir) / "final"
    policy = jax.device_get(rloo.policy_params(out["params"], out["frozen"], config.rloo))
    export.export_policy(policy, loaded, config.model.name, final,
                         {"tuned_by": "rloo", "reward": dataclasses.asdict(r), "rloo": dataclasses.asdict(config.rloo)})
    # every step's metrics, also those of the runs this one resumed
    log_path = Path(config.rloo.run_dir) / "metrics.jsonl"
    history = [json.loads(ln) for ln in log_path.read_text().splitlines() if ln]
    trained = [h for h in history if not h.get("skipped")]
    result = {"model": config.model.name, "final": str(final), "reward": dataclasses.asdict(r), "prompts": len(prompts),
              "steps": config.rloo.steps, "seconds": round(time.perf_counter() - t0, 1),
              "first": history[0] if history else None, "last": history[-1] if history else None,
              "skipped_steps": len(history) - len(trained)}
    if trained:
        result.update({f"mean_{name}": float(np.mean([h[name] for h in trained])) for name in ("reward", "kl", "length")})
    write_json(Path(config.rloo.run_dir) / "result.json", result)
    return result
