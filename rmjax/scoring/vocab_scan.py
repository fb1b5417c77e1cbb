"""Exhaustive scoring: every vocabulary token (or every word of a list) as the response to a prompt.

For each prompt the chat-templated prefix runs through the model ONCE; its KV cache is then
extended by batches of candidate responses:
  * ``next_token``: log p(token | prompt) for all V tokens from one forward (the last position);
  * ``response``: the full templated response, token + the template's end-of-turn suffix (e.g.
    ``<|im_end|>\\n``), scored as a sequence: its log-prob sum, or a reward head's reward;
  * word lists: each word rendered as a (multi-token) reply, sharing the prompt prefix.
Output tables follow the released score tables: a ``response`` column, then one column per prompt.

The cross-tokenizer mixture-weighted log ratio compares two models whose vocabularies differ:
MWLR(s) = 0.5 (p_A(s) + p_B(s)) (log p_A(s) - log p_B(s)), as Christian et al. (ICLR 2026) define it:
joined on the exact decoded strings (the max probability per string within each model), one MWLR
per string; a word's MWLR is the mean over its case and space variants (``word_mwlr``). The
``folded`` join (strip, lowercase, ASCII only before the max) is an option.
"""
from __future__ import annotations

import functools
import sys
import time
import unicodedata

import jax
import numpy as np
import pandas as pd

from rmjax.data.batching import Encoded, bucket, pad_rows
from rmjax.data.chat import gate_offset, render, template_name
from rmjax.errors import ConfigError
from rmjax.heads.reward import pooled_response
from rmjax.models.transformer import forward, unembedding_matrix
from rmjax.pooling import gather_last
from rmjax.scoring.kv_path import pad_batch, rm_fn, score_fn
from rmjax.scoring.logprobs import next_token_logprobs


@functools.lru_cache(maxsize=None)
def _next_token_fn(config):
    """jit'd (params, ids, mask) -> log p(next token) at each row's last real token; once per model."""

    def run(params, ids, mask):
        hidden = forward(params, config, ids, mask).hidden
        return next_token_logprobs(gather_last(hidden, mask), unembedding_matrix(params, config),
                                   logit_softcap=config.final_logit_softcap)

    return jax.jit(run)


def next_token_table(loaded, prompts: dict[str, str], template: str = "model") -> pd.DataFrame:
    """log p(token | prompt) in the analysis schema: a ``response`` column (the token's decoded text)
    and one column per prompt key, one row per token id (the index, ``token_id``; tokens that decode
    to the empty string are left out). A base model reads the bare prompt (``raw``) unless
    ``template`` says otherwise."""
    config, tok = loaded.config, loaded.tokenizer
    run = _next_token_fn(config)
    columns = {}
    for key, text in prompts.items():
        prompt_ids, _ = render(tok, [{"role": "user", "content": text}], "", template, base="raw")
        ids, mask = pad_rows([prompt_ids], bucket(len(prompt_ids)), tok.pad_id)
        columns[key] = np.asarray(run(loaded.params, ids, mask))[0, :config.vocab_size]
    return _table(tok, config.vocab_size, columns)


def _table(tok, vocab_size: int, columns: dict[str, np.ndarray]) -> pd.DataFrame:
    n = min(vocab_size, tok.vocab_size)
    frame = pd.DataFrame({"response": [tok.token_to_str(i) for i in range(n)],
                          **{key: values[:n] for key, values in columns.items()}},
                         index=pd.RangeIndex(n, name="token_id"))
    return frame[frame["response"] != ""]


def log_ratio_table(table_a: pd.DataFrame, table_b: pd.DataFrame, prompts, same_tokenizer: bool) -> pd.DataFrame:
    """The plain implicit reward log p_A - log p_B of every next token, per prompt column: per token id
    when both models share a tokenizer (rows and index as ``table_a``), else per exact decoded string
    present in both vocabularies (the max per string within each model, as for MWLR)."""
    prompts = list(prompts)
    if same_tokenizer:
        b = table_b.reindex(table_a.index)
        return pd.concat([table_a[["response"]], table_a[prompts] - b[prompts]], axis=1)
    columns = {}
    for key in prompts:
        a, b = string_logprobs(table_a, key), string_logprobs(table_b, key)
        joined = pd.concat([a.rename("a"), b.rename("b")], axis=1, join="inner")
        columns[key] = joined["a"] - joined["b"]
    return pd.DataFrame(columns).rename_axis("response").reset_index()


def scan_responses(loaded, prompt_ids: list[int], candidates: list[list[int]], *, chunk: int = 512,
                   rm: bool = False, gate: int = 0, progress: str | None = None) -> dict[str, np.ndarray]:
    """Score each candidate response (token ids incl. any suffix) after ONE prompt prefix.

    Returns {'sum', 'mean', 'count'} (log-probs), or with ``rm`` the reward head's {'rm'[,
    'rm_objectives', ...]} (``loaded.reward_head``; ``gate``: prompt tokens after its gating token,
    ``rmjax.data.chat.gate_offset``); arrays [N, ...].
    """
    head = loaded.reward_head if rm else None
    if rm and head is None:
        raise ConfigError(f"{loaded.source}: a causal language model, not a reward model (no reward head)")
    # built once per model (and head)
    run = rm_fn(loaded.config, head.spec) if rm else score_fn(loaded.config)
    if rm:  # read where transformers' sequence classifier reads (the last token that is not the pad id)
        candidates = [pooled_response(c, loaded.config.pad_token_id) for c in candidates]
    pad = loaded.tokenizer.pad_id
    results: dict[str, list[np.ndarray]] = {}
    t0 = time.perf_counter()
    # one prompt, responses in chunks; sorting by length keeps padding (and shapes) small
    order = np.argsort([len(c) for c in candidates], kind="stable")
    for start in range(0, len(order), chunk):
        idx = order[start:start + chunk]
        ex = Encoded(np.asarray(prompt_ids), tuple(np.asarray(candidates[i]) for i in idx), gate=gate)
        # responses padded to a multiple of 4 only (token scans: every candidate has the same length)
        longest = max(len(candidates[i]) for i in idx)
        batch, _ = pad_batch([ex], 1, pad, lengths=(bucket(len(prompt_ids)), -(-longest // 4) * 4))
        n = len(idx)
        if n < chunk and len(order) > chunk:  # keep one compiled shape for the last chunk
            filler = chunk - n
            for k in ("response_ids", "response_mask"):
                batch[k] = np.concatenate([batch[k], np.zeros((filler, batch[k].shape[1]), np.int32)])
        out = run(loaded.params, None if head is None else head.params, batch)
        for k, v in out.items():
            results.setdefault(k, []).append((idx, np.asarray(v)[:n]))
        if progress:
            done = min(start + chunk, len(order))
            rate = done / max(time.perf_counter() - t0, 1e-9)
            print(f"\r{progress}: {done}/{len(order)} responses, {rate:.0f}/s, "
                  f"ETA {(len(order) - done) / rate:.0f}s", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    out = {}
    for k, parts in results.items():
        values = np.empty((len(candidates), *parts[0][1].shape[1:]), np.float32)
        for idx, v in parts:
            values[idx] = v
        out[k] = values
    return out


def token_responses(loaded, prompt_text: str, template: str = "model", base: str = "raw"
                    ) -> tuple[list[int], list[list[int]]]:
    """(prompt ids, [token + end-of-turn suffix] for every token id); ``base``: the rendering of a
    model without a chat template (``raw``: the bare prompt, no suffix)."""
    tok = loaded.tokenizer
    prompt_ids, suffix = render(tok, [{"role": "user", "content": prompt_text}], "", template, base)
    suffix = [t for t in suffix if t != tok.bos_id]
    n = min(loaded.config.vocab_size, tok.vocab_size)
    return prompt_ids, [[t] + suffix for t in range(n)]


def word_responses(loaded, prompt_text: str, words: list[str], template: str = "model", base: str = "raw"
                   ) -> tuple[list[int], list[list[int]]]:
    """(prompt ids, each word rendered as the reply) with one shared prompt prefix."""
    tok = loaded.tokenizer
    messages = [{"role": "user", "content": prompt_text}]
    prompt_ids, _ = render(tok, messages, "", template, base)
    candidates = []
    for word in words:
        p, r = render(tok, messages, word, template, base)
        if p != prompt_ids:
            raise ValueError(f"prompt tokens changed with the reply {word!r}; the template is not prefix-stable")
        candidates.append(r)
    return prompt_ids, candidates


def word_scores(loaded, prompts: dict[str, str], words: list[str], template: str = "model", base: str = "raw",
                rm: bool = False, chunk: int = 512) -> pd.DataFrame:
    """Each word as the reply to each prompt: ``response`` + one column per prompt key holding the
    reply's log-prob sum, or with ``rm`` the reward model's reward (``loaded.reward_head``)."""
    columns = {}
    for key, text in prompts.items():
        prompt_ids, cands = word_responses(loaded, text, words, template, base)
        res = scan_responses(loaded, prompt_ids, cands, chunk=chunk, rm=rm,
                             gate=prompt_gate(loaded, text, template, base) if rm else 0)
        columns[key] = res["rm"] if rm else res["sum"]
    return pd.DataFrame({"response": list(words), **columns})


def prompt_gate(loaded, prompt_text: str, template: str = "model", base: str = "raw") -> int:
    """Prompt tokens after the gating token of a one-turn prompt, for a gated reward head (else 0)."""
    head = loaded.reward_head
    if head is None or not head.spec.gated:
        return 0
    return gate_offset(loaded.tokenizer, [{"role": "user", "content": prompt_text}], template_name(
        loaded.tokenizer, template, base))


def normalise(s: str) -> str:
    """strip, lowercase, ASCII only (accents folded, other characters dropped): the ``folded`` join."""
    folded = unicodedata.normalize("NFKD", s.strip().lower())
    return folded.encode("ascii", "ignore").decode("ascii").strip()


MWLR_JOINS = ("exact", "folded")


def string_logprobs(table: pd.DataFrame, column: str, join: str = "exact") -> pd.Series:
    """log p per string: the max over the tokens whose decoded text is that string.

    ``exact``: the decoded string as it is (" Love", "love" and "Love" stay apart; non-ASCII kept), as
    Christian et al. join vocabularies; ``folded``: strip + lowercase + ASCII (``normalise``). Empty
    strings are dropped.
    """
    if join not in MWLR_JOINS:
        raise ValueError(f"unknown join {join!r}; choose one of {list(MWLR_JOINS)}")
    keys = table["response"].astype(str)
    if join == "folded":
        keys = keys.map(normalise)
    frame = pd.DataFrame({"string": keys.to_numpy(), "logp": table[column].to_numpy()})
    frame = frame[frame["string"] != ""]
    return frame.groupby("string", sort=True)["logp"].max()


def mixture_weighted_log_ratio(table_a: pd.DataFrame, table_b: pd.DataFrame, column: str,
                               join: str = "exact") -> pd.DataFrame:
    """MWLR per string present in both vocabularies: 0.5 (p_A + p_B) (log p_A - log p_B).

    Columns ``response`` (the joined string), ``logp_a``, ``logp_b``, ``mwlr``.
    """
    a, b = string_logprobs(table_a, column, join), string_logprobs(table_b, column, join)
    joined = pd.concat([a.rename("logp_a"), b.rename("logp_b")], axis=1, join="inner")
    pa, pb = np.exp(joined["logp_a"]), np.exp(joined["logp_b"])
    joined["mwlr"] = 0.5 * (pa + pb) * (joined["logp_a"] - joined["logp_b"])
    return joined.reset_index(names="response")


def mwlr_table(table_a: pd.DataFrame, table_b: pd.DataFrame, prompts, join: str = "exact") -> pd.DataFrame:
    """MWLR of every shared string (rows, ``response``) under every prompt (one column per prompt key)."""
    columns = {key: mixture_weighted_log_ratio(table_a, table_b, key, join).set_index("response")["mwlr"]
               for key in prompts}
    return pd.DataFrame(columns).rename_axis("response").reset_index()


def word_mwlr(table: pd.DataFrame, words) -> pd.DataFrame:
    """Per word, the mean MWLR over the strings that equal it after strip + lowercase (" Love",
    "love", "LOVE", ...), as Christian et al. average case and space variants in their Figure 3.
    ``table``: ``mwlr_table`` output; words without any variant are left out. Columns ``word``,
    ``variants`` and one per prompt."""
    wanted = {str(w).strip().lower() for w in words}
    keys = table["response"].astype(str).str.strip().str.lower()
    rows = table[keys.isin(wanted)]
    prompts = [c for c in table.columns if c != "response"]
    grouped = rows[prompts].groupby(keys[rows.index].to_numpy())
    out = grouped.mean()
    out.insert(0, "variants", grouped.size())
    return out.rename_axis("word").reset_index()
