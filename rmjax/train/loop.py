"""`rmjax train`: any head x loss on any preference data, on a mesh, resumable, with eval, metrics, export.

Run directory layout:
    config.yaml            the resolved config (a re-run must match it, or pass --overwrite)
    checkpoints/<step>/    orbax: train state (+ data position = step), keep-last-k, async
    best/<step>/           the best checkpoint by the eval score
    metrics.jsonl          one line per logged/eval step (rewound on resume: no duplicates)
    tensorboard/           TensorBoard
    final/                 the export (``rmjax.train.export``: HF dir, + PEFT adapter with LoRA)
    result.json            final metrics (the ablation driver reads this)
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from rmjax import compilation, distributed
from rmjax import sharding as shd
from rmjax.config import plain
from rmjax.data import judge_prompts
from rmjax.errors import ConfigError
from rmjax.models.loading import load_model
from rmjax.scoring.bulk import same_tokenizer
from rmjax.train import evaluate as tevaluate
from rmjax.train import examples as texamples
from rmjax.train import objectives as tobjectives
from rmjax.train import params as tparams
from rmjax.train import plan as tplan
from rmjax.train import step as tstep
from rmjax.train import trainer
from rmjax.train.config import TrainConfig, save_config
from rmjax.train.export import export_run


def check_run_dir(run: TrainConfig, overwrite: bool) -> Path:
    run_dir = Path(run.run_dir)
    saved = run_dir / "config.yaml"
    if saved.exists():
        import yaml
        # where the run lives and the mesh it runs on may change between restarts (a copied run
        # directory, a resumed job on another slice): neither changes what it computes
        movable = ("run_dir", "mesh")
        previous, current = ({k: v for k, v in c.items() if k not in movable}
                             for c in (yaml.safe_load(saved.read_text()), plain(run)))
        if previous != current:
            if not overwrite:
                diff = [k for k in current if previous.get(k) != current[k]]
                raise ConfigError(f"{run_dir} holds a run with different settings (sections {diff}); "
                                  "use another run_dir, or --overwrite to delete it")
            shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(run, saved)
    return run_dir


def layout_for(run: TrainConfig, entry, pad_id: int, mesh, packed: bool | None = None, side: str = "right",
               num_objectives: int = 0) -> tplan.Layout:
    local_shards = max(1, shd.batch_shards(mesh) // jax.process_count())
    return tplan.Layout(packed=run.batch.layout == "packed" if packed is None else packed, trees=entry.trees,
                           targets=entry.targets, pad_id=pad_id,
                           pack_length=run.row_length,
                           row_multiple=local_shards, side=side, num_objectives=num_objectives)


def model_params(run: TrainConfig, loaded, entry, mesh, extra: dict) -> dict:
    """The full params {'backbone', 'head'[, 'lora'][, 'reference']} of a run before training."""
    rng = jax.random.key(run.train.seed)
    replicated = shd.replicated(mesh)
    head = entry.init(jax.random.fold_in(rng, 1), loaded.config.hidden_size, run, extra)
    full = {"backbone": loaded.params, "head": jax.device_put(head, replicated)}
    layers = loaded.config.num_layers
    for field, value, used in (("last_k", run.train.last_k, run.train.trainable == "last_k"),
                               ("lora_layers", run.train.lora_layers, run.train.trainable == "lora")):
        if used and value > layers:
            raise ConfigError(f"train.{field}={value} but {run.model.name} has {layers} layers; use at most {layers}")
    if run.train.trainable == "lora":
        full["lora"] = jax.device_put(tparams.init_lora(loaded.params, run.train.lora_rank, jax.random.fold_in(rng, 2),
                                                        run.train.lora_layers), replicated)
    if run.loss.kind == "dpo" and (run.loss.reference or run.train.trainable != "lora"):
        # a frozen reference: another model, or a copy of the policy as loaded (LoRA needs none: the
        # base without its adapters is the reference)
        full["reference"] = extra["reference"] if run.loss.reference else jax.tree.map(jnp.copy, loaded.params)
    return full


def head_extras(run: TrainConfig, loaded, mesh, train_set) -> dict:
    """What a head's init needs beyond the backbone: a loaded score head, the objective count, a
    frozen regression (armorm), a reference model (dpo)."""

    extra = {"score_head": loaded.score_head, "num_objectives": len(train_set.objectives)}
    if run.head.kind == "armorm" and run.head.regression_from:
        extra["regression"] = load_model(run.head.regression_from, with_tokenizer=False).score_head
    if run.loss.kind == "dpo" and run.loss.reference:
        ref = load_model(run.loss.reference, run.model, mesh=mesh, strategy=run.mesh.strategy)
        if not same_tokenizer(ref.tokenizer, loaded.tokenizer):
            raise ConfigError(f"loss.reference={run.loss.reference!r} has another tokenizer than model.name; "
                              "DPO compares log-probs of the same token ids, so use a reference with the same one")
        extra["reference"] = ref.params
    return extra


def statics_for(run: TrainConfig, tokenizer, objectives: tuple[str, ...]) -> dict:
    out: dict = {"objectives": objectives}
    if run.head.kind == "judge":
        out["label_ids"] = judge_prompts.label_ids(tokenizer, run.head.judge_labels, run.data.template)
    return out


def evaluate(eval_fn, trainable, frozen, data: texamples.ExampleSet, layout, mesh, run: TrainConfig,
             batch_size: int) -> dict:
    """Accuracy (pairs, best-of-N, judge; ties 0.5) per subset, the MSE per objective (ratings), or
    the held-out NLL per reply token (lm: pair pretraining)."""
    if not data.examples:
        return {}
    outs = tevaluate.outputs_per_example(eval_fn, trainable, frozen, data.examples, layout, mesh, batch_size)
    if layout.trees == "lm":
        tokens = sum(float(o["count"].sum()) for o in outs)
        return {"nll": -sum(float(o["logp"].sum()) for o in outs) / max(tokens, 1.0), "tokens": int(tokens),
                "examples": len(data)}
    if layout.trees == "ratings":
        report = tevaluate.ratings_report(outs, data.examples, data.objectives)
        return {"mse": report["mse"], "examples": report["examples"],
                **{f"mse/{k}": v["mse"] for k, v in report["objectives"].items()},
                **{f"pearson/{k}": v["pearson"] for k, v in report["objectives"].items()}}
    scored = [tevaluate.example_score(run.head.kind, o, beta=run.loss.beta) for o in outs]
    report = tevaluate.accuracy_report(np.array([s for s, _ in scored]), [e.record.subset for e in data.examples])
    out = {"accuracy": report["accuracy"], "margin": float(np.mean([m for _, m in scored])),
           "examples": len(data), "ci95": report["ci95"]}
    for k, v in report["subsets"].items():
        out.update({f"accuracy/{k}": v["accuracy"], f"examples/{k}": v["examples"], f"ci95/{k}": v["ci95"]})
    return out


def token_counts(examples: list, plan: list, layout: tplan.Layout, accum: int) -> dict:
    """Tokens the plan computes packed and unpacked (real = without padding)."""
    out = {"packed_padded": 0, "packed_real": 0, "unpacked_padded": 0, "unpacked_real": 0}
    for indices in plan:
        for mb in np.array_split(indices, accum):
            group = [examples[i] for i in mb]
            for packed in (True, False):
                t = tplan.tokens(group, tplan.Layout(**{**layout.__dict__, "packed": packed}))
                name = "packed" if packed else "unpacked"
                out[f"{name}_padded"] += t["padded"]
                out[f"{name}_real"] += t["real"]
    out["packed_over_unpacked"] = out["packed_padded"] / max(out["unpacked_padded"], 1)
    return out


def run(run: TrainConfig, overwrite: bool = False, progress: bool = True, stop_after: int | None = None) -> dict:
    """Train (or resume) the run; returns the final metrics. ``stop_after`` ends early (tests)."""
    import orbax.checkpoint as ocp

    began = time.perf_counter()
    distributed.maybe_initialize()
    run_dir = check_run_dir(run, overwrite)
    log = (lambda m: print(m, file=sys.stderr)) if distributed.is_main_process() else (lambda m: None)
    mesh = shd.make_mesh(shd.MeshConfig.for_strategy(run.mesh.strategy, **run.mesh.sizes()))
    loaded = load_model(run.model.name, run.model, mesh=mesh, strategy=run.mesh.strategy,
                        lm_head=tobjectives.uses_lm_head(run))
    config, tok = loaded.config, loaded.tokenizer
    entry = tobjectives.entry(run)
    train_set, eval_set = distributed.on_every_process(
        "reading the training data", lambda: texamples.load_sets(run, tok, entry.trees, log))
    log(f"data ({entry.trees}): train {train_set.summary()}; eval {eval_set.summary()}")
    steps = tplan.planned_steps(run.train, len(train_set.examples))
    if steps != run.train.steps:  # train.epochs: the training length follows the data quantity
        run = dataclasses.replace(run, train=dataclasses.replace(run.train, steps=steps))
        log(f"train.epochs={run.train.epochs:g} over {len(train_set.examples)} examples at batch "
            f"{run.train.batch_size}: {steps} steps")
    statics = statics_for(run, tok, train_set.objectives)

    full = model_params(run, loaded, entry, mesh, head_extras(run, loaded, mesh, train_set))
    trainable, frozen = tparams.split(full, run.train.trainable, run.train.last_k, entry.frozen)
    optimizer = tstep.make_optimizer(run)
    with shd.activate(mesh, run.mesh.strategy):
        state = tstep.create_state(trainable, optimizer, mesh)
    del trainable, full
    log(f"params: {tparams.count(state.params) / 1e6:.2f}M trainable, {tparams.count(frozen) / 1e6:.1f}M frozen "
        f"on mesh {shd.describe(mesh)} ({run.mesh.strategy}); {run.head.kind} head, {run.loss.kind} loss, "
        f"{'packed prompt trees' if run.batch.layout == 'packed' else 'padded rows'}")

    options = ocp.CheckpointManagerOptions(max_to_keep=run.train.keep_checkpoints or None,
                                           enable_async_checkpointing=True)
    manager = ocp.CheckpointManager((run_dir / "checkpoints").absolute(), options=options)
    score_key = {"ratings": "mse", "lm": "nll"}.get(entry.trees, "accuracy")
    lower_is_better = score_key != "accuracy"
    best = ocp.CheckpointManager((run_dir / "best").absolute(), options=ocp.CheckpointManagerOptions(
        max_to_keep=1, best_fn=lambda m: m["score"], best_mode="min" if lower_is_better else "max"))
    start = 0
    if manager.latest_step() is not None:
        start = manager.latest_step()
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        state = manager.restore(start, args=ocp.args.StandardRestore(abstract))
        log(f"resumed from step {start}")

    layout = layout_for(run, entry, tok.pad_id, mesh, num_objectives=len(train_set.objectives))
    accum, micro = run.train.grad_accum, run.train.batch_size // run.train.grad_accum
    if micro % jax.process_count():
        raise ConfigError(f"micro-batch train.batch_size/train.grad_accum = {micro} must be a multiple of the "
                          f"{jax.process_count()} processes")
    plan = tplan.plan(train_set.examples, run.train.batch_size, run.train.steps,
                         run.data.shuffle_seed + run.train.seed, run.data.max_length)
    counts = token_counts(train_set.examples, plan, layout, accum)
    log(f"tokens over {len(plan)} steps: packed {counts['packed_padded']} (real {counts['packed_real']}), "
        f"unpacked {counts['unpacked_padded']} (real {counts['unpacked_real']}): packing computes "
        f"{counts['packed_over_unpacked']:.2f}x the tokens of padded rows")
    metrics_log = trainer.MetricsLog(run_dir, start)
    with shd.activate(mesh, run.mesh.strategy):
        train_fn = tstep.make_train_step(state, frozen, mesh, layout.keys, config=config, run=run,
                                         optimizer=optimizer, entry=entry, statics=statics)
        eval_fn = tstep.make_eval_step(state.params, frozen, mesh, layout.keys, config=config, run=run,
                                       entry=entry, statics=statics)
    batch_iter = batch_iterator(plan, train_set.examples, layout, accum, start)
    b_sharding = tstep.batch_shardings(mesh, layout.keys)
    tokens = {"count": 0, "since": time.perf_counter()}

    def step(state, s: int):
        host, real_tokens = next(batch_iter)
        tokens["count"] += real_tokens
        arrays = {k: jax.make_array_from_process_local_data(b_sharding[k], v) for k, v in host.items()}
        with shd.activate(mesh, run.mesh.strategy):
            return train_fn(state, frozen, arrays)

    def with_throughput(done: int, values: dict) -> dict:
        now = time.perf_counter()
        values["tokens_per_s"] = tokens["count"] / max(now - tokens["since"], 1e-9)  # prompt once per response
        tokens.update(count=0, since=now)
        if values["skipped"]:
            log(f"step {done}: non-finite loss or gradient; update skipped")
        return values

    def evaluation(state) -> dict:
        with shd.activate(mesh, run.mesh.strategy):
            return evaluate(eval_fn, state.params, frozen, eval_set, layout, mesh, run, run.train.batch_size)

    def keep_best(done: int, state, result: dict) -> None:
        if result and finite(state.params):
            best.save(done, args=ocp.args.StandardSave(state.params), metrics={"score": result[score_key]})
            best.wait_until_finished()  # two managers must not write the same step at once

    end = run.train.steps if stop_after is None else min(run.train.steps, stop_after)
    evals = trainer.EvalHook(evaluation, run.train.eval_every, metrics_log, keep_best, last=run.train.steps,
                             at_start=run.train.eval_on_start)
    state = trainer.fit(state, step, start=start, end=end, hooks=[
        trainer.MetricsHook(metrics_log, run.train.log_every, with_throughput),
        evals,
        trainer.CheckpointHook(lambda done, st: save_checkpoint(manager, done, st, log), run.train.save_every,
                               last=run.train.steps),
        trainer.ProgressHook(run.train.steps, "train", progress)])
    last_eval = evals.last_result
    manager.wait_until_finished()
    best.wait_until_finished()
    result = {"step": int(state.step), "skipped_steps": int(state.skipped), "eval": last_eval,
              "compilation": compilation.stats(),
              "head": run.head.kind, "loss": run.loss.kind, "objectives": list(train_set.objectives),
              "train_examples": len(train_set), "eval_examples": len(eval_set),
              "distinct_train_examples": int(len(np.unique(np.concatenate(plan)))),
              "pair_presentations": int(sum(len(p) for p in plan)),
              "dropped_examples": len(train_set.dropped) + len(eval_set.dropped),
              "truncated_examples": train_set.truncated + eval_set.truncated,
              "bad_records_skipped": len(train_set.skipped) + len(eval_set.skipped), "tokens": counts,
              "seconds": round(time.perf_counter() - began, 1)}  # this invocation: load, train, evaluate
    if run.train.eval_on_start:
        result["eval_start"] = evals.start_result or metrics_log.read(0, "eval")
    if int(state.step) == run.train.steps:  # every process exports (a collective); one writes the files
        export_run(tparams.merge(state.params, frozen), loaded, run, run_dir / "final", statics)
        if distributed.is_main_process():
            (run_dir / "result.json").write_text(json.dumps(result, indent=2))
    return result


def finite(tree) -> bool:
    return bool(all(jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)))


def save_checkpoint(manager, step: int, state, log) -> bool:
    """Save unless any param is non-finite; a failed save leaves earlier checkpoints untouched."""
    import orbax.checkpoint as ocp

    if not finite(state.params):
        log(f"step {step}: params are not finite; checkpoint NOT written")
        return False
    manager.save(step, args=ocp.args.StandardSave(state))
    return True


def local_step(examples: list, indices: np.ndarray, layout: tplan.Layout, accum: int
               ) -> tuple[dict[str, np.ndarray], int]:
    """This process's arrays of one step ([accum, ...]) and the step's sequence tokens. Shapes are
    the same on every process (fitted to all processes' slices); pair indices are global."""
    micro = np.array_split(indices, accum)
    n_proc, me = jax.process_count(), jax.process_index()
    slices = [[tplan.process_slice(mb, p, n_proc) for mb in micro] for p in range(n_proc)]
    sizes = tplan.shapes([[examples[i] for i in s] for per in slices for s in per], layout)
    host = tplan.step_arrays(examples, slices[me], layout, sizes)
    if "pair_a" in host:  # local flat slots -> global: earlier processes' rows come first
        offset = me * sizes["rows"] * sizes["slots"]
        host["pair_a"] = host["pair_a"] + offset
        host["pair_b"] = host["pair_b"] + offset
    real = sum(len(e.tree.prompt) * len(e.tree.responses) + sum(map(len, e.tree.responses))
               for e in (examples[i] for i in indices))
    return host, real


def batch_iterator(plan: list, examples: list, layout: tplan.Layout, accum: int, start: int):
    """grain pipeline over the plan, positioned at ``start`` (the iterator state is the step)."""
    import grain

    ds = grain.MapDataset.source(plan).map(lambda indices: local_step(examples, indices, layout, accum))
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=4)).__iter__()
    it.set_state({"next_index": start})
    return it
