"""The vocabulary-scan job (``rmjax vocab-scan``): every vocabulary token (or every word of a list) as
the answer to the value prompts, one table per model in the analysis schema (``response`` + one
column per prompt key), the log-ratio implicit reward and the MWLR of Christian et al. (ICLR 2026).

    config = rmjax.config.load(VocabScanConfig, None, ["mode=words", "rm=/path/rm"])
    out_dir = run(config)
"""
from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

from rmjax.config import knob, section
from rmjax.data.chat import TEMPLATE_CHOICES
from rmjax.data.preferences import load_value_prompts
from rmjax.errors import RmjaxError
from rmjax.models.loading import load_model
from rmjax.scoring import vocab_scan as vs
from rmjax.scoring.bulk import same_tokenizer
from rmjax.scoring.vocab_scan import MWLR_JOINS
from rmjax.sections import ModelSection


@dataclasses.dataclass(kw_only=True)
class VocabScanConfig:
    model: ModelSection = section(ModelSection)
    reference: str = knob("", "second model: the implicit reward (same tokenizer) or MWLR against it")
    rm: str = knob("", "reward model: its reward for every reply (mode response or words)")
    prompts: str = knob("", "YAML {key: prompt}; '' = the 54 bundled value prompts")
    prompt_keys: tuple[str, ...] = knob((), "only these prompt keys")
    mode: str = knob("next-token", "next-token: log p of every token after the prompt; response: every token + "
                                   "the template's end-of-turn as the reply; words: every word of a list as the "
                                   "reply", ("next-token", "response", "words"))
    words: str = knob("big2_nouns", "words mode: the words to score; next-token mode with a reference: the words "
                                    "whose MWLR goes to mwlr_words.csv. A bundled dictionary name or a file")
    template: str = knob("model", "rendering of the model and the RM: its chat template (model), the bare prompt for "
                                  "a base model (raw, as Christian et al. prompt pretrained models), or a fixed one",
                         TEMPLATE_CHOICES)
    reference_template: str = knob("model", "rendering of the reference, as template", TEMPLATE_CHOICES)
    mwlr_join: str = knob("exact", "next-token MWLR across tokenizers: join on exact decoded strings (Christian et "
                                   "al.; max per string) or on folded ones (strip + lowercase + ASCII)", MWLR_JOINS)
    chunk: int = knob(512, "responses per batch against the prompt cache")
    out: str = knob("runs/vocab_scan", "output directory")

    def check(self) -> list[tuple[bool, str]]:
        return [(bool(self.model.name) or (bool(self.rm) and self.mode != "next-token"),
                 "give a model (log-probs), or an RM with mode response or words for RM scores only"),
                (self.chunk > 0, "chunk must be positive")]


def run(config: VocabScanConfig) -> Path:
    """Write the tables; returns the output directory."""

    prompts = load_value_prompts(Path(config.prompts) if config.prompts else None)
    if config.prompt_keys:
        unknown = [k for k in config.prompt_keys if k not in prompts]
        if unknown:
            raise RmjaxError(f"unknown prompt keys {unknown}; known: {sorted(prompts)[:6]}...")
        prompts = {k: prompts[k] for k in config.prompt_keys}
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    numerics = config.model
    model = load_model(config.model.name, numerics) if config.model.name else None
    if config.mode == "next-token":
        _next_token_scan(config, model, prompts, out)
        return out
    rm = load_model(config.rm, numerics) if config.rm else None
    ref = load_model(config.reference, numerics) if config.reference else None
    if ref is not None and model is None:
        raise RmjaxError("a reference needs a model (the implicit reward compares the two)")
    if ref is not None and config.mode == "response" and not same_tokenizer(model.tokenizer, ref.tokenizer):
        raise RmjaxError("mode response scores token ids, so the reference needs the same tokenizer; use mode "
                         "next-token (MWLR across tokenizers) or words")
    import pandas as pd
    columns: dict[str, dict[str, list]] = {}
    words = _words(config.words) if config.mode == "words" else None
    for key, text in prompts.items():
        for tag, loaded in (("policy", model), ("reference", ref), ("rm", rm)):
            if loaded is None:
                continue
            template = config.reference_template if tag == "reference" else config.template
            base = "plain" if tag == "rm" else "raw"  # an RM without a template reads what it trained on
            if words is None:
                prompt_ids, cands = vs.token_responses(loaded, text, template, base)
            else:
                prompt_ids, cands = vs.word_responses(loaded, text, words, template, base)
            gate = vs.prompt_gate(loaded, text, template, base) if tag == "rm" else 0
            res = vs.scan_responses(loaded, prompt_ids, cands, chunk=config.chunk, rm=tag == "rm", gate=gate,
                                    progress=f"{key} [{tag}]")
            columns.setdefault(tag, {})[key] = res["rm"] if tag == "rm" else res["sum"]
    first = model or rm
    labels = words if words is not None else [first.tokenizer.token_to_str(i) for i in range(len(cands))]
    tables = {tag: pd.DataFrame({"response": labels, **cols}) for tag, cols in columns.items()}
    if ref is not None:
        tables["implicit_reward"] = pd.DataFrame({"response": labels, **{
            k: columns["policy"][k] - columns["reference"][k] for k in prompts}})
    for tag, frame in tables.items():
        name = f"{config.mode}_{tag}"
        if words is None:  # token ids: rows in the analysis schema, the ids in token_ids/
            frame = frame.rename_axis("token_id")
            frame = frame[frame["response"] != ""]
            (out / "token_ids").mkdir(exist_ok=True)
            _write_csv(frame[["response"]].reset_index(), out / "token_ids" / f"{name}.csv")
        _write_csv(frame, out / f"{name}.csv")
    return out


def _next_token_scan(config: VocabScanConfig, model, prompts: dict, out: Path) -> None:
    """Next-token tables in the analysis schema (``response`` + one column per prompt key; the token
    ids of each row in token_ids/); with a reference also the log-ratio implicit reward and MWLR."""

    def write_table(table, name: str) -> None:
        _write_csv(table, out / f"{name}.csv")
        (out / "token_ids").mkdir(exist_ok=True)
        _write_csv(table[["response"]].reset_index(), out / "token_ids" / f"{name}.csv")

    table = vs.next_token_table(model, prompts, config.template)
    write_table(table, "next_token_logprobs")
    if not config.reference:
        return
    ref = load_model(config.reference, config.model)
    ref_table = vs.next_token_table(ref, prompts, config.reference_template)
    write_table(ref_table, "reference_next_token_logprobs")
    shared = same_tokenizer(model.tokenizer, ref.tokenizer)
    ratio = vs.log_ratio_table(table, ref_table, prompts, shared)
    if shared:
        write_table(ratio, "next_token_implicit_reward")
    else:  # one row per exact decoded string both vocabularies hold
        _write_csv(ratio, out / "next_token_implicit_reward.csv")
    mwlr = vs.mwlr_table(table, ref_table, prompts, config.mwlr_join)
    _write_csv(mwlr, out / "mwlr.csv")
    words = vs.word_mwlr(mwlr, _words(config.words))
    _write_csv(words.drop(columns="variants").rename(columns={"word": "response"}), out / "mwlr_words.csv")


def _write_csv(frame, path: Path) -> None:
    # Vocabulary tokens include "\r", "\x0b" and the like: quote every text field so that each
    # token stays one row when the table is read back.
    frame.to_csv(path, index=False, quoting=csv.QUOTE_NONNUMERIC)


def _words(spec: str) -> list[str]:
    # statsmodels and SciPy load only when this runs, not at every `rmjax` start-up
    from rmjax.analysis import load_dictionary

    return list(load_dictionary(spec).words)
