"""Sparse autoencoders on residual-stream activations, and the linear implicit reward model over
their features (Marks et al. 2024, "Beyond Training Objectives: Interpreting Reward Model Divergence
in LLMs").

    activations.py  per-token activation cache of one layer (resumable, zarr shards) and its
                    shuffled batch reader
    model.py        the SAE: params pytree, encode (ReLU or top-k) / decode / loss, decoder norms
    train.py        SAEConfig, train_sae (one jitted Adam step, dead-feature resampling), save / load
    matching.py     base vs tuned dictionaries matched by decoder cosine: shared / moved / new /
                    vanished features; a feature's top activations
    irm.py          per-response pooled features, the linear IRM fit (ridge, held-out Kendall tau,
                    pairwise agreement, R^2, top features), the rank statistics
"""
from rmjax.sae.activations import (
           ActivationCache,
           ActivationSettings,
           cache_activations,
           text_records,
)
from rmjax.sae.irm import (
           IRMFit,
           fit_irm,
           kendall_tau,
           pairwise_agreement,
           response_features,
)
from rmjax.sae.matching import match_dictionaries, top_activations
from rmjax.sae.train import SAEConfig, load_sae, save_sae, train_sae

__all__ = ["ActivationCache", "ActivationSettings", "IRMFit", "SAEConfig", "cache_activations", "fit_irm",
           "kendall_tau", "load_sae", "match_dictionaries", "pairwise_agreement", "response_features", "save_sae",
           "text_records", "top_activations", "train_sae"]
