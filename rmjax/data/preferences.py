"""The bundled data: where it lies, the HH-RLHF subsets and sources, LLMBar's subsets, the value prompts.

Records (pairs, singles, ratings, best-of-N) are read by ``rmjax.data.records.read_records`` only;
``hh-rlhf[:SUBSETS]`` and ``llmbar[:SUBSETS]`` name the bundled sets there.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

from rmjax.errors import DataError

HH_SUBSETS = ("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled")
# Data sources for the ablations: helpful vs harmless is a real data-source contrast.
HH_SOURCES = {
    "helpful": ("helpful-base", "helpful-online", "helpful-rejection-sampled"),
    "harmless": ("harmless-base",),
    "both": HH_SUBSETS,
}
# RewardBench's "Chat Hard" LLMBar sections: a held-out evaluation, never training data.
LLMBAR_SUBSETS = ("Natural", "Adversarial_Neighbor", "Adversarial_GPTInst", "Adversarial_GPTOut",
                  "Adversarial_Manual")


def bundled_path(*parts: str) -> Path:
    return Path(str(resources.files("rmjax.data").joinpath("bundled", *parts)))


def load_value_prompts(path: Path | None = None) -> dict[str, str]:
    """The 54 value prompts {key: text}; keys starting with worst/bad/terrible are negatively framed."""
    import yaml

    path = path or bundled_path("prompts", "value_prompts.yaml")
    data = yaml.safe_load(Path(path).read_text("utf-8"))
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise DataError(f"{path}: expected a mapping of prompt key -> prompt text")
    return data
