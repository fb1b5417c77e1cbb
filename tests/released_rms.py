"""Tiny random replicas of the layouts released reward models ship, each with its family's published
chat template, and the reward each model's own forward gives (transformers for the standard
``*ForSequenceClassification`` classes; for the custom heads, a transcription of the authors' forward
on the transformers backbone: ArmoRM's ``LlamaForRewardModelWithGating``, URM's
``LlamaForSequenceClassificationWithNormal_Weights``, QRM's ``LlamaForRewardModelWithGating31``).

    directory, reward = build(layout, tmp_dir)     reward(messages) -> float (the final turn is the reply)
"""
from __future__ import annotations

import json

import numpy as np
import torch
import transformers
from chat_templates import CHATML, GEMMA2, LLAMA3, LLAMA31, MISTRAL_V03, QWEN3, family_tokenizer
from hf_models import randomise
from safetensors.numpy import save_file

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, max_position_embeddings=512,
            attn_implementation="eager")

# layout -> (tokenizer family, chat template, transformers config class, config kwargs, head)
LAYOUTS = {
    # Skywork-Reward-Llama-3.1-8B / GRM-Llama3-8B: untied, llama3 RoPE scaling; pad = <|eot_id|>, so
    # transformers reads the reward one token before the reply's closing <|eot_id|>
    "llama31_untied": ("llama3", LLAMA31, "LlamaConfig",
                       dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, rope_theta=5e5,
                            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
                       "seqcls"),
    "qwen2_bias": ("qwen", CHATML, "Qwen2Config",
                   dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False), "seqcls"),
    # Skywork-Reward-V2-Qwen3: q/k head norms, head_dim != width / heads, the empty think block
    "qwen3": ("qwen", QWEN3, "Qwen3Config",
              dict(num_attention_heads=4, num_key_value_heads=2, head_dim=24, tie_word_embeddings=False), "seqcls"),
    "mistral_window": ("mistral", MISTRAL_V03, "MistralConfig",
                       dict(num_attention_heads=4, num_key_value_heads=1, sliding_window=8, tie_word_embeddings=False),
                       "seqcls"),
    # Skywork-Reward-Gemma-2-27B / GRM-gemma2-2B: soft-caps, alternating sliding windows
    "gemma2_softcap": ("gemma", GEMMA2, "Gemma2Config",
                       dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24,
                            sliding_window=8, attn_logit_softcapping=50.0, final_logit_softcapping=30.0), "seqcls"),
    "multi_objective": ("llama3", LLAMA31, "LlamaConfig",
                        dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False), "multi"),
    "armorm": ("llama3", LLAMA3, "LlamaConfig",
               dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False), "armorm"),
    "urm": ("llama3", LLAMA31, "LlamaConfig",
            dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False), "urm"),
    "qrm": ("llama3", LLAMA31, "LlamaConfig",
            dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False), "qrm"),
    # QRM's head on a Gemma-2 backbone (QRM-Gemma-2-27B)
    "qrm_gemma2": ("gemma", GEMMA2, "Gemma2Config",
                   dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24,
                        sliding_window=8, attn_logit_softcapping=50.0, final_logit_softcapping=30.0), "qrm"),
}
SYSTEMLESS = ("gemma", "mistral")  # their templates reject (Gemma-2) or move (Mistral) a system message
K, Q, GATE_HIDDEN, GATE_LAYERS, TEMPERATURE = 4, 3, 16, 2, 5.0
OBJECTIVES = ("helpfulness", "honesty", "brevity")
GATE_PATTERNS = {"llama3": "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
                 "gemma": "<end_of_turn>\n<start_of_turn>model\n"}

TEXTS = ["What is the capital of France? Paris is the capital and largest city of France.",
         "Tell me a joke about cats. Why did the cat sit on the computer? To keep an eye on the mouse!",
         "How do I boil an egg? Put it in boiling water for nine minutes, then cool it in cold water.",
         "Explain rain in one sentence. Water vapour condenses into droplets that fall from clouds.",
         "I refuse to answer that. Sure, here is a detailed and helpful answer to your question."] * 3


def conversations() -> list[dict]:
    """Records (multi-turn, a system message, a best-of-4) as rmjax reads them."""
    sys_msg = {"role": "system", "content": "You are a careful assistant."}
    return [
        {"id": "a", "prompt": [sys_msg, {"role": "user", "content": "What is rain?"},
                               {"role": "assistant", "content": "Water from clouds."},
                               {"role": "user", "content": "And snow, in one sentence?"}],
         "chosen": "Snow is frozen water vapour that falls as ice crystals.", "rejected": "A dog."},
        {"id": "b", "prompt": "Name a fruit.", "chosen": "An apple.", "rejected": "Never ask me that again!"},
        {"id": "c", "prompt": [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello!"},
                               {"role": "user", "content": "How do I boil an egg?"}],
         "chosen": "Boil it for nine minutes, then cool it in cold water.",
         "rejected": ["Eggs are birds.", "Put it in the oven for an hour.", "No."]},
        {"id": "d", "prompt": "Tell me a joke about cats.",
         "chosen": "Why did the cat sit on the computer? To keep an eye on the mouse!", "rejected": "Cats."},
        {"id": "e", "prompt": "What is the capital of France?", "chosen": "Paris.",
         "rejected": "The capital of France is Berlin, a large city."},
        {"id": "f", "prompt": "Explain rain in one sentence.",
         "chosen": "Water vapour condenses into droplets that fall from clouds.", "rejected": "It is wet."},
    ]


def records_for(family: str) -> list[dict]:
    if family not in SYSTEMLESS:
        return conversations()
    out = []
    for r in conversations():
        if isinstance(r["prompt"], list):
            r = {**r, "prompt": [m for m in r["prompt"] if m["role"] != "system"]}
        out.append(r)
    return out


def _tensor(x) -> np.ndarray:
    return np.ascontiguousarray(x.detach().float().numpy() if hasattr(x, "detach") else x, np.float32)


def find_token_for_gating(ids: list[int], pattern: list[int]) -> int:
    """The authors' search: the last occurrence of the pattern (the user turn's end + assistant header)."""
    for j in range(len(ids) - len(pattern), -1, -1):
        if ids[j:j + len(pattern)] == pattern:
            return j
    raise ValueError("pattern not found")


def build(layout: str, directory, seed: int = 0):
    """Save the replica to ``directory``; return the reward function of its own forward."""
    family, template, config_cls, kw, head = LAYOUTS[layout]
    tok = family_tokenizer(family, TEXTS, template)
    torch.manual_seed(seed)
    vocab = -(-len(tok) // 32) * 32
    pad = tok.pad_token_id
    if family == "llama3":  # no pad token: the standard classifiers use <|eot_id|> (it ends every reply); the
        # custom heads' own pooling ("first pad - 1") needs a pad that never occurs, as their releases have
        pad = tok.convert_tokens_to_ids("<|eot_id|>" if head in ("seqcls", "multi") else "<|end_of_text|>")
    labels = {"seqcls": 1, "multi": len(OBJECTIVES), "urm": 10}.get(head, 1)
    config = getattr(transformers, config_cls)(**{**TINY, **kw}, vocab_size=vocab, pad_token_id=pad,
                                               num_labels=labels)
    if head == "multi":
        config.id2label = dict(enumerate(OBJECTIVES))
        config.label2id = {n: i for i, n in enumerate(OBJECTIVES)}
    cls = config_cls.replace("Config", "ForSequenceClassification")
    model = getattr(transformers, cls)(config).eval()
    randomise(model, plus_one=family == "gemma")
    with torch.no_grad():
        model.score.weight.mul_(25.0)  # rewards well apart
    model.save_pretrained(directory, safe_serialization=True)
    tok.save_pretrained(directory)

    def ids_of(messages):
        text = tok.apply_chat_template(messages, tokenize=False)
        return tok(text, add_special_tokens=False)["input_ids"]

    def last_hidden(ids):
        with torch.no_grad():
            return model.model(input_ids=torch.tensor([ids])).last_hidden_state[0].double()

    if head in ("seqcls", "multi"):
        def reward(messages):
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids_of(messages)])).logits[0].double().numpy()
            return float(logits[0]) if head == "seqcls" else float(logits.mean())
        return reward
    rng = np.random.default_rng(seed + 1)
    backbone = {k: _tensor(v) for k, v in model.state_dict().items() if k.startswith("model.")}
    cfg = json.loads((directory / "config.json").read_text())
    width = config.hidden_size
    if head == "urm":
        fc = [torch.nn.Linear(width, width), torch.nn.Linear(width, width), torch.nn.Linear(width, 5)]
        for layer in fc:
            torch.nn.init.normal_(layer.weight, std=0.3)
            torch.nn.init.normal_(layer.bias, std=0.3)
        tensors = {**backbone, "score.weight": _tensor(model.score.weight)}
        tensors.update({f"weights.fc.{2 * i}.{p}": _tensor(getattr(layer, p)) for i, layer in enumerate(fc)
                        for p in ("weight", "bias")})
        cfg.update(architectures=["LlamaForSequenceClassificationWithNormal_Weights"])

        def reward(messages):  # URM: the (mean, spread) pairs of score at the last token, a SELU weight net
            h = last_hidden(ids_of(messages))[-1].float()
            with torch.no_grad():
                means = model.score(h).view(5, 2)[:, 0]
                w = fc[2](torch.selu(fc[1](torch.selu(fc[0](h)))))
            return float((means * w).sum())
    else:  # gated heads: ArmoRM (Linear + bias, ReLU) or QRM (Linear, ReLU, BatchNorm), softmax(x / T) * scale
        pattern = tok(GATE_PATTERNS[family], add_special_tokens=False)["input_ids"]
        transform = np.eye(K) - np.outer(np.eye(K)[K - 1], rng.normal(0, 0.4, K))
        scale = np.array([1.7])
        rows = K * Q if head == "qrm" else K
        regression = rng.normal(0, 0.3, (rows, width))
        layers, tensors = [], {**backbone, "regression_layer.weight": regression, "reward_transform_matrix": transform,
                               "gating.logit_scale": scale}
        sizes = [width] + [GATE_HIDDEN] * GATE_LAYERS
        for i in range(GATE_LAYERS):
            lin = torch.nn.Linear(sizes[i], sizes[i + 1], bias=head == "armorm")
            torch.nn.init.normal_(lin.weight, std=0.5)
            if head == "armorm":
                torch.nn.init.normal_(lin.bias, std=0.5)
                layers.append((lin,))
                tensors.update({f"gating.layers.{i}.weight": lin.weight, f"gating.layers.{i}.bias": lin.bias})
                continue
            bn = torch.nn.BatchNorm1d(sizes[i + 1]).eval()
            with torch.no_grad():
                bn.weight.normal_(1.0, 0.3)
                bn.bias.normal_(0.0, 0.3)
                bn.running_mean.normal_(0.0, 0.5)
                bn.running_var.uniform_(0.5, 2.0)
            layers.append((lin, bn))
            tensors.update({f"gating.layers.{3 * i}.weight": lin.weight, **{
                f"gating.layers.{3 * i + 2}.{p}": getattr(bn, p)
                for p in ("weight", "bias", "running_mean", "running_var")}})
        final = torch.nn.Linear(GATE_HIDDEN, K)
        torch.nn.init.normal_(final.weight, std=0.5)
        torch.nn.init.normal_(final.bias, std=0.5)
        last = f"gating.layers.{3 * GATE_LAYERS if head == 'qrm' else GATE_LAYERS}"
        tensors.update({f"{last}.weight": final.weight, f"{last}.bias": final.bias})
        tensors = {k: _tensor(v) for k, v in tensors.items()}
        arch = "LlamaForRewardModelWithGating31" if head == "qrm" else "LlamaForRewardModelWithGating"
        if family == "gemma":
            arch = "Gemma2ForRewardModelWithGating"
        cfg.update(architectures=[arch], num_objectives=K, gating_temperature=TEMPERATURE,
                   gating_hidden_dim=GATE_HIDDEN, gating_n_hidden=GATE_LAYERS)
        if head == "qrm":
            cfg.update(num_quantiles=Q)

        def gate(x):
            with torch.no_grad():
                for layer in layers:
                    x = torch.relu(layer[0](x))
                    if len(layer) > 1:
                        x = layer[1](x[None])[0]
                x = final(x)
                return torch.softmax(x / TEMPERATURE, -1).double().numpy() * scale[0]

        def reward(messages):
            ids = ids_of(messages)
            h = last_hidden(ids)
            g = gate(h[find_token_for_gating(ids, pattern)].float())
            rewards = h[-1].numpy() @ regression.T
            if head == "qrm":  # the expectation of each objective's quantiles
                rewards = rewards.reshape(K, Q).mean(-1)
            return float(np.sum(g * (rewards @ transform)))
    save_file(tensors, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(cfg))
    return reward
