"""ArmoRM's stages on cached features (``rmjax.scoring.features``), after the authors' ``armo-rm/`` code.

    stage 1   regression(cache, out)         per-objective ridge, no intercept, each penalty chosen on a
                                             held-out 20% from 1e-4 ... 1e4; missing ratings masked per
                                             objective -> OUT/regression.safetensors + stage1.json
                                             (objectives given by pairs: ridge on the pairs as ratings,
                                             or ``pair_loss="bt"``, a Bradley-Terry probe)
    debias    debias(stage1, reference, out) the authors' verbosity search: per objective the smallest
                                             penalty (0 ... 0.95) whose adjusted reward r_k - p_k r_v has
                                             a Spearman correlation with the verbosity reward r_v at or
                                             under the threshold -> the reward transform matrix
    stage 2   gate(stage1, debias, pairs, out) the gating MLP (ReLU, 1024 x 3, dropout, softmax / T, a
                                             learned scale) trained with Bradley-Terry on preference pairs
                                             over the frozen stage-1 rewards, from cached features only
    evaluate  evaluate(model, cache)         pairwise / best-of-N accuracy per subset with 95% intervals
    export    rmjax.train.export.export_released_armorm: an HF directory in the released layout

Stage outputs use the released checkpoint's tensor names (``regression_layer.weight`` [K, D],
``reward_transform_matrix`` [K, K], ``gating.*``), so a model directory is their union plus the
backbone. Every stage records its inputs in a JSON file; stage 2 checkpoints its state every
``save_every`` steps and a re-run with the same settings resumes it (each step's batch and dropout
come from the step number, so a resumed run equals an uninterrupted one).

Targets for stage 1 (``regression_targets``): rating records' ratings (the cache's objectives), and
optionally preference pairs as ratings (``pair_objectives`` {subset: objective}: the chosen
response 1, a rejected one 0, the other objectives unrated) and a *measured* verbosity objective
(the response length in tokens, log and standardised over the rows).
"""
from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from rmjax import runs
from rmjax.errors import ConfigError, DataError, RmjaxError
from rmjax.heads.armorm import (
    ArmoRMGatingHead,
    head_from_released,
    released_from_head,
    verbosity_transform_matrix,
)
from rmjax.metrics import best_of_n_scores
from rmjax.regression import L2_GRID, logistic_select, ridge_select
from rmjax.train import trainer
from rmjax.train.evaluate import accuracy_report

# The authors' stage-2 defaults (stage-2_train.py) and verbosity penalty grid.
PENALTY_GRID = (0, 0.01, 0.025, 0.05, 0.075, 0.1, 0.125, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6,
                0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)
REGRESSION_FILE, TRANSFORM_FILE, GATE_FILE = "regression.safetensors", "transform.safetensors", "gate.safetensors"


def _save(path: Path, tensors: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file

    runs.atomic_write(path, lambda tmp: save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()},
                                                  str(tmp)))


def _load(path: Path, what: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    if not path.exists():
        raise DataError(f"{path}: missing; run the {what} stage first")
    return load_file(str(path))


def _write_json(path: Path, data: dict) -> None:
    runs.write_json(path, data)


def _read_json(path: Path, what: str) -> dict:
    if not path.exists():
        raise DataError(f"{path}: missing; run the {what} stage first")
    return json.loads(path.read_text())


# ---------------------------------------------------------------- stage 1

def check_ranges(cache, ranges: dict[str, tuple[float, float]]) -> None:
    """Every rating within its objective's declared [lo, hi]; DataError naming file:line, field and fix."""
    for name, bounds in ranges.items():
        if name not in cache.objectives:
            raise ConfigError(f"a range is declared for objective {name!r}, but {cache.path} has the objectives "
                              f"{list(cache.objectives)}; fix the name")
        if len(bounds) != 2 or not bounds[0] < bounds[1]:
            raise ConfigError(f"the range of objective {name!r} must be [low, high] with low < high, got {bounds}")
    ratings = cache.ratings()
    for k, name in enumerate(cache.objectives):
        if name not in ranges:
            continue
        lo, hi = ranges[name]
        bad = np.flatnonzero((ratings[:, k] < lo) | (ratings[:, k] > hi))
        if len(bad):
            row = cache.examples.iloc[bad[0]]
            raise DataError(f"{row['place'] or row['id']}: field 'ratings.{name}' is {ratings[bad[0], k]:g}, outside "
                            f"its declared range [{lo:g}, {hi:g}] ({len(bad)} ratings of {name!r} are); fix the "
                            "rating (or rescale the objective), or widen the declared range")


def regression_targets(cache, pair_objectives: dict[str, str] | None = None, verbosity: str | None = None,
                       ranges: dict[str, tuple[float, float]] | None = None
                       ) -> tuple[np.ndarray, np.ndarray, tuple[str, ...], dict]:
    """(features [M, D], targets [M, K] with NaN = not rated, objective names, info) of stage 1.

    Rows: each rated single response (its ratings), and with ``pair_objectives`` each response of a
    pair / best-of-N record whose subset is mapped (chosen 1, rejected 0 for that objective).
    ``verbosity`` names an extra objective: log(response tokens), standardised over the rows.
    """
    if ranges:
        check_ranges(cache, ranges)
    pair_objectives = dict(pair_objectives or {})
    objectives = list(cache.objectives) + [o for o in dict.fromkeys(pair_objectives.values())
                                           if o not in cache.objectives]
    if verbosity:
        if verbosity in objectives:
            raise ConfigError(f"the verbosity objective {verbosity!r} is already an objective of the data; "
                              "choose another name")
        objectives.append(verbosity)
    if not objectives:
        raise DataError(f"{cache.path}: no objective to regress: the records have no 'ratings' and no pair "
                        "subset is mapped to an objective (pair_objectives)")
    feats, ratings, tokens = cache.response(), cache.ratings(), cache.response_tokens()
    kinds, subsets = cache.kinds, cache.subsets
    unmapped = sorted({str(s) for s, k in zip(subsets, kinds) if k != "single"} - set(pair_objectives))
    if pair_objectives and unmapped:
        raise ConfigError(f"{cache.path}: pair subsets {unmapped} have no objective in pair_objectives "
                          f"{pair_objectives}; map every subset (or cache only the mapped ones)")
    rows_x, rows_y, rows_t = [], [], []
    col = {o: k for k, o in enumerate(objectives)}
    for i, kind in enumerate(kinds):
        if kind == "single":
            y = np.full(len(objectives), np.nan)
            y[:len(cache.objectives)] = ratings[i]
            rows_x.append(feats[i, 0]), rows_y.append(y), rows_t.append(tokens[i, 0])
        elif pair_objectives:
            n = int(cache.examples["n_responses"].iloc[i])
            for j in range(n):
                y = np.full(len(objectives), np.nan)
                y[col[pair_objectives[str(subsets[i])]]] = 1.0 if j == 0 else 0.0
                rows_x.append(feats[i, j]), rows_y.append(y), rows_t.append(tokens[i, j])
    if not rows_x:
        raise DataError(f"{cache.path}: no rated response (the cache holds {len(kinds)} examples of kinds "
                        f"{sorted(set(kinds))}); cache rating records, or map pair subsets with pair_objectives")
    x, y = np.stack(rows_x).astype(np.float64), np.stack(rows_y)
    info: dict[str, Any] = {"rows": len(x)}
    if verbosity:
        logt = np.log(np.asarray(rows_t, np.float64))
        mean, sd = float(logt.mean()), float(logt.std()) or 1.0
        y[:, col[verbosity]] = (logt - mean) / sd
        info["verbosity"] = {"objective": verbosity, "measure": "log(response tokens), standardised",
                             "log_tokens_mean": mean, "log_tokens_sd": sd}
    rated = np.isfinite(y).sum(0)
    for k, name in enumerate(objectives):
        if rated[k] == 0:
            raise DataError(f"{cache.path}: objective {name!r} has no data: none of the {len(x)} responses is rated "
                            "on it (all null); rate some responses, or remove it from the records' ratings")
    info["rated"] = dict(zip(objectives, rated.tolist()))
    return x, y, tuple(objectives), info


PAIR_LOSSES = ("ridge", "bt")


def regression(cache, out_dir: Path | str, *, pair_objectives: dict[str, str] | None = None,
               verbosity: str | None = None, ranges: dict | None = None, grid: tuple[float, ...] = L2_GRID,
               val_fraction: float = 0.2, seed: int = 42, pair_loss: str = "ridge") -> dict:
    """Stage 1 (module docstring); returns the stage1.json record.

    ``pair_loss`` for the objectives given by pairs: "ridge" (ArmoRM's regression, on the pairs as
    ratings: chosen 1, rejected 0) or "bt" (a Bradley-Terry probe on chosen-minus-rejected features,
    ``logistic_select``: the pairwise counterpart, penalty chosen on held-out pairs from the same grid).
    """
    if pair_loss not in PAIR_LOSSES:
        raise ConfigError(f"pair_loss must be one of {PAIR_LOSSES}, got {pair_loss!r}")
    x, y, objectives, info = regression_targets(cache, pair_objectives, verbosity, ranges)
    bt = [o for o in dict.fromkeys((pair_objectives or {}).values())] if pair_loss == "bt" else []
    ridge_cols = [k for k, o in enumerate(objectives) if o not in bt]
    weights = np.zeros((x.shape[1], len(objectives)))
    per_objective: dict[str, dict] = {}
    if ridge_cols:
        names = tuple(objectives[k] for k in ridge_cols)
        sel = ridge_select(x, y[:, ridge_cols], grid, val_fraction, seed, fit_intercept=False, objectives=names)
        weights[:, ridge_cols] = sel.weights
        for j, k in enumerate(ridge_cols):
            best = int(np.argmin(sel.val_mse[:, j]))
            per_objective[objectives[k]] = {
                "fit": "ridge", "l2": float(sel.l2[j]), "val_mse": float(sel.val_mse[best, j]),
                "val_mse_by_l2": sel.val_mse[:, j].tolist(), "train_rows": int(sel.n_train[j]),
                "val_rows": int(sel.n_val[j]), "val_target_variance": _val_variance(y[:, k], val_fraction, seed)}
    if bt:
        feats = cache.response()
        for o in bt:
            rows = [i for i, (kind, sub) in enumerate(zip(cache.kinds, cache.subsets))
                    if kind != "single" and pair_objectives[str(sub)] == o]
            diff = np.concatenate([feats[i, 0][None] - feats[i, 1:int(cache.examples["n_responses"].iloc[i])]
                                   for i in rows]).astype(np.float64)
            sel = logistic_select(diff, grid, val_fraction, seed)
            weights[:, objectives.index(o)] = sel.weights
            per_objective[o] = {"fit": "bt", "l2": sel.l2, "val_loss": float(sel.val_loss.min()),
                                "val_loss_by_l2": sel.val_loss.tolist(), "val_accuracy": sel.val_accuracy,
                                "train_pairs": sel.n_train, "val_pairs": sel.n_val}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _save(out / REGRESSION_FILE, {"regression_layer.weight": weights.T})
    record = {"stage": "regression", "cache": str(cache.path), "cache_settings": cache.settings,
              "objectives": list(objectives), "pair_objectives": pair_objectives or {}, "pair_loss": pair_loss,
              "ranges": ranges or {}, "grid": list(grid), "val_fraction": val_fraction, "seed": seed,
              "fit_intercept": False, **info, "per_objective": {o: per_objective[o] for o in objectives}}
    _write_json(out / "stage1.json", record)
    return record


def _val_variance(y: np.ndarray, val_fraction: float, seed: int) -> float:
    """The held-out rows' target variance: the MSE of predicting their mean (a baseline)."""
    order = np.random.default_rng(seed).permutation(len(y))[:int(round(val_fraction * len(y)))]
    return float(np.nanvar(y[order]))


def load_regression(stage1_dir: Path | str) -> tuple[np.ndarray, dict]:
    """(W [D, K], stage1.json)."""
    d = Path(stage1_dir)
    return _load(d / REGRESSION_FILE, "regression")["regression_layer.weight"].T, _read_json(d / "stage1.json", "regression")


# ---------------------------------------------------------------- verbosity debiasing

def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b)[0])


def verbosity_penalties(rewards: np.ndarray, verbosity_index: int, threshold: float = 0.03,
                        penalties: tuple[float, ...] = PENALTY_GRID) -> tuple[np.ndarray, np.ndarray]:
    """The authors' search (``find_proper_verbosity_penalties``): (penalty [K], correlation [K]).

    Going up the sorted penalties, an objective k leaves the search at the first penalty p with
    Spearman(r_k - p r_v, r_v) <= threshold (signed), and keeps p. Objectives that never get there
    keep penalty 1 and their lowest correlation; the verbosity objective itself keeps penalty 1, so
    its adjusted reward r_v - r_v is 0 (it no longer enters the score).
    """
    v = np.asarray(rewards, np.float64)
    k = v.shape[1]
    if not 0 <= verbosity_index < k:
        raise ConfigError(f"verbosity index {verbosity_index} is outside 0..{k - 1}")
    candidates = set(range(k)) - {verbosity_index}
    penalty, corr = np.ones(k), np.ones(k)
    for p in sorted(penalties):
        if not candidates:
            break
        adjusted = v - p * v[:, [verbosity_index]]
        for dim in sorted(candidates):
            c = spearman(adjusted[:, dim], v[:, verbosity_index])
            if c <= threshold:
                candidates.remove(dim)
                penalty[dim], corr[dim] = p, c
            else:
                corr[dim] = np.min([corr[dim], c])
    return penalty, corr


def response_rows(cache) -> tuple[np.ndarray, np.ndarray]:
    """Every cached response's features [M, D] and its length in tokens [M]."""
    feats, tokens = cache.response(), cache.response_tokens()
    present = np.isfinite(tokens)
    return feats[present], tokens[present]


def debias(stage1_dir: Path | str, reference, out_dir: Path | str, *, verbosity: str = "verbosity",
           threshold: float = 0.03, penalties: tuple[float, ...] = PENALTY_GRID) -> dict:
    """The transform matrix M = I - e_v p^T from the rewards of every response in ``reference``."""
    w, stage1 = load_regression(stage1_dir)
    objectives = stage1["objectives"]
    if verbosity not in objectives:
        raise ConfigError(f"the verbosity objective {verbosity!r} is not among the stage-1 objectives {objectives}")
    v = objectives.index(verbosity)
    feats, tokens = response_rows(reference)
    rewards = feats @ w
    penalty, corr = verbosity_penalties(rewards, v, threshold, penalties)
    transform = np.asarray(verbosity_transform_matrix(len(objectives), v, tuple(penalty.tolist())))
    adjusted = rewards @ transform
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _save(out / TRANSFORM_FILE, {"reward_transform_matrix": transform})
    record = {"stage": "debias", "stage1": str(stage1_dir), "reference": str(reference.path), "responses": len(feats),
              "verbosity": verbosity, "threshold": threshold, "penalty_grid": list(penalties),
              "per_objective": {name: {"penalty": float(penalty[k]), "spearman_vs_verbosity_reward": float(corr[k]),
                                       "spearman_before": spearman(rewards[:, k], rewards[:, v]),
                                       "spearman_tokens_before": spearman(rewards[:, k], tokens),
                                       "spearman_tokens_after": spearman(adjusted[:, k], tokens)
                                       if adjusted[:, k].std() > 0 else None}
                                for k, name in enumerate(objectives)},
              "reward_transform_matrix": transform}
    _write_json(out / "debias.json", record)
    return record


def load_transform(debias_dir: Path | str | None, k: int) -> np.ndarray:
    if not debias_dir:
        return np.eye(k, dtype=np.float32)
    return _load(Path(debias_dir) / TRANSFORM_FILE, "debias")["reward_transform_matrix"]


# ---------------------------------------------------------------- stage 2: the gate

@dataclasses.dataclass(frozen=True)
class GateSettings:
    hidden: int = 1024
    layers: int = 3
    temperature: float = 10.0
    dropout: float = 0.2
    logit_scale: float = 1.0
    lr: float = 1e-3
    weight_decay: float = 0.0
    steps: int = 2000
    batch_size: int = 1024
    val_fraction: float = 0.2
    seed: int = 0
    save_every: int = 200
    log_every: int = 100


def gate_module(k: int, s: GateSettings) -> ArmoRMGatingHead:
    # torch nn.Linear's default weight init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)); biases start at 0
    init = jax.nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
    return ArmoRMGatingHead(k, hidden_dim=s.hidden, num_hidden_layers=s.layers, temperature=s.temperature,
                            learn_scale=True, scale=s.logit_scale, dropout=s.dropout, kernel_init=init)


def preference_pairs(cache) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(gate features [P, D], chosen [P, D], rejected [P, D], example row [P]): every pair and, for
    best-of-N records, chosen against each rejected response."""
    kinds = cache.kinds
    rows = [(i, j) for i, kind in enumerate(kinds) if kind != "single"
            for j in range(1, int(cache.examples["n_responses"].iloc[i]))]
    if not rows:
        raise DataError(f"{cache.path}: no preference pairs (kinds {sorted(set(kinds))}); stage 2 trains on "
                        "pair or best-of-N records")
    feats, gate = cache.response(), cache.gate()
    i, j = np.array([r[0] for r in rows]), np.array([r[1] for r in rows])
    return gate[i], feats[i, 0], feats[i, j], i


def _split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    n_val = int(round(fraction * n))
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def gate(stage1_dir: Path | str, debias_dir: Path | str | None, pairs, out_dir: Path | str,
         settings: GateSettings = GateSettings(), log: Callable[[str], None] | None = None) -> dict:
    """Stage 2 (module docstring); resumes from OUT/state.msgpack; returns the stage2.json record."""
    import optax
    from flax import linen as nn
    from flax import serialization

    log = log or (lambda m: None)
    s = settings
    w, stage1 = load_regression(stage1_dir)
    k = w.shape[1]
    transform = jnp.asarray(load_transform(debias_dir, k))
    gate_x, chosen, rejected, _ = preference_pairs(pairs)
    diff = (chosen - rejected) @ w  # the score is linear in the rewards: s(c) - s(r) = gate(p, r_c - r_r)
    train, val = _split(len(diff), s.val_fraction, s.seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ident = {"stage1": str(stage1_dir), "debias": str(debias_dir) if debias_dir else None,
             "pairs": str(pairs.path), "pairs_data_hash": pairs.settings.get("data_hash"),
             "settings": dataclasses.asdict(s)}
    module = gate_module(k, s)
    params = jax.jit(lambda key: nn.unbox(module.init(key, jnp.zeros((1, w.shape[0])), jnp.zeros((1, k)),
                                                      transform)["params"]))(jax.random.key(s.seed))
    schedule = optax.cosine_decay_schedule(s.lr, max(s.steps, 1))
    tx = optax.adamw(schedule, weight_decay=s.weight_decay)
    state = {"params": params, "opt": jax.jit(tx.init)(params), "step": 0}
    state_path, ident_path = out / "state.msgpack", out / "state.json"
    if state_path.exists() and ident_path.exists():
        if json.loads(ident_path.read_text()) != json.loads(json.dumps(ident)):
            raise RmjaxError(f"{out}: holds a stage-2 run with other inputs or settings; use another output "
                             "directory or delete state.msgpack")
        state = serialization.from_bytes(state, state_path.read_bytes())
        log(f"gate: resuming at step {int(state['step'])}")
    _write_json(ident_path, ident)
    x_train, d_train = jnp.asarray(gate_x[train], jnp.float32), jnp.asarray(diff[train], jnp.float32)
    base = jax.random.key(s.seed + 1)

    def loss_fn(p, xb, db, rng):
        margin = module.apply({"params": p}, xb, db, transform, deterministic=False, rngs={"dropout": rng}).score
        return -jnp.mean(jax.nn.log_sigmoid(margin)), jnp.mean(margin > 0)

    @jax.jit
    def update(p, opt, i):
        key_batch, key_drop = jax.random.split(jax.random.fold_in(base, i))
        idx = jax.random.randint(key_batch, (s.batch_size,), 0, x_train.shape[0])  # with replacement
        (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, x_train[idx], d_train[idx], key_drop)
        updates, opt = tx.update(grads, opt, p)
        return optax.apply_updates(p, updates), opt, {"loss": loss, "batch_accuracy": acc}

    def gate_step(po, i: int):
        p, opt, metrics = update(*po, i)
        return (p, opt), metrics

    history = []

    def record_metrics(done: int, _state, metrics: dict) -> None:
        loss, acc = float(metrics["loss"]), float(metrics["batch_accuracy"])
        history.append({"step": done, "loss": loss, "batch_accuracy": acc})
        log(f"gate: step {done}/{s.steps} loss {loss:.4f} batch accuracy {acc:.3f}")

    def save(done: int, po) -> None:
        data = serialization.to_bytes({"params": po[0], "opt": po[1], "step": done})
        runs.atomic_write(state_path, lambda tmp: tmp.write_bytes(data))

    p, _ = trainer.fit((state["params"], state["opt"]), gate_step, start=int(state["step"]), end=s.steps,
                       hooks=[trainer.Every(s.log_every, record_metrics), trainer.CheckpointHook(save, s.save_every)])
    head = {"regression_layer": {"kernel": w}, "gating": jax.device_get(p), "reward_transform": np.asarray(transform)}
    settings_out = gate_settings(stage1["objectives"], s)
    margins = np.asarray(_scores(head, settings_out, gate_x, diff))
    _save(out / GATE_FILE, {n: v for n, v in released_from_head(head).items() if n.startswith("gating.")})
    record = {"stage": "gate", **ident, "pairs_total": len(diff), "pairs_train": len(train), "pairs_val": len(val),
              "train_accuracy": float(np.mean(margins[train] > 0)),
              "val_accuracy": float(np.mean(margins[val] > 0)) if len(val) else None,
              "history": history, "head": settings_out}
    _write_json(out / "stage2.json", record)
    return record


def gate_settings(objectives: list[str], s: GateSettings) -> dict:
    """The head settings of an ArmoRM model (``rmjax.json`` ``head``; ``load_head`` reads them)."""
    return {"kind": "armorm", "objectives": list(objectives), "gate_hidden": s.hidden, "gate_layers": s.layers,
            "gate_temperature": s.temperature}


@functools.lru_cache(maxsize=None)
def _gate_fn(k: int, hidden: int, layers: int, temperature: float) -> Callable:
    module = ArmoRMGatingHead(k, hidden_dim=hidden, num_hidden_layers=layers, temperature=temperature)
    return jax.jit(lambda p, x, r, t: module.apply({"params": p}, x, r, t))


def _gate_out(head: dict, settings: dict, gate_x: np.ndarray, rewards: np.ndarray):
    fn = _gate_fn(head["regression_layer"]["kernel"].shape[1], settings["gate_hidden"], settings["gate_layers"],
                  float(settings["gate_temperature"]))
    return fn(head["gating"], jnp.asarray(gate_x, jnp.float32), jnp.asarray(rewards, jnp.float32),
              jnp.asarray(head["reward_transform"], jnp.float32))


def _scores(head: dict, settings: dict, gate_x: np.ndarray, rewards: np.ndarray) -> jax.Array:
    """The gated score (scale * sum_k w_k (r @ M)_k) of rewards [n, K] given gate features [n, D]."""
    return _gate_out(head, settings, gate_x, rewards).score


def load_stages(stage1_dir, debias_dir, gate_dir) -> tuple[dict, dict]:
    """(head params, head settings) from the three stage outputs."""

    w, _ = load_regression(stage1_dir)
    record = _read_json(Path(gate_dir) / "stage2.json", "gate")
    tensors = {**_load(Path(gate_dir) / GATE_FILE, "gate"), "regression_layer.weight": w.T,
               "reward_transform_matrix": load_transform(debias_dir, w.shape[1])}
    s = record["head"]
    config = {"num_objectives": w.shape[1], "gating_temperature": s["gate_temperature"],
              "gating_hidden_dim": s["gate_hidden"], "gating_n_hidden": s["gate_layers"]}
    head, _ = head_from_released(tensors, config, str(gate_dir))
    return head, s


# ---------------------------------------------------------------- evaluation from a cache

def cache_scores(head: dict, settings: dict, cache) -> np.ndarray:
    """The gated score of every cached response [n, R] (NaN where a record has fewer responses)."""
    feats, gate_x = cache.response(), cache.gate()
    w = np.asarray(head["regression_layer"]["kernel"])
    out = np.full(feats.shape[:2], np.nan)
    for j in range(feats.shape[1]):
        present = np.isfinite(feats[:, j, 0])
        if present.any():
            out[present, j] = np.asarray(_scores(head, settings, gate_x[present], feats[present, j] @ w))
    return out


def evaluate(head: dict, settings: dict, cache) -> dict:
    """Accuracy per subset with Wilson 95% intervals (``rmjax.train.evaluate``) of the pairs and
    best-of-N records of ``cache`` (ties 0.5; RewardBench 2's best-of-N rule)."""

    keep = cache.kinds != "single"
    if not keep.any():
        raise DataError(f"{cache.path}: no pairs or best-of-N records to evaluate")
    subsets = [str(s) for s in cache.subsets[keep]]

    def report_of(scores: np.ndarray) -> dict:
        per = [float(best_of_n_scores(row[np.isfinite(row)][None])[0]) for row in scores[keep]]
        return accuracy_report(np.asarray(per), subsets)

    report = report_of(cache_scores(head, settings, cache))
    # each objective's reward alone (before the transform), for comparison with the gated score
    rewards = cache.response() @ np.asarray(head["regression_layer"]["kernel"])
    report["objectives"] = {name: report_of(rewards[..., k]) for k, name in enumerate(settings.get("objectives", []))}
    # the gate's mean weights per subset (the interpretable part: which objectives a prompt calls for)
    gate_x = cache.gate()[keep]
    weights = np.asarray(_gate_out(head, settings, gate_x, np.zeros((len(gate_x), rewards.shape[-1]))).gating_weights)
    names = settings.get("objectives") or [str(k) for k in range(rewards.shape[-1])]
    report["gating_weights"] = {sub: dict(zip(names, weights[np.asarray(subsets) == sub].mean(0).round(4).tolist()))
                                for sub in dict.fromkeys(subsets)}
    report["data"] = cache.settings.get("data")
    report["cache"] = str(cache.path)
    return report
