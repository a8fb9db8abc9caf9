"""What the three PCDMs stages share: the Stage base (frozen networks run in the step or read from offline
features), schedulers from the config, per-example random draws, the frozen image encoders (CLIP ViT-H/14 image
embedding, DINOv2 tokens), and the up-front check for weights and data."""

from __future__ import annotations

from typing import Any, Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from pgpis_jax import input_pipeline
from pgpis_jax.diffusion import forward
from pgpis_jax.errors import UserError
from pgpis_jax.methods.base import Method, diffusion_schedules, example_keys
from pgpis_jax.methods.pcdm import features, networks
from pgpis_jax.trainer.precision import Policy


class Stage(Method):
    """A PCDMs stage. Its frozen networks (FROZEN, parameter-tree names) turn a pixel batch into the inputs of its
    trainable networks (`extract`); with config.data.features_dir those come from an offline feature dataset
    instead (pgpis_jax.methods.pcdm.features) and the training step runs only the trainable networks.
    Condition dropout zeroes a pixel input (a DROPPABLE key) before the encoders, or, on features, swaps in the
    features of that zeroed input."""

    FROZEN: Tuple[str, ...] = ()
    INPUTS: Tuple[str, ...] = ()                          # the pixel batch keys `extract` reads
    DROPPABLE: Dict[str, Tuple[str, ...]] = {}            # pixel input -> the features computed from it

    def __init__(self, config):
        super().__init__(config)
        self.features = features.open_for_training(config, self.FROZEN)

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
                                          process_count=process_count)

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


class Diffusion:
    """The training schedule and the sampler of a stage (config.diffusion, config.sampling)."""

    def __init__(self, config):
        self.alphas_cumprod, self.prediction_type, self.sampler = diffusion_schedules(config)
        self.noise_offset = float(config.diffusion.noise_offset)
        self.num_train_timesteps = len(self.alphas_cumprod)

    def training_pair(self, key, x0, varying_axes=(0, -1)):
        """(t [B], x_t, regression target) for clean samples x0 [B, ...] with one key per example [B]:
        t ~ U{0..T-1}, noise N(0, 1) plus `noise_offset` x one normal per (example, varying axis)."""
        def draw(k, x):
            t_key, n_key = jax.random.split(k)
            t = jax.random.randint(t_key, (), 0, self.num_train_timesteps, dtype=jnp.int32)
            noise = forward.offset_noise(n_key, (1,) + x.shape, self.noise_offset, varying_axes)[0]
            return t, noise

        t, noise = jax.vmap(draw)(key, x0)
        x_t = forward.add_noise(self.alphas_cumprod, x0, noise, t)
        return t, x_t, forward.training_target(self.prediction_type, self.alphas_cumprod, x0, noise, t)


def per_example_keys(rng, batch, num: int):
    """[num, B] keys: for each purpose one key per example, from fold_in(rng, example_id)."""
    keys = example_keys(rng, jnp.asarray(batch["example_id"]))
    return jnp.moveaxis(jax.vmap(lambda k: jax.random.split(k, num))(keys), 1, 0)


def dropped(keys, probability: float):
    """[B] bool: each example's condition dropped with `probability` (classifier-free training)."""
    return jax.vmap(lambda k: jax.random.bernoulli(k, probability))(keys)


def zero_where(drop, x):
    """x with the examples where drop [B] is True set to zeros (PCDMs zeroes the encoder's input pixels)."""
    return jnp.where(drop.reshape((-1,) + (1,) * (x.ndim - 1)), jnp.zeros_like(x), x)


def encode_latents(codec, vae_params, images, keys):
    """Posterior samples times the scaling factor for images [B, H, W, 3] in [-1, 1], one key per example."""
    return sample_latents(codec, *codec.moments(vae_params, images), keys)


def sample_latents(codec, mean, logvar, keys):
    """Posterior samples times the scaling factor from moments [B, h, w, C] (logvar None: deterministic)."""
    if logvar is None:
        return codec.latent(mean, None, None)
    return jax.vmap(codec.latent)(mean, logvar, keys)


def moments(codec, vae_params, images, name: str) -> Dict[str, Any]:
    """{name_mean, name_logvar (if the codec has one)}: the posterior moments of images, as features."""
    mean, logvar = codec.moments(vae_params, images)
    return {f"{name}_mean": mean, **({f"{name}_logvar": logvar} if logvar is not None else {})}


def latents_of(codec, inputs, name: str, keys):
    """Posterior samples from the features `moments` made."""
    return sample_latents(codec, inputs[f"{name}_mean"], inputs.get(f"{name}_logvar"), keys)


def signed_to_uint8(x):
    """[-1, 1] images made from uint8 (u / 127.5 - 1) back to uint8, exactly (compact features)."""
    return jnp.round((x + 1.0) * 127.5).astype(jnp.uint8)


def uint8_to_signed(x):
    """uint8 -> [-1, 1] as the input pipeline makes it (u / 127.5 - 1, float32)."""
    return x.astype(jnp.float32) / 127.5 - 1.0


def mean_squared_error(prediction, target):
    """Mean over all elements, in float32 (the PCDMs loss)."""
    return jnp.mean(jnp.square(prediction.astype(jnp.float32) - target.astype(jnp.float32)))


class Encoders:
    """The frozen encoders a stage uses, by parameter-tree name: "image_encoder" (CLIP vision with projection:
    `embed(pixels)` -> image_embeds [B, E]) and/or "dinov2" (`tokens(pixels)` -> last_hidden_state [B, N, D]);
    pixels are CLIP-normalised [B, 224, 224, 3]."""

    def __init__(self, config, names, missing: networks.MissingInputs, policy: Policy):
        kw = dict(dtype=policy.compute_dtype, param_dtype=policy.param_dtype,
                  attention_implementation=config.model.attention_implementation)
        specs = {"image_encoder": config.model.image_encoder, "dinov2": config.model.dinov2}
        self.resolved = {name: networks.resolve_network(specs[name], f"config.model.{name}", missing,
                                                        "transformers", **kw)
                         for name in names}

    def module(self, name: str):
        return self.resolved[name].module

    def init(self, rng) -> Dict[str, Any]:
        return {name: r.module.init_params(jax.random.fold_in(rng, i))
                for i, (name, r) in enumerate(sorted(self.resolved.items()))}

    def warm_start(self, params) -> Dict[str, Any]:
        return {name: networks.load_pretrained(r, params[name]) for name, r in self.resolved.items()}

    def embed(self, params, pixels):
        out = self.module("image_encoder").apply({"params": params["image_encoder"]}, pixels)
        return jax.lax.stop_gradient(out["image_embeds"].astype(jnp.float32))

    def tokens(self, params, pixels):
        out = self.module("dinov2").apply({"params": params["dinov2"]}, pixels)
        return jax.lax.stop_gradient(out["last_hidden_state"])


def check_dataset(config, missing: networks.MissingInputs) -> None:
    """Adds a problem if the config's TFDS dataset is not prepared."""
    try:
        input_pipeline.load_builder(input_pipeline.dataset_name(config.data), config.data.get("data_dir") or None)
    except UserError:
        missing.add(f"config.data.dataset={config.data.dataset!r} ({input_pipeline.dataset_name(config.data)}) is not "
                    f"prepared in config.data.data_dir={config.data.get('data_dir') or '(the TFDS default)'}: build it "
                    f"with `tfds build data/{config.data.dataset}` (README, Data)")


def first_test_examples(config, num: int, **options) -> Dict[str, np.ndarray]:
    """The first `num` test pairs in record order (the same on every process): preview and demo batches."""
    pipeline = input_pipeline.from_config(config, split="test", train=False, process_index=0, process_count=1,
                                          **options)
    batch = next(pipeline)
    if len(batch["mask"]) < num or not batch["mask"][:num].all():
        raise UserError(f"config.logging.num_samples={num} needs a batch of that many test pairs; "
                        f"config.batch_size is {config.batch_size}")
    return {k: v[:num] for k, v in batch.items()}
