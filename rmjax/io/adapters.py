"""LoRA adapters in PEFT's layout: ``adapter_config.json`` + ``adapter_model.safetensors``.

Tensor names are PEFT's: ``base_model.model.<module>.lora_A.weight`` [r, in] and ``.lora_B.weight``
[out, r] for each adapted linear layer (Hugging Face names, e.g. ``model.layers.0.self_attn.q_proj``),
and ``base_model.model.<module>.weight`` for modules saved whole (``modules_to_save``, e.g. the
``score`` head of a reward model). The update is W + (lora_alpha / r) * B @ A, in the HF layout.

A model argument names an adapter as ``BASE+ADAPTER_DIR`` or as an adapter directory alone (its
``base_model_name_or_path`` is the base); ``AdapterCheckpoint`` reads the base with the update
merged into each adapted weight, so everything that loads a checkpoint loads an adapted one, and
``merge`` writes the merged weights as a full Hugging Face checkpoint.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from rmjax.errors import CheckpointError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).exists()


def read_config(directory: str | Path) -> dict:
    path = Path(directory) / ADAPTER_CONFIG
    try:
        config = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read the adapter config ({e})") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{path}: peft_type {config.get('peft_type')!r} is not supported; only LORA adapters")
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), (int, float)):
            raise CheckpointError(f"{path}: field {key!r} is missing or not a number")
    if config.get("use_dora") or config.get("use_rslora"):
        raise CheckpointError(f"{path}: DoRA / rsLoRA adapters are not supported (use_dora / use_rslora)")
    return config


def write(directory: str | Path, tensors: dict[str, np.ndarray], *, rank: int, alpha: float, targets: list[str],
          base: str, task_type: str, modules_to_save: list[str] = (), layers: list[int] | None = None) -> Path:
    """Write an adapter directory ``peft.PeftModel.from_pretrained`` loads; ``tensors`` by PEFT name;
    ``layers``: the decoder layers adapted when not all of them (``layers_to_transform``)."""
    from safetensors.numpy import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "task_type": task_type, "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0,
              "target_modules": sorted(targets), "bias": "none", "fan_in_fan_out": False,
              "base_model_name_or_path": base, "modules_to_save": list(modules_to_save) or None,
              "inference_mode": True, "init_lora_weights": True, "use_dora": False, "use_rslora": False}
    if layers is not None:
        config.update(layers_to_transform=list(layers), layers_pattern="layers")
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}, str(directory / ADAPTER_WEIGHTS))
    return directory


class AdapterCheckpoint:
    """A base checkpoint with a LoRA adapter merged on read (HF names and layout, like the base)."""

    def __init__(self, base, directory: str | Path):
        from safetensors.numpy import load_file

        self.base, self.directory = base, Path(directory)
        self.adapter = read_config(directory)
        path = self.directory / ADAPTER_WEIGHTS
        if not path.exists():
            raise CheckpointError(f"{path}: adapter weights not found")
        tensors = load_file(str(path))
        self.scale = float(self.adapter["lora_alpha"]) / float(self.adapter["r"])
        self.factors: dict[str, dict[str, np.ndarray]] = {}
        self.whole: dict[str, np.ndarray] = {}
        for name, value in tensors.items():
            if not name.startswith(PREFIX):
                raise CheckpointError(f"{path}: tensor {name!r} is not in PEFT's layout ({PREFIX}...)")
            name = name[len(PREFIX):].replace(".modules_to_save.default.", ".")
            for part in ("lora_A", "lora_B"):
                marker = f".{part}."
                if marker in name:
                    module = name.split(marker)[0]
                    self.factors.setdefault(module + ".weight", {})[part] = value.astype(np.float32)
                    break
            else:
                self.whole[name] = value.astype(np.float32)
        names = set(base.tensor_names())
        unknown = sorted(n for n in self.factors if n not in names)
        if unknown:
            raise CheckpointError(f"{self.directory}: the adapter changes {unknown[:3]} which the base checkpoint "
                                  "does not have; is it the adapter of another model?")
        self.config = dict(base.config)
        if "score.weight" in self.whole:  # a reward model: the base with the saved score head
            arch = self.config.get("architectures", ["LlamaForCausalLM"])[0]
            self.config["architectures"] = [arch.replace("ForCausalLM", "ForSequenceClassification")]
            self.config["num_labels"] = int(self.whole["score.weight"].shape[0])

    def tensor_names(self) -> list[str]:
        return list(dict.fromkeys([*self.base.tensor_names(), *self.whole]))

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.whole[name].shape) if name in self.whole else tuple(self.base.tensor_shape(name))

    def read(self, name: str) -> np.ndarray:
        if name in self.whole:
            return self.whole[name]
        w = self.base.read(name)
        ab = self.factors.get(name)
        if ab is None:
            return w
        if set(ab) != {"lora_A", "lora_B"}:
            raise CheckpointError(f"{self.directory}: {name} has only {sorted(ab)}; an adapted layer needs both")
        return (w + self.scale * (ab["lora_B"] @ ab["lora_A"])).astype(w.dtype)


def split_spec(text: str) -> tuple[str, Path] | None:
    """``BASE+ADAPTER_DIR`` -> (base, adapter dir), or None when ``text`` is no such pair."""
    base, plus, adapter = text.rpartition("+")
    if plus and base and is_adapter_dir(adapter):
        return base, Path(adapter)
    return None


def merge(model: str, out_dir: str | Path) -> Path:
    """Write ``model`` (``BASE+ADAPTER`` or an adapter dir) with its adapter merged, as a complete
    Hugging Face checkpoint directory (config.json, model.safetensors, tokenizer files)."""
    from safetensors.numpy import save_file

    # registry reads BASE+ADAPTER names through this module, so this one imports it late
    from rmjax.io import registry

    source = registry.resolve_model(model)
    if source.kind != "adapter":
        raise CheckpointError(f"{model}: not an adapter; give BASE+ADAPTER_DIR or an adapter directory")
    ckpt = registry.open_checkpoint(source)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({n: np.ascontiguousarray(ckpt.read(n), np.float32) for n in ckpt.tensor_names()},
              str(out_dir / "model.safetensors"))
    config = {k: v for k, v in ckpt.config.items() if not k.startswith("_")}
    (out_dir / "config.json").write_text(json.dumps({**config, "torch_dtype": "float32"}, indent=2))
    registry.load_tokenizer(source).save_hf(out_dir)
    return out_dir
