"""Bulk corpus scoring: implicit rewards (policy vs reference log-probs) and explicit RM scores.

    records -> per-model rendering (each model its own chat template and tokenizer)
            -> shards of consecutive examples (the unit of resumption and of output)
            -> length-bucketed batches of prompt groups (prompt once, responses on its KV cache)
            -> one parquet part per shard -> scores.parquet + metadata.json

Policy and reference sharing a tokenizer run in ONE jitted function over the same batches; with
different tokenizers each model encodes the text itself and the log-ratio is taken per sequence.
A shard's batches depend only on that shard's examples, so a killed run re-run with the same
command skips finished shards and gives exactly the rows of an uninterrupted run.
"""
from __future__ import annotations

import contextlib
import dataclasses
import sys
from typing import Any

import jax
import numpy as np

from rmjax import metrics
from rmjax import sharding as shd
from rmjax.data import batching, judge_prompts
from rmjax.data.batching import Encoded
from rmjax.data.chat import template_name
from rmjax.data.records import Record
from rmjax.errors import ConfigError, DataError
from rmjax.heads.reward import pooled_response
from rmjax.scoring import compute, packing
from rmjax.scoring.kv_path import judge_fn, pad_batch, paired_score_fn, rm_fn, score_fn


@dataclasses.dataclass
class ScoreSettings:
    beta: float = 1.0
    reduction: str = "sum"  # sum | mean: which sequence log-prob enters the implicit reward
    template: str = "model"  # the policy's (and the RM's) rendering
    reference_template: str = "model"  # the reference's rendering
    base_template: str = "raw"  # what "model" means for a model without a chat template (rmjax.data.chat)
    max_length: int = 1024
    over_length: str = "truncate"  # truncate (drop oldest prompt tokens) | drop
    batch_size: int = 8  # prompt groups per batch
    shard_size: int = 64  # examples per output part
    token_logprobs: bool = False
    # > 0: pack prompt trees into rows of this many tokens (prompt once, responses as branches);
    # 0: length-bucketed batches of ``batch_size`` prompts with responses on the prompts' KV cache
    pack_length: int = 512
    batch_tokens: int = 4096  # packed rows per batch = batch_tokens // pack_length
    buckets: tuple[int, ...] = batching.BUCKETS  # batches also sort by length
    # packed: fixed shapes from this ladder of row lengths (``batching.packed_batches``), for a server
    ladder: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class JudgeSpec:
    """How a generative judge reads a pair (``rmjax.data.judge_prompts``)."""

    labels: tuple[str, str]  # verdicts for the first / second response shown
    label_ids: tuple[int, int]  # the token each verdict reply starts with
    template: str  # the judge prompt (placeholders filled per pair and order)
    chat: str = "model"  # the chat rendering of the judge prompt


@dataclasses.dataclass
class ModelSlot:
    role: str  # policy | reference | rm | judge
    loaded: Any
    judge: JudgeSpec | None = None
    reward: Any = None  # rm: the reward head (rmjax.heads.reward.RewardHead; default the checkpoint's own)

    def __post_init__(self):
        if self.role == "rm" and self.reward is None:
            self.reward = self.loaded.reward_head
            if self.reward is None:
                raise ConfigError(f"--rm {self.loaded.source}: a causal language model, not a reward model (no "
                                  "reward head); score its implicit reward with --policy (and --reference), or "
                                  "use it as a --judge")

    @property
    def tokenizer(self):
        return self.loaded.tokenizer


def slot_template(slot: ModelSlot, s: ScoreSettings) -> str:
    """The rendering this model gets: its role's template, 'model' resolved for base models (an
    explicit RM without a chat template keeps ``plain``, the layout base-model RMs train on)."""
    if slot.judge is not None:
        return template_name(slot.tokenizer, slot.judge.chat, s.base_template)
    template = s.reference_template if slot.role == "reference" else s.template
    return template_name(slot.tokenizer, template, "plain" if slot.role == "rm" else s.base_template)


def encode(slot: ModelSlot, rec: Record, s: ScoreSettings) -> Encoded | str:
    """This model's token ids for the record, or the reason it is dropped. A judge's record is one
    tree: the judge prompt in both candidate orders, their shared beginning once."""
    if slot.judge is None and slot.reward is not None:  # a reward head: its pooling rule, its gating token
        enc = batching.encode(slot.tokenizer, rec, slot_template(slot, s), s.max_length, s.over_length,
                              name="rm ", gate=slot.reward.spec.gated)
        if isinstance(enc, str):
            return enc
        pad = slot.loaded.config.pad_token_id
        return dataclasses.replace(enc, responses=tuple(pooled_response(r, pad) for r in enc.responses))
    if slot.judge is None:
        return batching.encode(slot.tokenizer, rec, slot_template(slot, s), s.max_length, s.over_length,
                               name=f"{slot.role} ")
    if rec.kind != "pair":
        return f"{rec.id}: the judge compares two responses; it scores pair records only"
    j = slot.judge
    try:
        seqs = judge_prompts.judge_sequences(slot.tokenizer, rec, j.labels, slot_template(slot, s), j.template)
    except DataError as e:
        raise DataError(f"{rec.place or rec.id}: {e}") from None
    enc = batching.encode_sequences(seqs, 2 * s.max_length, s.over_length, name="judge ")  # it holds both responses
    return f"{rec.id}: {enc}" if isinstance(enc, str) else enc


def judge_spec(name: str, loaded, labels: tuple[str, ...] = (), template: str = "", chat: str = "model") -> JudgeSpec:
    """The judge settings of ``name``: an exported judge's rmjax.json (labels, chat and judge
    templates), else any causal LM as a zero-shot judge; arguments given override them."""
    import json
    from pathlib import Path

    meta = Path(name) / "rmjax.json"
    settings = json.loads(meta.read_text()).get("head", {}) if meta.is_file() else {}
    if loaded.score_head is not None:
        raise ConfigError(f"--judge {name}: a sequence-classification reward model, not a generative judge; "
                          "score it with --rm")
    labels = tuple(labels or settings.get("labels") or ("A", "B"))
    chat = settings.get("template", chat)
    text = judge_prompts.judge_template(template or judge_prompts.exported_template(name, settings))
    return JudgeSpec(labels, judge_prompts.label_ids(loaded.tokenizer, labels, chat), text, chat)


def batches(encoded: dict[int, Encoded], batch_size: int, buckets: tuple[int, ...]):
    """Batches of examples with similar lengths: sorted by (responses, prompt, response length),
    then cut into runs of ``batch_size``; each batch is padded to its own bucketed maxima."""
    key = lambda i: (len(encoded[i].responses), len(encoded[i].prompt), max(map(len, encoded[i].responses)))  # noqa: E731
    order = sorted(encoded, key=key)
    start = 0
    while start < len(order):
        n_resp = len(encoded[order[start]].responses)
        stop = start
        while stop < len(order) and stop - start < batch_size and len(encoded[order[stop]].responses) == n_resp:
            stop += 1
        yield order[start:stop]
        start = stop


def same_tokenizer(a, b) -> bool:
    return a.vocab_size == b.vocab_size and a.backend.to_str() == b.backend.to_str()


class Scorer:
    """Runs the models over shards of records and returns output rows."""

    def __init__(self, slots: list[ModelSlot], settings: ScoreSettings, mesh=None, strategy: str = "dp"):
        self.slots, self.s = slots, settings
        self.mesh, self.strategy = mesh, strategy
        # one mesh over several processes' devices: every process runs each batch, each feeding its
        # own devices' rows, and every process receives the whole result
        self.spans_processes = mesh is not None and any(d.process_index != jax.process_index()
                                                        for d in mesh.devices.flat)
        roles = {sl.role: sl for sl in slots}
        self.policy, self.reference, self.rm = roles.get("policy"), roles.get("reference"), roles.get("rm")
        if self.policy is None and self.rm is None and "judge" not in roles:
            raise ConfigError("give a --policy model (implicit reward / log-probs), an --rm model or a --judge")
        self.fused = (self.policy is not None and self.reference is not None
                      and same_tokenizer(self.policy.tokenizer, self.reference.tokenizer)
                      and slot_template(self.policy, settings) == slot_template(self.reference, settings))
        tok = settings.token_logprobs
        packed = settings.pack_length > 0
        pair_fn = packing.packed_pair_fn if packed else paired_score_fn
        single_fn = packing.packed_score_fn if packed else score_fn
        self.fns = {}
        self.shared_layers = 0
        if self.fused:
            pa, pb = self.policy.loaded, self.reference.loaded
            extra = {}
            if packed:  # an adapter on the last layers vs its base: the layers below run once for both
                self.shared_layers = extra["shared_layers"] = compute.shared_layers(pa.params, pb.params,
                                                                                    pa.config, pb.config)
            self.fns["pair"] = pair_fn(pa.config, pb.config, with_tokens=tok, **extra)
        for sl in slots:
            if sl.role == "judge":
                self.fns["judge"] = (packing.packed_judge_fn if packed else judge_fn)(sl.loaded.config)
            elif sl.role == "rm":
                self.fns["rm"] = (packing.packed_rm_fn if packed else rm_fn)(sl.loaded.config, sl.reward.spec)
            elif not self.fused:
                self.fns[sl.role] = single_fn(sl.loaded.config, with_tokens=tok and sl.role == "policy")
        self.real_tokens = 0
        self.padded_tokens = 0
        self.naive_tokens = 0

    def _place(self, batch: dict[str, np.ndarray]) -> dict:
        """Rows split over the mesh's data-parallel axes where they divide (else replicated)."""
        if self.mesh is None:
            return batch
        if self.spans_processes:  # each process places the rows of its own devices
            return {k: jax.make_array_from_callback(v.shape, shd.batch_sharding(self.mesh, v.shape),
                                                    lambda index, v=v: v[index]) for k, v in batch.items()}
        return {k: jax.device_put(v, shd.batch_sharding(self.mesh, v.shape)) for k, v in batch.items()}

    def _fetch(self, stats):
        if self.spans_processes:
            from jax.experimental import multihost_utils
            return multihost_utils.process_allgather(stats, tiled=True)
        return jax.device_get(stats)

    def _on_mesh(self):
        """The context the models run in: the scorer's mesh and strategy, if it has one."""
        return contextlib.nullcontext() if self.mesh is None else shd.activate(self.mesh, self.strategy)

    def _run(self, name: str, slot: ModelSlot, encoded: dict[int, Encoded], out: dict[int, dict]):
        with self._on_mesh():
            return self._run_batches(name, slot, encoded, out)

    def _call(self, name: str, slot: ModelSlot, batch: dict) -> list[tuple[str, dict]]:
        batch = self._place(batch)
        if name == "pair":
            res = self.fns["pair"](self.policy.loaded.params, self.reference.loaded.params, batch)
            return [("policy", res["policy"]), ("reference", res["reference"])]
        if name == "rm":
            return [("rm", self.fns["rm"](slot.loaded.params, slot.reward.params, batch))]
        if name == "judge":
            return [("judge", self.fns["judge"](slot.loaded.params, np.asarray(slot.judge.label_ids, np.int32), batch))]
        return [(name, self.fns[name](slot.loaded.params, None, batch))]

    def programs(self) -> list[tuple[str, ModelSlot]]:
        """The jitted functions a batch runs: (name, model slot)."""
        out = [("pair", self.policy)] if self.fused else []
        return out + [(sl.role, sl) for sl in self.slots if sl.role in ("rm", "judge") or not self.fused]

    def warm_up(self) -> int:
        """Compile every program for every shape of the settings' ladder (packed rows of fixed
        shapes) before the first request; returns how many (program, shape) pairs ran."""
        s = self.s
        if not s.ladder or s.pack_length <= 0:
            raise ConfigError("warm_up needs packed rows on a ladder of fixed shapes (settings.ladder)")
        n = 0
        with self._on_mesh():
            for name, slot in self.programs():
                pad = slot.tokenizer.pad_id or 0
                dummy = {0: Encoded(np.array([pad], np.int32), (np.array([pad], np.int32),))}
                for rows, length in batching.ladder_shapes(s.ladder, s.batch_tokens):
                    pb = batching.build_packed(dummy, [[0]], length, pad, n_rows=rows, slots=length, targets=length)
                    for _, stats in self._call(name, slot, pb.arrays):
                        jax.block_until_ready(stats)
                    n += 1
        return n

    def _run_batches(self, name: str, slot: ModelSlot, encoded: dict[int, Encoded], out: dict[int, dict]):
        s = self.s
        pad = slot.tokenizer.pad_id
        if s.pack_length > 0:
            for pb in packing.packed_batches(encoded, pad, row_length=s.pack_length,
                                             batch_tokens=s.batch_tokens, buckets=s.buckets, ladder=s.ladder):
                self.real_tokens += pb.real_tokens
                self.padded_tokens += pb.padded_tokens
                self.naive_tokens += sum(encoded[k].unshared_tokens for k in {q[0] for q in pb.sequences if q})
                for role, stats in self._call(name, slot, pb.arrays):
                    for key, per_example in packing.unpack(pb, self._fetch(stats)).items():
                        out.setdefault(key, {})[role] = per_example
            return
        for ids in batches(encoded, s.batch_size, s.buckets):
            exs = [encoded[i] for i in ids]
            rows = 1 << (len(ids) - 1).bit_length()  # 1, 2, 4, 8...: few shapes, few empty groups
            batch, real = pad_batch(exs, rows, pad, s.buckets)
            self.real_tokens += real
            self.padded_tokens += batch["prompt_ids"].size + batch["response_ids"].size
            self.naive_tokens += sum(e.unshared_tokens for e in exs)
            r = len(exs[0].responses)
            for role, stats in self._call(name, slot, batch):
                stats = self._fetch(stats)
                for g, i in enumerate(ids):
                    rows = slice(g * r, (g + 1) * r)
                    out.setdefault(i, {})[role] = {k: np.asarray(v)[rows] for k, v in stats.items()}

    def encode_records(self, records: list[Record]) -> tuple[dict[str, dict[int, Encoded]], dict[int, str], set[int]]:
        """Every model's token ids for the records: ({role: {index: Encoded}}, {index: drop reason},
        indices truncated). A record one model drops is dropped for all."""
        encoded: dict[str, dict[int, Encoded]] = {}
        dropped: dict[int, str] = {}
        truncated = set()
        for sl in self.slots:
            enc = {}
            for rec in records:
                e = encode(sl, rec, self.s)
                if isinstance(e, str):
                    dropped.setdefault(rec.index, e)
                else:
                    enc[rec.index] = e
                    if e.truncated:
                        truncated.add(rec.index)
            encoded[sl.role] = enc
        for enc in encoded.values():
            for i in dropped:
                enc.pop(i, None)
        return encoded, dropped, truncated

    def run_encoded(self, encoded: dict[str, dict[int, Encoded]]) -> dict[int, dict[str, dict]]:
        """Every model over encoded examples: {key: {role: per-response stats}}."""
        results: dict[int, dict] = {}
        if self.fused:
            self._run("pair", self.policy, encoded["policy"], results)
        for sl in self.slots:
            if sl.role in ("rm", "judge") or not self.fused:
                self._run(sl.role, sl, encoded[sl.role], results)
        return results

    def score_shard(self, records: list[Record]) -> tuple[list[dict], dict[int, str], list[dict]]:
        """Rows for the records (in order), {index: drop reason}, and per row the policy's per-token
        log-probs by response name (empty dicts unless settings.token_logprobs)."""
        encoded, dropped, truncated = self.encode_records(records)
        results = self.run_encoded(encoded)
        kept = [rec for rec in records if rec.index in results]
        rows = [self.row(rec, results[rec.index], rec.index in truncated) for rec in kept]
        tokens = [self.token_streams(rec, results[rec.index]) for rec in kept]
        return rows, dropped, tokens

    def token_streams(self, rec: Record, res: dict) -> dict[str, np.ndarray]:
        stats = res.get("policy", {})
        if "tokens" not in stats:
            return {}
        return {name: np.asarray(stats["tokens"][j][:int(stats["count"][j])], np.float32)
                for j, name in enumerate(rec.response_names)}

    def row(self, rec: Record, res: dict, truncated: bool) -> dict:
        s = self.s
        names = rec.response_names
        row: dict[str, Any] = {"index": rec.index, "id": rec.id, "kind": rec.kind, "truncated": truncated}
        for role, stats in res.items():
            if role == "judge":
                row.update(judge_columns(stats["judge"]))
                continue
            for j, name in enumerate(names):
                if role == "rm":
                    row[f"rm_{name}"] = float(stats["rm"][j])
                    if "rm_objectives" in stats:  # one column per objective: rm_chosen[helpfulness]
                        for k, objective in enumerate(self.rm.reward.spec.objectives):
                            row[f"rm_{name}[{objective}]"] = float(stats["rm_objectives"][j][k])
                    continue
                row[f"{role}_{name}_logp_sum"] = float(stats["sum"][j])
                row[f"{role}_{name}_logp_mean"] = float(stats["mean"][j])
                row[f"{role}_{name}_tokens"] = int(stats["count"][j])
        if "policy" in res:
            rewards = compute.implicit_rewards(res["policy"], res.get("reference"), s.beta, s.reduction)
            row.update({f"reward_{name}": float(r) for name, r in zip(names, rewards)})
            self._compare(row, rec, "", rewards)
        if "rm" in res:
            self._compare(row, rec, "rm_", np.asarray(res["rm"]["rm"]))
        return row

    @staticmethod
    def _compare(row: dict, rec: Record, prefix: str, scores: np.ndarray) -> None:
        """A pair's margin (chosen - rejected); a best-of-N record's RewardBench 2 score."""
        if rec.kind == "pair":
            row[f"{prefix}margin"] = float(scores[0] - scores[1])
        elif rec.kind == "best_of_n":
            row[f"{prefix}best_of_n"] = float(metrics.best_of_n_scores(scores[None])[0])


def judge_columns(logits: np.ndarray) -> dict[str, float]:
    """A judge's row: the verdict log-odds for chosen in each order (shown first, shown second), their
    mean (``judge_margin``, swap-debiased), GRAM's score (the mean over both orders of p(chosen's
    label), softmax over the two labels) and the position bias (the mean log-odds of the first label)."""
    z = np.asarray(logits, np.float64)  # [2 orders, 2 labels]
    first, second = z[0, 0] - z[0, 1], z[1, 1] - z[1, 0]
    sigmoid = lambda x: 1.0 / (1.0 + np.exp(-x))  # noqa: E731
    return {"judge_log_odds_chosen_first": float(first), "judge_log_odds_chosen_second": float(second),
            "judge_margin": float(compute.judge_margin(z)),
            "judge_p_chosen": float(0.5 * (sigmoid(first) + sigmoid(second))),
            "judge_position_bias": float(0.5 * (first - second))}


_SUMMARY_PARTS = (("", "implicit"), ("rm_", "rm"), ("judge_", "judge"))
SUMMARY_COLUMNS = ("judge_p_chosen", "judge_position_bias",
                   *(f"{prefix}{what}" for prefix, _ in _SUMMARY_PARTS for what in ("margin", "best_of_n")))


def summarise(rows: list[dict]) -> dict:
    """Pairwise accuracy (ties 0.5) and mean margin of the implicit reward, of the RM and of the
    judge (swap-debiased log-odds; also GRAM's rule, p(chosen) > 1/2, and the position bias), and the
    RewardBench 2 best-of-N accuracy of best-of-N records."""
    columns = {c: np.array([np.nan if r.get(c) is None else r[c] for r in rows], np.float64) for c in SUMMARY_COLUMNS}
    return _summary([(len(rows), columns)])


def summarise_table(path) -> dict:
    """``summarise`` of a score table, read a batch at a time (only the columns it needs): memory
    does not grow with the corpus."""
    import pyarrow.parquet as pq

    file = pq.ParquetFile(path)
    present = [c for c in SUMMARY_COLUMNS if c in file.schema_arrow.names]

    def batches():
        for batch in file.iter_batches(batch_size=65_536, columns=present or ["index"]):
            cols = {c: batch.column(c).to_numpy(zero_copy_only=False).astype(np.float64) for c in present}
            yield batch.num_rows, cols
    return _summary(batches())


def _summary(batches) -> dict:
    """The summary from (rows, {column: float array, NaN = none}) batches, accumulated: counts and sums."""
    sums: dict[str, list[float]] = {}  # column -> [n, sum of wins or scores, sum of values]
    rows = 0

    def add(name: str, values: np.ndarray, wins: np.ndarray | None = None) -> None:
        acc = sums.setdefault(name, [0, 0.0, 0.0])
        acc[0] += len(values)
        acc[1] += float((values if wins is None else wins).sum())
        acc[2] += float(values.sum())
    for n, cols in batches:
        rows += n
        for name, values in cols.items():
            values = values[~np.isnan(values)]  # other rows have no such value
            if name.endswith("margin") or name == "judge_p_chosen":
                shifted = values - 0.5 if name == "judge_p_chosen" else values
                add(name, values, metrics.pairwise_wins(shifted))
            else:
                add(name, values)
    out: dict[str, Any] = {"examples": rows}
    if sums.get("judge_p_chosen", [0])[0]:
        n, wins, _ = sums["judge_p_chosen"]
        out["judge_p_chosen_accuracy"] = wins / n
        n, _, total = sums["judge_position_bias"]
        out["judge_mean_position_bias"] = total / n
    for prefix, name in _SUMMARY_PARTS:
        n, wins, total = sums.get(f"{prefix}margin", [0, 0.0, 0.0])
        if n:
            out[f"{name}_pairwise_accuracy"] = wins / n
            out[f"{name}_pairwise_accuracy_ci95"] = list(metrics.wilson(wins / n, n))
            out[f"{name}_mean_margin"] = total / n
            out[f"{name}_pairs"] = int(n)
        n, total, _ = sums.get(f"{prefix}best_of_n", [0, 0.0, 0.0])
        if n:
            out[f"{name}_best_of_n_accuracy"] = total / n
            out[f"{name}_best_of_n_examples"] = int(n)
    return out


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
