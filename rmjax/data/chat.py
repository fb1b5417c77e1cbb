"""Chat rendering with an exact token-level prompt/response boundary.

``render(tokenizer, prompt_messages, response)`` returns (prompt_ids, response_ids) such that
prompt_ids + response_ids is the model's tokenisation of the whole conversation: the prompt is
rendered with the generation prompt, the full conversation must start with exactly that text
(checked), and the response ids are the tokens of the remainder (the reply and its end-of-turn).
The families' tokenizers and templates end the generation prompt where no token spans the boundary
(a special token, or newlines their split keeps whole); a tokenizer that does merge across it (a
GPT-2 split before Llama-3's "\\n\\n") keeps the generation prompt's own tokens, the reply tokenised
after them as a model generating it would have.

Templates: the model's own chat template by default, rendered with the tokenizer's template
variables (``Tokenizer.template_variables``: thinking off where the template has ``enable_thinking``,
so Qwen3's empty think block ends the prompt and the response is the reply alone); a named built-in
to render a base model in its instruct sibling's format, token for token (``chatml``; ``gemma``, as
Gemma 3's template, a system message folded into the first user turn; ``llama3``, as Llama 3's,
without Llama 3.1's dated system header); ``plain``, the HH-RLHF transcript layout
("\\n\\nHuman: ...\\n\\nAssistant: reply" + EOS); or ``raw``, the bare prompt text as a pretrained
model reads a document (the tokenizer's own special tokens, e.g. BOS, and nothing else; several
messages are joined by blank lines) with the response appended as plain text (" reply", no
end-of-turn, no EOS). ``raw`` is how Christian et al. (ICLR 2026) prompt base models.

``model`` on a tokenizer without a chat template (a base model) falls back to ``base``: ``plain``
for training (an RM learns the turn structure of HH-RLHF), ``raw`` in the vocabulary scan and the
implicit reward (``rmjax vocab-scan``, ``rmjax score``), where the base model is a reference that
should read the prompt as text.

``gate_offset(tokenizer, prompt_messages)`` locates ArmoRM's *gating token* in the prompt ids: the
token that closes the last user turn (Llama-3's ``<|eot_id|>`` before the assistant header,
ChatML's and Qwen3's ``<|im_end|>``, Gemma's ``<end_of_turn>``; Mistral's ``[/INST]``, which is also
the last prompt token), not the last token of the generation prompt.
"""
from __future__ import annotations

from rmjax.errors import ConfigError, DataError

BUILTIN_TEMPLATES = {
    "chatml": ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
               "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"),
    "gemma": ("{{ bos_token }}{% if messages and messages[0]['role'] == 'system' %}"
              "{% set prefix = messages[0]['content'] + '\n\n' %}{% set turns = messages[1:] %}"
              "{% else %}{% set prefix = '' %}{% set turns = messages %}{% endif %}"
              "{% for m in turns %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
              "{{ '<start_of_turn>' + role + '\n' + (prefix if loop.first else '') + m['content'] | trim"
              " + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}"
              "{% endif %}"),
    "llama3": ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n'"
               " + m['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
               "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"),
}
TEMPLATE_CHOICES = ("model", "plain", "raw", *BUILTIN_TEMPLATES)
BASE_FALLBACKS = ("plain", "raw")


def template_name(tokenizer, template: str = "model", base: str = "plain") -> str:
    """The template actually used: 'model' falls back to ``base`` for tokenizers without one."""
    if template not in TEMPLATE_CHOICES:
        raise ConfigError(f"unknown template {template!r}; choose one of {list(TEMPLATE_CHOICES)}")
    if base not in BASE_FALLBACKS:
        raise ConfigError(f"unknown base-model fallback {base!r}; choose one of {list(BASE_FALLBACKS)}")
    if template == "model":
        return "model" if tokenizer.has_chat_template else base
    return template


def render(tokenizer, prompt: list[dict], response: str, template: str = "model",
           base: str = "plain") -> tuple[list[int], list[int]]:
    template = template_name(tokenizer, template, base)
    prompt_ids, response_ids = _render(tokenizer, prompt, response, template)
    bos = tokenizer.bos_id
    if bos is not None and prompt_ids[:2] == [bos, bos]:
        token = tokenizer.bos_token
        raise DataError(f"{tokenizer.source}: the rendered conversation starts with two BOS tokens ({token!r} "
                        f"twice): the text already begins with {token!r} and the {template_name(tokenizer, template)} "
                        f"rendering adds its own. Remove the leading {token!r} from the data (it was probably "
                        "rendered with a chat template already; give the plain messages instead)")
    return prompt_ids, response_ids


def _render(tokenizer, prompt: list[dict], response: str, template: str) -> tuple[list[int], list[int]]:
    name = template_name(tokenizer, template)
    if name == "raw":
        text = "\n\n".join(m["content"] for m in prompt)
        prompt_ids = tokenizer.encode(text, add_special_tokens=True)
        return prompt_ids, tokenizer.encode(" " + response, add_special_tokens=False) if response else []
    if name == "plain":
        turns = "".join(f"\n\n{'Assistant' if m['role'] == 'assistant' else 'Human'}: {m['content']}"
                        for m in prompt if m["role"] != "system")
        system = "".join(m["content"] + "\n" for m in prompt if m["role"] == "system")
        prompt_ids = tokenizer.encode(system + turns + "\n\nAssistant:", add_special_tokens=True)
        eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
        return prompt_ids, tokenizer.encode(" " + response, add_special_tokens=False) + eos
    chat_template = None if name == "model" else BUILTIN_TEMPLATES[name]
    full_messages = list(prompt) + [{"role": "assistant", "content": response}]
    prompt_text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, chat_template=chat_template)
    full_text = tokenizer.apply_chat_template(full_messages, chat_template=chat_template)
    if not full_text.startswith(prompt_text):
        raise DataError(f"{tokenizer.source}: the chat template does not render the reply right after the "
                        "generation prompt (it renders the prompt turns differently once a reply follows them; "
                        "Mistral's template, e.g., writes a system message only into a final user turn), so the "
                        "prompt/response boundary is undefined; drop the system message or fold it into the last "
                        "user turn, or choose --template")
    return (tokenizer.encode(prompt_text, add_special_tokens=False),
            tokenizer.encode(full_text[len(prompt_text):], add_special_tokens=False))


def gate_offset(tokenizer, prompt: list[dict], template: str = "model") -> int:
    """How many prompt tokens follow the gating token: its position is ``len(prompt_ids) - 1 - offset``.

    The gating token closes the last user turn. It is the last token of the prompt rendered
    *without* the generation prompt, trailing whitespace removed (ChatML's ``<|im_end|>\n`` ends in
    ``<|im_end|>``, Llama-3's rendering in ``<|eot_id|>``); what follows it in ``render``'s prompt
    ids (a newline, the assistant header) is the offset. With ``plain`` the user turn has no closing
    token and the gate is its last token (before "\n\nAssistant:"). Counting from the end keeps the
    offset valid when the oldest prompt tokens are truncated away. Where the closed turn does not
    tokenise as a prefix of the prompt (a merge across the boundary), the gate is the last token
    the two share.
    """
    if not prompt:
        raise DataError("an empty prompt has no user turn, so there is no gating token; give the prompt turns")
    name = template_name(tokenizer, template)
    if name == "plain":
        prompt_ids = _render(tokenizer, prompt, "x", template)[0]
        turns = "".join(f"\n\n{'Assistant' if m['role'] == 'assistant' else 'Human'}: {m['content']}"
                        for m in prompt if m["role"] != "system")
        system = "".join(m["content"] + "\n" for m in prompt if m["role"] == "system")
        closed_ids = tokenizer.encode((system + turns).rstrip(), add_special_tokens=True)
    else:
        chat_template = None if name == "model" else BUILTIN_TEMPLATES[name]
        with_header = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, chat_template=chat_template)
        closed = tokenizer.apply_chat_template(prompt, add_generation_prompt=False, chat_template=chat_template)
        if not with_header.startswith(closed):
            raise DataError(f"{tokenizer.source}: the chat template's generation prompt does not follow the closed "
                            "user turn, so the gating token (the token that closes the user turn) is undefined; "
                            "choose --template")
        prompt_ids = tokenizer.encode(with_header, add_special_tokens=False)
        closed_ids = tokenizer.encode(closed.rstrip(), add_special_tokens=False)
    shared = next((i for i, (a, b) in enumerate(zip(prompt_ids, closed_ids)) if a != b),
                  min(len(prompt_ids), len(closed_ids)))
    if shared == 0:
        raise DataError(f"{tokenizer.source}: the prompt shares no token with its closed user turn; no gating token")
    return len(prompt_ids) - shared
