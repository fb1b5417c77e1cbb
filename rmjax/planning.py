"""Sizing a training job for a TPU topology before booking it: the job's real jitted train step
compiled ahead of time from this host for the topology's chips, on abstract params (nothing is
allocated, no weight is read).

    record = plan_train(run, topology="v5p:2x2x1")      # run: a TrainConfig; model.name a named shape too
    record["memory"]["peak_gb"], record["fits"], record["estimate"]["mfu"]

Memory is XLA's ``memory_analysis()`` of the compiled step per chip (arguments, outputs, temporaries;
the donated state aliased). FLOPs are counted two ways:

* ``compiled``: every matmul in the step's jaxpr, loops counted by their trip count (XLA's own cost
  analysis counts a ``scan`` body once: the layer scan, the micro-batch scan), rematerialised
  forwards included; the attention kernels' block loops have data-dependent trip counts, so
  attention is counted analytically from the batch's own visibility pattern (``attention_pairs``);
* ``model``: the analytic count MFU conventionally uses (each layer's matmuls forward, twice that
  backward where weights train, once where only activation gradients pass, attention likewise; with
  LoRA the gradients of the merged q/k/v/o weights rmjax computes).

The step time is XLA's estimate (``cost_analysis()``'s optimal seconds) scaled by the FLOPs its loops
hide where the TPU compiler gives one; for a program with loops it gives none (-2), and the step time is
then bounded from below by the compiled FLOPs at the chips' peak, which bounds tokens/s and MFU from
above (MFU at most = model / compiled FLOPs: what rematerialisation, padding and the attention
backward's recomputation cost). Every figure is labelled an estimate or a bound.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import types
from pathlib import Path
from typing import Any

import jax
import jax.extend.core as jax_core
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

import rmjax
from rmjax import sharding as shd
from rmjax.data.batching import BUCKETS, Encoded, packed_batches
from rmjax.data.records import Record
from rmjax.errors import ConfigError
from rmjax.heads.reward import HeadSpec
from rmjax.io.registry import resolve_model
from rmjax.models import config_from_hf
from rmjax.models.config import ModelConfig
from rmjax.models.transformer import abstract_params
from rmjax.scoring import kv_path, packing
from rmjax.scoring.features import feature_fn
from rmjax.train import loop as tloop
from rmjax.train import objectives as tobjectives
from rmjax.train import params as tparams
from rmjax.train import plan as tplan
from rmjax.train import step as tstep
from rmjax.train.examples import Example

# Public configs of the models users train RMs from (config.json fields rmjax reads).
_LLAMA31 = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 128256,
            "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 131072,
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192}, "tie_word_embeddings": False,
            "bos_token_id": 128000, "eos_token_id": 128001}
_GEMMA2 = {"model_type": "gemma2", "architectures": ["Gemma2ForCausalLM"], "vocab_size": 256000, "rms_norm_eps": 1e-6,
           "rope_theta": 10000.0, "max_position_embeddings": 8192, "sliding_window": 4096,
           "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0, "hidden_activation": "gelu_pytorch_tanh",
           "tie_word_embeddings": True, "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0}
NAMED_SHAPES: dict[str, dict] = {
    "llama-3.1-8b": {**_LLAMA31, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                     "num_attention_heads": 32, "num_key_value_heads": 8},
    "llama-3.1-70b": {**_LLAMA31, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                      "num_attention_heads": 64, "num_key_value_heads": 8},
    "llama-3.2-3b": {**_LLAMA31, "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28,
                     "num_attention_heads": 24, "num_key_value_heads": 8, "tie_word_embeddings": True,
                     "rope_scaling": {**_LLAMA31["rope_scaling"], "factor": 32.0}},
    "gemma-2-9b": {**_GEMMA2, "hidden_size": 3584, "intermediate_size": 14336, "num_hidden_layers": 42,
                   "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256, "query_pre_attn_scalar": 256},
    "gemma-2-27b": {**_GEMMA2, "hidden_size": 4608, "intermediate_size": 36864, "num_hidden_layers": 46,
                    "num_attention_heads": 32, "num_key_value_heads": 16, "head_dim": 128,
                    "query_pre_attn_scalar": 144},
    "qwen3-8b": {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "vocab_size": 151936,
                 "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36, "num_attention_heads": 32,
                 "num_key_value_heads": 8, "head_dim": 128, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
                 "max_position_embeddings": 40960, "tie_word_embeddings": False, "bos_token_id": 151643,
                 "eos_token_id": 151645},
}

# Per chip: dense bf16 peak FLOP/s and HBM bytes (Google Cloud's published TPU figures), by the
# device_kind JAX reports.
CHIPS = {"TPU v4": (275e12, 32 << 30), "TPU v5 lite": (197e12, 16 << 30), "TPU v5": (459e12, 95 << 30),
         "TPU v5p": (459e12, 95 << 30), "TPU v6 lite": (918e12, 32 << 30)}


def hf_config(model: str) -> dict:
    """A model's config.json fields: a named shape, a config.json file, or a checkpoint directory or
    registry name (only its config is read)."""
    if model in NAMED_SHAPES:
        return NAMED_SHAPES[model]
    path = Path(model)
    if path.is_file() and path.suffix == ".json":
        return json.loads(path.read_text())
    if (path / "config.json").is_file():
        return json.loads((path / "config.json").read_text())
    try:  # a registry model's directory (its config.json; a GGUF's metadata is not read here)
        source = resolve_model(model)
    except Exception as e:  # noqa: BLE001 (any failure to resolve is the same message)
        raise ConfigError(f"model {model!r}: not a named shape ({', '.join(NAMED_SHAPES)}), a config.json or a "
                          f"checkpoint directory ({e})") from None
    config = Path(source.path) / "config.json"
    if not config.is_file():
        raise ConfigError(f"model {model!r}: {source.path} has no config.json; give its config.json or a named shape")
    return json.loads(config.read_text())


def topology_devices(topology: str, num_slices: int = 1) -> list:
    """The chips of a TPU topology ('v5p:2x2x1', 'v5e:4x4', 'v6e:2x4', 'v4:2x2x2'; ``num_slices`` of
    them joined by the data-centre network: multi-slice) as compile targets on this host (libtpu, no
    TPU needed)."""
    from jax.experimental import topologies

    if rmjax.cpu_only_host():  # no TPU workers to look for: libtpu would otherwise search and complain
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    try:
        kwargs = {"num_slices": num_slices} if num_slices > 1 else {}
        return list(topologies.get_topology_desc(platform="tpu", topology_name=topology, **kwargs).devices)
    except Exception as e:  # noqa: BLE001 (libtpu's errors name the problem; this names the fix)
        raise ConfigError(f"topology {topology!r}: {e}; give a TPU topology such as v5p:2x2x1, v5e:4x4, v6e:2x4 "
                          "(libtpu must be installed: pip install \"jax[tpu]\")") from None


# ---------------------------------------------------------------- FLOPs

def _dot_flops(eqn) -> float:
    (lc, _), _ = eqn.params["dimension_numbers"]
    a = eqn.invars[0].aval.shape
    return 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(a[i] for i in lc)


def jaxpr_flops(jaxpr, mesh_size: int = 1) -> float:
    """Matmul FLOPs of a jaxpr over every device: scans counted ``length`` times, a cond by its most
    expensive branch, a ``shard_map`` body once per device of its mesh; while loops (data-dependent
    trip counts: the attention kernels' block loops) and Pallas kernels (splash, the prompt-tree
    kernel: their grids skip blocks by the data) are not counted (see ``attention_pairs``)."""
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += _dot_flops(eqn)
        elif name == "scan":
            total += eqn.params["length"] * jaxpr_flops(eqn.params["jaxpr"].jaxpr, mesh_size)
        elif name == "cond":
            total += max(jaxpr_flops(b.jaxpr, mesh_size) for b in eqn.params["branches"])
        elif name in ("while", "pallas_call"):  # data-dependent loops; custom kernels (attention, counted
            continue                             # analytically by ``attention_pairs``)
        elif name == "shard_map":
            mesh = eqn.params["mesh"]
            copies = math.prod(mesh.shape[a] for a in eqn.params.get("manual_axes", mesh.axis_names))
            total += copies * jaxpr_flops(eqn.params["jaxpr"], mesh_size)
        else:  # jit, remat, custom_jvp / custom_vjp calls: their inner jaxprs once
            for inner in jax_core.jaxprs_in_params(eqn.params):
                total += jaxpr_flops(inner, mesh_size)
    return total


def attention_pairs(batch: dict, config: ModelConfig) -> tuple[int, int]:
    """(query-key pairs a global and a sliding-window layer computes over the whole step): packed
    rows by segment, branch and position (a branch sees its prompt and itself), padded rows by their
    mask; causal."""
    ids = batch.get("segment_ids")
    window = config.sliding_window or 0
    full = local = 0
    rows = batch["input_ids"].reshape(-1, batch["input_ids"].shape[-1])
    if ids is None:  # padded rows
        for n in batch["attention_mask"].reshape(rows.shape).sum(axis=1):
            full += n * (n + 1) // 2
            local += sum(min(i + 1, window) for i in range(n)) if window else 0
        return int(full), int(local or full)
    seg = ids.reshape(rows.shape)
    br = batch["branch_ids"].reshape(rows.shape)
    pos = batch["positions"].reshape(rows.shape)
    for r in range(rows.shape[0]):
        for s in np.unique(seg[r][seg[r] > 0]):
            in_seg = seg[r] == s
            prompt = int(np.sum(in_seg & (br[r] == 0)))
            full += prompt * (prompt + 1) // 2
            local += sum(min(p + 1, window) for p in range(prompt)) if window else 0
            for b in np.unique(br[r][in_seg & (br[r] > 0)]):
                p = pos[r][in_seg & (br[r] == b)]
                full += int(np.sum(p + 1))  # the prompt and its own earlier tokens
                local += int(np.sum(np.minimum(p + 1, window))) if window else 0
    return int(full), int(local or full)


def _attention_flops(pairs: tuple[int, int], config: ModelConfig) -> float:
    """Forward FLOPs of attention over every layer: scores and weighted values, 4 x heads x head_dim
    per visible pair."""
    sliding = sum(config.layer_is_sliding) if config.sliding_window else 0
    per_pair = 4.0 * config.num_heads * config.head_dim
    return per_pair * (pairs[0] * (config.num_layers - sliding) + pairs[1] * sliding)


def _layer_flops(config: ModelConfig) -> float:
    """Forward matmul FLOPs of one layer per token (projections and MLP)."""
    c = config
    return 2.0 * c.hidden_size * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads) + 2.0 * 3 * c.hidden_size * c.mlp_dim


def backward_layers(run, config: ModelConfig) -> tuple[int, int]:
    """(layers whose weights train, layers that only pass activation gradients)."""
    t, n = run.train, config.num_layers
    if t.trainable == "full":
        return n, 0
    if t.trainable == "last_k":
        return min(t.last_k, n), 0
    if t.trainable == "lora":
        return 0, min(t.lora_layers or n, n)
    return 0, 0


def model_flops(run, config: ModelConfig, tokens: int, targets: int, pairs: tuple[int, int] = (0, 0)) -> float:
    """The analytic FLOPs of one step over ``tokens`` tokens: forward, and backward twice the forward
    where weights train, once where only activation gradients pass; the unembedding of ``targets``
    response tokens (log-prob heads); DPO's frozen reference forward."""
    trained, passed = backward_layers(run, config)
    per_layer = _layer_flops(config) * tokens + _attention_flops(pairs, config) / config.num_layers
    reference = config.num_layers if run.loss.kind == "dpo" else 0
    layers = per_layer * (config.num_layers + 2 * trained + passed + reference)
    if run.train.trainable == "lora":  # adapters merged into q/k/v/o: those weights' gradients are computed
        c = config
        layers += passed * tokens * 2.0 * c.hidden_size * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)
    unembed = 2.0 * config.hidden_size * config.vocab_size * targets * (
        (3 if trained or passed else 1) + (1 if reference else 0))
    return layers + unembed


# ---------------------------------------------------------------- the abstract step

def synthetic_examples(run, trees: str, n: int, sequence: int, responses: int, response_tokens: int,
                       objectives: int) -> list[Example]:
    """``n`` examples whose trees are ``sequence`` tokens (prompt + one response) with ``responses``
    responses of ``response_tokens`` each (one for ratings and lm), as the training data would be."""
    n_resp = responses if trees in ("pairs", "judge") else 1
    prompt = max(sequence - response_tokens, 1)
    out = []
    for i in range(n):
        tree = Encoded(np.ones(prompt, np.int32), tuple(np.ones(response_tokens, np.int32) for _ in range(n_resp)))
        record = Record(str(i), (("user", ""),), ("",) * n_resp, "pair" if n_resp == 2 else "single", i)
        kw: dict[str, Any] = {}
        if trees == "pairs":
            kw["pairs"] = tuple((0, j) for j in range(1, n_resp))
        elif trees == "judge":
            kw["labels"] = tuple(j % 2 for j in range(n_resp))
        elif trees == "ratings":
            kw["targets"] = (0.5,) * objectives
        out.append(Example(tree, record, **kw))
    return out


def _with(structs, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), structs, shardings)


def abstract_step(run, config: ModelConfig, mesh, *, sequence: int, responses: int = 2,
                  response_tokens: int = 0, objectives: int = 3):
    """(the jitted train step, its abstract state, frozen params and batch with their shardings,
    the host batch arrays) for ``run`` on ``mesh``: the same functions ``rmjax train`` builds."""
    entry = tobjectives.entry(run)
    strategy = run.mesh.strategy
    param_dtype = jnp.dtype(config.param_dtype)
    boxed = abstract_params(config)
    backbone_sh = shd.param_shardings(boxed, mesh, strategy)
    backbone = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.value.shape, param_dtype, sharding=s), boxed,
                            backbone_sh, is_leaf=lambda x: hasattr(x, "value"))
    k = objectives if entry.trees == "ratings" or run.head.kind in ("multi_objective", "armorm") else 0
    extra: dict[str, Any] = {"score_head": None, "num_objectives": k}
    if run.head.kind == "armorm":
        extra["regression"] = jnp.zeros((config.hidden_size, objectives), jnp.float32)
    if run.loss.kind == "dpo" and run.loss.reference:  # a reference of the policy's shape
        extra["reference"] = backbone
    full = jax.eval_shape(lambda b: tloop.model_params(run, types.SimpleNamespace(params=b, config=config), entry,
                                                       mesh, extra), backbone)
    # placed as model_params places them: backbone and reference by the rules, head and adapters replicated
    by_rules = {p: x.sharding for p, x in traverse_util.flatten_dict(backbone, sep="/").items()}
    replicated = shd.replicated(mesh)
    flat_sh = {p: by_rules[p.split("/", 1)[1]] if p.split("/", 1)[0] in ("backbone", "reference") else replicated
               for p in traverse_util.flatten_dict(full, sep="/")}
    parts = jax.eval_shape(lambda f: tparams.split(f, run.train.trainable, run.train.last_k, entry.frozen), full)

    def reattach(tree):  # a split layer keeps its tensor's sharding (the layer axis is never split)
        flat = traverse_util.flatten_dict(tree, sep="/")
        return traverse_util.unflatten_dict({p: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shd.fit_to_shape(
            flat_sh[p.rsplit("__", 1)[0] if p not in flat_sh else p], x.shape)) for p, x in flat.items()}, sep="/")

    trainable, frozen = (reattach(t) for t in parts)
    optimizer = tstep.make_optimizer(run)
    state_abs, state_sh = tstep.state_shardings(trainable, optimizer, mesh)
    state = _with(state_abs, state_sh)
    layout = tplan.Layout(packed=run.batch.layout == "packed", trees=entry.trees, targets=entry.targets, pad_id=0,
                          pack_length=run.row_length, row_multiple=shd.batch_shards(mesh),
                          num_objectives=objectives)
    examples = synthetic_examples(run, entry.trees, run.train.batch_size, sequence, responses,
                                  response_tokens or max(sequence // 4, 1), objectives)
    micro = np.array_split(np.arange(len(examples)), run.train.grad_accum)
    host = tplan.step_arrays(examples, micro, layout)
    b_sh = tstep.batch_shardings(mesh, layout.keys)
    batch = {key: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=b_sh[key]) for key, v in host.items()}
    statics = {"objectives": tuple(f"objective_{i}" for i in range(k)), "label_ids": (1, 2)}
    fn = tstep.make_train_step(state, frozen, mesh, layout.keys, config=config, run=run, optimizer=optimizer,
                               entry=entry, statics=statics)
    return fn, state, frozen, batch, host


BOUND = ("bound: the compiled FLOPs at the chips' peak (a lower bound on the step time, so upper bounds on "
         "tokens/s and MFU; XLA gives no time estimate for a program with loops)")
_OUT_OF_MEMORY = re.compile(r"HLO temporaries \(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)")


def per_device_bytes(x: jax.ShapeDtypeStruct) -> int:
    """Bytes of one device's shard of an abstract array."""
    shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
    return math.prod(shape) * jnp.dtype(x.dtype).itemsize


def _gib(n: float) -> float:
    return round(n / 2 ** 30, 3)


def plan_train(run, topology: str, *, sequence: int = 0, responses: int = 2, response_tokens: int = 0,
               objectives: int = 3, devices: list | None = None) -> dict:
    """Compile ``run``'s train step for ``topology`` ahead of time and size it (module docstring)."""
    devices = devices or topology_devices(topology)
    kind = devices[0].device_kind
    peak, hbm = CHIPS.get(kind, (float("nan"), 0))
    hf = hf_config(run.model.name)
    config = config_from_hf(hf, source=run.model.name, **run.model.numerics())
    if not tobjectives.uses_lm_head(run):
        config = dataclasses.replace(config, lm_head=False)
    sequence = sequence or run.data.max_length
    mesh = shd.make_mesh(shd.MeshConfig.for_strategy(run.mesh.strategy, **run.mesh.sizes()), devices=devices)
    fn, state, frozen, batch, host = abstract_step(run, config, mesh, sequence=sequence, responses=responses,
                                                   response_tokens=response_tokens, objectives=objectives)
    with shd.activate(mesh, run.mesh.strategy):
        counted = jaxpr_flops(jax.make_jaxpr(fn)(state, frozen, batch).jaxpr)
        compiled, sizes, peak_bytes, hbm, cost = _compile_and_size(fn, (state, frozen, batch), hbm)
    pairs = attention_pairs(host, config)
    trained, passed = backward_layers(run, config)
    # the blockwise kernel's backward recomputes the scores from the saved logsumexp: 2.5x its forward
    # (the TPU kernels' dq and dk/dv kernels recompute them twice: 3.5x, an estimate this does not
    # separate); a rematerialised layer runs its forward once more
    again = 2.5 + (1.0 if run.model.remat != "none" else 0.0)
    attention = _attention_flops(pairs, config) * (1 + again * (trained + passed) / config.num_layers)
    compiled_flops = counted + attention
    tokens = int(np.sum(host["input_ids"] != 0))  # the trees' tokens (the synthetic trees never use pad id 0)
    targets = int(np.sum(host["target_valid"])) if "target_valid" in host else 0
    analytic = model_flops(run, config, tokens, targets, pairs)
    computed = model_flops(run, config, int(host["input_ids"].size), int(host["target_valid"].size)
                           if "target_valid" in host else 0)  # every position of the rows, padding too
    xla_flops = float(cost.get("flops", 0.0))
    xla_seconds = float(cost.get("optimal_seconds", 0.0) or 0.0)
    chips = len(devices)
    estimate: dict[str, Any] = {"basis": None}
    if compiled is None:
        seconds = 0.0
        estimate["basis"] = "none: XLA does not compile a program that does not fit"
    elif xla_seconds > 0 and xla_flops > 0:
        # XLA's time for what its analysis sees (loop bodies once, per chip), scaled up by the FLOPs it misses
        seconds = xla_seconds * compiled_flops / (xla_flops * chips)
        estimate["basis"] = "XLA cost analysis (optimal seconds), scaled by the loop trip counts it counts once"
    else:  # XLA's TPU cost model gives no time for a program with loops (optimal_seconds < 0)
        seconds = compiled_flops / (chips * peak) if peak == peak else float("nan")
        estimate["basis"] = BOUND
    estimate.update(step_seconds=float(f"{seconds:.4g}") if seconds else None,
                    tokens_per_s=round(tokens / seconds, 1) if seconds else None,
                    mfu=round(analytic / (seconds * chips * peak), 3) if seconds and peak == peak else None)
    return {
        "model": run.model.name, "topology": topology, "chip": kind, "chips": chips,
        "mesh": shd.describe(mesh), "strategy": run.mesh.strategy, "remat": run.model.remat,
        "dtype": run.model.dtype, "param_dtype": run.model.param_dtype, "trainable": run.train.trainable,
        "head": run.head.kind, "loss": run.loss.kind, "layout": run.batch.layout,
        "batch": {"examples": run.train.batch_size, "micro_batches": run.train.grad_accum,
                  "sequence_tokens": sequence, "tokens": tokens, "rows": list(host["input_ids"].shape)},
        "memory": {**{f"{k}_gib": _gib(v) for k, v in sizes.items()}, "peak_gib": _gib(peak_bytes),
                   "hbm_gib": _gib(hbm),
                   "source": "memory_analysis" if compiled is not None else "the compiler's out-of-memory report"},
        "fits": bool(hbm) and peak_bytes <= hbm,
        "flops": {"model": analytic, "compiled": compiled_flops, "xla_cost_analysis": xla_flops,
                  "matmuls_counted": counted, "matmuls_analytic_on_padded_rows": computed,
                  "attention_analytic": attention},
        "estimate": estimate,
    }


# ---------------------------------------------------------------- scoring jobs

VOCAB_SCAN_CHUNK = 512  # replies per batch of the vocabulary scan (``scan_responses``' chunk)


def _replies(layout: str, sequence: int, responses: int, response_tokens: int) -> tuple[int, int]:
    """(replies per tree, tokens per reply) of a scoring plan: the vocabulary scan's chunk of 512
    replies of a token and its end-of-turn suffix (4), else ``responses`` of a quarter of the sequence."""
    if layout == "vocab_scan":
        return VOCAB_SCAN_CHUNK, response_tokens or 4
    return responses, response_tokens or max(sequence // 4, 1)

def _kv_attention_pairs(batch: dict) -> tuple[int, int]:
    """Query-key pairs of the KV-cache scoring layout: each prompt once (causal), each response over
    its prompt and its own earlier tokens."""
    full = 0
    for g, n in enumerate(batch["prompt_mask"].sum(axis=1)):
        full += int(n) * (int(n) + 1) // 2
        per = batch["response_ids"].shape[0] // batch["prompt_ids"].shape[0]
        for m in batch["response_mask"][g * per:(g + 1) * per].sum(axis=1):
            full += int(m) * int(n) + int(m) * (int(m) + 1) // 2
    return full, full


def abstract_score(model: str, mesh, *, role: str = "policy", layout: str = "packed", strategy: str = "fsdp",
                   numerics: dict | None = None, sequence: int = 2048, responses: int = 2, response_tokens: int = 0,
                   row_length: int = 0, batch_tokens: int = 16384):
    """(the jitted scoring function ``rmjax score`` runs, its abstract params, head params and batch
    with their shardings, the host batch arrays, the examples in the batch, the model config) for
    one batch of synthetic trees (``plan_score``)."""
    if role not in ("policy", "rm", "features") or layout not in ("packed", "kv", "vocab_scan") or (
            role == "features" and layout != "packed"):
        raise ConfigError(f"score plan: role policy|rm|features and layout packed|kv|vocab_scan (features: packed), "
                          f"got {role!r} and {layout!r}")
    config = config_from_hf(hf_config(model), source=model, **(numerics or {}))
    if role in ("rm", "features"):
        config = dataclasses.replace(config, lm_head=False)
    boxed = abstract_params(config)
    params = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.value.shape, jnp.dtype(config.param_dtype), sharding=sh),
                          boxed, shd.param_shardings(boxed, mesh, strategy), is_leaf=lambda x: hasattr(x, "value"))
    responses, response_tokens = _replies(layout, sequence, responses, response_tokens)
    tree = Encoded(np.ones(max(sequence - response_tokens, 1), np.int32),
                   tuple(np.ones(response_tokens, np.int32) for _ in range(responses)))
    length = tree.tree_length
    if layout == "vocab_scan":  # rmjax.scoring.vocab_scan.scan_responses' batch: one group, replies padded to 4s
        n = 1
        host, _ = kv_path.pad_batch([tree], 1, 0, lengths=(len(tree.prompt), -(-response_tokens // 4) * 4))
        fn = kv_path.rm_fn(config, HeadSpec("scalar")) if role == "rm" else kv_path.score_fn(config)
    elif layout == "packed":
        row = row_length or 512  # rmjax score's default rows: longer trees get a row of their own length bucket
        n = max(1, max(batch_tokens, row) // length)
        first = packed_batches({i: tree for i in range(n)}, 0, row_length=row, batch_tokens=max(batch_tokens, row),
                               buckets=BUCKETS)[0]
        host, n = first.arrays, len({seq[0] for seq in first.sequences if seq is not None})
        if role == "features":  # rmjax features' function (params, batch), with the engine's signature
            features = feature_fn(config)
            fn = jax.jit(lambda p, _, b: features(p, b))
        else:
            fn = packing.packed_rm_fn(config, HeadSpec("scalar")) if role == "rm" else packing.packed_score_fn(config)
    else:
        n = max(1, batch_tokens // length)
        host, _ = kv_path.pad_batch([tree] * n, 1 << (n - 1).bit_length(), 0)
        fn = kv_path.rm_fn(config, HeadSpec("scalar")) if role == "rm" else kv_path.score_fn(config)
    head = {"score": jax.ShapeDtypeStruct((config.hidden_size, 1), jnp.float32, sharding=shd.replicated(mesh))} \
        if role == "rm" else None
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shd.batch_sharding(mesh, v.shape))
             for k, v in host.items()}
    return fn, params, head, batch, host, n, config


def plan_score(model: str, topology: str, *, role: str = "policy", layout: str = "packed", strategy: str = "fsdp",
               numerics: dict | None = None, sequence: int = 2048, responses: int = 2, response_tokens: int = 0,
               row_length: int = 0, batch_tokens: int = 16384, devices: list | None = None) -> dict:
    """Compile one batch of ``rmjax score``'s engine for ``topology`` ahead of time and size it: the
    policy's log-prob statistics (``role`` policy: the implicit reward's forward, the reference costs
    the same again), a scalar reward head (``role`` rm) or ``rmjax features``' hidden states at each
    response's last token and gating token (``role`` features), packed prompt trees (``layout`` packed,
    rows of ``row_length``) or the KV-cache path (``kv``), trees of ``sequence`` tokens (a prompt and
    one response) with ``responses`` responses each, ``batch_tokens`` tokens per batch. The same
    jitted functions ``rmjax score`` runs (``rmjax.scoring.packing`` / ``kv_path``)."""
    devices = devices or topology_devices(topology)
    kind = devices[0].device_kind
    peak, hbm = CHIPS.get(kind, (float("nan"), 0))
    mesh = shd.make_mesh(shd.MeshConfig.for_strategy(strategy), devices=devices)
    responses, response_tokens = _replies(layout, sequence, responses, response_tokens)
    fn, params, head, batch, host, n, config = abstract_score(
        model, mesh, role=role, layout=layout, strategy=strategy, numerics=numerics, sequence=sequence,
        responses=responses, response_tokens=response_tokens, row_length=row_length, batch_tokens=batch_tokens)
    with shd.activate(mesh, strategy):
        counted = jaxpr_flops(jax.make_jaxpr(fn)(params, head, batch).jaxpr)
        compiled, sizes, peak_bytes, hbm, cost = _compile_and_size(fn, (params, head, batch), hbm)
    if layout == "packed":
        pairs, tokens = attention_pairs(host, config), int(np.sum(host["input_ids"] != 0))
        positions, unembedded = host["input_ids"].size, host["target_ids"].size
    else:
        pairs = _kv_attention_pairs(host)
        tokens = int(host["prompt_mask"][:n].sum() + host["response_mask"].sum())
        positions, unembedded = host["prompt_ids"].size + host["response_ids"].size, host["response_ids"].size
    targets = n * responses * response_tokens if role == "policy" else 0
    unembed = 2.0 * config.hidden_size * config.vocab_size
    attention = _attention_flops(pairs, config)
    analytic = _layer_flops(config) * tokens * config.num_layers + attention + unembed * targets
    on_rows = _layer_flops(config) * positions * config.num_layers + (unembed * unembedded if role == "policy" else 0)
    compiled_flops = counted + attention
    chips = len(devices)
    seconds = compiled_flops / (chips * peak) if compiled is not None and peak == peak else 0.0
    rows = host["input_ids"].shape if layout == "packed" else host["response_ids"].shape
    return {
        "job": "score", "model": model, "role": role, "layout": layout, "topology": topology, "chip": kind,
        "chips": chips, "mesh": shd.describe(mesh), "strategy": strategy, "dtype": config.dtype,
        "param_dtype": config.param_dtype,
        "batch": {"examples": n, "responses": responses, "sequence_tokens": sequence, "tokens": tokens,
                  "rows": list(rows)},
        "memory": {**{f"{k}_gib": _gib(v) for k, v in sizes.items()}, "peak_gib": _gib(peak_bytes),
                   "hbm_gib": _gib(hbm),
                   "source": "memory_analysis" if compiled is not None else "the compiler's out-of-memory report"},
        "fits": bool(hbm) and peak_bytes <= hbm,
        "flops": {"model": analytic, "compiled": compiled_flops, "xla_cost_analysis": float(cost.get("flops", 0.0)),
                  "matmuls_counted": counted, "matmuls_analytic_on_padded_rows": on_rows,
                  "attention_analytic": attention},
        "estimate": {"basis": BOUND if seconds else "none: XLA does not compile a program that does not fit",
                     "step_seconds": float(f"{seconds:.4g}") if seconds else None,
                     "tokens_per_s": round(tokens / seconds, 1) if seconds else None,
                     "examples_per_s": round(n / seconds, 1) if seconds else None,
                     "responses_per_s": round(n * responses / seconds, 1) if seconds else None,
                     "mfu": round(analytic / (seconds * chips * peak), 3) if seconds else None},
    }


def _compile_and_size(fn, args, hbm: int):
    """(compiled or None, memory sizes, peak bytes, HBM bytes, XLA cost) of ``fn`` on abstract
    ``args``; a program XLA refuses for want of HBM is sized from the compiler's report."""
    arguments = sum(per_device_bytes(x) for x in jax.tree.leaves(args))
    try:
        compiled = fn.lower(*args).compile()
    except jax.errors.JaxRuntimeError as e:
        found = _OUT_OF_MEMORY.search(str(e))
        if "RESOURCE_EXHAUSTED" not in str(e) or not found:
            raise
        need, have = (float(found.group(i)) * (1 << 30) for i in (1, 2))
        sizes = {"arguments": arguments, "outputs": 0, "aliased": 0, "temporaries": need}
        return None, sizes, arguments + need, have, {}
    mem = compiled.memory_analysis()
    sizes = {"arguments": mem.argument_size_in_bytes, "outputs": mem.output_size_in_bytes,
             "aliased": mem.alias_size_in_bytes, "temporaries": mem.temp_size_in_bytes}
    peak_bytes = (sizes["arguments"] + sizes["outputs"] - sizes["aliased"] + sizes["temporaries"]
                  + getattr(mem, "generated_code_size_in_bytes", 0))
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost or {}
    return compiled, sizes, peak_bytes, hbm, cost


def summary_line(r: dict) -> str:
    m, e = r["memory"], r["estimate"]
    if r.get("job") == "score":
        what = (f"{r['batch']['responses']} replies to one prompt of {r['batch']['sequence_tokens']} tokens"
                if r["layout"] == "vocab_scan" else
                f"{r['batch']['examples']} trees of {r['batch']['sequence_tokens']} tokens")
        head = (f"{r['model']} score ({r['role']}, {r['layout']}, {what} per batch) on {r['topology']} ({r['chips']} x {r['chip']}, "
                f"{r['mesh']}, {r['strategy']}): {m['peak_gib']:.2f} GiB per chip of {m['hbm_gib']:.0f} GiB")
    else:
        head = (f"{r['model']} {r['trainable']} {r['head']}+{r['loss']} on {r['topology']} ({r['chips']} x "
                f"{r['chip']}, {r['mesh']}, {r['strategy']}, remat {r['remat']}, {r['batch']['micro_batches']} "
                f"micro-batches): {m['peak_gib']:.2f} GiB per chip of {m['hbm_gib']:.0f} GiB")
    if not r["fits"]:
        return f"{head} (does not fit)"
    if e["basis"] == BOUND:
        return (f"{head} (fits); at least {e['step_seconds']:.4g} s per step (compiled FLOPs at peak), at most "
                f"{e['tokens_per_s']:,.0f} tokens/s, MFU at most {e['mfu']:.0%} [bounds]")
    mfu = f", MFU {e['mfu']:.0%}" if e.get("mfu") is not None else ""
    return f"{head} (fits); estimated {e['step_seconds']:.4g} s per step, {e['tokens_per_s']} tokens/s{mfu} [estimates]"


__all__ = ["NAMED_SHAPES", "CHIPS", "plan_train", "plan_score", "abstract_score", "jaxpr_flops", "attention_pairs", "model_flops", "hf_config",
           "topology_devices", "abstract_step", "summary_line"]
