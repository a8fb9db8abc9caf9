"""The mixed-precision contract and the remat policy, read from the config.

- parameters (and the EMA) are stored in `param_dtype`; optimizer updates are applied in that dtype;
- methods build their networks with `dtype=compute_dtype` (activations, matmuls) and keep norms, softmax
  and scheduler math in float32 (pgpis_jax.nn does);
- the loss is reduced and returned in float32, gradients arrive in `param_dtype`;
- Adam's first moment is kept in `mu_dtype` (second moment in param_dtype); no loss scaling (bf16 only).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from pgpis_jax.errors import UserError

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# jax.checkpoint_policies that take no arguments (the name-based ones need names tagged in the network).
SIMPLE_POLICIES = ("everything_saveable", "nothing_saveable", "dots_saveable", "checkpoint_dots",
                   "dots_with_no_batch_dims_saveable", "checkpoint_dots_with_no_batch_dims")


def _dtype(config_value: str, key: str):
    if config_value not in DTYPES:
        raise UserError(f"config.precision.{key} {config_value!r} is not supported; expected one of {sorted(DTYPES)}")
    return DTYPES[config_value]


@dataclasses.dataclass(frozen=True)
class Policy:
    param_dtype: Any = jnp.float32
    compute_dtype: Any = jnp.float32
    mu_dtype: Any = jnp.float32

    @classmethod
    def from_config(cls, config) -> "Policy":
        p = config.precision
        return cls(_dtype(p.param_dtype, "param_dtype"), _dtype(p.compute_dtype, "compute_dtype"),
                   _dtype(p.mu_dtype, "mu_dtype"))

    def cast_params(self, params):
        """Floating-point parameters in param_dtype (integer leaves untouched)."""
        return jax.tree.map(lambda x: x.astype(self.param_dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                            params)


def remat_policy(name: str) -> tuple[bool, Optional[Callable]]:
    """(remat enabled?, policy for jax.checkpoint / nn.remat) for config.remat.

    "none": no rematerialisation. "full": recompute everything in the backward pass (policy None). Else one
    of SIMPLE_POLICIES, e.g. "dots_with_no_batch_dims_saveable" (keep the matmul outputs without batch
    dimensions: weights-stationary products, cheap to keep).
    """
    if name == "none":
        return False, None
    if name == "full":
        return True, None
    if name not in SIMPLE_POLICIES:
        raise UserError(f"config.remat {name!r} is not supported; use 'none', 'full' or one of "
                        f"{', '.join(SIMPLE_POLICIES)}")
    return True, getattr(jax.checkpoint_policies, name)
