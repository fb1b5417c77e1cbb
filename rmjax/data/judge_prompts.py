"""Generative judges: the judge prompt of a pair in both candidate orders, the verdict label tokens,
and GRAM's pair-pretraining text.

    judge_template(spec)                    "rmjax" | "gram" | a text file -> the checked template
    label_ids(tokenizer, labels, template)  the one token each verdict reply starts with
    judge_sequences(tokenizer, record, ...) the judge prompt, chosen first then rejected first, rendered
                                            (chat template) up to where the verdict token comes
    pair_text(record, swap)                 GRAM stage 1: (question prompt, "answer A ... answer B" text)

A template is plain text with the placeholders {question}, {response_a}, {response_b} (required)
and {label_a}, {label_b} (optional: the verdict labels). It becomes the user turn of a one-turn
conversation, rendered with the model's chat template; the judge reads the next-token logits of
the two labels where the assistant reply begins. The ``gram`` template is GRAM's fine-tuning format
(NiuTrans/GRAM README); ``rmjax`` is a shorter one of rmjax's own.
"""
from __future__ import annotations

import re
from pathlib import Path

from rmjax.data.chat import render
from rmjax.errors import ConfigError

REQUIRED = ("question", "response_a", "response_b")
PLACEHOLDERS = (*REQUIRED, "label_a", "label_b")

TEMPLATES = {
    "rmjax": ("Which response answers the conversation better? Answer with {label_a} or {label_b} only.\n\n"
              "{question}\n\n[Response {label_a}]\n{response_a}\n\n[Response {label_b}]\n{response_b}"),
    "gram": (
        "Please act as an impartial judge and evaluate the quality of the responses provided by two AI "
        "assistants to the user question displayed below. You should choose the assistant that follows the "
        "user's instructions and answers the user's question better.\n"
        "Your evaluation should consider factors such as the helpfulness, relevance, accuracy, depth, "
        "creativity, and level of detail of their responses. Avoid any position biases and ensure that the "
        "order in which the responses were presented does not influence your decision. Do not allow the "
        "length of the responses to influence your evaluation. Do not favor certain names of the assistants. "
        "Be as objective as possible.\n"
        "Please directly output your final verdict by strictly following this format: \"{label_a}\" if "
        "assistant A is better, \"{label_b}\" if assistant B is better.\n\n"
        "[User Question]\n{question}\n\n"
        "[The Start of Assistant A's Answer]\n{response_a}\n[The End of Assistant A's Answer]\n\n"
        "[The Start of Assistant B's Answer]\n{response_b}\n[The End of Assistant B's Answer]\n\n"
        "#Preferred:"),
}

# GRAM stage 1 (unsupervised pair pretraining): the question is the prompt, both answers the target
PAIR_PROMPT = "[User Question]\n{question}\n\n"
PAIR_TEXT = ("[The Start of Assistant A's Answer]\n{response_a}\n[The End of Assistant A's Answer]\n\n"
             "[The Start of Assistant B's Answer]\n{response_b}\n[The End of Assistant B's Answer]")

_FIELD = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def check_template(text: str, where: str) -> str:
    """The template if its placeholders are known and the required ones are present."""
    found = set(_FIELD.findall(text))
    unknown = sorted(found - set(PLACEHOLDERS))
    if unknown:
        raise ConfigError(f"{where}: unknown placeholder(s) {', '.join('{' + u + '}' for u in unknown)}; a judge "
                          f"template may use {', '.join('{' + p + '}' for p in PLACEHOLDERS)}")
    missing = [p for p in REQUIRED if p not in found]
    if missing:
        raise ConfigError(f"{where}: the judge template has no {', '.join('{' + m + '}' for m in missing)}; it "
                          "must show the question and both responses ({question}, {response_a}, {response_b})")
    return text


def judge_template(spec: str) -> str:
    """A built-in template by name, or the text of a template file (checked)."""
    if spec in TEMPLATES:
        return TEMPLATES[spec]
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ConfigError(f"judge template {spec!r}: neither a built-in template ({', '.join(TEMPLATES)}) nor a "
                          "text file")
    return check_template(path.read_text(encoding="utf-8"), str(path))


def exported_template(directory: str, settings: dict) -> str:
    """The judge template of an exported judge (rmjax.json ``head`` settings): a built-in name, or
    its template file inside the export."""
    spec = settings.get("judge_template", "rmjax")
    return spec if spec in TEMPLATES else str(Path(directory) / spec)


def fill(template: str, **values: str) -> str:
    """Each {placeholder} replaced by its value (other braces, e.g. JSON in the text, stay as they are)."""
    return _FIELD.sub(lambda m: values.get(m.group(1), m.group(0)), template)


def question(record) -> str:
    """The conversation a judge sees: the user's text for one turn, else the turns with role tags."""
    if len(record.prompt) == 1:
        return record.prompt[0][1]
    return "\n\n".join(f"[{role.capitalize()}]\n{text}" for role, text in record.prompt)


def label_ids(tokenizer, labels: tuple[str, ...], template: str = "model") -> tuple[int, int]:
    """The token each verdict reply starts with; every label must be that one token."""
    if len(labels) != 2:
        raise ConfigError(f"judge labels must be two verdicts (first, second response), got {list(labels)}")
    ids = []
    for label in labels:
        reply = render(tokenizer, [{"role": "user", "content": "?"}], label, template)[1]
        first = tokenizer.decode([reply[0]]).strip() if reply else ""
        if first != label.strip():
            pieces = tokenizer.encode(label, add_special_tokens=False)
            raise ConfigError(f"judge label {label!r} is not a single token of {tokenizer.source} (a reply starting "
                              f"with it begins with token {first!r}; the label alone is {len(pieces)} tokens): the "
                              "judge reads one next-token log-prob per label, so choose labels that are single "
                              "tokens, e.g. A and B")
        ids.append(int(reply[0]))
    if ids[0] == ids[1]:
        raise ConfigError(f"judge labels {list(labels)} start with the same token ({ids[0]}); choose labels whose "
                          "replies begin with different tokens, e.g. A and B")
    return ids[0], ids[1]


def judge_sequences(tokenizer, record, labels: tuple[str, ...], template: str, judge: str) -> list[list[int]]:
    """The judge prompt for both orders of a pair (chosen first, then rejected first), each rendered
    up to where the verdict token comes. ``judge`` is the template text (``judge_template``)."""
    chosen, rejected = record.responses
    out = []
    for first, second in ((chosen, rejected), (rejected, chosen)):
        text = fill(judge, question=question(record), response_a=first, response_b=second,
                    label_a=labels[0], label_b=labels[1])
        out.append(render(tokenizer, [{"role": "user", "content": text}], labels[0], template)[0])
    return out


def pair_text(record, swap: bool) -> tuple[list[dict], str]:
    """GRAM stage 1: the question as a user turn and both answers as the reply (rejected first when
    ``swap``: the pretraining data carry no preference, so the order must not reveal it)."""
    a, b = record.responses[::-1] if swap else record.responses
    prompt = [{"role": "user", "content": fill(PAIR_PROMPT, question=question(record))}]
    return prompt, fill(PAIR_TEXT, response_a=a, response_b=b)
