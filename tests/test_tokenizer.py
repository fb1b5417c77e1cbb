"""Tokenizer against transformers' own tokenizers for the two real models (GGUF and saved HF dirs)."""
from __future__ import annotations

import json
import random
import shutil

import pytest

from rmjax.errors import CheckpointError, ConfigError, DataError
from rmjax.io.registry import resolve_model
from rmjax.io.tokenizer import Tokenizer, check_vocab

transformers = pytest.importorskip("transformers")
from tokenizers import pre_tokenizers

TEXTS = [
    "Hello world", "The capital of France is", "  two leading spaces", "trailing spaces   ",
    "multiple   spaces  inside", "line1\nline2\n\nline4\n", "\ttabs\tand\t\tmore", "windows\r\nnewlines\r\n",
    "digits 12345, 3.14159 and 2024-01-01", "9\n\n6 6", "punctuation!?.,;:'\"()[]{}<>@#$%^&*~`|\\",
    "don't won't it's I'm we'll they've", "unicode: café naïve façade Zürich Ελληνικά русский",
    "emoji 😀🎉👍🏽 and ❤️", "CJK: 你好，世界。日本語のテキスト 한국어", "∑∫√∞≠≤ math", "\u200b zero width \u00a0 nbsp",
    "<|im_start|>user\nHi<|im_end|>\n", "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n",
    "code: def f(x):\n    return x**2  # comment", "", " ", "\n", "a", "x" * 60,
]

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi there!"},
    {"role": "assistant", "content": "Hello. How can I help?"},
    {"role": "user", "content": "What is 2+2?\nAnswer briefly."},
]

# A Gemma-style template (the base GGUF has none) exercising set/elif/raise_exception/trim/bos_token.
GEMMA_STYLE_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}"
    "{% elif message['role'] in ['user', 'system'] %}{% set role = message['role'] %}"
    "{% else %}{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
    "<start_of_turn>{{ role }}\n{{ message['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


def random_texts(tokenizer: Tokenizer, n: int, seed: int = 0) -> list[str]:
    """Strings glued from random vocabulary pieces and random characters."""
    rng = random.Random(seed)
    chars = list("abcxyzABC 0123456789 \n\t.,!?'\"-éüñ漢字かなЖж😀")
    out = []
    for _ in range(n):
        parts = [tokenizer.token_to_str(rng.randrange(tokenizer.vocab_size)) if rng.random() < 0.5
                 else "".join(rng.choice(chars) for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(1, 10))]
        out.append("".join(parts))
    return out


@pytest.fixture(scope="module")
def smollm2():
    """(ours, transformers' reference) for SmolLM2's GGUF."""
    path = resolve_model("smollm2-135m-instruct").path
    reference = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    # transformers ignores tokenizer.ggml.pre='smollm'; SmolLM2's published tokenizer.json (and llama.cpp's
    # 'smollm' rule) split digits individually before the GPT-2 byte-level split. Restore that.
    reference.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    return Tokenizer.from_gguf(path), reference


@pytest.fixture(scope="module")
def gemma3():
    path = resolve_model("gemma3-270m").path
    reference = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return Tokenizer.from_gguf(path), reference


@pytest.fixture(scope="module", params=["smollm2", "gemma3"])
def pair(request):
    return request.getfixturevalue(request.param)


@pytest.mark.slow
def test_encode_matches_transformers(pair):
    ours, reference = pair
    for text in TEXTS:
        for special in (True, False):
            assert ours.encode(text, add_special_tokens=special) == reference.encode(
                text, add_special_tokens=special), repr(text)
    fuzz = random_texts(ours, 150)
    assert ours.encode_batch(fuzz) == [reference.encode(t) for t in fuzz]


@pytest.mark.slow
def test_decode_matches_and_round_trips(pair):
    ours, reference = pair
    for text in TEXTS:
        ids = reference.encode(text)
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == reference.decode(ids, skip_special_tokens=skip)
        assert ours.decode(ours.encode(text, add_special_tokens=False)) == text


@pytest.mark.slow
def test_special_tokens_match(pair):
    ours, reference = pair
    assert ours.vocab_size == len(reference)
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.unk_id) == (
        reference.bos_token_id, reference.eos_token_id, reference.pad_token_id, reference.unk_token_id)


@pytest.mark.slow
def test_smollm2_specifics(smollm2):
    ours, _ = smollm2
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (1, 2, 2)
    assert ours.end_of_turn_ids == [2]  # <|im_end|> is also eos
    assert ours.encode("Hi") == ours.encode("Hi", add_special_tokens=False)  # no BOS for SmolLM2
    paris = ours.encode(" Paris", add_special_tokens=False)
    assert len(paris) == 1 and ours.token_to_str(paris[0]) == " Paris"
    # "\n\n" before a digit stays one token under the digit-isolating split.
    tokens = [ours.backend.id_to_token(i) for i in ours.encode("9\n\n6")]
    assert tokens == ["9", "ĊĊ", "6"]


@pytest.mark.slow
def test_gemma3_specifics(gemma3):
    ours, _ = gemma3
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (2, 1, 0)
    assert ours.end_of_turn_ids == [106, 1]  # <end_of_turn>, <eos>
    assert ours.encode("Hi")[0] == 2 and ours.encode("Hi", add_special_tokens=False)[0] != 2
    paris = ours.encode(" Paris", add_special_tokens=False)
    assert len(paris) == 1 and ours.token_to_str(paris[0]) == " Paris"
    assert ours.token_to_str(ours.token_id("<0x0A>")) == "\n"
    assert not ours.has_chat_template
    with pytest.raises(ConfigError, match="no chat template"):
        ours.apply_chat_template(CONVERSATION)


@pytest.mark.slow
def test_token_to_str_matches_single_token_decode(pair):
    ours, reference = pair
    step = max(1, ours.vocab_size // 500)
    for token_id in range(0, ours.vocab_size, step):
        piece = reference.convert_ids_to_tokens(token_id)
        if piece.startswith("<0x"):
            continue  # a lone byte is no text; checked separately
        assert ours.token_to_str(token_id) == reference.decode([token_id]), token_id


@pytest.mark.slow
def test_smollm2_chat_template_matches_transformers(smollm2):
    ours, reference = smollm2
    assert ours.has_chat_template
    for messages in (CONVERSATION, CONVERSATION[1:]):
        for generation_prompt in (False, True):
            assert ours.apply_chat_template(messages, add_generation_prompt=generation_prompt) == \
                reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


@pytest.mark.slow
def test_explicit_template_matches_transformers(gemma3):
    ours, reference = gemma3
    for generation_prompt in (False, True):
        assert ours.apply_chat_template(CONVERSATION, generation_prompt, chat_template=GEMMA_STYLE_TEMPLATE) == \
            reference.apply_chat_template(CONVERSATION, chat_template=GEMMA_STYLE_TEMPLATE, tokenize=False,
                                          add_generation_prompt=generation_prompt)
    json_template = "{{ messages | tojson }}{{ messages[0] | tojson(indent=2) }}"
    assert ours.apply_chat_template(CONVERSATION, chat_template=json_template) == \
        reference.apply_chat_template(CONVERSATION, chat_template=json_template, tokenize=False)
    with pytest.raises(DataError, match="unknown role tool"):
        ours.apply_chat_template([{"role": "tool", "content": "x"}], chat_template=GEMMA_STYLE_TEMPLATE)


@pytest.fixture(scope="module")
def saved_dirs(tmp_path_factory, smollm2, gemma3):
    root = tmp_path_factory.mktemp("tok")
    for name, (_, reference) in (("smollm2", smollm2), ("gemma3", gemma3)):
        reference.save_pretrained(root / name)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_from_hf_dir_matches_transformers(saved_dirs, name):
    directory = saved_dirs / name
    ours = Tokenizer.from_hf_dir(directory)
    reference = transformers.AutoTokenizer.from_pretrained(directory)
    for text in TEXTS + random_texts(ours, 50, seed=1):
        assert ours.encode(text) == reference.encode(text), repr(text)
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.vocab_size) == (
        reference.bos_token_id, reference.eos_token_id, reference.pad_token_id, len(reference))
    assert ours.chat_template == reference.chat_template
    if ours.has_chat_template:
        assert ours.apply_chat_template(CONVERSATION, True) == reference.apply_chat_template(
            CONVERSATION, tokenize=False, add_generation_prompt=True)


@pytest.mark.slow
def test_tokenizer_json_decides_bos_not_the_config_flag(saved_dirs, tmp_path):
    directory = tmp_path / "smollm2-bos"
    shutil.copytree(saved_dirs / "smollm2", directory)
    config_file = directory / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps(config | {"add_bos_token": True}))
    ours = Tokenizer.from_hf_dir(directory)
    reference = transformers.AutoTokenizer.from_pretrained(directory)
    assert ours.encode("Hello") == reference.encode("Hello")
    assert ours.bos_id not in ours.encode("Hello")  # tokenizer.json's post-processor adds no BOS


def test_check_vocab():
    path = resolve_model("smollm2-135m-instruct").path
    tokenizer = Tokenizer.from_gguf(path)
    check_vocab(tokenizer, 49152, "model.gguf")
    check_vocab(tokenizer, 49152 + 64, "model.gguf")  # padded embedding tables are fine
    with pytest.raises(CheckpointError, match=r"model.gguf: the tokenizer .* has 49152 tokens .* only 32000 rows"):
        check_vocab(tokenizer, 32000, "model.gguf")


def test_missing_tokenizer_json_says_how_to_fix(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"\x00")
    with pytest.raises(CheckpointError, match=r"no tokenizer.json \(found: tokenizer.model\).*save_pretrained"):
        Tokenizer.from_hf_dir(tmp_path)


def test_gguf_without_vocabulary_or_with_unknown_split(tmp_path):
    import numpy as np
    from test_io_gguf import write_gguf

    tensors = {"token_embd.weight": np.zeros((4, 8)), "output_norm.weight": np.ones(8)}
    meta = {"llama.block_count": 0, "llama.embedding_length": 8, "llama.attention.head_count": 1,
            "llama.feed_forward_length": 8}
    bare = write_gguf(tmp_path / "bare.gguf", "llama", meta, tensors)
    with pytest.raises(CheckpointError, match="no tokenizer in this GGUF"):
        Tokenizer.from_gguf(bare)
    vocab = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "mystery", "tokenizer.ggml.tokens": ["a", "b", "ab", "c"],
             "tokenizer.ggml.merges": ["a b"]}
    odd = write_gguf(tmp_path / "odd.gguf", "llama", meta | vocab, tensors)
    with pytest.raises(CheckpointError, match=r"tokenizer.ggml.pre 'mystery' .* not supported; supported: .*smollm"):
        Tokenizer.from_gguf(odd)
    known = write_gguf(tmp_path / "known.gguf", "llama", meta | vocab | {"tokenizer.ggml.pre": "gpt2"}, tensors)
    assert Tokenizer.from_gguf(known).encode("abc") == [2, 3]


def _sentencepiece_gguf(tmp_path, extra: dict):
    """A hand-made SentencePiece-style ('llama') vocabulary: specials, 256 byte pieces, then pieces
    in merge-priority order (scores -position, as SentencePiece writes them)."""
    import numpy as np
    from test_io_gguf import write_gguf

    pieces = ["\u2581", "a", "b", "c", "ab", "\u2581a", "\u2581ab", "bc"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    meta = {"llama.block_count": 0, "llama.embedding_length": 8, "llama.attention.head_count": 1,
            "llama.feed_forward_length": 8, "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.scores": [-float(i) for i in range(len(tokens))],
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.unknown_token_id": 0} | extra
    tensors = {"token_embd.weight": np.zeros((len(tokens), 8)), "output_norm.weight": np.ones(8)}
    return Tokenizer.from_gguf(write_gguf(tmp_path / "spm.gguf", "llama", meta, tensors))


def test_sentencepiece_vocab_merges_by_priority_with_byte_fallback(tmp_path):
    tokenizer = _sentencepiece_gguf(tmp_path, {})
    byte = {b: 3 + b for b in range(256)}
    space_ab, c, space_a = 265, 262, 264
    # "▁abc": the a+b merge outranks ▁+a, then ▁+ab; BOS is added by default for this vocabulary type.
    assert tokenizer.encode("abc") == [1, space_ab, c]
    assert tokenizer.encode("a\né", add_special_tokens=False) == [space_a, byte[0x0A], byte[0xC3], byte[0xA9]]
    assert tokenizer.decode(tokenizer.encode("abc ab\né"), skip_special_tokens=True) == "abc ab\né"
    assert tokenizer.token_to_str(space_ab) == " ab" and tokenizer.token_to_str(byte[0x0A]) == "\n"
    assert tokenizer.end_of_turn_ids == [2]

    no_prefix = _sentencepiece_gguf(tmp_path, {"tokenizer.ggml.add_space_prefix": False,
                                               "tokenizer.ggml.add_bos_token": False,
                                               "tokenizer.ggml.add_eos_token": True})
    assert no_prefix.encode("abc") == [263, c, 2]


# ------------------------------------------------------------------ template variables
THINKING = "{% if enable_thinking is defined and enable_thinking is false %}off{% else %}on{% endif %}"


def _bare(chat_template: str | None = None, **kwargs) -> Tokenizer:
    from tokenizers import Tokenizer as Backend
    from tokenizers import models

    return Tokenizer(Backend(models.BPE()), source="bare", chat_template=chat_template, **kwargs)


def test_thinking_is_off_by_default_where_the_template_has_the_switch():
    hi = [{"role": "user", "content": "Hi"}]
    tok = _bare(THINKING)
    assert tok.template_variables == {"enable_thinking": False}
    assert tok.apply_chat_template(hi) == "off"
    assert tok.apply_chat_template(hi, enable_thinking=True) == "on"  # a call's own variables win
    assert _bare("{{ messages[0]['content'] }}").template_variables == {}
    assert _bare().template_variables == {}
    tok.chat_template = "{{ messages[0]['content'] }}"  # the default follows the template
    assert tok.template_variables == {}
    tok.chat_template = THINKING
    tok.template_variables["extra"] = 1  # the default dict is the tokenizer's own, kept while the template is
    assert tok.template_variables == {"enable_thinking": False, "extra": 1}


def test_template_variables_can_be_overridden():
    hi = [{"role": "user", "content": "Hi"}]
    tok = _bare(THINKING, template_variables={})  # no variables: the template's own default (thinking on)
    assert tok.template_variables == {} and tok.apply_chat_template(hi) == "on"
    tok.template_variables = {"enable_thinking": False}
    assert tok.apply_chat_template(hi) == "off"
    tok.template_variables = None  # back to the default for this template
    assert tok.template_variables == {"enable_thinking": False}
    with pytest.raises(ConfigError, match="bare: template_variables must be a dict"):
        tok.template_variables = ["enable_thinking"]
    with pytest.raises(ConfigError, match="may not set add_generation_prompt, messages"):
        _bare(THINKING, template_variables={"messages": [], "add_generation_prompt": True})


def test_template_sees_tools_and_documents_as_transformers_passes_them():
    from transformers.utils.chat_template_utils import render_jinja_template

    template = "{{ tools is none }} {{ documents is none }} {{ tools is defined }}"
    hi = [{"role": "user", "content": "Hi"}]
    assert _bare(template).apply_chat_template(hi) == render_jinja_template([hi], chat_template=template)[0][0]
    assert _bare(template).apply_chat_template(hi) == "True True True"
