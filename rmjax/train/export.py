"""Export a trained run so that ``transformers`` and rmjax load it back, for every head.

``final/`` is a complete Hugging Face directory (config.json, model.safetensors, tokenizer files)
plus ``rmjax.json`` (base model, head settings) and ``orbax/`` (the rmjax params):

    scalar            ``*ForSequenceClassification``, num_labels=1 (``score.weight`` [1, D])
    multi_objective   ``*ForSequenceClassification``, num_labels=K, id2label = the objective names
    armorm            the same K-label regression as ``score.weight``, plus ``armorm_gate.safetensors``
                      (the gate's params, flat names ``layers_0.kernel`` ... ``logit_scale``) and the gate
                      settings under ``head`` in rmjax.json; ``rmjax.heads.reward`` rebuilds the gated score
    judge             ``*ForCausalLM`` (the judge is the LM); rmjax.json ``head`` holds the verdict labels,
                      the chat template and the judge template (a built-in name, or judge_template.txt)
    ArmoRM pipeline   ``export_released_armorm``: the released ArmoRM layout (``LlamaForRewardModelWithGating``:
                      backbone ``model.*``, ``regression_layer``, ``gating.*``, ``reward_transform_matrix``),
                      which ``rmjax.heads.reward`` also reads from the authors' released checkpoint
    lm (dpo)          ``*ForCausalLM``; rmjax.json holds the reference model and beta of the implicit reward
    lm (nll)          ``*ForCausalLM`` (GRAM stage 1, pair pretraining): the start of a judge's training

With LoRA, the weights in ``final/`` have the adapters merged, and ``final/adapter/`` holds them in
PEFT's layout (``adapter_config.json`` + ``adapter_model.safetensors``, the head as a module to
save), loadable by ``peft`` on the base model and by rmjax as ``BASE+final/adapter``.

The per-family checkpoint-key table is used in reverse: each HF tensor name of the base checkpoint
is matched to its rmjax param, and the reshape/transpose is undone by pushing an index array through
the forward transform (so no inverse has to be written by hand for any table entry).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import jax
import numpy as np
from flax import traverse_util

from rmjax.data.judge_prompts import TEMPLATES, judge_template
from rmjax.errors import ConfigError
from rmjax.heads.armorm import RELEASED_ARCHITECTURE, released_from_head
from rmjax.heads.reward import GATE_FILE, export_settings
from rmjax.io import adapters, registry
from rmjax.models import family_of
from rmjax.models.loading import canonical_name, load_model
from rmjax.train import params as tparams

JUDGE_TEMPLATE_FILE = "judge_template.txt"
SEQ_CLS_HEADS = ("scalar", "multi_objective", "armorm")
LORA_MODULES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}


def invert(transform, param: np.ndarray, hf_shape: tuple[int, ...], config) -> np.ndarray:
    index = np.arange(int(np.prod(hf_shape))).reshape(hf_shape)
    where = transform(index, config)
    out = np.empty(int(np.prod(hf_shape)), param.dtype)
    out[np.asarray(where).ravel()] = np.asarray(param).ravel()
    return out.reshape(hf_shape)


def _table(ckpt):
    return [(re.compile(p + r"$"), t, tf) for p, t, tf in family_of(ckpt.config).CHECKPOINT_KEYS]


def _matches(ckpt):
    """(HF name, rmjax param path, layer or None, transform) of every base tensor the table knows."""
    table = _table(ckpt)
    for name in ckpt.tensor_names():
        canon = canonical_name(name)
        for rx, target, tf in table:
            m = rx.match(canon)
            if m:
                yield canon, target, (int(m.group(1)) if m.groups() else None), tf, name
                break


def hf_state_dict(backbone: dict, ckpt, config) -> dict[str, np.ndarray]:
    """The backbone's tensors under the base checkpoint's HF names and layouts."""
    flat = {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(backbone).items()}
    out = {}
    for canon, target, layer, tf, name in _matches(ckpt):
        if target in flat:
            value = flat[target][layer] if layer is not None else flat[target]
            out[canon] = invert(tf, value, tuple(ckpt.tensor_shape(name)), config)
    return out


def _index_maps(tf, hf_shape: tuple[int, int], config, n_in: int) -> tuple[np.ndarray, np.ndarray]:
    """For an rmjax kernel made from an HF weight [out, in] by ``tf``: the HF input index of each
    position along the kernel's first ``n_in`` axes, and the HF output index along the others."""
    rows, cols = hf_shape
    where = np.asarray(tf(np.arange(rows * cols).reshape(rows, cols), config))
    first = where[(slice(None),) * n_in + (0,) * (where.ndim - n_in)] % cols
    rest = where[(0,) * n_in] // cols
    return first, rest


def lora_to_peft(lora: dict, ckpt, config) -> dict[str, np.ndarray]:
    """rmjax LoRA factors -> PEFT tensors (A [r, in], B [out, r] per adapted HF module)."""
    out = {}
    cut = config.num_layers - tparams.lora_layers(lora)  # adapters on the last layers only
    for canon, target, layer, tf, name in _matches(ckpt):
        short = target.rsplit("/", 1)[-1].removesuffix("_kernel")
        if not target.startswith("layers/attn/") or not target.endswith("_kernel") or short not in lora \
                or layer < cut:
            continue
        a, b = (np.asarray(lora[short][k][layer - cut], np.float32) for k in ("a", "b"))
        rank = a.shape[-1]
        n_in = a.ndim - 1  # q/k/v: a [D, r], b [r, H, hd]; o: a [H, hd, r], b [r, D]
        hf_shape = tuple(ckpt.tensor_shape(name))
        inputs, outputs = _index_maps(tf, hf_shape, config, n_in)
        mat_a = np.zeros((rank, hf_shape[1]), np.float32)
        mat_a[:, inputs.ravel()] = a.reshape(-1, rank).T
        mat_b = np.zeros((hf_shape[0], rank), np.float32)
        mat_b[outputs.ravel(), :] = b.reshape(rank, -1).T
        module = canon.removesuffix(".weight")
        out[f"{adapters.PREFIX}{module}.lora_A.weight"] = mat_a
        out[f"{adapters.PREFIX}{module}.lora_B.weight"] = mat_b
    return out


def head_tensors(kind: str, head: dict) -> dict[str, np.ndarray]:
    if kind == "scalar":
        return {"score.weight": np.asarray(head["score"]["kernel"]).T}
    if kind in ("multi_objective", "armorm"):
        return {"score.weight": np.asarray(head["regression_layer"]["kernel"]).T}
    return {}


def head_settings(run, statics: dict) -> dict:
    h, kind = run.head, run.head.kind
    out: dict = {"kind": kind}
    if kind in ("multi_objective", "armorm"):
        out["objectives"] = list(statics.get("objectives", ()))
    if kind == "armorm":
        out.update(gate_hidden=h.gate_hidden, gate_layers=h.gate_layers, gate_temperature=h.gate_temperature)
    if kind == "judge":
        # a template file is copied into the export (judge_template.txt), a built-in one named
        out.update(labels=list(h.judge_labels), template=run.data.template,
                   judge_template=h.judge_template if h.judge_template in TEMPLATES else JUDGE_TEMPLATE_FILE)
    if kind == "lm" and run.loss.kind == "nll":  # a pair-pretrained LM (GRAM stage 1): no reward yet
        out.update(stage="pair_pretraining")
    elif kind == "lm":
        out.update(reference=run.loss.reference or run.model.name, beta=run.loss.beta)
    return out


def _hf_config(ckpt, kind: str, num_labels: int, labels: list[str], pad_id) -> dict:
    hf_config = dict(ckpt.config)
    arch = hf_config.get("architectures", ["Model"])[0]
    base = re.sub(r"(ForCausalLM|ForSequenceClassification|Model)$", "", arch) or "Llama"
    if hf_config.get("model_type") == "gemma3_text":
        base = "Gemma3Text" if kind in SEQ_CLS_HEADS else "Gemma3"
    for key in ("num_labels", "id2label", "label2id"):
        hf_config.pop(key, None)
    if kind in SEQ_CLS_HEADS:
        names = labels or [f"LABEL_{i}" for i in range(num_labels)]
        hf_config.update(architectures=[f"{base}ForSequenceClassification"], num_labels=num_labels,
                         id2label={str(i): n for i, n in enumerate(names)}, label2id={n: i for i, n in enumerate(names)})
    else:
        hf_config.update(architectures=[f"{base}ForCausalLM"])
    hf_config.update(torch_dtype="float32", pad_token_id=pad_id if pad_id is not None else hf_config.get("pad_token_id"))
    return hf_config


def export_run(full_params: dict, loaded, run, out_dir: Path, statics: dict | None = None) -> Path:
    """Write ``out_dir/`` (see the module docstring) for the run's head. With several processes
    every one calls it (the params may span processes); process 0 writes the HF files."""
    import orbax.checkpoint as ocp
    from safetensors.numpy import save_file

    statics = statics or {}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()  # every process saves its shards of the rmjax params
    checkpointer.save((out_dir / "orbax").absolute(), full_params, force=True)
    full_params = host_copy(full_params)  # every process takes part in gathering what others hold
    if jax.process_index() != 0:  # the HF files are written once
        checkpointer.wait_until_finished()
        return out_dir
    kind, head = run.head.kind, full_params.get("head", {})
    backbone = full_params["backbone"]
    scale = run.train.lora_alpha / max(run.train.lora_rank, 1)
    if "lora" in full_params:
        backbone = jax.device_get(tparams.apply_lora(backbone, full_params["lora"], scale))
    ckpt = registry.open_checkpoint(registry.resolve_model(run.model.name))
    tensors = {**hf_state_dict(backbone, ckpt, loaded.config), **head_tensors(kind, head)}
    if kind in SEQ_CLS_HEADS:  # a *ForSequenceClassification has no LM head (an untied base's is left out)
        tensors.pop("lm_head.weight", None)
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}, str(out_dir / "model.safetensors"))
    settings = head_settings(run, statics)
    num_labels = tensors["score.weight"].shape[0] if "score.weight" in tensors else 0
    pad_id = loaded.tokenizer.pad_id if loaded.tokenizer else None
    hf_config = _hf_config(ckpt, kind, num_labels, settings.get("objectives", []), pad_id)
    (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2))
    if kind == "judge" and run.head.judge_template not in TEMPLATES:
        (out_dir / JUDGE_TEMPLATE_FILE).write_text(judge_template(run.head.judge_template), encoding="utf-8")
    if kind == "armorm":
        flat = traverse_util.flatten_dict(head["gating"], sep=".")
        save_file({k: np.ascontiguousarray(v, np.float32) for k, v in flat.items()}, str(out_dir / GATE_FILE))
    meta = {"base_model": run.model.name, "run_dir": run.run_dir, "head": settings}
    (out_dir / "rmjax.json").write_text(json.dumps(meta, indent=2))
    if loaded.tokenizer is not None:  # a complete HF directory: rmjax and transformers load it alone
        loaded.tokenizer.save_hf(out_dir)
    if "lora" in full_params:
        peft_tensors = lora_to_peft(jax.device_get(full_params["lora"]), ckpt, loaded.config)
        peft_tensors.update({adapters.PREFIX + k: v for k, v in head_tensors(kind, head).items()})
        adapted = tparams.lora_layers(full_params["lora"])
        layers = loaded.config.num_layers
        adapters.write(out_dir / "adapter", peft_tensors, rank=run.train.lora_rank, alpha=run.train.lora_alpha,
                       targets=[LORA_MODULES[k] for k in full_params["lora"]], base=run.model.name,
                       layers=list(range(layers - adapted, layers)) if adapted < layers else None,
                       task_type="SEQ_CLS" if kind in SEQ_CLS_HEADS else "CAUSAL_LM",
                       modules_to_save=["score"] if kind in SEQ_CLS_HEADS else [])
    checkpointer.wait_until_finished()
    return out_dir


def export_policy(backbone: dict, loaded, base: str, out_dir: Path, meta: dict) -> Path:
    """``out_dir/``: a complete HF ``*ForCausalLM`` directory of ``base``'s layout with ``backbone``'s
    weights (e.g. an RL-tuned policy, adapters merged) and ``rmjax.json`` = ``meta``. One process."""
    from safetensors.numpy import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt = registry.open_checkpoint(registry.resolve_model(base))
    tensors = hf_state_dict(jax.device_get(backbone), ckpt, loaded.config)
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}, str(out_dir / "model.safetensors"))
    pad_id = loaded.tokenizer.pad_id if loaded.tokenizer else None
    (out_dir / "config.json").write_text(json.dumps(_hf_config(ckpt, "lm", 0, [], pad_id), indent=2))
    (out_dir / "rmjax.json").write_text(json.dumps({"base_model": base, **meta}, indent=2))
    if loaded.tokenizer is not None:
        loaded.tokenizer.save_hf(out_dir)
    return out_dir


def host_copy(tree):
    """NumPy copies of a pytree's arrays; arrays that span processes are gathered (a collective:
    every process must call it)."""
    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            from jax.experimental import multihost_utils
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))
    return jax.tree.map(one, tree)


def load_head(directory: str | Path, loaded) -> tuple[str, dict, dict]:
    """(head kind, head params, settings) of a loaded model: its reward head (``rmjax.heads.reward``:
    any released layout or rmjax export), else the causal LM's rmjax.json settings (judge, lm)."""

    directory = Path(directory)
    settings = export_settings(directory if directory.is_dir() else None)
    head = loaded.reward_head
    if head is None:
        return settings.get("kind", "lm"), {}, settings
    spec = head.spec
    out = {**settings, "kind": spec.kind}
    if spec.objectives:
        out["objectives"] = list(spec.objectives)
    if spec.gated:
        out.update(gate_hidden=spec.gate_hidden, gate_layers=spec.gate_layers, gate_temperature=spec.gate_temperature)
    return spec.kind, head.params, out


# ---------------------------------------------------------------- ArmoRM's released layout

def export_released_armorm(head: dict, settings: dict, base_model: str, out_dir: str | Path,
                           meta: dict | None = None) -> Path:
    """An HF directory in the released ArmoRM layout: config.json (the base config with architectures
    ``LlamaForRewardModelWithGating``, ``num_objectives``, ``gating_temperature``, ``gating_hidden_dim``,
    ``gating_n_hidden``, the objectives as ``id2label``), model.safetensors (the backbone's ``model.*``
    tensors + ``regression_layer.weight``, ``reward_transform_matrix``, ``gating.*``), the tokenizer,
    and rmjax.json (base model, head settings, ``meta``). ``rmjax.heads.reward`` / ``rmjax eval-rm`` read it."""
    from safetensors.numpy import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    loaded = load_model(base_model)
    ckpt = registry.open_checkpoint(registry.resolve_model(base_model))
    backbone = hf_state_dict(jax.device_get(loaded.params), ckpt, loaded.config)
    released = released_from_head(head)
    k = released["regression_layer.weight"].shape[0]
    if released["regression_layer.weight"].shape[1] != loaded.config.hidden_size:
        raise ConfigError(f"the regression layer is [{k}, {released['regression_layer.weight'].shape[1]}] but "
                          f"{base_model} has width {loaded.config.hidden_size}; export with the model whose "
                          "features trained it")
    tensors = {**{n: v for n, v in backbone.items() if n.startswith("model.")}, **released}
    save_file({n: np.ascontiguousarray(v, np.float32) for n, v in tensors.items()}, str(out_dir / "model.safetensors"))
    objectives = list(settings.get("objectives") or [f"objective_{i}" for i in range(k)])
    hf_config = dict(ckpt.config)
    for key in ("num_labels", "id2label", "label2id"):
        hf_config.pop(key, None)
    pad_id = loaded.tokenizer.pad_id if loaded.tokenizer else None
    hf_config.update(architectures=[RELEASED_ARCHITECTURE], num_objectives=k,
                     gating_temperature=settings["gate_temperature"], gating_hidden_dim=settings["gate_hidden"],
                     gating_n_hidden=settings["gate_layers"], id2label={str(i): n for i, n in enumerate(objectives)},
                     label2id={n: i for i, n in enumerate(objectives)}, torch_dtype="float32",
                     pad_token_id=pad_id if pad_id is not None else hf_config.get("pad_token_id"))
    (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2))
    (out_dir / "rmjax.json").write_text(json.dumps({"base_model": base_model, "head": {**settings, "kind": "armorm",
                                                    "objectives": objectives}, **(meta or {})}, indent=2))
    if loaded.tokenizer is not None:
        loaded.tokenizer.save_hf(out_dir)
    return out_dir
