"""What the three PCDMs stages share: schedulers from the config, per-example random draws, the frozen image
encoders (CLIP ViT-H/14 image embedding, DINOv2 tokens), and the up-front check for weights and data."""

from __future__ import annotations

from typing import Any, Dict

import jax
import jax.numpy as jnp
import numpy as np

from pgpis_jax import input_pipeline
from pgpis_jax.diffusion import forward
from pgpis_jax.errors import UserError
from pgpis_jax.methods.base import example_keys, scheduler_from_config
from pgpis_jax.methods.pcdm import networks
from pgpis_jax.trainer.precision import Policy


class Diffusion:
    """The training schedule and the sampler of a stage (config.diffusion, config.sampling)."""

    def __init__(self, config):
        train = scheduler_from_config(config.diffusion.train_scheduler, "config.diffusion.train_scheduler")
        self.alphas_cumprod = np.asarray(train.schedule.alphas_cumprod, np.float32)
        self.prediction_type = train.prediction_type
        self.sampler = scheduler_from_config(config.sampling.scheduler, "config.sampling.scheduler")
        if self.sampler.prediction_type != self.prediction_type:
            raise UserError(f"config.sampling.scheduler predicts {self.sampler.prediction_type!r} but the network "
                            f"is trained for {self.prediction_type!r} (config.diffusion.train_scheduler)")
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
    mean, logvar = codec.moments(vae_params, images)
    if logvar is None:
        return codec.latent(mean, None, None)
    return jax.vmap(codec.latent)(mean, logvar, keys)


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
                    f"with `tfds build data/{config.data.dataset}` (README, Datasets)")


def train_iterator(config, process_index: int, process_count: int):
    """The stage's training batches from the input pipeline (pcdm_* batch layouts)."""
    return input_pipeline.from_config(config, split="train", train=True, process_index=process_index,
                                      process_count=process_count)


def first_test_examples(config, num: int, **options) -> Dict[str, np.ndarray]:
    """The first `num` test pairs in record order (the same on every process): preview and demo batches."""
    pipeline = input_pipeline.from_config(config, split="test", train=False, process_index=0, process_count=1,
                                          **options)
    batch = next(pipeline)
    if len(batch["mask"]) < num or not batch["mask"][:num].all():
        raise UserError(f"config.logging.num_samples={num} needs a batch of that many test pairs; "
                        f"config.batch_size is {config.batch_size}")
    return {k: v[:num] for k, v in batch.items()}
