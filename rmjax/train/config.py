"""Training configuration: plain dataclasses, YAML + dotted ``key=value`` overrides, validated on load.

    config = load_config("experiments/rm_ablation/base.yaml", ["optim.lr=3e-5", "data.train=hh-rlhf:harmless"])

An unknown key is an error that names the file (or the override) and the closest valid key.
The resolved config is saved as ``config.yaml`` in every run directory.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from pathlib import Path
from typing import Any

import yaml

from rmjax.errors import ConfigError
from rmjax.models.config import ATTENTION_BACKENDS
from rmjax.sharding import RULES


@dataclasses.dataclass
class ModelSection:
    name: str = "smollm2-135m-instruct"  # registry name, HF checkpoint dir or .gguf
    dtype: str = "bfloat16"  # compute dtype; master weights stay in param_dtype
    param_dtype: str = "float32"
    remat: str = "none"  # none | full | dots | dots_no_batch
    attention: str = "auto"  # auto | blockwise | naive | cudnn | splash (rmjax.models.attention)
    attention_block_q: int = 512  # blockwise kernel block sizes
    attention_block_k: int = 512

    def load_options(self) -> dict:
        """``load_model`` keyword arguments for the numerics and kernels of this section."""
        return {"dtype": self.dtype, "param_dtype": self.param_dtype, "remat_policy": self.remat,
                "attention": self.attention, "attention_block_q": self.attention_block_q,
                "attention_block_k": self.attention_block_k}


@dataclasses.dataclass
class DataSection:
    # inputs, as ``rmjax score --data`` takes them: files, datasets dirs, hh-rlhf[:SUBSETS], llmbar[:SUBSETS]
    train: tuple[str, ...] = ("hh-rlhf:helpful",)
    eval: tuple[str, ...] = ()  # empty: hold out ``holdout`` examples of the training data instead
    holdout: float = 200  # >= 1: that many examples; < 1: that fraction (never trained on)
    fraction: float = 1.0  # data quantity ablation: fraction of the training pool used
    max_length: int = 512
    over_length: str = "truncate"  # truncate (keep the end of the prompt) | drop
    template: str = "model"  # chat rendering (rmjax.data.chat)
    on_error: str = "skip"  # bad records: skip (counted, reported) | fail
    columns: str = ""  # column mapping for every input, FIELD=COLUMN,... (e.g. prompt=question,chosen=response_a)
    ratings: tuple[str, ...] = ()  # flat rating columns read as a single response's ratings (HelpSteer2)
    shuffle_seed: int = 0


@dataclasses.dataclass
class HeadSection:
    kind: str = "scalar"  # scalar | multi_objective | armorm | judge | lm (see rmjax.train.heads)
    objectives: tuple[str, ...] = ()  # multi_objective / armorm: objective names (empty: from the data)
    regression_from: str = ""  # armorm: the multi_objective run's final/ dir (its frozen regression)
    gate_hidden: int = 1024
    gate_layers: int = 3
    gate_temperature: float = 10.0
    judge_labels: tuple[str, ...] = ("A", "B")  # judge: the verdict tokens for the first / second response
    judge_template: str = "rmjax"  # judge: rmjax | gram | a template file (rmjax.data.judge)


@dataclasses.dataclass
class OptimSection:
    lr: float = 1e-4
    warmup_steps: int = 10
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    clip_norm: float = 1.0


@dataclasses.dataclass
class LossSection:
    kind: str = "bt"  # bt (Bradley-Terry) | mse | ce (judge) | dpo | nll (LM loss: GRAM pair pretraining)
    margin: float = 0.0  # bt: added to every pair's own margin field
    # bt / ce: the soft target of the preferred side is 1 - label_smoothing / 2 (torch's CrossEntropyLoss
    # label_smoothing over two classes); dpo: the flip probability of conservative DPO
    label_smoothing: float = 0.0
    judge_normalize: str = "labels"  # ce: softmax over the two verdict tokens (GRAM) | vocab (the whole vocabulary)
    center_coef: float = 0.0  # bt: reward centring
    beta: float = 0.1  # dpo
    reference: str = ""  # dpo: the frozen reference model ("" = the policy as loaded)


@dataclasses.dataclass
class TrainSection:
    steps: int = 100  # optimizer steps; replaced by the epochs rule below when epochs > 0
    # > 0: steps = ceil(epochs x training examples / batch_size), so the data quantity (data.fraction)
    # sets the training length: every example is seen ``epochs`` times whatever the fraction
    epochs: float = 0.0
    batch_size: int = 8  # pairs per optimizer step (over all devices), split into grad_accum micro-batches
    grad_accum: int = 1
    trainable: str = "lora"  # head | last_k | lora | full
    last_k: int = 2
    lora_rank: int = 8
    lora_alpha: float = 16.0
    # LoRA on the last n layers only (0 = every layer; PEFT's layers_to_transform): the layers below
    # run once without a backward pass, and for DPO against the model as loaded the reference shares them
    lora_layers: int = 0
    pack: bool = True  # prompt trees packed into rows (the prompt once); false: padded [2b, T] batches
    pack_length: int = 0  # packed row length (0 = data.max_length)
    seed: int = 0
    eval_every: int = 50
    save_every: int = 50
    keep_checkpoints: int = 2  # 0 = keep every saved checkpoint (checkpoint trajectories)
    log_every: int = 10


@dataclasses.dataclass
class MeshSection:
    """Mesh axis sizes: 0 = the strategy's default shape (``sharding.DEFAULT_MESH_SHAPES``, e.g.
    fsdp_tp: tensor 2, fsdp_sp: sequence 2, the rest fsdp), -1 = every device left over."""

    strategy: str = "fsdp"
    data: int = 0
    fsdp: int = 0
    tensor: int = 0
    sequence: int = 0

    def sizes(self) -> dict[str, int]:
        return {a: getattr(self, a) for a in ("data", "fsdp", "tensor", "sequence") if getattr(self, a)}


@dataclasses.dataclass
class RunConfig:
    run_dir: str = "runs/rm"
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    head: HeadSection = dataclasses.field(default_factory=HeadSection)
    optim: OptimSection = dataclasses.field(default_factory=OptimSection)
    loss: LossSection = dataclasses.field(default_factory=LossSection)
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    mesh: MeshSection = dataclasses.field(default_factory=MeshSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_CHOICES = {
    "model.dtype": ("float32", "bfloat16"),
    "model.param_dtype": ("float32", "bfloat16"),
    "model.remat": ("none", "full", "dots", "dots_no_batch"),
    "model.attention": ATTENTION_BACKENDS,
    "data.over_length": ("truncate", "drop"),
    "data.on_error": ("skip", "fail"),
    "head.kind": ("scalar", "multi_objective", "armorm", "judge", "lm"),
    "loss.kind": ("bt", "mse", "ce", "dpo", "nll"),
    "loss.judge_normalize": ("labels", "vocab"),
    "train.trainable": ("head", "last_k", "lora", "full"),
    "mesh.strategy": tuple(RULES),
}


def _strings(text: str) -> Any:
    """YAML with every scalar kept as text: each field's type decides (so 'No' stays a label)."""
    return yaml.load(text, Loader=yaml.BaseLoader)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    try:
        if hint is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        if hint in (int, float):
            if isinstance(value, bool):
                raise ValueError(value)
            out = hint(value)
            if hint is int and isinstance(value, float) and value != out:
                raise ValueError(value)
            return out
        if hint is str:
            return str(value)
        if origin is tuple:
            if isinstance(value, str) and typing.get_args(hint)[0] is str and not value.startswith("["):
                return (value,)  # one input, e.g. hh-rlhf:helpful-base,helpful-online
            if isinstance(value, str):
                value = _strings(value if value.startswith("[") else f"[{value}]")
            (item,) = {a for a in typing.get_args(hint) if a is not Ellipsis}
            return tuple(_coerce(v, item, where) for v in value)
    except (TypeError, ValueError):
        pass
    else:
        raise ConfigError(f"{where}: unsupported field type {hint}")
    raise ConfigError(f"{where}: {value!r} is not a valid {getattr(hint, '__name__', hint)}")


def _set(obj: Any, dotted: str, value: Any, where: str) -> None:
    *parents, leaf = dotted.split(".")
    path = []
    for name in parents + [leaf]:
        fields = {f.name: f for f in dataclasses.fields(obj)}
        if name not in fields:
            prefix = ".".join(path)
            options = [f"{prefix}.{f}" if prefix else f for f in fields]
            close = difflib.get_close_matches(".".join(path + [name]), options, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys here: {sorted(options)}"
            raise ConfigError(f"{where}: unknown key {'.'.join(path + [name])!r}{hint}")
        path.append(name)
        if name != leaf:
            obj = getattr(obj, name)
            if not dataclasses.is_dataclass(obj):
                raise ConfigError(f"{where}: {'.'.join(path)!r} is a value, not a section")
    hints = typing.get_type_hints(type(obj))
    if dataclasses.is_dataclass(getattr(obj, leaf)):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {dotted!r} is a section; give a mapping")
        for k, v in value.items():
            _set(getattr(obj, leaf), k, v, where)
        return
    setattr(obj, leaf, _coerce(value, hints[leaf], f"{where}: {dotted}"))


def _flatten(d: dict, prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.extend(_flatten(v, key + ".") if isinstance(v, dict) else [(key, v)])
    return out


def validate(config: RunConfig, where: str = "config") -> RunConfig:
    from rmjax.data.records import parse_columns

    try:
        parse_columns(config.data.columns)
    except ConfigError as e:
        raise ConfigError(f"{where}: data.columns: {e}") from None
    for key, allowed in _CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        if value not in allowed:
            raise ConfigError(f"{where}: {key}={value!r} is not one of {list(allowed)}")
    t, d = config.train, config.data
    checks = [
        (0 < d.fraction <= 1, "data.fraction must be in (0, 1]"),
        (config.model.attention_block_q > 0 and config.model.attention_block_k > 0,
         "model.attention_block_q and model.attention_block_k must be positive"),
        (bool(d.train), "data.train must name at least one input"),
        (d.holdout > 0 or d.eval, "data.holdout must be positive when data.eval is empty"),
        (d.holdout < 1 or float(d.holdout).is_integer(), "data.holdout is a count (>= 1) or a fraction (< 1)"),
        (t.pack_length == 0 or t.pack_length >= d.max_length,
         "train.pack_length must be 0 (= data.max_length) or at least data.max_length"),
        (t.steps > 0, "train.steps must be positive"),
        (t.epochs >= 0, "train.epochs must be 0 (use train.steps) or positive"),
        (t.keep_checkpoints >= 0, "train.keep_checkpoints must be 0 (keep all) or positive"),
        (t.grad_accum >= 1 and t.batch_size % t.grad_accum == 0,
         "train.batch_size must be a positive multiple of train.grad_accum"),
        (config.optim.lr > 0, "optim.lr must be positive"),
        (0 <= config.loss.label_smoothing < 1, "loss.label_smoothing must be in [0, 1)"),
        (d.max_length >= 8, "data.max_length must be at least 8"),
        (t.lora_rank > 0 or t.trainable != "lora", "train.lora_rank must be positive for trainable=lora"),
        (t.lora_layers >= 0, "train.lora_layers must be 0 (every layer) or positive"),
        (t.last_k >= 1 or t.trainable != "last_k", "train.last_k must be positive for trainable=last_k"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"{where}: {message}")
    from rmjax.train.heads import check_combination
    check_combination(config, where)
    if config.head.kind == "judge":
        from rmjax.data.judge import judge_template
        try:
            judge_template(config.head.judge_template)
        except ConfigError as e:
            raise ConfigError(f"{where}: head.judge_template: {e}") from None
    return config


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    config = RunConfig()
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"{path}: config file not found")
        try:
            data = _strings(path.read_text("utf-8")) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}{line}: invalid YAML ({getattr(e, 'problem', e)})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        for key, value in _flatten(data):
            _set(config, key, value, str(path))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected dotted.key=value, e.g. optim.lr=3e-5")
        key, value = item.split("=", 1)
        _set(config, key.strip(), _strings(value) if value else "", f"override {item!r}")
    return validate(config, str(path) if path else "config")


def plain(config: RunConfig) -> dict:
    """The config as plain YAML-able types (tuples as lists)."""
    return yaml.safe_load(yaml.safe_dump(_lists(config.to_dict())))


def _lists(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _lists(v) for k, v in value.items()}
    return [_lists(v) for v in value] if isinstance(value, (list, tuple)) else value


def save_config(config: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(plain(config), sort_keys=False))
