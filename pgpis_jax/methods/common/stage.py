"""The base of every trained stage: networks built from config specs (or from a run's recorded configs for
inference), frozen networks run in the training step by `extract` or read from offline features, condition
dropout on either, the data layout check and per-example random draws."""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp

from pgpis_jax import input_pipeline
from pgpis_jax.errors import UserError
from pgpis_jax.methods.base import Method, example_keys
from pgpis_jax.methods.common import features
from pgpis_jax.methods.common.networks import NetworkBuilder

NETWORKS_FILE = "networks.json"
DATASET_FILE = "dataset.json"


class Stage(Method):
    """A stage trained by the shared trainer.

    FROZEN: parameter-tree names of the frozen networks; INPUTS: the batch keys `extract` reads; DROPPABLE:
    pixel input -> the features computed from it (condition dropout zeroes the input, or on features swaps in
    the features of a zeroed input); LAYOUTS: the data layouts (config.data.layout) whose batches it reads;
    PIXELS_ONLY: why the stage trains on pixels only (offline features are then refused), or "".

    saved_networks: the network configs a trained run recorded (<run>/networks.json): the stage is then built
    for inference from the run alone (no pretrained directories, no dataset, no offline features).
    needs_data=False builds a stage for training without its dataset or features (the pretrained directories are
    still resolved): importing a released checkpoint into a run.
    Subclasses build their networks with `self.builder` in __init__ and end it with `self.check_inputs()`."""

    FROZEN: Tuple[str, ...] = ()
    INPUTS: Tuple[str, ...] = ()
    DROPPABLE: Dict[str, Tuple[str, ...]] = {}
    LAYOUTS: Tuple[str, ...] = ()
    PIXELS_ONLY: str = ""

    def __init__(self, config, saved_networks: Optional[Dict[str, Any]] = None, needs_data: bool = True):
        super().__init__(config)
        if self.PIXELS_ONLY and config.data.get("features_dir"):
            raise UserError(f"config.data.features_dir={config.data.features_dir!r}: method {config.method!r} trains "
                            f"on pixels only ({self.PIXELS_ONLY}); set it to ''")
        layout = config.data.get("layout", "")
        if layout not in self.LAYOUTS:
            raise UserError(f"config.data.layout={layout!r}: method {config.method!r} reads the layouts "
                            f"{', '.join(self.LAYOUTS)}")
        self.builder = NetworkBuilder(saved_networks)
        self.needs_data = needs_data and not self.builder.from_run
        self.features = features.open_for_training(config, self.FROZEN) if self.needs_data else None

    def check_inputs(self) -> None:
        """One UserError naming every missing pretrained directory and, for training on pixels, the dataset."""
        if self.needs_data and self.features is None:
            check_dataset(self.config, self.builder.missing)
        self.builder.raise_if_any(self.config.method)

    def run_files(self) -> Dict[str, Any]:
        """The resolved configs of the stage's networks, from which inference rebuilds them, and what the stage
        trains on (`data_identity`), so that resuming with the data in another folder is checked by what it is."""
        files = {NETWORKS_FILE: self.builder.recorded}
        if self.needs_data:
            files[DATASET_FILE] = self.data_identity()
        return files

    def data_identity(self) -> Dict[str, Any]:
        """{"features": the offline features' method, split, rows and frozen-weight fingerprint} or {"tfds":
        input_pipeline.dataset_identity} of the training data; neither holds where the data lies."""
        if self.features is not None:
            index = self.features.index
            return {"features": {key: index[key] for key in ("method", "split", "rows", "fingerprint")}}
        return {"tfds": input_pipeline.dataset_identity(self.config.data)}

    def extract(self, params, batch) -> Dict[str, Any]:
        """{feature: [B, ...]} of a pixel batch (its INPUTS keys); the frozen networks' outputs."""
        raise NotImplementedError

    def frozen_params(self, params) -> Dict[str, Any]:
        return {name: params[name] for name in self.FROZEN if name in params}

    def check_frozen(self, params) -> None:
        """On features: UserError unless the run's frozen parameters are those the features were made with."""
        if self.features is None:
            return
        differ = features.fingerprint_mismatches(self.features.index["fingerprint"],
                                                 features.fingerprint(self.frozen_params(params)))
        if differ:
            raise UserError(f"config.data.features_dir={self.features.directory} was extracted with other weights "
                            f"for {len(differ)} frozen tensors (e.g. {', '.join(differ[:3])}); extract again with "
                            f"this config")

    def train_iterator(self, process_index: int, process_count: int):
        """Pixel batches from the input pipeline, or feature batches from config.data.features_dir."""
        if self.features is not None:
            return features.FeatureIterator(self.features, self.config.batch_size, process_index, process_count,
                                            self.config.seed)
        return input_pipeline.from_config(self.config, split="train", train=True, process_index=process_index,
                                          process_count=process_count, encoded=True)

    def training_inputs(self, params, batch, drops) -> Dict[str, Any]:
        """The features of a training batch with condition dropout applied; drops: {pixel input: bool [B]}."""
        if self.features is None:
            pixels = {key: batch[key] for key in self.INPUTS}
            pixels.update({key: zero_where(drop, batch[key]) for key, drop in drops.items()})
            return self.extract(params, pixels)
        out = {key: jnp.asarray(batch[key]) for key in self.features.keys}
        for key, drop in drops.items():
            for name in (n for n in self.DROPPABLE[key] if n in out):
                constant = jnp.asarray(self.features.constants[name], out[name].dtype)
                out[name] = jnp.where(drop.reshape((-1,) + (1,) * (out[name].ndim - 1)), constant, out[name])
        return out


def per_example_keys(rng, batch, num: int):
    """[num, B] keys: for each purpose one key per example, from fold_in(rng, example_id)."""
    keys = example_keys(rng, jnp.asarray(batch["example_id"]))
    return jnp.moveaxis(jax.vmap(lambda k: jax.random.split(k, num))(keys), 1, 0)


def dropped(keys, probability: float):
    """[B] bool: each example's condition dropped with `probability` (classifier-free training)."""
    return jax.vmap(lambda k: jax.random.bernoulli(k, probability))(keys)


def zero_where(drop, x):
    """x with the examples where drop [B] is True set to zeros (the methods zero an encoder's input pixels)."""
    return jnp.where(drop.reshape((-1,) + (1,) * (x.ndim - 1)), jnp.zeros_like(x), x)


def check_same_data(trained_workdir: str, config) -> None:
    """UserError if the run in `trained_workdir` recorded other training data (its dataset.json) than the TFDS
    dataset `config.data` now points at; nothing to check for a run that recorded none or trained on features."""
    import json
    import os

    path = os.path.join(trained_workdir, DATASET_FILE)
    if not os.path.isfile(path):
        return
    with open(path) as f:
        recorded = json.load(f).get("tfds")
    if recorded is None:
        return
    current = input_pipeline.dataset_identity(config.data)
    if current != recorded:
        keys = [k for k in sorted(set(recorded) | set(current)) if recorded.get(k) != current.get(k)]
        raise UserError(f"config.data.data_dir={config.data.get('data_dir') or '(the TFDS default)'} holds another "
                        f"dataset than the one {trained_workdir} was trained on ({path}): "
                        + ", ".join(f"{k} {recorded.get(k)!r} -> {current.get(k)!r}" for k in keys))


def check_dataset(config, missing) -> None:
    """Adds a problem to `missing` (a networks.MissingInputs) if the config's TFDS dataset is not prepared."""
    try:
        input_pipeline.load_builder(input_pipeline.dataset_name(config.data), config.data.get("data_dir") or None)
    except UserError:
        missing.add(f"config.data.dataset={config.data.dataset!r} ({input_pipeline.dataset_name(config.data)}) is not "
                    f"prepared in config.data.data_dir={config.data.get('data_dir') or '(the TFDS default)'}: build it "
                    f"with `tfds build data/{config.data.dataset}` (README, Data)")


def first_test_examples(config, num: int, **options) -> Dict[str, Any]:
    """The first `num` test pairs in record order (the same on every process): preview and demo batches."""
    pipeline = input_pipeline.from_config(config, split="test", train=False, process_index=0, process_count=1,
                                          **options)
    batch = next(pipeline)
    if len(batch["mask"]) < num or not batch["mask"][:num].all():
        raise UserError(f"config.logging.num_samples={num} needs a batch of that many test pairs; "
                        f"config.batch_size is {config.batch_size}")
    return {k: v[:num] for k, v in batch.items()}
