"""Reinforcement learning against a reward model: sampling on the KV cache, the RLOO trainer."""
