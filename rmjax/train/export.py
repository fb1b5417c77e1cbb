"""Export a trained scalar RM as a Hugging Face ``*ForSequenceClassification`` safetensors directory
(loadable by ``transformers``) and as an orbax checkpoint of the rmjax params.

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

from rmjax.models import family_of
from rmjax.models.loading import _canonical
from rmjax.train import params as tparams


def invert(transform, param: np.ndarray, hf_shape: tuple[int, ...], config) -> np.ndarray:
    index = np.arange(int(np.prod(hf_shape))).reshape(hf_shape)
    where = transform(index, config)
    out = np.empty(int(np.prod(hf_shape)), param.dtype)
    out[np.asarray(where).ravel()] = np.asarray(param).ravel()
    return out.reshape(hf_shape)


def hf_state_dict(backbone: dict, head_kernel: np.ndarray, ckpt, config) -> dict[str, np.ndarray]:
    family = family_of(ckpt.config)
    table = [(re.compile(p + r"$"), t, tf) for p, t, tf in family.CHECKPOINT_KEYS]
    flat = {"/".join(k): np.asarray(v) for k, v in _flatten(backbone).items()}
    out = {}
    for name in ckpt.tensor_names():
        canon = _canonical(name)
        for rx, target, tf in table:
            m = rx.match(canon)
            if m and target in flat:
                value = flat[target][int(m.group(1))] if m.groups() else flat[target]
                out[canon] = invert(tf, value, tuple(ckpt.tensor_shape(name)), config)
                break
    out["score.weight"] = np.ascontiguousarray(np.asarray(head_kernel).T)
    return out


def _flatten(tree, prefix=()):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def export_reward_model(full_params: dict, loaded, run, out_dir: Path) -> Path:
    """Write ``out_dir/`` (config.json + model.safetensors) and ``out_dir/orbax``."""
    import orbax.checkpoint as ocp
    from safetensors.numpy import save_file

    from rmjax.io import registry

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    full_params = jax.device_get(full_params)
    backbone = full_params["backbone"]
    if "lora" in full_params:
        backbone = jax.device_get(tparams.apply_lora(backbone, full_params["lora"],
                                                     run.train.lora_alpha / run.train.lora_rank))
    ckpt = registry.open_checkpoint(registry.resolve_model(run.model.name))
    tensors = hf_state_dict(backbone, full_params["head"]["score"]["kernel"], ckpt, loaded.config)
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}, str(out_dir / "model.safetensors"))
    hf_config = dict(ckpt.config)
    arch = hf_config.get("architectures", ["Model"])[0]
    base = re.sub(r"(ForCausalLM|ForSequenceClassification|Model)$", "", arch) or "Llama"
    if hf_config.get("model_type") == "gemma3_text":
        base = "Gemma3Text"
    hf_config.update(architectures=[f"{base}ForSequenceClassification"], num_labels=1,
                     id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0}, torch_dtype="float32",
                     pad_token_id=loaded.tokenizer.pad_id if loaded.tokenizer else hf_config.get("pad_token_id"))
    (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2))
    (out_dir / "rmjax.json").write_text(json.dumps({"base_model": run.model.name, "run_dir": run.run_dir}))
    if loaded.tokenizer is not None:  # a complete HF directory: rmjax and transformers load it alone
        loaded.tokenizer.save_hf(out_dir)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save((out_dir / "orbax").absolute(), full_params, force=True)
    checkpointer.wait_until_finished()
    return out_dir
