"""The implicit RM `rmjax score` uses by default: its adapter ships in the package, scored on held-out pairs only."""
from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
from pathlib import Path

import pytest

from rmjax.commands.score import CROSS_FAMILY, resolve_score_inputs
from rmjax.errors import RmjaxError
from rmjax.io.registry import bundled_adapter_dir, resolve_model

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "experiments" / "irm" / "build.py"
ADAPTER = bundled_adapter_dir("smollm2-135m-dpo-hh")


def load_build():
    spec = importlib.util.spec_from_file_location("irm_build", BUILD)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bundled_ids() -> list[str]:
    with gzip.open(ADAPTER / "heldout.jsonl.gz", "rt", encoding="utf-8") as f:
        return [json.loads(line)["id"] for line in f]


def test_heldout_pairs_are_the_training_runs_holdout_and_never_trained_on():
    train, held = load_build().heldout_records()
    assert len(held) == 256
    train_ids = {r.id for r in train}
    assert not train_ids & {r.id for r in held}
    assert not {(r.prompt, r.responses) for r in train} & {(r.prompt, r.responses) for r in held}
    assert bundled_ids() == [r.id for r in held]  # the bundled file is exactly that split


def test_bundled_adapter_is_a_small_lora_on_smollm2():
    source = resolve_model("smollm2-135m-dpo-hh")
    assert source.kind == "adapter" and source.base.name == "smollm2-135m-instruct"
    config = json.loads((ADAPTER / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "smollm2-135m-instruct" and config["r"] == 8
    assert (ADAPTER / "adapter_model.safetensors").stat().st_size < 5e6
    meta = json.loads((ADAPTER / "rmjax.json").read_text())
    assert meta["heldout"]["pairs"] == 256 and meta["head"]["kind"] == "lm"


def score_args(**kw):
    base = dict(policy=None, reference=None, data="heldout", sample=None, cross_family=False, rm="", judge="")
    return argparse.Namespace(**{**base, **kw})


def test_score_defaults_to_the_heldout_pairs_and_the_cross_family_pair_is_one_flag_away():
    args = score_args()
    resolve_score_inputs(args)
    assert args.data == str(ADAPTER / "heldout.jsonl.gz") and args.sample == 0  # every held-out pair
    assert (args.policy, args.reference) == ("smollm2-135m-dpo-hh", "smollm2-135m-instruct")
    args = score_args(judge="some-judge", data="pairs.jsonl")  # a judge alone brings no default policy
    resolve_score_inputs(args)
    assert (args.policy, args.reference, args.sample) == ("", "", 64)
    args = score_args(rm="an-rm", policy="smollm2-135m-instruct", data="pairs.jsonl")  # a policy keeps its reference
    resolve_score_inputs(args)
    assert args.reference == "smollm2-135m-instruct"
    args = score_args(cross_family=True)
    resolve_score_inputs(args)
    assert (args.policy, args.reference, args.data, args.sample) == (*CROSS_FAMILY, 64)
    with pytest.raises(RmjaxError, match="drop --policy"):
        resolve_score_inputs(score_args(cross_family=True, policy="x"))
    with pytest.raises(RmjaxError, match="ships heldout.jsonl.gz"):
        resolve_score_inputs(score_args(policy="smollm2-135m-instruct"))
