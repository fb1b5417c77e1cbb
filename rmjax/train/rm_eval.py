"""``rmjax eval-rm``: any reward model on any dataset, RewardBench style.

    evaluate_rm(model=..., data=("llmbar",))                 an explicit RM (any exported head, any HF
                                                             *ForSequenceClassification, BASE+ADAPTER)
    evaluate_rm(policy=P, reference=R, beta=, reduction=)    the implicit reward beta * (log pi - log pi_ref)
    evaluate_rm(policy=P, reference="")                      reference-free: beta * log pi (sum or mean)

The model runs over the same batches and head outputs as training (``rmjax.train.heads``), packed
prompt trees by default or padded rows (``pack_length=0``, with ``batch_size`` and ``padding_side``);
neither changes a reward. Pairs and best-of-N records score by ``rmjax.train.evaluate`` (ties 0.5;
RewardBench 2's best-of-N rule); rating records give the MSE per objective.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import jax

from rmjax import sharding as shd
from rmjax.data import judge
from rmjax.data.records import RecordReport
from rmjax.errors import ConfigError, DataError, RmjaxError
from rmjax.train import evaluate as tevaluate
from rmjax.train import examples as texamples
from rmjax.train import heads as theads
from rmjax.train import step as tstep
from rmjax.train.config import load_config
from rmjax.train.loop import layout_for

LOSS = {"scalar": "bt", "multi_objective": "mse", "armorm": "bt", "judge": "ce", "lm": "dpo"}


def _load(name: str, mesh, dtype: str, attention: dict):
    from rmjax.models.loading import load_model
    return load_model(name, mesh=mesh, strategy="dp", dtype=dtype, **attention)


@dataclasses.dataclass
class Evaluator:
    """A loaded reward model (explicit head, or policy + reference) and its jitted eval step."""

    kind: str
    run: Any
    loaded: Any
    trainable: dict
    frozen: dict
    statics: dict
    settings: dict
    mesh: Any
    beta: float
    name: str

    @classmethod
    def load(cls, model: str = "", *, policy: str = "", reference: str = "", beta: float = 1.0,
             max_length: int = 1024, pack_length: int = -1, template: str = "model",
             attention: dict | None = None) -> "Evaluator":
        """``attention``: ``load_model``'s attention options (backend, block sizes)."""
        if bool(model) == bool(policy):
            raise ConfigError("give --model (an explicit reward model) or --policy (the implicit reward), not both")
        mesh = shd.make_mesh(shd.MeshConfig(strategy="dp", data=1), devices=jax.devices()[:1])
        attention = attention or {}
        loaded = _load(model or policy, mesh, "float32", attention)
        frozen, settings, kind, head = {"backbone": loaded.params}, {}, "lm", {}
        if model:
            from rmjax.train.export import load_head
            kind, head, settings = load_head(model, loaded)
            if kind == "lm" and "beta" not in settings:
                raise ConfigError(f"{model}: a language model, not a reward model (no score head); evaluate its "
                                  "implicit reward with --policy MODEL --reference REF")
        if kind == "lm":
            ref_name = reference if policy else settings.get("reference", "")
            beta = beta if policy else settings.get("beta", beta)
            if ref_name:
                ref = _load(ref_name, mesh, "float32", attention)
                from rmjax.scoring.bulk import same_tokenizer
                if not same_tokenizer(ref.tokenizer, loaded.tokenizer):
                    raise ConfigError(f"--reference {ref_name} has another tokenizer than the policy; the implicit "
                                      "reward compares log-probs of the same token ids")
                frozen["reference"] = ref.params
        template = settings.get("template", template)
        overrides = [f"head.kind={kind}", f"loss.kind={LOSS[kind]}", f"data.max_length={max_length}",
                     f"data.template={template}", f"loss.beta={beta}",
                     *(f"head.{k}={settings[k]}" for k in ("gate_hidden", "gate_layers", "gate_temperature")
                       if k in settings),
                     "train.trainable=lora" if kind in ("lm", "judge") else "train.trainable=head",
                     f"head.judge_labels={json.dumps(settings.get('labels', ['A', 'B']))}",
                     f"head.judge_template={judge.exported_template(model, settings)}"]
        if pack_length > 0:
            overrides.append(f"train.pack_length={pack_length}")
        run = load_config(None, overrides)
        statics = {"objectives": tuple(settings.get("objectives", ())),
                   "reference_free": kind == "lm" and "reference" not in frozen}
        if kind == "judge":
            statics["label_ids"] = judge.label_ids(loaded.tokenizer, run.head.judge_labels, template)
        name = model or f"implicit: {policy} vs {reference or '(reference-free)'}"
        return cls(kind, run, loaded, {"head": jax.device_put(head, shd.replicated(mesh))}, frozen, statics,
                   settings, mesh, beta, name)

    def trees(self, records) -> str:
        """A multi-objective RM regresses rating records and ranks pairs (by the objectives' mean)."""
        if self.kind == "multi_objective" and not all(r.ratings is not None for r in records):
            return "pairs"
        return theads.entry(self.run).trees

    def examples(self, records) -> texamples.ExampleSet:
        return texamples.build(records, self.loaded.tokenizer, self.run, self.trees(records),
                               self.statics["objectives"])

    def outputs(self, examples: list, *, batch_size: int = 8, packed: bool = True, padding_side: str = "right",
                num_objectives: int = 0) -> list[dict]:
        """Per example the head outputs over its responses (``rmjax.train.evaluate``)."""
        entry = theads.entry(self.run)
        layout = layout_for(self.run, entry, self.loaded.tokenizer.pad_id, self.mesh, packed=packed,
                            side=padding_side, num_objectives=num_objectives)
        if examples and examples[0].pairs and layout.trees == "ratings":
            layout = dataclasses.replace(layout, trees="pairs")
        key = (layout.keys, entry)
        if getattr(self, "_fn", (None,))[0] != key:
            self._fn = key, tstep.make_eval_step(self.trainable, self.frozen, self.mesh, layout.keys,
                                                 config=self.loaded.config, run=self.run, entry=entry,
                                                 statics=self.statics)
        return tevaluate.outputs_per_example(self._fn[1], self.trainable, self.frozen, examples, layout, self.mesh,
                                             batch_size)


def evaluate_rm(model: str = "", *, data: tuple[str, ...] = ("llmbar",), policy: str = "", reference: str = "",
                beta: float = 1.0, reduction: str = "sum", categories: str | None = None, max_length: int = 1024,
                batch_size: int = 8, pack_length: int = -1, padding_side: str = "right", template: str = "model",
                on_error: str = "skip", objective: str | None = None, attention: dict | None = None,
                log=None) -> dict:
    """The report dict (see ``rmjax.train.evaluate``); ``pack_length`` -1 packs rows of 2 x max_length,
    0 uses padded rows."""
    log = log or (lambda m: print(m, file=sys.stderr))
    ev = Evaluator.load(model, policy=policy, reference=reference, beta=beta, max_length=max_length,
                        pack_length=pack_length, template=template, attention=attention)
    report_in = RecordReport()
    records = texamples.read_inputs(tuple(data), on_error, report_in)
    subsets = [r.subset for r in records]
    if any(subsets) and not all(subsets):
        first = next(r for r in records if not r.subset)
        raise DataError(f"{first.place}: this record has no subset but {sum(map(bool, subsets))} other evaluation "
                        "records have one; give every record a subset (or none)")
    ex = ev.examples(records)
    log(f"data: {report_in.summary()}; {ex.summary()}")
    if not ex.examples:
        raise RmjaxError(f"{list(data)}: no example to evaluate ({ex.dropped[0] if ex.dropped else 'no records'})")
    outs = ev.outputs(ex.examples, batch_size=batch_size, packed=pack_length != 0, padding_side=padding_side,
                      num_objectives=len(ex.objectives))
    base = {"model": ev.name, "head": ev.kind, "data": list(data), "dropped": ex.dropped,
            "records_skipped": report_in.skipped}
    if ev.trees(records) == "ratings":
        return {**base, **tevaluate.ratings_report(outs, ex.examples, ex.objectives)}
    k = ev.statics["objectives"].index(objective) if objective else None
    scored = [tevaluate.example_score(ev.kind, o, beta=ev.beta, reduction=reduction, objective=k) for o in outs]
    mapping = tevaluate.load_categories(categories) if categories else None
    report = tevaluate.accuracy_report([s for s, _ in scored], [e.record.subset for e in ex.examples], mapping)
    kinds = [e.record.kind for e in ex.examples]
    report["kinds"] = {k: kinds.count(k) for k in sorted(set(kinds))}
    if ev.kind == "lm":
        report["implicit_reward"] = {"beta": ev.beta, "reduction": reduction}
    return {**base, **report}


def write_report(report: dict, out: str | Path) -> tuple[Path, Path]:
    """``out`` (JSON) and the same name with .md (markdown tables)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    md = out.with_suffix(".md")
    md.write_text(tevaluate.markdown(report))
    return out, md
