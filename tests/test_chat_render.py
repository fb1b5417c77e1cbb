"""Prompt/response boundaries are token-exact for every template, on the real tokenizers.

(tests/test_chat_templates_published.py compares the renderings with transformers' on the families'
published templates.)"""
import pytest
from tokenizers import AddedToken
from tokenizers import Tokenizer as Backend

from rmjax.data.chat import BUILTIN_TEMPLATES, gate_offset, render, template_name
from rmjax.errors import ConfigError, DataError
from rmjax.io import registry
from rmjax.io.tokenizer import Tokenizer

PROMPT = [{"role": "user", "content": "What, in one word, is the best thing ever?"},
          {"role": "assistant", "content": "Love."}, {"role": "user", "content": "And the worst?"}]
# the control tokens of every built-in rendering
FAMILY_TOKENS = ("<|im_start|>", "<|im_end|>", "<start_of_turn>", "<end_of_turn>", "<|begin_of_text|>",
                 "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


def with_family_tokens(tok: Tokenizer) -> Tokenizer:
    """A copy of a real tokenizer that also holds the other families' control tokens (as special tokens
    appended to its vocabulary), so every built-in rendering can be tokenised with it."""
    backend = Backend.from_str(tok.backend.to_str())
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in FAMILY_TOKENS
                                if backend.token_to_id(t) is None])
    return Tokenizer(backend, source=tok.source, bos_token=tok.bos_token, eos_token=tok.eos_token,
                     pad_token=tok.pad_token, unk_token=tok.unk_token, chat_template=tok.chat_template,
                     sentencepiece=tok._sentencepiece)


@pytest.fixture(scope="module", params=["smollm2-135m-instruct", "gemma3-270m"])
def tok(request):
    return with_family_tokens(registry.load_tokenizer(request.param))


def test_family_tokens_are_whole_tokens_and_the_rest_is_unchanged(tok):
    original = registry.load_tokenizer("gemma3-270m" if "gemma" in tok.source.lower() else "smollm2-135m-instruct")
    assert all(len(tok.encode(t, add_special_tokens=False)) == 1 for t in FAMILY_TOKENS)
    text = "What, in one word, is the best thing ever?\n多语言 émoji 🎉"
    assert tok.encode(text) == original.encode(text) and tok.vocab_size >= original.vocab_size


@pytest.mark.parametrize("template", ["model", "plain", *BUILTIN_TEMPLATES])
@pytest.mark.parametrize("response", ["Hatred", " spaced  out ", "多语言 émoji 🎉\nnew line"])
def test_boundary_is_token_exact(tok, template, response):
    prompt_ids, response_ids = render(tok, PROMPT, response, template)
    name = template_name(tok, template)
    if name == "plain":
        full = tok.encode(tok.decode(prompt_ids, skip_special_tokens=True) + " " + response, add_special_tokens=True)
        assert full[:len(prompt_ids)] == prompt_ids
        assert response_ids[-1] == tok.eos_id
    else:
        chat = None if name == "model" else BUILTIN_TEMPLATES[name]
        text = tok.apply_chat_template(PROMPT + [{"role": "assistant", "content": response}], chat_template=chat)
        prompt_text = tok.apply_chat_template(PROMPT, add_generation_prompt=True, chat_template=chat)
        assert prompt_ids == tok.encode(prompt_text, add_special_tokens=False)
        assert tok.decode(prompt_ids + response_ids) == text
        if name == "llama3" and "SmolLM" in tok.source:
            # the one pairing whose split merges across the boundary: SmolLM2's GPT-2 split reads the
            # generation prompt's "\n\n" before a reply as two newline tokens, alone as one; the prompt keeps
            # its own tokens and the reply is tokenised after it, as a model generating it would have
            assert tok.encode(text, add_special_tokens=False) != prompt_ids + response_ids
            assert tok.encode(text[len(prompt_text):], add_special_tokens=False) == response_ids
        else:
            assert tok.encode(text, add_special_tokens=False) == prompt_ids + response_ids
        end = tok.decode(response_ids)
        assert response.strip() in end
        assert set(response_ids) & set(tok.end_of_turn_ids)  # the reply's end-of-turn is scored


def test_model_template_falls_back_to_plain_for_base_models():
    gemma = registry.load_tokenizer("gemma3-270m")
    assert template_name(gemma, "model") == "plain"
    smol = registry.load_tokenizer("smollm2-135m-instruct")
    assert template_name(smol, "model") == "model"
    with pytest.raises(ConfigError, match="unknown template"):
        template_name(smol, "vicuna")


def test_duplicated_bos_is_reported_with_the_fix():
    gemma = registry.load_tokenizer("gemma3-270m")  # its tokenizer adds BOS itself
    bos = gemma.bos_token
    with pytest.raises(DataError, match=r"starts with two BOS tokens .* Remove the leading '<bos>'"):
        render(gemma, [{"role": "system", "content": f"{bos}Be kind."}, {"role": "user", "content": "Hi"}], "Hey")
    prompt, _ = render(gemma, [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}], "Hey")
    assert prompt[0] == gemma.bos_id and prompt[1] != gemma.bos_id


# ----------------------------------------------------------------------------- ArmoRM's gating token
def _gate_token(tok, template):
    """(prompt ids, gate position) for PROMPT (two user turns)."""
    prompt_ids, _ = render(tok, PROMPT, "Hatred", template)
    return prompt_ids, len(prompt_ids) - 1 - gate_offset(tok, PROMPT, template)


def test_gating_token_closes_the_last_user_turn_chatml():
    smol = registry.load_tokenizer("smollm2-135m-instruct")
    for template in ("model", "chatml"):
        ids, g = _gate_token(smol, template)
        assert ids[g] == smol.token_id("<|im_end|>")  # not the last token of the generation prompt
        assert g < len(ids) - 1
        assert smol.decode(ids[g + 1:]) == "\n<|im_start|>assistant\n"
        assert smol.decode(ids[:g]).endswith("And the worst?")  # the last user turn, not the first


def test_gating_token_plain_template_is_the_last_user_token():
    gemma = registry.load_tokenizer("gemma3-270m")
    ids, g = _gate_token(gemma, "plain")
    assert gemma.decode(ids[:g + 1]).endswith("And the worst?")
    assert gemma.decode(ids[g + 1:]) == "\n\nAssistant:"


def test_gating_token_gemma_is_end_of_turn_before_the_model_turn():
    gemma = registry.load_tokenizer("gemma3-270m")
    ids, g = _gate_token(gemma, "gemma")
    assert ids[g] == gemma.token_id("<end_of_turn>")
    assert gemma.decode(ids[g + 1:]) == "\n<start_of_turn>model\n"  # the header follows the gate
    assert gemma.decode(ids[:g]).endswith("And the worst?")
    assert ids.count(ids[g]) == 3 and g == len(ids) - 1 - ids[::-1].index(ids[g])  # every turn closes so; the last


def test_gating_token_llama3_is_eot_before_the_assistant_header():
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from rmjax.io.tokenizer import Tokenizer

    specials = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator([m["content"] for m in PROMPT] * 4 + ["user assistant"], trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok = Tokenizer(backend, source="tiny-llama3", bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                    chat_template=BUILTIN_TEMPLATES["llama3"])
    ids, g = _gate_token(tok, "model")
    assert ids[g] == tok.token_id("<|eot_id|>")
    # the authors' pattern: <|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n starts at the gate
    assert tok.decode(ids[g:]) == "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    assert ids.count(tok.token_id("<|eot_id|>")) == 3 and ids[g] == ids[-1 - ids[::-1].index(ids[g])]
    with pytest.raises(DataError, match="no user turn"):
        gate_offset(tok, [], "model")


def test_raw_is_the_bare_prompt_with_the_reply_as_plain_text():
    gemma = registry.load_tokenizer("gemma3-270m")
    question = "What, in one word, is the best thing ever?"
    assert template_name(gemma, "model", base="raw") == "raw"
    assert template_name(registry.load_tokenizer("smollm2-135m-instruct"), "model", base="raw") == "model"
    prompt_ids, response_ids = render(gemma, [{"role": "user", "content": question}], "Love", "raw")
    assert prompt_ids == gemma.encode(question, add_special_tokens=True)  # as a pretrained model reads text
    assert prompt_ids[0] == gemma.bos_id and "Human" not in gemma.decode(prompt_ids)
    assert response_ids == gemma.encode(" Love", add_special_tokens=False)  # no end-of-turn, no EOS
    assert render(gemma, [{"role": "user", "content": question}], "", "model", base="raw") == (prompt_ids, [])
    joined, _ = render(gemma, PROMPT, "", "raw")
    assert gemma.decode(joined, skip_special_tokens=True) == "\n\n".join(m["content"] for m in PROMPT)


def test_score_gives_policy_and_reference_their_own_rendering():
    from rmjax.scoring.bulk import ModelSlot, ScoreSettings, slot_template

    gemma, smol = registry.load_tokenizer("gemma3-270m"), registry.load_tokenizer("smollm2-135m-instruct")

    def slot(role, tok):
        return ModelSlot(role, type("Loaded", (), {"tokenizer": tok, "reward_head": "a reward head"})())

    s = ScoreSettings()
    assert slot_template(slot("policy", smol), s) == "model"
    assert slot_template(slot("reference", gemma), s) == "raw"  # a base reference reads the bare prompt
    assert slot_template(slot("rm", gemma), s) == "plain"
    s = ScoreSettings(template="chatml", reference_template="plain")
    assert slot_template(slot("policy", smol), s) == "chatml"
    assert slot_template(slot("reference", gemma), s) == "plain"
