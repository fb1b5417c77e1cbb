"""The main job: `rmjax logprobs` on the embedded SmolLM2 model."""
import json

from rmjax.cli import main


def test_logprobs_json_paris_first(capsys):
    assert main(["logprobs", "--model", "smollm2-135m-instruct", "--prompt", "The capital of France is",
                 "--top", "5", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"] == "smollm2-135m-instruct" and out["prompt"] == "The capital of France is"
    assert len(out["top"]) == 5 and out["top"][0]["token"] == " Paris"
    lps = [t["logprob"] for t in out["top"]]
    assert lps == sorted(lps, reverse=True) and all(lp < 0 for lp in lps)
    assert all(isinstance(t["token_id"], int) for t in out["top"])


def test_logprobs_chat_and_text_output(capsys):
    assert main(["logprobs", "--prompt", "What, in one word, is the best thing ever?", "--chat", "--top", "3"]) == 0
    text = capsys.readouterr().out
    assert "<|im_start|>assistant" in text and text.count("p=") == 3


def test_bad_model_and_top(capsys):
    assert main(["logprobs", "--model", "no-such-model", "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'no-such-model'" in err
    for name in ("gemma3-270m", "smollm2-135m-instruct", "smollm2-135m-dpo-hh"):
        assert name in err.split("registry models:")[1]
    assert main(["logprobs", "--prompt", "x", "--top", "0"]) == 2
    assert main(["logprobs", "--model", "gemma3-270m", "--prompt", "x", "--chat"]) == 2
    assert "no chat template" in capsys.readouterr().err


def test_attention_switch(capsys):
    """--attention picks the kernel: naive and blockwise (tiny blocks) agree on the real model; a
    backend this machine lacks is a clear error, not a traceback."""
    args = ["logprobs", "--prompt", "The capital of France is", "--top", "3", "--json"]
    assert main(args + ["--attention", "naive"]) == 0
    naive = json.loads(capsys.readouterr().out)["top"]
    assert main(args + ["--attention", "blockwise", "--attention-block-q", "2", "--attention-block-k", "3"]) == 0
    block = json.loads(capsys.readouterr().out)["top"]
    assert [t["token_id"] for t in block] == [t["token_id"] for t in naive]
    assert all(abs(a["logprob"] - b["logprob"]) < 1e-4 for a, b in zip(block, naive))
    assert main(args + ["--attention", "splash"]) == 2
    assert "splash attention needs a TPU" in capsys.readouterr().err
