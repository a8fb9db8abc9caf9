"""What a method gives the trainer. The trainer (pgpis_jax/trainer) knows nothing else about it.

A method module exposes `build(config) -> Method`. The trainer calls, in order:

    method.init(rng)                      -> params (nested dict of arrays), traced under jit with
                                             out_shardings, so it must be a pure JAX function
    method.warm_start(params)             -> params (host side, fresh runs only: load pretrained weights)
    method.train_iterator(index, count)   -> this process's batches (see DataIterator)
    method.loss_fn(params, batch, rng)    -> (scalar loss, {name: scalar}), traced inside the train step
    method.preview_batch(n), sample_fn    -> periodic sample grids (optional)

Constructors must not run JAX computations: `jax.distributed.initialize()` may still have to run.
"""

from __future__ import annotations

import abc
from typing import Any, Dict, Mapping, Optional, Protocol, Tuple, runtime_checkable

import jax
import numpy as np

from pgpis_jax.diffusion import from_diffusers_config
from pgpis_jax.errors import UserError

Params = Dict[str, Any]
Batch = Mapping[str, Any]


@runtime_checkable
class DataIterator(Protocol):
    """This process's share of each global batch: `next()` returns a dict of NumPy arrays whose leading
    dimension is config.batch_size // jax.process_count(), in a deterministic order.

    `get_state()` returns the position (JSON-serialisable, or bytes) after the batches returned so far and
    `set_state(state)` restores it, so that a resumed run sees the same batches. An iterator without them
    is fast-forwarded by skipping the batches already consumed (slow for long runs, but exact).

    Optionally `device_decode`: a JAX function (or None) from the batches `next()` returns to the batches
    `loss_fn` reads; the trainer applies it inside the jitted step, so compact encodings (uint8 levels, pose
    map parts) cross to the devices and are expanded there.
    """

    def __next__(self) -> Dict[str, np.ndarray]: ...

    def get_state(self) -> Any: ...

    def set_state(self, state: Any) -> None: ...


class Method(abc.ABC):
    """Base class of the methods: holds the config; subclasses define the networks, loss and data."""

    def __init__(self, config):
        self.config = config

    @abc.abstractmethod
    def init(self, rng: jax.Array) -> Params:
        """Fresh parameters (float32 or the config's param dtype; the trainer casts to param_dtype)."""

    def warm_start(self, params: Params) -> Params:
        """Parameters to start a fresh run from (e.g. pretrained weights loaded from disk); identity here.
        Not called when resuming from a checkpoint."""
        return params

    @abc.abstractmethod
    def loss_fn(self, params: Params, batch: Batch, rng: jax.Array) -> Tuple[jax.Array, Dict[str, jax.Array]]:
        """The training loss on one (micro-)batch and named scalar diagnostics, logged as train/<name>.

        The loss must be a mean over the batch's examples, so that accumulating equal micro-batches equals
        one large batch. `rng` is the step's key and is the same for every micro-batch of an accumulated
        step: derive per-example randomness from something that identifies the example (see
        `example_keys`) rather than drawing one tensor for the whole micro-batch.
        """

    @abc.abstractmethod
    def train_iterator(self, process_index: int, process_count: int) -> DataIterator:
        """This process's training batches (see DataIterator)."""

    def preview_batch(self, num: int) -> Optional[Dict[str, np.ndarray]]:
        """A fixed conditioning batch of `num` examples (the same on every process) for sample grids, or
        None if the method has no sample_fn."""
        return None

    def sample_fn(self, params: Params, batch: Batch, rng: jax.Array) -> jax.Array:
        """Images [N, H, W, C] in [0, 1] sampled for `batch` (from preview_batch)."""
        raise NotImplementedError

    def run_files(self) -> Dict[str, Any]:
        """JSON files the method records in the run directory at the start of a fresh run ({file name: JSON-able
        value}), e.g. the resolved configs of its networks so that inference rebuilds them without the
        pretrained directories."""
        return {}


def scheduler_from_config(scheduler_config, key: str):
    """A sampler from a diffusers-style scheduler config in a method's config (a ConfigDict); a bad config is a
    UserError naming `key` (e.g. "config.sampling.scheduler")."""
    try:
        return from_diffusers_config(scheduler_config.to_dict())
    except ValueError as error:
        raise UserError(f"{key}: {error}") from None


def diffusion_schedules(config):
    """(alphas_cumprod [T] float32, prediction_type, sampler) from config.diffusion.train_scheduler and
    config.sampling.scheduler; a UserError when the sampler expects another prediction than the training."""
    train = scheduler_from_config(config.diffusion.train_scheduler, "config.diffusion.train_scheduler")
    sampler = scheduler_from_config(config.sampling.scheduler, "config.sampling.scheduler")
    if sampler.prediction_type != train.prediction_type:
        raise UserError(f"config.sampling.scheduler predicts {sampler.prediction_type!r} but the network is trained "
                        f"for {train.prediction_type!r} (config.diffusion.train_scheduler)")
    return np.asarray(train.schedule.alphas_cumprod, np.float32), train.prediction_type, sampler


def example_keys(rng: jax.Array, example_ids: jax.Array) -> jax.Array:
    """One key per example: fold_in(rng, id). Keys, hence noise, then do not depend on how a batch is split
    into micro-batches or over devices."""
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, example_ids)

