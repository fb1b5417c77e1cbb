"""Dense layers whose parameters carry logical axis names (mapped to mesh axes by rmjax.sharding)."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flax import linen as nn

Initializer = Callable[..., Any]
default_kernel_init: Initializer = nn.initializers.normal(stddev=0.02)


def logical_dense(features: int, axes: tuple[str | None, str | None], *, name: str, use_bias: bool,
                  dtype: Any, param_dtype: Any, kernel_init: Initializer = default_kernel_init) -> nn.Dense:
    """``nn.Dense`` with kernel [in, out] named ``axes`` and bias [out] named ``axes[1]``."""
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(kernel_init, axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes[1],)),
        name=name,
    )
