"""What every process of a multi-host job computes together, and the per-call copies of a config it uses."""

from __future__ import annotations

import jax
import ml_collections
import numpy as np


def summed_over_processes(values) -> np.ndarray:
    """The element-wise sum over all processes of a few numbers (every process calls this)."""
    values = np.asarray(values, np.float64)
    if jax.process_count() == 1:
        return values
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(values)).sum(axis=0)


def with_batch_size(config, batch_size: int):
    """A copy of `config` with another global batch_size (sampling and extraction batches need not be the
    training batch)."""
    config = ml_collections.ConfigDict(config.to_dict())
    config.batch_size = batch_size
    return config
