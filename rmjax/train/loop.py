"""`rmjax train`: a Bradley-Terry reward model on a mesh, resumable, with eval, metrics and export.

Run directory layout:
    config.yaml            the resolved config (a re-run must match it, or pass --overwrite)
    checkpoints/<step>/    orbax: train state (+ data position = step), keep-last-k, async
    best/<step>/           the best checkpoint by eval accuracy
    metrics.jsonl          one line per logged/eval step (rewound on resume: no duplicates)
    events.*               TensorBoard
    final/                 HF ``*ForSequenceClassification`` safetensors export + orbax params
    result.json            final metrics (the ablation driver reads this)
"""
from __future__ import annotations

import json
import math
import shutil
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from rmjax import distributed
from rmjax import sharding as shd
from rmjax.data import pairs as pairdata
from rmjax.data.preferences import LoadReport, PreferencePair, load_hh_rlhf
from rmjax.errors import ConfigError
from rmjax.train import params as tparams
from rmjax.train import step as tstep
from rmjax.train.config import RunConfig, save_config


def split_data(pairs: list[PreferencePair], run: RunConfig) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """Deterministic held-out eval set, then the first ``fraction`` of the rest (nested subsets)."""
    order = np.random.default_rng(run.data.shuffle_seed).permutation(len(pairs))
    shuffled = [pairs[i] for i in order]
    evals, pool = shuffled[:run.data.eval_pairs], shuffled[run.data.eval_pairs:]
    return pool[:max(1, math.ceil(run.data.fraction * len(pool)))], evals


def check_run_dir(run: RunConfig, overwrite: bool) -> Path:
    run_dir = Path(run.run_dir)
    saved = run_dir / "config.yaml"
    if saved.exists():
        import yaml
        previous = yaml.safe_load(saved.read_text())
        current = yaml.safe_load(yaml.safe_dump({**run.to_dict(), "data": {**run.to_dict()["data"],
                                                                           "buckets": list(run.data.buckets)}}))
        if previous != current:
            if not overwrite:
                diff = [k for k in current if previous.get(k) != current[k]]
                raise ConfigError(f"{run_dir} holds a run with different settings (sections {diff}); "
                                  "use another run_dir, or --overwrite to delete it")
            shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(run, saved)
    return run_dir


class MetricsLog:
    """metrics.jsonl + TensorBoard; on resume, lines past the restored step are dropped."""

    def __init__(self, run_dir: Path, resume_step: int):
        self.path = run_dir / "metrics.jsonl"
        if self.path.exists():
            keep = [ln for ln in self.path.read_text().splitlines() if ln and json.loads(ln)["step"] <= resume_step]
            self.path.write_text("".join(ln + "\n" for ln in keep))
        self.tb = None
        if distributed.is_main_process():
            from tensorboardX import SummaryWriter
            self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1)

    def write(self, step: int, kind: str, values: dict) -> None:
        if not distributed.is_main_process():
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "kind": kind, **values}) + "\n")
        for k, v in values.items():
            if isinstance(v, (int, float)):
                self.tb.add_scalar(f"{kind}/{k}", v, step)
        self.tb.flush()


def evaluate(eval_fn, trainable, frozen, data: pairdata.TokenizedPairs, pad_id: int, batch: int,
             buckets: tuple[int, ...], mesh) -> dict:
    """Pairwise accuracy (ties 0.5), mean margin and per-subset accuracy over ``data``."""
    rows = NamedSharding(mesh, P(("data", "fsdp"), None))
    n_dev = mesh.shape["data"] * mesh.shape["fsdp"]
    batch = max(n_dev, batch - batch % n_dev)
    margins = np.zeros(len(data), np.float64)
    order = sorted(range(len(data)), key=lambda i: max(len(data.chosen[i]), len(data.rejected[i])))
    for start in range(0, len(order), batch):
        idx = np.asarray(order[start:start + batch])
        real = len(idx)
        idx = np.concatenate([idx, np.repeat(idx[-1:], batch - real)])  # pad the last batch
        length = pairdata.bucket_of(max(max(len(data.chosen[i]), len(data.rejected[i])) for i in idx), buckets)
        arrays = pairdata.make_batch(data, idx, length, pad_id)
        arrays = {k: jax.device_put(v, rows) for k, v in arrays.items()}
        r_c, r_r = eval_fn(trainable, frozen, arrays)
        margins[idx[:real]] = (np.asarray(r_c) - np.asarray(r_r))[:real]
    wins = np.where(margins > 0, 1.0, np.where(margins == 0, 0.5, 0.0))
    out = {"accuracy": float(wins.mean()), "margin": float(margins.mean()), "pairs": len(data)}
    for subset in sorted({p.subset for p in data.pairs}):
        sel = np.array([p.subset == subset for p in data.pairs])
        out[f"accuracy/{subset}"] = float(wins[sel].mean())
    return out


def train(run: RunConfig, overwrite: bool = False, progress: bool = True, stop_after: int | None = None) -> dict:
    """Train (or resume) the run; returns the final metrics. ``stop_after`` ends early (tests)."""
    import orbax.checkpoint as ocp
    from tqdm import tqdm

    from rmjax.models.loading import load_model

    distributed.maybe_initialize()
    run_dir = check_run_dir(run, overwrite)
    mesh = shd.make_mesh(shd.MeshConfig(strategy=run.mesh.strategy, data=run.mesh.data, fsdp=run.mesh.fsdp,
                                        tensor=run.mesh.tensor))
    loaded = load_model(run.model.name, mesh=mesh, strategy=run.mesh.strategy, dtype=run.model.dtype,
                        param_dtype=run.model.param_dtype, remat_policy=run.model.remat)
    config, tok = loaded.config, loaded.tokenizer

    report = LoadReport()
    pool, eval_pairs = split_data(load_hh_rlhf(run.data.source, report=report), run)
    train_data = pairdata.tokenize_pairs(tok, pool, run.data.max_length, run.data.over_length)
    eval_data = pairdata.tokenize_pairs(tok, eval_pairs, run.data.max_length, run.data.over_length)
    log = print if distributed.is_main_process() else (lambda *a, **k: None)
    log(f"data: {report.summary()}; train {train_data.summary()}; eval {eval_data.summary()}", file=sys.stderr)

    # full params -> (trainable, frozen); frozen parts never get optimizer state
    rng = jax.random.key(run.train.seed)
    replicated = NamedSharding(mesh, P())
    if loaded.score_head is not None:
        head = {"score": {"kernel": jnp.asarray(loaded.score_head[:, :1])}}
    else:
        head = tstep.init_head(jax.random.fold_in(rng, 1), config.hidden_size)
    full = {"backbone": loaded.params, "head": jax.device_put(head, replicated)}
    if run.train.trainable == "lora":
        full["lora"] = jax.device_put(tparams.init_lora(loaded.params, run.train.lora_rank,
                                                        jax.random.fold_in(rng, 2)), replicated)
    trainable, frozen = tparams.split(full, run.train.trainable, run.train.last_k)
    optimizer = tstep.make_optimizer(run)
    with shd.activate(mesh, run.mesh.strategy):
        state = tstep.create_state(trainable, optimizer, mesh)
    del trainable
    log(f"params: {tparams.count(state.params) / 1e6:.2f}M trainable, {tparams.count(frozen) / 1e6:.1f}M frozen "
        f"on mesh {shd.describe(mesh)} ({run.mesh.strategy})", file=sys.stderr)

    options = ocp.CheckpointManagerOptions(max_to_keep=run.train.keep_checkpoints, enable_async_checkpointing=True)
    manager = ocp.CheckpointManager((run_dir / "checkpoints").absolute(), options=options)
    best = ocp.CheckpointManager((run_dir / "best").absolute(), options=ocp.CheckpointManagerOptions(
        max_to_keep=1, best_fn=lambda m: m["accuracy"], best_mode="max"))
    start = 0
    if manager.latest_step() is not None:
        start = manager.latest_step()
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        state = manager.restore(start, args=ocp.args.StandardRestore(abstract))
        log(f"resumed from step {start}", file=sys.stderr)

    metrics_log = MetricsLog(run_dir, start)
    with shd.activate(mesh, run.mesh.strategy):
        train_fn = tstep.make_train_step(state, frozen, mesh, config=config, run=run, optimizer=optimizer)
        eval_fn = tstep.make_eval_step(state.params, frozen, mesh, config=config, run=run)
    pad_id = tok.pad_id
    plan = pairdata.batch_plan(train_data, run.train.batch_size, run.train.steps, run.data.buckets,
                               run.data.shuffle_seed + run.train.seed)
    batches = batch_iterator(plan, train_data, pad_id, run, start)
    b_sharding = tstep.batch_sharding(mesh)
    accum, micro = run.train.grad_accum, run.train.batch_size // run.train.grad_accum
    n_batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if micro % n_batch_shards:
        raise ConfigError(f"micro-batch train.batch_size/train.grad_accum = {micro} must be a multiple of the "
                          f"{n_batch_shards} data-parallel devices (mesh {shd.describe(mesh)})")

    bar = tqdm(total=run.train.steps, initial=start, disable=not progress or not distributed.is_main_process(),
               desc="train", unit="step", file=sys.stderr)
    t_last, tokens, last_eval = time.perf_counter(), 0, {}
    end = run.train.steps if stop_after is None else min(run.train.steps, stop_after)
    for step in range(start, end):
        host = next(batches)
        tokens += int(host["chosen_mask"].sum() + host["rejected_mask"].sum())
        arrays = {k: jax.make_array_from_process_local_data(
            b_sharding, v.reshape(accum, micro // jax.process_count(), v.shape[-1])) for k, v in host.items()}
        with shd.activate(mesh, run.mesh.strategy):
            state, metrics = train_fn(state, frozen, arrays)
        done = step + 1
        if done % run.train.log_every == 0 or done == end:
            values = {k: float(v) for k, v in metrics.items()}
            elapsed = time.perf_counter() - t_last
            values["tokens_per_s"] = tokens / max(elapsed, 1e-9)
            t_last, tokens = time.perf_counter(), 0
            metrics_log.write(done, "train", values)
            bar.set_postfix(loss=f"{values['loss']:.4f}", acc=f"{values['accuracy']:.2f}",
                            tok_s=f"{values['tokens_per_s']:.0f}")
            if values["skipped"]:
                log(f"step {done}: non-finite loss or gradient; update skipped", file=sys.stderr)
        if done % run.train.eval_every == 0 or done == run.train.steps:
            last_eval = evaluate(eval_fn, state.params, frozen, eval_data, pad_id, run.train.batch_size,
                                 run.data.buckets, mesh)
            metrics_log.write(done, "eval", last_eval)
            if finite(state.params):
                best.save(done, args=ocp.args.StandardSave(state.params), metrics={"accuracy": last_eval["accuracy"]})
        if done % run.train.save_every == 0 or done == run.train.steps:
            save_checkpoint(manager, done, state, log)
        bar.update(1)
    bar.close()
    manager.wait_until_finished()
    best.wait_until_finished()
    result = {"step": int(state.step), "skipped_steps": int(state.skipped), "eval": last_eval,
              "train_pairs": len(train_data), "eval_pairs": len(eval_data),
              "dropped_pairs": len(train_data.dropped) + len(eval_data.dropped),
              "truncated_pairs": train_data.truncated + eval_data.truncated}
    if int(state.step) == run.train.steps and distributed.is_main_process():
        from rmjax.train.export import export_reward_model
        full = tparams.merge(jax.device_get(state.params), jax.device_get(frozen))
        export_reward_model(full, loaded, run, run_dir / "final")
        (run_dir / "result.json").write_text(json.dumps(result, indent=2))
    return result


def finite(tree) -> bool:
    return bool(all(jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)))


def save_checkpoint(manager, step: int, state, log) -> bool:
    """Save unless any param is non-finite; a failed save leaves earlier checkpoints untouched."""
    import orbax.checkpoint as ocp

    if not finite(state.params):
        log(f"step {step}: params are not finite; checkpoint NOT written", file=sys.stderr)
        return False
    manager.save(step, args=ocp.args.StandardSave(state))
    return True


def batch_iterator(plan, data: pairdata.TokenizedPairs, pad_id: int, run: RunConfig, start: int):
    """grain pipeline over the batch plan, positioned at ``start`` (the iterator state is the step)."""
    import grain

    def materialise(item):
        indices, length = item
        local = pairdata.process_slice(indices, jax.process_index(), jax.process_count())
        return pairdata.make_batch(data, local, length, pad_id)

    ds = grain.MapDataset.source(plan).map(materialise)
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=4)).__iter__()
    it.set_state({"next_index": start})
    return it
