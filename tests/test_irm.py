"""The implicit RM `rmjax score` uses by default: its adapter ships in the package, scored on held-out pairs only."""
from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

import pytest

from rmjax.jobs.score import CROSS_FAMILY, resolve
from rmjax.errors import RmjaxError
from rmjax.io.registry import bundled_adapter_dir, resolve_model

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "experiments" / "irm" / "build.py"
BASELINES = ROOT / "experiments" / "irm" / "baselines.py"
ADAPTER = bundled_adapter_dir("smollm2-135m-dpo-hh")


def load_script(path: Path = BUILD):
    spec = importlib.util.spec_from_file_location(f"irm_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bundled_ids() -> list[str]:
    with gzip.open(ADAPTER / "heldout.jsonl.gz", "rt", encoding="utf-8") as f:
        return [json.loads(line)["id"] for line in f]


def test_heldout_pairs_are_the_training_runs_holdout_and_never_trained_on():
    train, held = load_script().heldout_records()
    assert len(held) == 256
    train_ids = {r.id for r in train}
    assert not train_ids & {r.id for r in held}
    assert not {(r.prompt, r.responses) for r in train} & {(r.prompt, r.responses) for r in held}
    assert bundled_ids() == [r.id for r in held]  # the bundled file is exactly that split


def test_bundled_adapter_is_a_small_lora_on_smollm2():
    source = resolve_model("smollm2-135m-dpo-hh")
    assert source.kind == "adapter" and source.base.name == "smollm2-135m-instruct"
    config = json.loads((ADAPTER / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "smollm2-135m-instruct" and config["r"] == 16
    assert config["layers_to_transform"] == list(range(22, 30))  # the last 8 of SmolLM2's 30 layers
    assert (ADAPTER / "adapter_model.safetensors").stat().st_size < 5e6
    meta = json.loads((ADAPTER / "rmjax.json").read_text())
    assert meta["heldout"]["pairs"] == 256 and meta["head"]["kind"] == "lm"
    assert meta["train"]["data"] == ["hh-rlhf:helpful-base"] and meta["train"]["distinct_pairs"] > 2000


def score_config(**keys):
    from rmjax import config as rconfig
    from rmjax.jobs.score import ScoreConfig

    return rconfig.load(ScoreConfig, None, [f"{k}={v}" for k, v in keys.items()])


def test_score_defaults_to_the_heldout_pairs_and_the_cross_family_pair_is_one_flag_away():
    c = resolve(score_config())
    assert c.data.path == str(ADAPTER / "heldout.jsonl.gz") and c.data.sample == 0  # every held-out pair
    assert (c.model.policy, c.model.reference) == ("smollm2-135m-dpo-hh", "smollm2-135m-instruct")
    c = resolve(score_config(**{"model.judge": "some-judge", "data.path": "pairs.jsonl"}))  # a judge alone: no policy
    assert (c.model.policy, c.model.reference, c.data.sample) == ("", "", 64)
    c = resolve(score_config(**{"model.rm": "an-rm", "model.policy": "smollm2-135m-instruct",
                                "data.path": "pairs.jsonl"}))  # a policy keeps its reference
    assert c.model.reference == "smollm2-135m-instruct"
    c = resolve(score_config(**{"model.cross_family": "true"}))
    assert (c.model.policy, c.model.reference, c.data.path, c.data.sample) == (*CROSS_FAMILY, 64)
    with pytest.raises(RmjaxError, match="drop model.policy"):
        resolve(score_config(**{"model.cross_family": "true", "model.policy": "x"}))
    with pytest.raises(RmjaxError, match="ships heldout.jsonl.gz"):
        resolve(score_config(**{"model.policy": "smollm2-135m-instruct"}))


def test_baselines_on_a_hand_computed_table():
    import pandas as pd

    from rmjax.metrics import wilson

    # five pairs; policy - reference sums give implicit margins +1, -2, +3, 0 (a tie), +1
    table = pd.DataFrame({
        "kind": ["pair"] * 5 + ["single"],
        "policy_chosen_logp_sum": [-10., -20., -5., -8., -9., 0.],
        "policy_rejected_logp_sum": [-12., -19., -9., -8., -11., 0.],
        "reference_chosen_logp_sum": [-11., -21., -6., -7., -10., 0.],
        "reference_rejected_logp_sum": [-12., -22., -7., -7., -11., 0.],
        "policy_chosen_logp_mean": [-1., -2., -1., -2., -3., 0.],
        "policy_rejected_logp_mean": [-2., -1., -2., -2., -1., 0.],
        "reference_chosen_logp_mean": [-1., -2., -2., -1., -1., 0.],
        "reference_rejected_logp_mean": [-1.5, -1., -3., -1., -2., 0.],
        "policy_chosen_tokens": [10, 10, 5, 8, 3, 1],
        "policy_rejected_tokens": [6, 10, 9, 4, 7, 1],
    })
    out = load_script(BASELINES).baselines(table)
    implicit = out["implicit RM (sum)"]
    assert implicit["pairs"] == 5 and implicit["accuracy"] == pytest.approx(3.5 / 5)  # +, -, +, tie, +
    assert implicit["ci95"] == pytest.approx(list(wilson(0.7, 5)))
    # mean: policy diffs 1, -1, 1, 0, -2; reference diffs 0.5, -1, 1, 0, 1 -> 0.5, 0, 0, 0, -3
    assert out["implicit RM (mean)"]["accuracy"] == pytest.approx((1 + 0.5 + 0.5 + 0.5 + 0) / 5)
    # lengths 10-6, 10-10, 5-9, 8-4, 3-7: longer wins on pairs 1 and 4, ties on 2
    assert out["longer reply wins"]["accuracy"] == pytest.approx(2.5 / 5)
    assert out["reference, mean logp"]["accuracy"] == pytest.approx((1 + 0 + 1 + 0.5 + 1) / 5)
    assert out["reference, sum logp"]["accuracy"] == pytest.approx((1 + 1 + 1 + 0.5 + 1) / 5)
    # chosen longer: pairs 1 and 4 (margins +1, 0); chosen shorter: pairs 3 and 5 (+3, +1)
    assert out["implicit RM (sum), chosen longer"] == {"accuracy": 0.75, "ci95": pytest.approx(list(wilson(0.75, 2))),
                                                        "pairs": 2}
    assert out["implicit RM (sum), chosen shorter"]["accuracy"] == 1.0
    # prefers longer: (m > 0) == (len > 0): T==T, F==F, T!=F, F!=T, T!=F -> 2 of 5
    assert out["implicit RM prefers the longer reply"] == pytest.approx(0.4)
    with pytest.raises(SystemExit, match="both --policy and --reference"):
        load_script(BASELINES).baselines(table.drop(columns=["reference_chosen_logp_sum"]))
