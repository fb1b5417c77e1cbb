"""One tokenizer interface over Hugging Face tokenizer directories and GGUF vocabularies.

The runtime tokenizer is always a ``tokenizers.Tokenizer``. From a GGUF it is rebuilt from the
metadata llama.cpp stores: ``gpt2`` vocabularies become byte-level BPE with the split regex named by
``tokenizer.ggml.pre``; ``llama`` (SentencePiece) vocabularies become BPE with byte fallback whose
merges are derived from the vocabulary order. Chat templates are rendered with jinja2 the way
transformers renders them, with the tokenizer's template variables (``Tokenizer.template_variables``,
e.g. Qwen3's ``enable_thinking``) passed to every rendering.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox
from tokenizers import (
    AddedToken,
    Regex,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)
from tokenizers import Tokenizer as Backend

from rmjax.errors import CheckpointError, ConfigError, DataError
from rmjax.io.gguf import GGUFCheckpoint

# llama.cpp token types (tokenizer.ggml.token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Tokens that close a chat turn in the common templates (ChatML, Gemma, Llama 3, Phi-3).
END_OF_TURN_TOKENS = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>")

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre -> (split regexes applied in order, whole-word lookup before merges).
# The smollm/starcoder family isolates every digit before the GPT-2 split.
_PRE_TOKENIZERS: dict[str, tuple[tuple[str, ...], bool]] = {
    "default": ((_GPT2_SPLIT,), False),
    "gpt2": ((_GPT2_SPLIT,), False),
    "gpt-2": ((_GPT2_SPLIT,), False),
    "smollm": ((r"\p{N}", _GPT2_SPLIT), False),
    "starcoder": ((r"\p{N}", _GPT2_SPLIT), False),
    "refact": ((r"\p{N}", _GPT2_SPLIT), False),
    "llama-bpe": ((_LLAMA3_SPLIT,), True),
    "llama3": ((_LLAMA3_SPLIT,), True),
    "qwen2": ((_QWEN2_SPLIT,), False),
    "deepseek-r1-qwen": ((_QWEN2_SPLIT,), False),
}


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used by byte-level vocabularies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


_BYTE_TO_CHAR = _byte_alphabet()
_CHAR_TO_BYTE = {c: b for b, c in _BYTE_TO_CHAR.items()}


def _token_content(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def default_template_variables(chat_template: str | None) -> dict[str, Any]:
    """The template variables a reward model renders with unless told otherwise: thinking off where the
    template has the switch (``enable_thinking``; Qwen3 then ends the generation prompt with an empty
    think block), since a reward model scores the reply, not a reasoning trace."""
    return {"enable_thinking": False} if chat_template and "enable_thinking" in chat_template else {}


def _raise_template_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # jinja2's built-in tojson escapes HTML characters, which chat templates must not do.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _template_environment() -> jinja2.Environment:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_template_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


class Tokenizer:
    """Encode/decode text and render chat templates for one model."""

    def __init__(self, backend: Backend, *, source: str, bos_token: str | None = None,
                 eos_token: str | None = None, pad_token: str | None = None, unk_token: str | None = None,
                 chat_template: str | None = None, sentencepiece: bool = False,
                 template_variables: dict[str, Any] | None = None):
        self.backend = backend
        self.source = source
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = bos_token, eos_token, pad_token, unk_token
        self.chat_template = chat_template
        self._defaults: tuple[str | None, dict[str, Any]] = (None, {})
        self.template_variables = template_variables
        self._sentencepiece = sentencepiece
        for role, token in (("bos", bos_token), ("eos", eos_token), ("pad", pad_token), ("unk", unk_token)):
            if token is not None and backend.token_to_id(token) is None:
                raise ConfigError(f"{source}: {role}_token {token!r} is not in the vocabulary")

    def __repr__(self) -> str:
        return f"Tokenizer({self.source!r}, vocab_size={self.vocab_size})"

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def from_hf_dir(cls, path: str | Path) -> Tokenizer:
        """A directory with ``tokenizer.json`` (+ ``tokenizer_config.json``) as saved by transformers."""
        directory = Path(path).expanduser()
        file = directory / "tokenizer.json"
        if not file.exists():
            found = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
            raise CheckpointError(
                f"{directory}: no tokenizer.json (found: {', '.join(found) or 'nothing'}); rmjax needs the fast "
                f"tokenizer file. Create it once with: python -c \"from transformers import AutoTokenizer as T; "
                f"T.from_pretrained('{directory}').save_pretrained('{directory}')\"")
        try:
            backend = Backend.from_file(str(file))
        except Exception as e:  # noqa: BLE001 -- the Rust parser raises a bare Exception
            raise CheckpointError(f"{file}: cannot parse tokenizer ({e}); re-download or re-save it") from None
        config = cls._json_or_empty(directory / "tokenizer_config.json")
        special_map = cls._json_or_empty(directory / "special_tokens_map.json")

        def special(name: str) -> str | None:
            return _token_content(config.get(name, special_map.get(name)))

        # BOS/EOS insertion comes from tokenizer.json's post-processor alone; like transformers 5, the
        # add_bos_token/add_eos_token flags of tokenizer_config.json are ignored when tokenizer.json exists.
        return cls(backend, source=str(directory), bos_token=special("bos_token"), eos_token=special("eos_token"),
                   pad_token=special("pad_token"), unk_token=special("unk_token"),
                   chat_template=cls._hf_chat_template(directory, config),
                   sentencepiece=bool(getattr(backend.model, "byte_fallback", False)))

    def save_hf(self, directory: str | Path) -> None:
        """Write ``tokenizer.json`` + ``tokenizer_config.json`` (special tokens, chat template), the
        files ``from_hf_dir`` and transformers' fast tokenizers read."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
        for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
            if getattr(self, name) is not None:
                config[name] = getattr(self, name)
        if self.chat_template:
            config["chat_template"] = self.chat_template
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))

    @staticmethod
    def _json_or_empty(file: Path) -> dict:
        if not file.exists():
            return {}
        try:
            content = json.loads(file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{file}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
        if not isinstance(content, dict):
            raise ConfigError(f"{file}: expected a JSON object at the top level")
        return content

    @staticmethod
    def _hf_chat_template(directory: Path, config: dict) -> str | None:
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        if template is None and (directory / "chat_template.jinja").exists():
            template = (directory / "chat_template.jinja").read_text(encoding="utf-8")
        if template is None and (directory / "chat_template.json").exists():
            template = Tokenizer._json_or_empty(directory / "chat_template.json").get("chat_template")
        return template

    @classmethod
    def from_gguf(cls, checkpoint: GGUFCheckpoint | str | Path) -> Tokenizer:
        """The tokenizer described by a GGUF file's ``tokenizer.*`` metadata."""

        if not isinstance(checkpoint, GGUFCheckpoint):
            checkpoint = GGUFCheckpoint(checkpoint)
        meta, source = checkpoint.metadata, str(checkpoint.path)
        kind = meta.get("tokenizer.ggml.model")
        tokens: list[str] | None = meta.get("tokenizer.ggml.tokens")
        if kind is None or not tokens:
            raise CheckpointError(f"{source}: no tokenizer in this GGUF (metadata 'tokenizer.ggml.model' / "
                                  f"'tokenizer.ggml.tokens' missing); use a GGUF that embeds its vocabulary")
        types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
        if kind == "gpt2":
            backend, tokens = _byte_level_bpe(meta, tokens, source)
        elif kind == "llama":
            backend, tokens = _sentencepiece_bpe(meta, tokens, types)
        else:
            raise CheckpointError(f"{source}: tokenizer.ggml.model {kind!r} is not supported (supported: gpt2, llama)")
        _add_marked_tokens(backend, tokens, types, kind)

        def token(key: str) -> str | None:
            index = meta.get(f"tokenizer.ggml.{key}")
            return tokens[index] if index is not None and 0 <= index < len(tokens) else None

        bos, eos = token("bos_token_id"), token("eos_token_id")
        add_bos = meta.get("tokenizer.ggml.add_bos_token", kind == "llama")
        add_eos = meta.get("tokenizer.ggml.add_eos_token", False)
        _set_bos_eos(backend, bos if add_bos else None, eos if add_eos else None)
        return cls(backend, source=source, bos_token=bos, eos_token=eos, pad_token=token("padding_token_id"),
                   unk_token=token("unknown_token_id"), chat_template=meta.get("tokenizer.chat_template"),
                   sentencepiece=kind == "llama")

    # -- ids ---------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    @property
    def bos_id(self) -> int | None:
        return None if self.bos_token is None else self.token_id(self.bos_token)

    @property
    def eos_id(self) -> int | None:
        return None if self.eos_token is None else self.token_id(self.eos_token)

    @property
    def unk_id(self) -> int | None:
        return None if self.unk_token is None else self.token_id(self.unk_token)

    @property
    def pad_id(self) -> int | None:
        """The padding id; the eos id when the vocabulary defines no padding token."""
        return self.token_id(self.pad_token) if self.pad_token is not None else self.eos_id

    @cached_property
    def end_of_turn_ids(self) -> list[int]:
        """Ids that end an assistant turn: the template's end-of-turn marker(s), then eos."""
        ids = [self.token_id(t) for t in END_OF_TURN_TOKENS] + [self.eos_id]
        return list(dict.fromkeys(i for i in ids if i is not None))

    # -- text --------------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_str(self, token_id: int) -> str:
        """The text one token stands for, e.g. ``" Paris"`` (special tokens as written)."""
        piece = self.backend.id_to_token(token_id)
        if piece is None:
            raise DataError(f"token id {token_id} is outside the vocabulary of {self.source} "
                            f"(size {self.vocab_size})")
        if token_id in self._added_ids:
            return piece
        if self._sentencepiece:
            if piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:
                return bytes([int(piece[3:5], 16)]).decode("utf-8", errors="replace")
            return piece.replace("\u2581", " ")
        return self.decode([token_id])

    @cached_property
    def _added_ids(self) -> frozenset[int]:
        return frozenset(self.backend.get_added_tokens_decoder())

    # -- chat --------------------------------------------------------------------------------------
    @property
    def has_chat_template(self) -> bool:
        return bool(self.chat_template)

    @property
    def template_variables(self) -> dict[str, Any]:
        """Variables every chat-template rendering sees besides the messages, e.g. ``{"enable_thinking":
        False}``. Unless assigned (here or in the constructor), ``default_template_variables`` of the
        current chat template; assigning None restores that default."""
        if self._template_variables is not None:
            return self._template_variables
        if self._defaults[0] != self.chat_template:
            self._defaults = (self.chat_template, default_template_variables(self.chat_template))
        return self._defaults[1]

    @template_variables.setter
    def template_variables(self, variables: dict[str, Any] | None) -> None:
        if variables is not None and not (isinstance(variables, dict) and all(isinstance(k, str) for k in variables)):
            raise ConfigError(f"{self.source}: template_variables must be a dict of name -> value "
                              f"(e.g. {{'enable_thinking': False}}), got {variables!r}")
        reserved = sorted(set(variables or ()) & {"messages", "add_generation_prompt"})
        if reserved:
            raise ConfigError(f"{self.source}: template_variables may not set {', '.join(reserved)} (given to "
                              "every rendering by apply_chat_template itself); remove them")
        self._template_variables = None if variables is None else dict(variables)

    @cached_property
    def _compiled_templates(self) -> dict[str, jinja2.Template]:
        return {}

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = False,
                            chat_template: str | None = None, **variables: Any) -> str:
        """Render a conversation ([{"role": ..., "content": ...}, ...]) to the prompt string.

        The template sees the special tokens, ``tools`` and ``documents`` (None, as transformers passes
        them), ``template_variables`` and then ``variables`` (which win)."""
        template = chat_template or self.chat_template
        if not template:
            raise ConfigError(
                f"{self.source}: this tokenizer has no chat template (a base model); format the prompt "
                f"as plain text or pass chat_template=...")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise DataError(f"message {i} must be a dict with 'role' and 'content', got {message!r}")
        if template not in self._compiled_templates:
            try:
                self._compiled_templates[template] = _template_environment().from_string(template)
            except jinja2.TemplateSyntaxError as e:
                raise ConfigError(f"{self.source}: chat template line {e.lineno}: {e.message}") from None
        context = {"bos_token": self.bos_token, "eos_token": self.eos_token, "unk_token": self.unk_token,
                   "pad_token": self.pad_token, "tools": None, "documents": None}
        context.update(self.template_variables)
        context.update(variables)
        try:
            return self._compiled_templates[template].render(
                messages=list(messages), add_generation_prompt=add_generation_prompt, **context)
        except jinja2.TemplateError as e:
            raise DataError(f"{self.source}: the chat template rejected the conversation: {e}") from None


def _set_bos_eos(backend: Backend, bos: str | None, eos: str | None) -> None:
    """Make ``encode(add_special_tokens=True)`` add exactly these tokens (None = not added)."""
    single = " ".join([*([f"{bos}:0"] if bos else []), "$A:0", *([f"{eos}:0"] if eos else [])])
    pair = single + " " + " ".join([*([f"{bos}:1"] if bos else []), "$B:1", *([f"{eos}:1"] if eos else [])])
    specials = list(dict.fromkeys((t, backend.token_to_id(t)) for t in (bos, eos) if t))
    backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)


def _byte_level_bpe(meta: dict, tokens: list[str], source: str) -> tuple[Backend, list[str]]:
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in _PRE_TOKENIZERS:
        raise CheckpointError(
            f"{source}: tokenizer.ggml.pre {pre!r} (the pre-tokenizer split rule) is not supported; "
            f"supported: {', '.join(sorted(_PRE_TOKENIZERS))}")
    splits, ignore_merges = _PRE_TOKENIZERS[pre]
    # Byte-level vocabularies spell every byte with a printable stand-in; re-spell any stored raw.
    alphabet = set(_CHAR_TO_BYTE)
    tokens = [t if set(t) <= alphabet else "".join(_BYTE_TO_CHAR[b] for b in t.encode("utf-8")) for t in tokens]
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
    if not merges:
        raise CheckpointError(f"{source}: byte-level vocabulary without 'tokenizer.ggml.merges'")
    backend = Backend(models.BPE({t: i for i, t in enumerate(tokens)}, merges, ignore_merges=ignore_merges))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(s), behavior="isolated") for s in splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    return backend, tokens


def _sentencepiece_bpe(meta: dict, tokens: list[str], types: list[int]) -> tuple[Backend, list[str]]:
    # Whitespace runs are stored with real spaces, but the normalizer turns spaces into U+2581.
    tokens = ["\u2581" * len(t) if t and " " in t and not t.strip() else t for t in tokens]
    vocab = {t: i for i, t in enumerate(tokens)}
    # SentencePiece BPE lists pieces in merge order, so a piece's position is its merge priority
    # (the scores agree for normal pieces, but user-defined pieces carry placeholder scores).
    rank = {t: i for i, t in enumerate(tokens) if types[i] in (NORMAL, USER_DEFINED)}
    candidates = []
    for piece, piece_rank in rank.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in rank and right in rank:
                candidates.append((piece_rank, rank[left], rank[right], left, right))
    candidates.sort()
    unk_index = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_index] if unk_index is not None else None
    backend = Backend(models.BPE(vocab, [(c[3], c[4]) for c in candidates], unk_token=unk,
                                 fuse_unk=True, byte_fallback=True))
    replace = normalizers.Replace(" ", "\u2581")
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if meta.get("tokenizer.ggml.add_space_prefix", True):
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), replace])
        steps.append(decoders.Strip(" ", 1, 0))
    else:
        backend.normalizer = replace
    backend.decoder = decoders.Sequence(steps)
    return backend, tokens


def _add_marked_tokens(backend: Backend, tokens: list[str], types: list[int], kind: str) -> None:
    """Control tokens match whole as special tokens, user-defined ones as plain added tokens."""
    special = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == CONTROL]
    # Re-spelled whitespace runs are reached through the normalizer, so they are not matched raw.
    plain = [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types)
             if k == USER_DEFINED and not (kind == "llama" and t.startswith("\u2581") and not t.strip("\u2581"))]
    if special:
        backend.add_special_tokens(special)
    if plain:
        backend.add_tokens(plain)


def check_vocab(tokenizer: Tokenizer, model_vocab_size: int, source: str) -> None:
    """Fail when the tokenizer can produce ids the model's embedding table does not have.

    A model's table may be larger than its tokenizer (padded to a multiple of 64/128); that is fine.
    """
    if tokenizer.vocab_size > model_vocab_size:
        raise CheckpointError(
            f"{source}: the tokenizer ({tokenizer.source}) has {tokenizer.vocab_size} tokens but the model's "
            f"embedding table (vocab_size) has only {model_vocab_size} rows, so ids >= {model_vocab_size} "
            f"would index past it; use the tokenizer that was shipped with this checkpoint")
