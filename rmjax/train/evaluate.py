"""Held-out reward-model evaluation on the bundled LLMBar pairs (RewardBench's "Chat Hard" LLMBar)."""
from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np

from rmjax.data import pairs as pairdata
from rmjax.data.preferences import load_llmbar
from rmjax.errors import RmjaxError


def scalar_rewards_fn(loaded):
    """jit'd (ids, mask) -> rewards for a loaded *ForSequenceClassification model."""
    from rmjax.models import forward
    from rmjax.pooling import gather_last

    if loaded.score_head is None:
        raise RmjaxError(f"{loaded.source}: not a reward model (no 'score' head in the checkpoint); "
                         "give a *ForSequenceClassification checkpoint or a trained run's final/ directory")
    config, head = loaded.config, loaded.score_head[:, 0]

    @jax.jit
    def fn(params, ids, mask):
        hidden = forward(params, config, ids, mask).hidden
        return gather_last(hidden.astype(np.float32), mask) @ head

    return fn


def evaluate_llmbar(model: str, batch_size: int = 8, max_length: int = 1024) -> dict:
    from rmjax.io import registry
    from rmjax.models.loading import load_model

    loaded = load_model(model, with_tokenizer=False)
    tok_source = model
    meta = Path(model) / "rmjax.json"
    if meta.exists() and not (Path(model) / "tokenizer.json").exists():  # an export without tokenizer files
        tok_source = json.loads(meta.read_text())["base_model"]
    tokenizer = registry.load_tokenizer(registry.resolve_model(tok_source))
    data = pairdata.tokenize_pairs(tokenizer, load_llmbar(), max_length, "truncate")
    fn = scalar_rewards_fn(loaded)
    margins = []
    for start in range(0, len(data), batch_size):
        idx = np.arange(start, min(start + batch_size, len(data)))
        length = max(max(len(data.chosen[i]), len(data.rejected[i])) for i in idx)
        length = int(2 ** np.ceil(np.log2(max(length, 16))))  # few distinct shapes -> few compiles
        b = pairdata.make_batch(data, idx, length, tokenizer.pad_id)
        r_c = np.asarray(fn(loaded.params, b["chosen_ids"], b["chosen_mask"]))
        r_r = np.asarray(fn(loaded.params, b["rejected_ids"], b["rejected_mask"]))
        margins.extend(r_c - r_r)
    margins = np.asarray(margins)
    wins = np.where(margins > 0, 1.0, np.where(margins == 0, 0.5, 0.0))
    report = {"model": model, "pairs": len(data), "dropped": data.dropped, "accuracy": float(wins.mean()),
              "subsets": {}}
    for subset in dict.fromkeys(p.subset for p in data.pairs):
        sel = np.array([p.subset == subset for p in data.pairs])
        report["subsets"][subset] = {"accuracy": float(wins[sel].mean()), "pairs": int(sel.sum())}
    return report
