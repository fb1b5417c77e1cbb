"""Golden: every family's tiny random HF model, saved and loaded by rmjax, gives HF's logits."""
import jax
import numpy as np
import pytest

from hf_models import CASES, build, hf_logits, padded_batch
from rmjax.models import forward, unembed
from rmjax.models.loading import StateDictCheckpoint, load_params


def load(model):
    ckpt = StateDictCheckpoint(model.config.to_dict(), model.state_dict())
    return load_params(ckpt, source="tiny")


def rel_err(a, b, mask):
    a, b = a[mask.astype(bool)], b[mask.astype(bool)]
    return np.max(np.abs(a - b)) / np.max(np.abs(b))


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_hf(case, side):
    model = build(case)
    config, params, _ = load(model)
    ids, mask = padded_batch(config.vocab_size, [11, 7, 3], 12, side)
    ours = jax.jit(lambda p, i, m: unembed(p, config, forward(p, config, i, m).hidden))(params, ids, mask)
    ref = hf_logits(model, ids, mask)
    assert rel_err(np.asarray(ours), ref, mask) <= 1e-4
