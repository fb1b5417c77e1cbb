"""The sizing job (``rmjax plan``): a training run's step, or a batch of ``rmjax score``'s engine
(``job=score``: policy log-probs or a reward head, packed trees or the KV-cache path), compiled ahead of
time for a TPU topology from this host (``rmjax.planning``): memory per chip against its HBM, FLOPs, step
time, tokens/s and MFU (estimates or bounds).

    config = rmjax.config.load(PlanConfig, "experiments/rm_ablation/base.yaml",
                               ["model.name=llama-3.1-8b", "topology=v5p:2x2x1", "data.max_length=4096"])
    records = run(config)           # one record; with search, one per candidate, fitting and fastest first

A plan config is a training config (every ``rmjax train`` key: head, loss, trainable, batch, mesh, remat,
dtype) plus the target; ``model.name`` may also be a named shape (``rmjax.planning.NAMED_SHAPES``) or a
config.json. Nothing is allocated and no weight is read.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path

from rmjax import planning
from rmjax.config import knob
from rmjax.errors import ConfigError, RmjaxError
from rmjax.train.config import TrainConfig
from rmjax.train.objectives import check_combination


@dataclasses.dataclass(kw_only=True)
class PlanConfig(TrainConfig):
    topology: str = knob("v5p:2x2x1", "the TPU topology to compile for (v4:2x2x1, v5e:4x4, v5p:2x2x1, v6e:2x4, ...)")
    num_slices: int = knob(1, "slices of the topology joined by the data-centre network (multi-slice: the data "
                              "axis spans them, so set mesh.data to a multiple of the slices)")
    job: str = knob("train", "what to size: train (the train step) or score (one batch of rmjax score's engine)",
                    ("train", "score"))
    score_role: str = knob("policy", "score: the policy's log-probs (the implicit reward; its reference costs the "
                                     "same again), a scalar reward head (rm), or rmjax features' hidden states "
                                     "(features)", ("policy", "rm", "features"))
    score_layout: str = knob("packed", "score: packed prompt trees (rows of batch.row_length, else rmjax score's 512; "
                                       "a longer tree a row of its own), the KV-cache path, or the vocabulary "
                                       "scan's batch (one prompt, 512 one-token replies)", ("packed", "kv", "vocab_scan"))
    score_batch_tokens: int = knob(16384, "score: tokens per batch")
    sequence_length: int = knob(0, "tokens per sequence (a prompt and one response; 0: data.max_length)")
    responses: int = knob(2, "responses per prompt tree (pairs, judge)")
    response_tokens: int = knob(0, "tokens per response (0: a quarter of the sequence)")
    objectives: int = knob(3, "objectives of a multi-objective / ArmoRM head")
    search: bool = knob(False, "compile the candidates (strategy x remat x micro-batches) and list them, those "
                               "that fit first, fastest estimate first")
    search_strategies: tuple[str, ...] = knob(("fsdp", "fsdp_tp"), "search: the sharding strategies tried")
    search_remat: tuple[str, ...] = knob(("none", "full"), "search: the remat policies tried")
    search_micro_batches: tuple[int, ...] = knob((1, 2, 4), "search: train.grad_accum values tried (dividing "
                                                             "train.batch_size)")
    out: str = knob("", "also write the records here (JSON)")

    def check(self) -> list[tuple[bool, str]]:
        rules = [r for r in super().check() if "data.train" not in r[1]]  # nothing is read
        return [*rules, (self.responses >= 1 and self.objectives >= 1, "responses and objectives must be >= 1")]


def candidates(config: PlanConfig) -> list[PlanConfig]:
    """The configs ``search`` compiles (scoring: the strategies alone)."""
    if config.job == "score":
        return [dataclasses.replace(config, mesh=dataclasses.replace(config.mesh, strategy=s))
                for s in config.search_strategies]
    out = []
    for strategy, remat, accum in itertools.product(config.search_strategies, config.search_remat,
                                                    config.search_micro_batches):
        if config.train.batch_size % accum:
            continue
        out.append(dataclasses.replace(
            config, mesh=dataclasses.replace(config.mesh, strategy=strategy),
            model=dataclasses.replace(config.model, remat=remat),
            train=dataclasses.replace(config.train, grad_accum=accum)))
    if not out:
        raise ConfigError("search: no candidate (every search_micro_batches value leaves train.batch_size indivisible)")
    return out


def one(config: PlanConfig, devices=None) -> dict:
    topology = config.topology + (f" x {config.num_slices} slices" if config.num_slices > 1 else "")
    if config.job == "score":
        devices = devices or planning.topology_devices(config.topology, config.num_slices)
        return planning.plan_score(config.model.name, topology, role=config.score_role,
                                   layout=config.score_layout, strategy=config.mesh.strategy,
                                   numerics=config.model.numerics(),
                                   sequence=config.sequence_length or config.data.max_length,
                                   responses=config.responses, response_tokens=config.response_tokens,
                                   row_length=config.batch.row_length, batch_tokens=config.score_batch_tokens,
                                   devices=devices)
    check_combination(config, "plan")
    devices = devices or planning.topology_devices(config.topology, config.num_slices)
    return planning.plan_train(config, topology, sequence=config.sequence_length,
                               responses=config.responses, response_tokens=config.response_tokens,
                               objectives=config.objectives, devices=devices)


def run(config: PlanConfig, log=print) -> list[dict]:
    """The plan of the configured run, or of every search candidate (fitting first, fastest first)."""
    devices = planning.topology_devices(config.topology, config.num_slices)
    configs = candidates(config) if config.search else [config]
    records = []
    for c in configs:
        try:
            record = one(c, devices)
        except RmjaxError:
            raise
        except Exception as e:  # noqa: BLE001 (a candidate XLA cannot compile is reported, not fatal)
            if not config.search:
                raise
            record = {"job": c.job, "strategy": c.mesh.strategy, "remat": c.model.remat,
                      "micro_batches": c.train.grad_accum,
                      "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}", "fits": False}
            log(f"{c.mesh.strategy} remat {c.model.remat} x{c.train.grad_accum}: did not compile ({record['error']})")
        else:
            log(planning.summary_line(record))
        records.append(record)
    if config.search:
        records.sort(key=lambda r: (not r["fits"], r.get("estimate", {}).get("step_seconds") or float("inf")))
    if config.out:
        Path(config.out).parent.mkdir(parents=True, exist_ok=True)
        Path(config.out).write_text(json.dumps(records, indent=2))
    return records
