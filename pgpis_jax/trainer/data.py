"""Host batches to global arrays, and the input pipeline's position for checkpoints.

Each process reads its own share of the global batch (config.batch_size // process_count examples);
`jax.make_array_from_process_local_data` assembles the shares into one array sharded over the mesh's
batch axes. The position is the iterator's own `get_state()` when it has one, else the number of batches
consumed (a resumed run then skips that many). An iterator's `device_decode` (the input pipeline's uint8 levels
and pose-map parts to the documented batch) is applied by the train step on the devices.
"""

from __future__ import annotations

import base64
from typing import Any, Dict, Mapping

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh

from pgpis_jax.errors import UserError
from pgpis_jax.trainer import mesh as mesh_lib

BYTES_KEY = "__bytes_base64__"


def encode_state(state: Any) -> Any:
    """A JSON-serialisable form of an iterator state (bytes become base64)."""
    if isinstance(state, (bytes, bytearray)):
        return {BYTES_KEY: base64.b64encode(bytes(state)).decode("ascii")}
    return state


def decode_state(state: Any) -> Any:
    if isinstance(state, dict) and set(state) == {BYTES_KEY}:
        return base64.b64decode(state[BYTES_KEY])
    return state


class HostData:
    """Wraps a method's iterator: global batches for the train step, and its position."""

    def __init__(self, iterator, mesh: Mesh, config):
        self._iterator = iterator
        self._mesh = mesh
        self._config = config
        self._consumed = 0
        self._has_state = callable(getattr(iterator, "get_state", None)) and callable(
            getattr(iterator, "set_state", None))
        self.device_decode = getattr(iterator, "device_decode", None)
        count = jax.process_count()
        if config.batch_size % count:
            raise UserError(f"config.batch_size {config.batch_size} is not divisible by the {count} processes")
        self.local_batch_size = config.batch_size // count

    def next_host_batch(self) -> Dict[str, np.ndarray]:
        batch = next(self._iterator)
        self._consumed += 1
        for name, value in batch.items():
            kind = np.asarray(value).dtype.kind
            if kind not in "biuf":
                raise UserError(f"the input pipeline returned batch field {name!r} of dtype {np.asarray(value).dtype}; "
                                "only numeric and bool fields can go to the devices (drop it in the training "
                                "iterator, e.g. include_names=False)")
            if np.ndim(value) == 0 or np.shape(value)[0] != self.local_batch_size:
                raise UserError(f"the input pipeline returned batch field {name!r} of shape {np.shape(value)}; "
                                f"expected a leading dimension of {self.local_batch_size} (config.batch_size "
                                f"{self._config.batch_size} / {jax.process_count()} processes)")
        return batch

    def shardings(self, batch: Mapping[str, np.ndarray]):
        return {name: mesh_lib.batch_sharding(self._mesh, self._config, np.ndim(value))
                for name, value in batch.items()}

    def to_global(self, batch: Mapping[str, np.ndarray]) -> Dict[str, jax.Array]:
        out = {}
        for name, value in batch.items():
            value = np.asarray(value)
            sharding = mesh_lib.batch_sharding(self._mesh, self._config, value.ndim)
            global_shape = (self._config.batch_size,) + value.shape[1:]
            out[name] = jax.make_array_from_process_local_data(sharding, value, global_shape)
        return out

    def get_state(self) -> Any:
        if self._has_state:
            return {"iterator": encode_state(self._iterator.get_state()), "batches_consumed": self._consumed}
        return {"batches_consumed": self._consumed}

    def set_state(self, state: Mapping[str, Any]) -> None:
        consumed = int(state["batches_consumed"])
        if consumed == 0 and "iterator" not in state:
            return   # a run that has read nothing yet (an imported checkpoint): the fresh iterator is its position
        if "iterator" in state:
            if not self._has_state:
                raise UserError("the checkpoint holds an input-pipeline state but this method's iterator has no "
                                "set_state(); the input pipeline changed since the checkpoint was written")
            self._iterator.set_state(decode_state(state["iterator"]))
        else:
            if self._has_state:
                raise UserError("the checkpoint holds no input-pipeline state (only a batch count) but this "
                                "method's iterator has get_state()/set_state(); the input pipeline changed "
                                "since the checkpoint was written")
            logging.warning("input pipeline without set_state(): skipping %d batches to resume", consumed)
            for _ in range(consumed):
                next(self._iterator)
        self._consumed = consumed
