"""The scoring job (``rmjax score``): a corpus scored with implicit rewards, a reward model and/or a
generative judge; resumable, shard by shard.

    config = rmjax.config.load(ScoreConfig, "job.yaml", ["model.rm=/path/rm", "data.path=llmbar"])
    summary = run(config)

Default: the implicit RM rmjax ships (SmolLM2-135M-Instruct + its DPO LoRA adapter against
SmolLM2-135M-Instruct) on the adapter's held-out HH-RLHF pairs; ``model.rm`` or ``model.judge``
alone scores the bundled LLMBar pairs; ``model.cross_family`` the two embedded families on HH-RLHF.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time

from rmjax import compilation, distributed
from rmjax import sharding as shd
from rmjax.config import knob, section
from rmjax.data.records import RecordReport, Share, input_fingerprint
from rmjax.errors import RmjaxError
from rmjax.io.registry import resolve_model
from rmjax.models.config import Numerics
from rmjax.models.loading import load_model
from rmjax.runs import PART_ROWS, RunWriter
from rmjax.scoring import bulk
from rmjax.sections import DataSection, MeshSection, ScoringBatch

DEFAULT_POLICY, DEFAULT_REFERENCE, HELDOUT = "smollm2-135m-dpo-hh", "smollm2-135m-instruct", "heldout"
RM_DEFAULT_DATA = "llmbar"  # what an RM or a judge alone scores by default (bundled, never trained on)
CROSS_FAMILY = ("smollm2-135m-instruct", "gemma3-270m", "hh-rlhf")
HELDOUT_FILE = "heldout.jsonl.gz"
DEFAULT_ROW_LENGTH = 512


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelRoles(Numerics):
    """The models the scoring engine runs (``rmjax.scoring.bulk``), and how they run."""

    policy: str | None = knob(None, f"policy (log pi); '' for none (default: {DEFAULT_POLICY}; none with rm or judge)")
    reference: str | None = knob(None, f"reference (log pi_ref); '' = reference-free (default: {DEFAULT_REFERENCE} "
                                       "with a policy)")
    rm: str = knob("", "explicit reward model: a *ForSequenceClassification dir (any released head: ArmoRM, URM, "
                       "QRM), an rmjax export, BASE+ADAPTER_DIR")
    judge: str = knob("", "generative judge: an exported judge dir or any causal LM (zero-shot); each pair is judged "
                          "in both orders (swap-debiased)")
    judge_labels: tuple[str, ...] = knob((), "verdict tokens for the first / second response (default: the "
                                             "judge's own, else A B)")
    judge_template: str = knob("", "judge prompt: rmjax | gram | a template file with {question} {response_a} "
                                   "{response_b} (default: the judge's own, else rmjax)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScoreModels(ModelRoles):
    """The models of a scoring run, and how they run."""

    cross_family: bool = knob(False, f"the cross-family pair instead: policy {CROSS_FAMILY[0]}, reference "
                                     f"{CROSS_FAMILY[1]}, data {CROSS_FAMILY[2]} (an instruct model against "
                                     "another family's base model: their disagreement, not a reward model)")


@dataclasses.dataclass(kw_only=True)
class ScoreData(DataSection):
    path: str = knob(HELDOUT, "jsonl / parquet / datasets dir, hh-rlhf[:SUBSETS], llmbar[:SUBSETS], or 'heldout': "
                              f"the held-out pairs bundled with the policy adapter (an RM or judge alone: "
                              f"{RM_DEFAULT_DATA})")
    sample: int | None = knob(None, "score a seeded sample of this many examples (0 = all; default: every held-out "
                                    "pair with heldout, else 64)")
    seed: int = knob(0, "the sample's seed")


@dataclasses.dataclass(kw_only=True)
class ScoreMesh(MeshSection):
    scope: str = knob("process", "with several processes: process (each scores its own shards on a mesh of its own "
                                 "devices) or global (one mesh over every process's devices, each shard scored "
                                 "together: models sharded across hosts)", ("process", "global"))


@dataclasses.dataclass(kw_only=True)
class ScoreConfig:
    model: ScoreModels = section(ScoreModels)
    data: ScoreData = section(ScoreData)
    batch: ScoringBatch = section(ScoringBatch)
    mesh: ScoreMesh = section(ScoreMesh)
    beta: float = knob(1.0, "implicit reward: beta x (log pi - log pi_ref)")
    reduction: str = knob("sum", "the sequence log-prob in the implicit reward: sum, or mean (length-normalised)",
                          ("sum", "mean"))
    reference_template: str = knob("model", "the reference's rendering, as data.template (a base reference reads the "
                                            "raw prompt text)")
    shard_size: int = knob(32, "examples per shard (the unit of work and of resumption)")
    part_rows: int = knob(PART_ROWS, "rows per part file of an unfinished run (the parts are merged into "
                                     "scores.parquet at the end)")
    token_logprobs: bool = knob(False, "also store per-token log-probs (tokens.zarr)")
    out: str = knob("runs/score", "output directory")
    overwrite: bool = knob(False, "start over in an existing output directory")
    progress: bool = knob(True, "show a progress bar")

    def check(self) -> list[tuple[bool, str]]:
        return [(self.batch.layout in ("packed", "kv"), "batch.layout must be packed or kv for scoring"),
                (self.shard_size > 0, "shard_size must be positive"), (self.part_rows > 0, "part_rows must be positive")]


def resolve(config: ScoreConfig) -> ScoreConfig:
    """Defaults that depend on each other: the cross-family pair, the default policy / reference (none
    when an RM or a judge is given alone), the data (the policy adapter's held-out pairs, or LLMBar
    for an RM or judge alone) and the sample size."""
    m, d = config.model, config.data
    policy, reference, path = m.policy, m.reference, d.path
    if m.cross_family:
        given = [k for k, v, default in (("model.policy", policy, None), ("model.reference", reference, None),
                                         ("data.path", path, HELDOUT)) if v != default]
        if given:
            raise RmjaxError(f"model.cross_family (--cross-family) sets the models and data itself; drop "
                             f"{', '.join(given)}")
        policy, reference, path = CROSS_FAMILY
    policy, reference = default_roles(m, policy, reference)
    sample = d.sample
    if path == HELDOUT and not policy:
        path = RM_DEFAULT_DATA
    if path == HELDOUT:
        source = resolve_model(policy) if policy else None
        held = source.path / HELDOUT_FILE if source is not None and source.kind == "adapter" else None
        if held is None or not held.exists():
            raise RmjaxError(f"data heldout needs a policy adapter that ships {HELDOUT_FILE} (the pairs it did not "
                             f"train on); {policy!r} has none: give --data")
        path = str(held)
        sample = 0 if sample is None else sample
    elif sample is None:
        sample = 64
    if not policy and reference:
        raise RmjaxError("a reference (--reference) needs a policy (--policy)")
    return dataclasses.replace(config, model=dataclasses.replace(m, policy=policy, reference=reference),
                               data=dataclasses.replace(d, path=path, sample=sample))


def default_roles(m: ModelRoles, policy: str | None, reference: str | None) -> tuple[str, str]:
    """The policy and reference: the implicit RM rmjax ships unless an RM or a judge is given alone;
    a policy without a reference scores against the default reference ('' = reference-free)."""
    other = bool(m.judge or m.rm)
    if policy is None:
        policy = "" if other else DEFAULT_POLICY
        if reference is None:
            reference = "" if other else DEFAULT_REFERENCE
    elif reference is None:
        reference = DEFAULT_REFERENCE
    return policy, reference


def settings(config: ScoreConfig, data_hash: str) -> dict:
    """What the output's metadata records (a resumed run must have the same)."""
    m, d, b = config.model, config.data, config.batch
    roles = {"policy": m.policy, "reference": m.reference, "rm": m.rm, "judge": m.judge}
    out = {"models": {r: v for r, v in roles.items() if v}, "beta": config.beta, "reduction": config.reduction,
           "template": d.template, "reference_template": config.reference_template, "dtype": m.dtype,
           "data": d.path, "split": d.split or None, "columns": d.columns, "ratings": list(d.ratings),
           "data_hash": data_hash, "sample": d.sample, "seed": d.seed, "max_length": d.max_length,
           "over_length": d.over_length, "batch_size": b.batch_size, "layout": b.layout,
           "row_length": row_length(config), "batch_tokens": b.batch_tokens, "on_error": d.on_error}
    if m.judge:
        out.update(judge_labels=list(m.judge_labels) or None, judge_template=m.judge_template)
    return out


def row_length(config: ScoreConfig) -> int:
    """Packed rows' length (0 for the KV layout)."""
    if config.batch.layout == "kv":
        return 0
    return config.batch.row_length or DEFAULT_ROW_LENGTH


def run(config: ScoreConfig) -> dict:
    """Score the corpus (or resume); returns the summary (accuracies with intervals, throughput)."""
    import jax
    from tqdm import tqdm

    distributed.maybe_initialize()
    config = resolve(config)
    m, d, b = config.model, config.data, config.batch
    report = RecordReport()
    # each process parses only its part of the input (and owns the shards that start there)
    share = distributed.read_share(d.path, on_error=d.on_error, report=report, sample=d.sample, seed=d.seed,
                                   shard_size=config.shard_size, **d.read_options())
    bulk.log(f"data: {report.summary()}; scoring {share.total} examples"
             + (f" (this process parsed rows {share.units[0]}..{share.units[1] - 1}, holds "
                f"{share.held})" if jax.process_count() > 1 else ""))
    if not share.total:
        raise RmjaxError(f"{d.path}: no records to score")
    s = bulk.ScoreSettings(beta=config.beta, reduction=config.reduction, template=d.template,
                           reference_template=config.reference_template, max_length=d.max_length,
                           over_length=d.over_length, batch_size=b.batch_size, shard_size=config.shard_size,
                           token_logprobs=config.token_logprobs, pack_length=row_length(config),
                           batch_tokens=max(b.batch_tokens, row_length(config)))
    meta = settings(config, input_fingerprint(d.path))

    def open_writer(overwrite: bool, first: bool):  # process 0 opens (or resumes) the run before the others
        return RunWriter(config.out, meta, num_examples=share.total, shard_size=config.shard_size,
                         token_logprobs=config.token_logprobs, overwrite=overwrite and first,
                         part_rows=config.part_rows, tidy=first)

    writer = distributed.main_first(lambda first: open_writer(config.overwrite, first))
    if writer.is_complete():
        bulk.log(f"{config.out}: already complete")
        return writer.metadata.get("summary", {})
    mesh = None
    together = config.mesh.scope == "global" and jax.process_count() > 1
    if together and config.mesh.strategy == "none":
        raise RmjaxError("mesh.scope global shards the models over every process's devices: give a strategy "
                         "(e.g. --strategy fsdp)")
    if together:  # every process builds every global batch: each needs all records
        everything = [r for theirs in distributed.exchange("gathering the records", lambda: share.records)
                      for r in theirs]
        share = Share(everything, share.total, 0, share.units, config.shard_size)
    if config.mesh.strategy != "none":
        # several processes: each one scores its own shards with the models on its own devices, or
        # (mesh.scope global) all score every shard on one mesh over all of them
        mesh = config.mesh.mesh(devices=None if together else distributed.own_devices())
        bulk.log(f"mesh {shd.describe(mesh)} ({config.mesh.strategy}) over "
                 f"{'every process' if together else 'this process'}'s devices")
    strategy = config.mesh.strategy if mesh is not None else "dp"
    scorer = bulk.Scorer(load_slots(m, mesh, strategy), s, mesh=mesh, strategy=config.mesh.strategy)
    bulk.log(f"models: {', '.join(f'{sl.role}={sl.loaded.source}' for sl in scorer.slots)}; "
             f"{'one fused jit for policy+reference' if scorer.fused else 'per-model passes'}"
             + (f", their first {scorer.shared_layers} layers (identical) run once" if scorer.shared_layers else ""))
    pending = writer.pending_shards()
    mine = [k for k in pending if share.owned(k)]
    done = share.total - sum(len(writer.shard_range(k)) for k in pending)
    bar = tqdm(total=share.total, initial=done, unit="ex", desc="score", file=sys.stderr,
               disable=not config.progress or not distributed.is_main_process())
    t0 = time.perf_counter()
    for k, (rows, dropped, token_streams) in zip(mine, _prefetched_shards(scorer, share, mine)):
        if not together or distributed.is_main_process():  # one global mesh: every process has all rows
            writer.write_shard(k, rows, skipped=dropped, token_logprobs=token_streams if s.token_logprobs else None)
        bar.update(len(writer.shard_range(k)))
        bar.set_postfix(tok_s=f"{scorer.real_tokens / max(time.perf_counter() - t0, 1e-9):.0f}")
    bar.close()
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("rmjax-score-shards")
    if not distributed.is_main_process():
        return {}
    elapsed = time.perf_counter() - t0  # this invocation (a resumed run counts its own part)
    run_stats = {**compilation.stats(), "seconds": round(elapsed, 1), "tokens": int(scorer.real_tokens),
                 "tokens_per_s": round(scorer.real_tokens / max(elapsed, 1e-9), 1)}

    def summarise(table_path) -> dict:
        summary = bulk.summarise_table(table_path)
        if scorer.padded_tokens:
            summary["padding_efficiency"] = scorer.real_tokens / scorer.padded_tokens
            summary["tokens_vs_unshared"] = scorer.real_tokens / max(scorer.naive_tokens, 1)
        summary["records_skipped"] = len(report.skipped)
        summary["run"] = run_stats
        return {"summary": summary}

    writer.finalize({"settings_resolved": dataclasses.asdict(s)}, summarise=summarise)
    summary = writer.metadata["summary"]
    if "implicit_pairwise_accuracy" in summary and m.reference:
        lo, hi = summary["implicit_pairwise_accuracy_ci95"]
        bulk.log(f"implicit reward {m.policy} vs {m.reference}: pairwise accuracy "
                 f"{summary['implicit_pairwise_accuracy']:.3f} [95% CI {lo:.3f}, {hi:.3f}] on "
                 f"{summary['implicit_pairs']} pairs of {d.path}")
    if "judge_pairwise_accuracy" in summary:
        lo, hi = summary["judge_pairwise_accuracy_ci95"]
        bulk.log(f"judge {m.judge}: pairwise accuracy {summary['judge_pairwise_accuracy']:.3f} [95% CI {lo:.3f}, "
                 f"{hi:.3f}] on {summary['judge_pairs']} pairs of {d.path} (swap-debiased log-odds; position "
                 f"bias {summary['judge_mean_position_bias']:+.3f})")
    return summary


def load_slots(m: ModelRoles, mesh=None, strategy: str = "dp") -> list[bulk.ModelSlot]:
    """The models named in ``m`` (a role left empty has none), loaded (on ``mesh``) into the engine's
    slots; a judge with its verdict settings."""
    roles = [("policy", m.policy), ("reference", m.reference), ("rm", m.rm), ("judge", m.judge)]
    slots = [bulk.ModelSlot(role, load_model(name, m, mesh=mesh, strategy=strategy)) for role, name in roles if name]
    for sl in slots:
        if sl.role == "judge":
            sl.judge = bulk.judge_spec(m.judge, sl.loaded, tuple(m.judge_labels), m.judge_template)
            bulk.log(f"judge: labels {list(sl.judge.labels)} (token ids {list(sl.judge.label_ids)}), chat "
                     f"template {sl.judge.chat}, both candidate orders per pair")
    return slots


def _prefetched_shards(scorer, share, shards):
    """Score shards in order; grain prefetches the next shard's records while one is scored."""
    import grain

    ds = grain.MapDataset.source(shards).map(share.shard_records)
    for recs in ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)):
        yield scorer.score_shard(recs)


def print_summary(summary: dict) -> None:
    print(json.dumps(summary, indent=2))
