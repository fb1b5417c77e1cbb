"""The real embedded models (GGUF) give the logits of HF torch models holding the same weights.

The torch model's weights come from transformers' own GGUF reader (its own dequantisation and
Q/K un-permutation), so this also checks rmjax's GGUF loading independently.
"""
import os

import jax
import numpy as np
import pytest
import torch
import transformers

from rmjax.io import registry
from rmjax.models import forward, unembed
from rmjax.models.loading import load_model

TEXTS = ["The capital of France is", "Reward models inherit values from their base model, and"]


@pytest.fixture(scope="module", params=["smollm2-135m-instruct", "gemma3-270m"])
def pair(request):
    name = request.param
    loaded = load_model(name)
    path = registry.resolve_model(name).path
    ckpt = registry.open_checkpoint(registry.resolve_model(name))
    hf_config = transformers.AutoConfig.for_model(**ckpt.config)
    hf_config._attn_implementation = "eager"
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), config=hf_config, dtype=torch.float32).eval()
    return name, loaded, ref


def test_real_logits_match_hf(pair):
    name, loaded, ref = pair
    tok = loaded.tokenizer
    rows = [tok.encode(t) for t in TEXTS]
    length = max(map(len, rows))
    ids = np.full((len(rows), length), tok.pad_id, np.int64)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):  # left padding, as batched scoring uses
        ids[i, length - len(r):], mask[i, length - len(r):] = r, 1
    ours = np.asarray(jax.jit(lambda p, i, m: unembed(p, loaded.config, forward(p, loaded.config, i, m).hidden))(
        loaded.params, ids.astype(np.int32), mask.astype(np.int32)))
    with torch.no_grad():
        pos = torch.tensor(np.maximum(np.cumsum(mask, -1) - 1, 0))
        theirs = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=pos).logits.numpy()
    real = mask.astype(bool)
    rel = np.abs(ours[real] - theirs[real]).max() / np.abs(theirs[real]).max()
    assert rel <= 1e-4, (name, rel)


def test_smollm2_says_paris():
    loaded = load_model("smollm2-135m-instruct")
    ids = np.array([loaded.tokenizer.encode("The capital of France is")], np.int32)
    logits = np.asarray(unembed(loaded.params, loaded.config, forward(loaded.params, loaded.config, ids).hidden))
    assert loaded.tokenizer.token_to_str(int(np.argmax(logits[0, -1]))) == " Paris"
