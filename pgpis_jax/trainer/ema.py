"""Exponential moving average of the trainable parameters (config.ema.decay; 0 = off).

The EMA holds only trainable leaves (frozen ones never change, so their average is themselves):
ema <- decay * ema + (1 - decay) * params after every update, starting from the initial parameters.
`eval_params` merges it with the frozen parameters for sampling.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

from pgpis_jax.errors import UserError
from pgpis_jax.trainer import tree


def enabled(config) -> bool:
    decay = float(config.ema.decay)
    if not 0.0 <= decay < 1.0:
        raise UserError(f"config.ema.decay must be in [0, 1) (0 = no EMA), got {decay}")
    return decay > 0.0


def init(trainable_params: Mapping) -> dict:
    return jax.tree.map(jnp.copy, dict(trainable_params))


def update(ema: Mapping, trainable_params: Mapping, decay: float) -> dict:
    def one(e, p):
        return (decay * e.astype(jnp.float32) + (1.0 - decay) * p.astype(jnp.float32)).astype(e.dtype)

    return jax.tree.map(one, dict(ema), dict(trainable_params))


def eval_params(params: Mapping, ema: Mapping) -> dict:
    """`params` with every trainable leaf replaced by its EMA (params itself when the EMA is empty)."""
    if not ema:
        return dict(params)
    flat = tree.flatten(params)
    flat.update(tree.flatten(ema))
    return tree.unflatten(flat)
