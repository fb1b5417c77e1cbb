"""rmjax renders the families' published chat templates to exactly the token ids transformers does.

For each template (Llama-3, Llama-3.1, Gemma-2, Gemma-3, Mistral-v0.3, Qwen3, ChatML) on a tiny tokenizer
that holds the family's special tokens: ``render``'s prompt ids + response ids are transformers'
``apply_chat_template`` ids of the whole conversation, the prompt ids are its ids of the prompt with
the generation prompt, and ``gate_offset`` points at the token that closes the last user turn. The
built-in ``llama3``, ``gemma`` and ``chatml`` renderings equal the published templates they stand for.
"""
from __future__ import annotations

import pytest
from chat_templates import (
    CHATML,
    GEMMA2,
    GEMMA3,
    LLAMA3,
    LLAMA31,
    MISTRAL_V03,
    QWEN3,
    family_tokenizer,
)

from rmjax.data.chat import gate_offset, render
from rmjax.errors import DataError
from rmjax.io.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

SYSTEM = {"role": "system", "content": "You are terse. \n"}
TURNS = [{"role": "user", "content": "  What, in one word, is the best thing ever?"},
         {"role": "assistant", "content": "Love. "}, {"role": "user", "content": "And the worst?"}]
PROMPTS = {"system+3": [SYSTEM, *TURNS], "3": TURNS, "1": TURNS[:1]}
RESPONSES = ["Hatred", " spaced  out ", "多语言 émoji 🎉\nnew line", "Well:\n\n- one\n- two  "]

# name -> (family, template, variables of its generation prompt, gating token, the generation prompt after it)
TEMPLATES = {
    "llama3": ("llama3", LLAMA3, {}, "<|eot_id|>", "<|start_header_id|>assistant<|end_header_id|>\n\n"),
    "llama3.1": ("llama3", LLAMA31, {}, "<|eot_id|>", "<|start_header_id|>assistant<|end_header_id|>\n\n"),
    "gemma2": ("gemma", GEMMA2, {}, "<end_of_turn>", "\n<start_of_turn>model\n"),
    "gemma3": ("gemma", GEMMA3, {}, "<end_of_turn>", "\n<start_of_turn>model\n"),
    "mistral-v0.3": ("mistral", MISTRAL_V03, {}, "[/INST]", ""),
    "qwen3": ("qwen", QWEN3, {"enable_thinking": False}, "<|im_end|>", "\n<|im_start|>assistant\n<think>\n\n</think>\n\n"),
    "chatml": ("qwen", CHATML, {}, "<|im_end|>", "\n<|im_start|>assistant\n"),
}
# templates that render no boundary for a system message: Gemma 2 has no system role, and Mistral v0.3
# writes the system message only into a conversation's final user turn (tested below)
NO_SYSTEM = {"gemma2", "mistral-v0.3"}


def _training_texts() -> list[str]:
    texts = [m["content"] for m in (SYSTEM, *TURNS)] + RESPONSES
    texts += ["user assistant system model ipython", "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024",
              "Environment: ipython\nYou have access to the following functions.", "<think>\n\n</think>\n\n"]
    return texts * 3


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """name -> (rmjax Tokenizer read from the saved directory, transformers tokenizer)."""
    out = {}
    for name, (family, template, *_) in TEMPLATES.items():
        reference = family_tokenizer(family, _training_texts(), template)
        directory = tmp_path_factory.mktemp(name)
        reference.save_pretrained(directory)
        ours = Tokenizer.from_hf_dir(directory)
        assert ours.chat_template == template
        out[name] = ours, reference
    return out


def _ids(encoded) -> list[int]:
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def _reference_ids(reference, messages, generation_prompt=False, chat_template=None, **variables) -> list[int]:
    return _ids(reference.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt,
                                              chat_template=chat_template, **variables))


def _cases():
    for name in TEMPLATES:
        for prompt in PROMPTS:
            if not (name in NO_SYSTEM and prompt == "system+3"):
                yield name, prompt


@pytest.mark.parametrize("response", RESPONSES)
@pytest.mark.parametrize(("name", "prompt"), list(_cases()))
def test_render_matches_transformers(pairs, name, prompt, response):
    ours, reference = pairs[name]
    messages, variables = PROMPTS[prompt], TEMPLATES[name][2]
    prompt_ids, response_ids = render(ours, messages, response, "model")
    full = _reference_ids(reference, messages + [{"role": "assistant", "content": response}])
    assert prompt_ids + response_ids == full
    assert prompt_ids == _reference_ids(reference, messages, True, **variables)  # the boundary is the prompt's end
    assert set(response_ids) & set(ours.end_of_turn_ids)  # the reply's end-of-turn is scored
    assert response.split()[0] in ours.decode(response_ids)


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_gating_token_closes_the_last_user_turn(pairs, name):
    ours, _ = pairs[name]
    *_, gate_token, header = TEMPLATES[name]
    messages = PROMPTS["3" if name in NO_SYSTEM else "system+3"]
    prompt_ids, _ = render(ours, messages, "Hatred", "model")
    g = len(prompt_ids) - 1 - gate_offset(ours, messages, "model")
    assert prompt_ids[g] == ours.token_id(gate_token)
    assert ours.decode(prompt_ids[:g]).endswith("And the worst?")  # the last user turn, not the first
    assert ours.decode(prompt_ids[g + 1:]) == header  # only the generation prompt follows the gate
    if name == "mistral-v0.3":
        assert g == len(prompt_ids) - 1  # [/INST] is the prompt's last token


def test_qwen3_thinking_off_puts_the_empty_think_block_in_the_prompt(pairs):
    ours, reference = pairs["qwen3"]
    assert ours.template_variables == {"enable_thinking": False}  # the default for a template with the switch
    messages = PROMPTS["system+3"]
    prompt_ids, response_ids = render(ours, messages, "Hatred", "model")
    assert ours.decode(prompt_ids).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    closing = prompt_ids.index(ours.token_id("</think>"))
    assert prompt_ids[closing - 2] == ours.token_id("<think>") and closing >= len(prompt_ids) - 2
    assert ours.token_id("<think>") not in response_ids and ours.decode(response_ids) == "Hatred<|im_end|>\n"
    # transformers' default (thinking on) generation prompt has no think block; the full conversation has it
    assert _reference_ids(reference, messages, True) != prompt_ids
    full = _reference_ids(reference, messages + [{"role": "assistant", "content": "Hatred"}])
    assert full == prompt_ids + response_ids

    ours.template_variables = {"enable_thinking": True}  # a caller's override: the think block is the reply's
    try:
        prompt_ids, response_ids = render(ours, messages, "Hatred", "model")
        assert prompt_ids == _reference_ids(reference, messages, True, enable_thinking=True)
        assert prompt_ids + response_ids == full and response_ids[0] == ours.token_id("<think>")
        reasoned = "<think>\nIt is hatred.\n</think>\n\nHatred"
        prompt_ids, response_ids = render(ours, messages, reasoned, "model")
        assert prompt_ids + response_ids == _reference_ids(reference, messages + [
            {"role": "assistant", "content": reasoned}])
    finally:
        ours.template_variables = None
    assert ours.template_variables == {"enable_thinking": False}


def test_llama31_dated_header_and_template_variables(pairs):
    ours, reference = pairs["llama3.1"]
    assert ours.template_variables == {}
    messages = PROMPTS["system+3"]
    prompt_ids, _ = render(ours, messages, "Hatred", "model")
    text = ours.decode(prompt_ids)
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
                           "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\nYou are terse.<|eot_id|>")
    ours.template_variables = {"date_string": "01 Jan 2025"}
    try:
        prompt_ids, response_ids = render(ours, messages, "Hatred", "model")
        assert "Today Date: 01 Jan 2025\n\n" in ours.decode(prompt_ids)
        assert prompt_ids == _reference_ids(reference, messages, True, date_string="01 Jan 2025")
        assert prompt_ids + response_ids == _reference_ids(
            reference, messages + [{"role": "assistant", "content": "Hatred"}], date_string="01 Jan 2025")
    finally:
        ours.template_variables = None


TOOLS = [{"type": "function", "function": {"name": "lookup", "description": "Look a word up.", "parameters": {
    "type": "object", "properties": {"word": {"type": "string", "description": "the word"}}, "required": ["word"]}}}]
CALL = {"role": "assistant", "content": "", "tool_calls": [
    {"id": "call12345", "type": "function", "function": {"name": "lookup", "arguments": {"word": "love"}}}]}


@pytest.mark.parametrize("name", ["llama3.1", "qwen3", "mistral-v0.3"])
def test_tool_branches_render_as_transformers(pairs, name):
    ours, reference = pairs[name]
    result = {"role": "tool", "content": "a feeling", "tool_call_id": "call12345"}
    messages = [TURNS[0], CALL, result]
    for generation_prompt in (False, True):
        for tools in (None, TOOLS):
            assert ours.apply_chat_template(messages, generation_prompt, tools=tools) == reference.apply_chat_template(
                messages, tools=tools, tokenize=False, add_generation_prompt=generation_prompt,
                **TEMPLATES[name][2])


def test_mistral_system_message_has_no_boundary(pairs):
    ours, reference = pairs["mistral-v0.3"]
    messages = PROMPTS["system+3"]
    # transformers itself renders the system text with the generation prompt but not before a reply
    prompt_text = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full_text = reference.apply_chat_template(messages + [{"role": "assistant", "content": "Hatred"}], tokenize=False)
    assert "You are terse." in prompt_text and "You are terse." not in full_text
    with pytest.raises(DataError, match="writes a system message only into a final user turn.*fold it into the last"):
        render(ours, messages, "Hatred", "model")


def test_gemma2_rejects_a_system_message_like_transformers(pairs):
    ours, reference = pairs["gemma2"]
    with pytest.raises(Exception, match="System role not supported"):
        reference.apply_chat_template(PROMPTS["system+3"], tokenize=False)
    with pytest.raises(DataError, match="rejected the conversation: System role not supported"):
        render(ours, PROMPTS["system+3"], "Hatred", "model")


# ----------------------------------------------------------------- built-in renderings = published templates
BUILTINS = [("llama3", "llama3", LLAMA3, list(PROMPTS)), ("gemma", "gemma3", GEMMA3, list(PROMPTS)),
            ("gemma", "gemma2", GEMMA2, ["3", "1"]), ("chatml", "chatml", CHATML, list(PROMPTS))]


@pytest.mark.parametrize(("builtin", "name", "published", "prompts"), BUILTINS)
def test_builtin_rendering_is_the_published_template(pairs, builtin, name, published, prompts):
    ours, reference = pairs[name]
    for prompt in prompts:
        messages = PROMPTS[prompt]
        for response in RESPONSES:
            prompt_ids, response_ids = render(ours, messages, response, builtin)
            assert prompt_ids == _reference_ids(reference, messages, True, chat_template=published), prompt
            assert prompt_ids + response_ids == _reference_ids(
                reference, messages + [{"role": "assistant", "content": response}], chat_template=published)
            assert (prompt_ids, response_ids) == render(ours, messages, response, "model")
        assert gate_offset(ours, messages, builtin) == gate_offset(ours, messages, "model")


def test_builtin_llama3_is_not_llama31(pairs):
    """Llama 3.1's template always writes its dated system header; the built-in (Llama 3's) never does."""
    ours, reference = pairs["llama3.1"]
    prompt_ids, _ = render(ours, TURNS, "Hatred", "llama3")
    assert "Cutting Knowledge" not in ours.decode(prompt_ids)
    assert prompt_ids != _reference_ids(reference, TURNS, True)
