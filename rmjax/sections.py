"""The config sections jobs share, each knob declared once (``rmjax.config``).

    ModelSection   a model by name and how it runs (``Numerics``: dtypes, remat, attention kernel)
    RenderSection  how a record is rendered for a model: template, length, what a longer one gets
    DataSection    how records are read (columns, ratings, split, errors) and rendered
    BatchSection   the batch layout: ``packed`` prompt trees, ``padded`` rows or the prompt's ``kv`` cache,
                   and the row length (``ScoringBatch`` adds how much goes in a batch)
    MeshSection    the sharding strategy and mesh shape
"""
from __future__ import annotations

import dataclasses

from rmjax import sharding as shd
from rmjax.config import knob
from rmjax.data.chat import TEMPLATE_CHOICES
from rmjax.data.records import parse_columns
from rmjax.errors import ConfigError
from rmjax.models.config import Numerics
from rmjax.sharding import RULES

LAYOUTS = ("packed", "padded", "kv")
STRATEGIES = ("none", *RULES)  # none: one device


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelSection(Numerics):
    """A model by name and how it runs (``rmjax.models.loading.load_model(section.name, section)``)."""

    name: str = knob("smollm2-135m-instruct", "registry name, HF checkpoint dir, .gguf file or BASE+ADAPTER_DIR")


@dataclasses.dataclass(kw_only=True)
class RenderSection:
    """How a record is rendered for a model (``rmjax.data.chat``) and held to a length."""

    max_length: int = knob(512, "tokens per sequence (prompt + its longest response); see over_length")
    over_length: str = knob("truncate", "a longer sequence: truncate (drop the oldest prompt tokens) or drop "
                                        "the example (counted)", ("truncate", "drop"))
    template: str = knob("model", "chat rendering (rmjax.data.chat): the model's own template, plain (HH-RLHF "
                                  "transcripts), raw (the bare prompt), or a built-in", TEMPLATE_CHOICES)

    def check(self) -> list[tuple[bool, str]]:
        return [(self.max_length >= 8, "data.max_length must be at least 8")]


@dataclasses.dataclass(kw_only=True)
class DataSection(RenderSection):
    """How records are read (``rmjax.data.records``) and rendered for a model (``rmjax.data.chat``)."""

    split: str = knob("", "split of a DatasetDict directory ('' for a file or a single Dataset)")
    columns: str = knob("", "column mapping FIELD=COLUMN,... for inputs in another layout, e.g. "
                            "prompt=question,chosen=response_a,rejected=response_b")
    ratings: tuple[str, ...] = knob((), "flat rating columns read as a single response's ratings (HelpSteer2)")
    on_error: str = knob("skip", "a bad record: skip it (counted, reported) or fail", ("skip", "fail"))

    def check(self) -> list[tuple[bool, str]]:
        try:
            parse_columns(self.columns)
            columns_ok, message = True, ""
        except ConfigError as e:
            columns_ok, message = False, f"data.columns: {e}"
        return [(columns_ok, message), *super().check()]

    def read_options(self) -> dict:
        """``read_records`` / ``read_share`` keyword arguments."""
        return {"split": self.split or None, "columns": self.columns, "ratings": tuple(self.ratings)}


@dataclasses.dataclass(kw_only=True)
class BatchSection:
    """The batch layout of a job that runs a model over records."""

    layout: str = knob("packed", "packed: prompt trees packed into rows (each prompt once, its responses as "
                                 "attention branches); padded: one row per sequence; kv: each prompt once, its "
                                 "responses batched on its KV cache", LAYOUTS)
    row_length: int = knob(0, "packed: tokens per row (a longer tree gets a row of its own); 0: the job's default")

    def check(self) -> list[tuple[bool, str]]:
        return [(self.row_length >= 0, "batch.row_length must be 0 (the job's default) or positive")]


@dataclasses.dataclass(kw_only=True)
class ScoringBatch(BatchSection):
    """A scoring job's batches: how much goes in one."""

    batch_tokens: int = knob(4096, "packed: tokens per batch (rows = batch_tokens // row_length)")
    batch_size: int = knob(8, "kv: prompts per batch; packed evaluation: rows per batch")

    def check(self) -> list[tuple[bool, str]]:
        return [*super().check(), (self.batch_tokens > 0 and self.batch_size > 0,
                                   "batch.batch_tokens and batch.batch_size must be positive")]


@dataclasses.dataclass(kw_only=True)
class MeshSection:
    """Mesh axis sizes: 0 = the strategy's default shape (``sharding.DEFAULT_MESH_SHAPES``), -1 = every
    device left over."""

    strategy: str = knob("none", "how params and batches are sharded over the devices (rmjax.sharding.RULES); "
                                 "none: one device", STRATEGIES)
    data: int = knob(0, "data-parallel axis size")
    fsdp: int = knob(0, "fully sharded data-parallel axis size")
    tensor: int = knob(0, "tensor-parallel axis size")
    sequence: int = knob(0, "sequence (context) parallel axis size")

    def sizes(self) -> dict[str, int]:
        return {a: getattr(self, a) for a in ("data", "fsdp", "tensor", "sequence") if getattr(self, a)}

    def mesh(self, devices=None):
        """The mesh (None for strategy none)."""

        if self.strategy == "none":
            return None
        return shd.make_mesh(shd.MeshConfig.for_strategy(self.strategy, **self.sizes()), devices=devices)
