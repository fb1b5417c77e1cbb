import pytest

from rmjax.errors import ConfigError
from rmjax.train.config import load_config, save_config


def test_yaml_and_dotted_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("run_dir: runs/x\noptim:\n  lr: 3.0e-5\ndata:\n  train: [hh-rlhf:helpful, my.jsonl]\n"
                    "head:\n  kind: multi_objective\n  objectives: [helpful, honest]\nloss:\n  kind: mse\n")
    c = load_config(path, ["train.steps=7", "data.eval=hh-rlhf:helpful-base,helpful-online", "data.fraction=0.25",
                           "optim.lr=1e-3", "batch.layout=padded"])
    assert c.optim.lr == 1e-3 and c.train.steps == 7 and c.data.train == ("hh-rlhf:helpful", "my.jsonl")
    assert c.data.eval == ("hh-rlhf:helpful-base,helpful-online",)  # one input: its own commas stay
    assert c.head.objectives == ("helpful", "honest") and c.batch.layout == "padded"
    assert c.data.fraction == 0.25 and c.run_dir == "runs/x"
    save_config(c, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == c


def test_unknown_key_names_closest(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'optim.lrr'; did you mean 'optim.lr'"):
        load_config(None, ["optim.lrr=1"])
    path = tmp_path / "c.yaml"
    path.write_text("trian:\n  steps: 3\n")
    with pytest.raises(ConfigError, match=r"c.yaml: unknown key 'trian'; did you mean 'train'"):
        load_config(path)


@pytest.mark.parametrize("override, message", [
    ("train.steps=abc", "not a valid int"),
    ("train.trainable=everything", "train.trainable='everything' is not one of"),
    ("data.fraction=0", "data.fraction must be in"),
    ("train.grad_accum=3", "multiple of train.grad_accum"),
    ("optim", "expected dotted.key=value"),
    ("loss.kind=mse", r"head.kind='scalar' with loss.kind='mse' is not trainable; choose one of scalar\+bt"),
    ("head.kind=armorm", "set train.trainable=head"),
    ("data.holdout=2.5", "data.holdout is a count"),
    ("model.attention=flash", "model.attention='flash' is not one of"),
    ("model.attention_block_q=0", "attention_block_k must be positive"),
    ("train.lora_layers=-1", r"train.lora_layers must be 0 \(every layer\) or positive"),
])
def test_bad_values(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_bad_yaml_names_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  lr: [1,\n")
    with pytest.raises(ConfigError, match=r"bad.yaml line \d+: invalid YAML"):
        load_config(path)


def test_model_section_passes_the_attention_kernel_to_the_loader():
    run = load_config(None, ["model.attention=naive", "model.attention_block_k=64", "model.dtype=float32"])
    opts = run.model.numerics()
    assert opts["attention"] == "naive" and opts["attention_block_k"] == 64 and opts["attention_block_q"] == 512
    assert opts["dtype"] == "float32" and opts["remat"] == "none" and "name" not in opts
    assert load_config(None).model.dtype == "bfloat16"  # training computes in bf16 by default
    with pytest.raises(ConfigError, match=r"model.attention='fast' is not one of"):
        load_config(None, ["model.attention=fast"])
    with pytest.raises(ConfigError, match="attention_block_q and attention_block_k must be positive"):
        load_config(None, ["model.attention_block_q=0"])


def test_an_empty_model_name_means_no_model_and_an_absent_one_the_default():
    """``--reference ''`` (reference-free) must not become None (the default reference)."""
    import argparse

    from rmjax.commands import score
    from rmjax.commands.options import config_from_args
    from rmjax.jobs.score import ScoreConfig, resolve

    p = argparse.ArgumentParser()
    score.add_config_arguments(p, ScoreConfig, score.SCORE_FLAGS)
    free = config_from_args(ScoreConfig, p.parse_args(["--policy", "smollm2-135m-instruct", "--reference", "", "--data", "llmbar"]))
    assert free.model.reference == "" and resolve(free).model.reference == ""
    default = config_from_args(ScoreConfig, p.parse_args(["--policy", "smollm2-135m-instruct", "--data", "llmbar"]))
    assert default.model.reference is None and resolve(default).model.reference == "smollm2-135m-instruct"
    assert config_from_args(ScoreConfig, p.parse_args(["model.reference=null"])).model.reference is None
