"""Tiny random Hugging Face models (torch, CPU) used as golden references."""
from __future__ import annotations

import functools

import numpy as np
import torch
import transformers

TINY = dict(vocab_size=211, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
            max_position_embeddings=256)

# name -> (config class, causal LM class, config kwargs)
CASES = {
    "llama_gqa_tied": ("LlamaConfig", "LlamaForCausalLM",
                       dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)),
    "llama_mha_untied_rope3": ("LlamaConfig", "LlamaForCausalLM",
                               dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False,
                                    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8},
                                    rope_theta=500000.0)),
    "qwen2_bias": ("Qwen2Config", "Qwen2ForCausalLM",
                   dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)),
    # head_dim 24 != 64 / 4 (as Qwen3-0.6B: 16 x 128 on 1024); the last layer slides over a window of 4
    "qwen3_qknorm_window": ("Qwen3Config", "Qwen3ForCausalLM",
                            dict(num_attention_heads=4, num_key_value_heads=2, head_dim=24, tie_word_embeddings=False,
                                 use_sliding_window=True, sliding_window=4, max_window_layers=2)),
    # a window of 4 on every layer, shorter than the test sequences; head_dim 32 != 64 / 4 (Mistral-Nemo)
    "mistral_window": ("MistralConfig", "MistralForCausalLM",
                       dict(num_attention_heads=4, num_key_value_heads=1, head_dim=32, sliding_window=4,
                            tie_word_embeddings=False)),
    "gemma2_softcap_window": ("Gemma2Config", "Gemma2ForCausalLM",
                              dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   query_pre_attn_scalar=24, sliding_window=4, attn_logit_softcapping=50.0,
                                   final_logit_softcapping=3.0)),
    "gemma3_window": ("Gemma3TextConfig", "Gemma3ForCausalLM",
                      dict(num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=4,
                           num_hidden_layers=4,
                           layer_types=["sliding_attention", "sliding_attention", "full_attention",
                                        "sliding_attention"],
                           rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                            "full_attention": {"rope_type": "linear", "factor": 2.0,
                                                               "rope_theta": 1000000.0}})),
}


def build(case: str, seed: int = 0, head: str = "causal", num_labels: int = 1, **overrides):
    cfg_cls, lm_cls, kw = CASES[case]
    torch.manual_seed(seed)
    cfg = getattr(transformers, cfg_cls)(**{**TINY, **kw, **overrides}, attn_implementation="eager", pad_token_id=0)
    if head == "seqcls":
        lm_cls = lm_cls.replace("ForCausalLM", "ForSequenceClassification")
        cfg.num_labels = num_labels
    model = getattr(transformers, lm_cls)(cfg).eval()
    randomise(model, plus_one="gemma" in case)
    return model


def randomise(model, plus_one: bool = False) -> None:
    """Every parameter random: transformers initialises norms to constants and biases to zero, which
    would hide a wrong mapping (a swapped k/v bias, a norm read from the wrong tensor)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.3 + (0.0 if plus_one else 1.0))
            elif name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.5)
            elif p.ndim == 2 and float(p.std()) < 1e-6:
                p.copy_(torch.randn_like(p) * 0.02)
        constant = [n for n, p in model.named_parameters() if p.numel() > 1 and float(p.std()) == 0.0]
    assert not constant, f"parameters left constant: {constant}"


def padded_batch(vocab: int, lengths: list[int], total: int, side: str, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = np.zeros((len(lengths), total), np.int64)
    mask = np.zeros((len(lengths), total), np.int64)
    for i, n in enumerate(lengths):
        sl = slice(total - n, total) if side == "left" else slice(0, n)
        ids[i, sl] = rng.integers(1, vocab, n)  # id 0 is the pad token
        mask[i, sl] = 1
    return ids, mask


def hf_logits(model, ids, mask):
    positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(positions))
    return out.logits.float().numpy()


CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def save_tiny_checkpoint(directory, case: str = "llama_gqa_tied", head: str = "causal", seed: int = 0):
    """A complete tiny HF checkpoint dir: config.json, model.safetensors and a real byte-level BPE
    tokenizer (trained on bundled HH-RLHF text) with a ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from rmjax.data.records import read_records

    texts = [r.responses[0] for r in read_records("hh-rlhf:harmless-base", limit=400, on_error="skip")]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  bos_token="<|im_start|>")
    tok.chat_template = CHATML
    model = build(case, seed=seed, head=head, vocab_size=416)
    model.config.pad_token_id = tok.pad_token_id
    model.save_pretrained(directory, safe_serialization=True)
    tok.save_pretrained(directory)
    return model, tok


def jit_forward(params, config, *args, **kwargs):
    """``rmjax.models.forward`` jitted (one compile per config, shape and flag set): tests that run
    whole decoders compare outputs, and an un-jitted decoder runs op by op, many times slower."""
    flags = tuple(sorted((k, v) for k, v in kwargs.items() if v is None or isinstance(v, (bool, int, str))))
    arrays = {k: v for k, v in kwargs.items() if k not in dict(flags)}
    return _jitted_forward()(params, config, args, arrays, flags)


@functools.cache
def _jitted_forward():
    import jax

    from rmjax.models import forward

    return jax.jit(lambda params, config, args, arrays, flags: forward(params, config, *args, **arrays, **dict(flags)),
                   static_argnums=(1, 4))


