"""The training job's config (``rmjax train``; its run is ``rmjax.train.loop.run``): any head x loss on
any preference data.

    config = load_config("experiments/rm_ablation/base.yaml", ["optim.lr=3e-5", "data.train=hh-rlhf:harmless"])
    result = rmjax.train.loop.run(config)

Typed sections (``rmjax.config``: YAML + dotted ``key=value`` overrides, validated on load; an unknown
key names the file or override and the closest valid key); the resolved config is saved as
``config.yaml`` in every run directory.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from rmjax import config as rconfig
from rmjax.config import knob, section
from rmjax.data.judge_prompts import judge_template
from rmjax.errors import ConfigError
from rmjax.sections import BatchSection, DataSection, MeshSection, ModelSection
from rmjax.sharding import RULES
from rmjax.train.objectives import check_combination

HEAD_KINDS = ("scalar", "multi_objective", "armorm", "judge", "lm")
LOSS_KINDS = ("bt", "mse", "ce", "dpo", "nll")


@dataclasses.dataclass(kw_only=True)
class TrainData(DataSection):
    train: tuple[str, ...] = knob(("hh-rlhf:helpful",), "training inputs, as rmjax score --data takes them: files, "
                                                          "datasets dirs, hh-rlhf[:SUBSETS], llmbar[:SUBSETS]")
    eval: tuple[str, ...] = knob((), "evaluation inputs; empty: hold out data.holdout of the training data instead")
    holdout: float = knob(200, ">= 1: that many training examples held out; < 1: that fraction (never trained on)")
    fraction: float = knob(1.0, "data quantity ablation: the fraction of the training pool used")
    shuffle_seed: int = knob(0, "the seed of the hold-out split and the data order")


@dataclasses.dataclass(kw_only=True)
class HeadSection:
    kind: str = knob("scalar", "the head (rmjax.train.objectives): scalar | multi_objective | armorm | judge | lm", HEAD_KINDS)
    objectives: tuple[str, ...] = knob((), "multi_objective / armorm: objective names (empty: from the data)")
    regression_from: str = knob("", "armorm: the multi_objective run's final/ dir (its frozen regression)")
    gate_hidden: int = knob(1024, "armorm: the gate's hidden width")
    gate_layers: int = knob(3, "armorm: the gate's hidden layers")
    gate_temperature: float = knob(10.0, "armorm: the gate's softmax temperature")
    judge_labels: tuple[str, ...] = knob(("A", "B"), "judge: the verdict tokens for the first / second response")
    judge_template: str = knob("rmjax", "judge: rmjax | gram | a template file (rmjax.data.judge_prompts)")


@dataclasses.dataclass(kw_only=True)
class OptimSection:
    lr: float = knob(1e-4, "peak learning rate (AdamW, linear warm-up, cosine decay to 0.1 x)")
    warmup_steps: int = knob(10, "linear warm-up steps")
    weight_decay: float = knob(0.0, "AdamW weight decay")
    b1: float = knob(0.9, "AdamW beta1")
    b2: float = knob(0.999, "AdamW beta2")
    clip_norm: float = knob(1.0, "global gradient-norm clip")


@dataclasses.dataclass(kw_only=True)
class LossSection:
    kind: str = knob("bt", "bt (Bradley-Terry) | mse | ce (judge) | dpo | nll (LM loss: GRAM pair pretraining)",
                     LOSS_KINDS)
    margin: float = knob(0.0, "bt: added to every pair's own margin field")
    label_smoothing: float = knob(0.0, "bt / ce: the soft target of the preferred side is 1 - label_smoothing / 2 "
                                       "(torch's CrossEntropyLoss over two classes); dpo: the flip probability of "
                                       "conservative DPO")
    judge_normalize: str = knob("labels", "ce: softmax over the two verdict tokens (GRAM) or the whole vocabulary",
                                ("labels", "vocab"))
    center_coef: float = knob(0.0, "bt: reward centring")
    beta: float = knob(0.1, "dpo: the implicit reward's beta")
    reference: str = knob("", "dpo: the frozen reference model ('' = the policy as loaded)")


@dataclasses.dataclass(kw_only=True)
class TrainSection:
    steps: int = knob(100, "optimizer steps; replaced by the epochs rule when epochs > 0")
    epochs: float = knob(0.0, "> 0: steps = ceil(epochs x training examples / batch_size), so the data quantity "
                              "(data.fraction) sets the training length")
    batch_size: int = knob(8, "pairs per optimizer step (over all devices), split into grad_accum micro-batches")
    grad_accum: int = knob(1, "micro-batches per optimizer step")
    trainable: str = knob("lora", "what trains besides the head: head | last_k | lora | full",
                          ("head", "last_k", "lora", "full"))
    last_k: int = knob(2, "last_k: how many top layers train")
    lora_rank: int = knob(8, "lora: the adapters' rank")
    lora_alpha: float = knob(16.0, "lora: the adapters' alpha (scale alpha / rank)")
    lora_layers: int = knob(0, "lora on the last n layers only (0 = every layer; PEFT's layers_to_transform): the "
                               "layers below run once without a backward pass")
    seed: int = knob(0, "initialisation seed")
    eval_every: int = knob(50, "evaluate every n steps")
    eval_on_start: bool = knob(False, "also evaluate the model before the first step (the untrained baseline; "
                                      "result.json eval_start)")
    save_every: int = knob(50, "checkpoint every n steps")
    keep_checkpoints: int = knob(2, "checkpoints kept (0 = every one: checkpoint trajectories)")
    log_every: int = knob(10, "log metrics every n steps")


@dataclasses.dataclass(kw_only=True)
class TrainConfig:
    run_dir: str = knob("runs/rm", "the run directory (config, metrics, checkpoints, final/)")
    model: ModelSection = section(ModelSection, dtype="bfloat16")  # bf16 compute, fp32 master weights
    data: TrainData = section(TrainData)
    batch: BatchSection = section(BatchSection)
    head: HeadSection = section(HeadSection)
    optim: OptimSection = section(OptimSection)
    loss: LossSection = section(LossSection)
    train: TrainSection = section(TrainSection)
    mesh: MeshSection = section(MeshSection, strategy="fsdp")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def row_length(self) -> int:
        """Packed rows' length: batch.row_length, or 2 x data.max_length (a pair's prompt and both replies)."""
        return self.batch.row_length or 2 * self.data.max_length

    def check(self) -> list[tuple[bool, str]]:
        t, d, b = self.train, self.data, self.batch
        return [
            (self.mesh.strategy in RULES, f"mesh.strategy must be one of {list(RULES)} for training"),
            (b.layout in ("packed", "padded"), "batch.layout must be packed or padded for training"),
            (0 < d.fraction <= 1, "data.fraction must be in (0, 1]"),
            (bool(d.train), "data.train must name at least one input"),
            (d.holdout > 0 or bool(d.eval), "data.holdout must be positive when data.eval is empty"),
            (d.holdout < 1 or float(d.holdout).is_integer(), "data.holdout is a count (>= 1) or a fraction (< 1)"),
            (b.row_length == 0 or b.row_length >= d.max_length,
             "batch.row_length must be 0 (= 2 x data.max_length) or at least data.max_length"),
            (t.steps > 0, "train.steps must be positive"),
            (t.epochs >= 0, "train.epochs must be 0 (use train.steps) or positive"),
            (t.keep_checkpoints >= 0, "train.keep_checkpoints must be 0 (keep all) or positive"),
            (t.grad_accum >= 1 and t.batch_size % t.grad_accum == 0,
             "train.batch_size must be a positive multiple of train.grad_accum"),
            (self.optim.lr > 0, "optim.lr must be positive"),
            (0 <= self.loss.label_smoothing < 1, "loss.label_smoothing must be in [0, 1)"),
            (t.lora_rank > 0 or t.trainable != "lora", "train.lora_rank must be positive for trainable=lora"),
            (t.lora_layers >= 0, "train.lora_layers must be 0 (every layer) or positive"),
            (t.last_k >= 1 or t.trainable != "last_k", "train.last_k must be positive for trainable=last_k"),
        ]


def validate(config: TrainConfig, where: str = "config") -> TrainConfig:
    """Every field and section checked, the head x loss combination trainable, the judge template readable."""

    rconfig.validate(config, where)
    check_combination(config, where)
    if config.head.kind == "judge":
        try:
            judge_template(config.head.judge_template)
        except ConfigError as e:
            raise ConfigError(f"{where}: head.judge_template: {e}") from None
    return config


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> TrainConfig:
    config = rconfig.apply(TrainConfig(), path, overrides)
    return validate(config, str(path) if path else "config")


def save_config(config: TrainConfig, path: str | Path) -> None:
    rconfig.save(config, path)
