"""The next-token job (``rmjax logprobs``): the most likely next tokens after a prompt, with log-probs."""
from __future__ import annotations

import dataclasses

import jax
import numpy as np

from rmjax.config import knob, section
from rmjax.errors import RmjaxError
from rmjax.models import forward
from rmjax.models.loading import load_model
from rmjax.models.transformer import unembedding_matrix
from rmjax.scoring.logprobs import next_token_logprobs
from rmjax.sections import ModelSection


@dataclasses.dataclass(kw_only=True)
class LogprobsConfig:
    model: ModelSection = section(ModelSection)
    prompt: str = knob("", "the text whose next token is predicted")
    top: int = knob(5, "how many tokens to list")
    chat: bool = knob(False, "render the prompt as a user turn with the model's chat template (+ generation prompt)")
    json: bool = knob(False, "print one JSON object")

    def check(self) -> list[tuple[bool, str]]:
        return [(bool(self.prompt), "give a prompt (--prompt)"), (self.top >= 1, "top must be at least 1")]


def top_next_tokens(loaded, text: str, top: int, add_special_tokens: bool = True) -> list[dict]:
    ids = loaded.tokenizer.encode(text, add_special_tokens=add_special_tokens)
    if not ids:
        raise RmjaxError("the prompt encodes to no tokens; give a non-empty prompt")
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


def run(config: LogprobsConfig) -> tuple[str, list[dict]]:
    """(the text the model read, the top tokens with their log-probs)."""

    loaded = load_model(config.model.name, config.model)
    text, add_special = config.prompt, True
    if config.chat:
        if not loaded.tokenizer.has_chat_template:
            raise RmjaxError(f"model {config.model.name!r} has no chat template; drop --chat")
        text = loaded.tokenizer.apply_chat_template([{"role": "user", "content": config.prompt}],
                                                    add_generation_prompt=True)
        add_special = False  # the template already holds any BOS
    return text, top_next_tokens(loaded, text, config.top, add_special)
