"""`rmjax logprobs`: the top next tokens of a prompt, with log-probabilities."""
from __future__ import annotations

import argparse
import json
import sys

import jax
import numpy as np

from rmjax.commands.options import add_attention_arguments, attention_options
from rmjax.errors import RmjaxError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("logprobs", help="top next tokens after a prompt, with log-probabilities",
                       description="Print the most likely next tokens after PROMPT.")
    p.add_argument("--model", default="smollm2-135m-instruct",
                   help="registry name, Hugging Face checkpoint directory or .gguf file")
    p.add_argument("--prompt", required=True)
    p.add_argument("--top", type=int, default=5)
    p.add_argument("--chat", action="store_true",
                   help="render the prompt as a user turn with the model's chat template (+ generation prompt)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    add_attention_arguments(p)
    p.set_defaults(func=run)


def top_next_tokens(loaded, text: str, top: int, add_special_tokens: bool = True):
    from rmjax.models import forward
    from rmjax.scoring.logprobs import next_token_logprobs
    from rmjax.models.transformer import unembedding_matrix

    ids = loaded.tokenizer.encode(text, add_special_tokens=add_special_tokens)
    if not ids:
        raise RmjaxError("the prompt encodes to no tokens; give a non-empty --prompt")
    config = loaded.config

    @jax.jit
    def run(params, ids):
        hidden = forward(params, config, ids[None]).hidden[:, -1]
        return next_token_logprobs(hidden, unembedding_matrix(params, config), top_k=top,
                                   logit_softcap=config.final_logit_softcap)

    result = run(loaded.params, np.asarray(ids, np.int32))
    values, indices = result[1] if isinstance(result, tuple) else (result["top_logprobs"], result["top_ids"])
    return [{"token_id": int(i), "token": loaded.tokenizer.token_to_str(int(i)), "logprob": float(v)}
            for v, i in zip(np.asarray(values)[0], np.asarray(indices)[0])]


def run(args) -> int:
    from rmjax.models.loading import load_model

    if args.top < 1:
        raise RmjaxError(f"--top must be at least 1, got {args.top}")
    loaded = load_model(args.model, dtype=args.dtype, **attention_options(args))
    text, add_special = args.prompt, True
    if args.chat:
        if not loaded.tokenizer.has_chat_template:
            raise RmjaxError(f"model {args.model!r} has no chat template; drop --chat")
        text = loaded.tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}],
                                                    add_generation_prompt=True)
        add_special = False  # the template already holds any BOS
    top = top_next_tokens(loaded, text, args.top, add_special)
    if args.json:
        print(json.dumps({"model": args.model, "prompt": args.prompt, "top": top}, ensure_ascii=False))
    else:
        print(f"{args.model}: next token after {text!r}")
        for rank, t in enumerate(top, 1):
            print(f"{rank:>3}  {t['logprob']:9.4f}  p={np.exp(t['logprob']):.4f}  {t['token']!r}  (id {t['token_id']})")
    sys.stdout.flush()
    return 0
