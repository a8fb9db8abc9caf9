"""A tiny diffusion model on synthetic images: the trainer's test method and a CPU demo of a real run.

Data: `num_examples` RGB images of `image_size`^2 pixels in [-1, 1], each a flat background with one
coloured square, generated from (data seed, example id) - in memory, no files. Network: an MLP denoiser
on the flattened image with a sinusoidal timestep embedding and residual blocks (optionally remat). Loss:
the epsilon / x0 / v regression of pgpis_jax.diffusion with per-example keys (fold_in(rng, id)), so a
step does not depend on how its batch is split into micro-batches or over devices. Samples: the
configured diffusers sampler (DDIM by default) from pure noise.

    python train.py  --config=configs/toy_denoiser.py:demo --workdir=runs/toy
    python sample.py --config=configs/toy_denoiser.py:demo --workdir=runs/toy
"""

from __future__ import annotations

import json
from typing import Any, Dict, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from pgpis_jax.diffusion import forward
from pgpis_jax.errors import UserError
from pgpis_jax.evaluation import write_results
from pgpis_jax.methods.base import Method, example_keys, diffusion_schedules
from pgpis_jax.nn.embeddings import get_timestep_embedding
from pgpis_jax.trainer.precision import Policy, remat_policy


# ---------------------------------------------------------------------------------------------------------
# Data

def make_image(seed: int, example_id: int, size: int) -> np.ndarray:
    """Example `example_id`: [size, size, 3] float32 in [-1, 1]."""
    rng = np.random.default_rng([seed, example_id])
    background, square = rng.uniform(-1.0, 1.0, (2, 3)).astype(np.float32)
    side = int(rng.integers(max(2, size // 4), max(3, size // 2) + 1))
    top, left = rng.integers(0, size - side + 1, 2)
    image = np.broadcast_to(background, (size, size, 3)).copy()
    image[top:top + side, left:left + side] = square
    return image


def make_images(seed: int, ids, size: int) -> np.ndarray:
    return np.stack([make_image(seed, int(i), size) for i in ids])


class SyntheticIterator:
    """Deterministic, restorable batches of the synthetic dataset for one process.

    The global order is a fresh permutation of the dataset each epoch (from the data seed and the epoch);
    global batch b holds positions [b * B, (b + 1) * B) of it (the remainder of an epoch is dropped), and
    process p gets rows [p * B / P, (p + 1) * B / P) of it. State: {"epoch": e, "position": i}.
    """

    def __init__(self, images: np.ndarray, global_batch: int, process_index: int, process_count: int, seed: int):
        if global_batch > len(images):
            raise UserError(f"config.batch_size {global_batch} exceeds config.data.num_examples {len(images)}")
        self._images = images
        self._global_batch = global_batch
        self._local = global_batch // process_count
        self._offset = process_index * self._local
        self._seed = seed
        self._epoch, self._position = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self._seed, 1, epoch]).permutation(len(self._images))

    def __iter__(self):
        return self

    def __next__(self) -> Dict[str, np.ndarray]:
        if self._position + self._global_batch > len(self._images):
            self._epoch, self._position = self._epoch + 1, 0
            self._order = self._permutation(self._epoch)
        rows = self._order[self._position + self._offset:self._position + self._offset + self._local]
        self._position += self._global_batch
        return {"image": self._images[rows], "id": rows.astype(np.int32)}

    def get_state(self) -> Dict[str, int]:
        return {"epoch": self._epoch, "position": self._position}

    def set_state(self, state: Dict[str, int]) -> None:
        self._epoch, self._position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation(self._epoch)


# ---------------------------------------------------------------------------------------------------------
# Network

class ResidualBlock(nn.Module):
    hidden: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h, temb):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        y = nn.LayerNorm(dtype=jnp.float32, param_dtype=self.param_dtype, name="norm")(h.astype(jnp.float32))
        y = nn.Dense(self.hidden, name="dense_in", **kw)(nn.silu(y))
        y = y + nn.Dense(self.hidden, name="time_proj", **kw)(temb)
        y = nn.Dense(self.hidden, name="dense_out", **kw)(nn.silu(y))
        return h + y


class ToyDenoiserNet(nn.Module):
    """MLP denoiser: [B, H, W, C] noisy images and [B] timesteps -> [B, H, W, C] prediction (float32)."""

    hidden: int = 256
    depth: int = 3
    time_embedding: int = 64
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: str = "none"

    @nn.compact
    def __call__(self, x, t):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        batch = x.shape[0]
        temb = get_timestep_embedding(t, self.time_embedding, flip_sin_to_cos=True, downscale_freq_shift=0.0)
        temb = nn.silu(nn.Dense(self.hidden, name="time_embedding", **kw)(temb.astype(self.dtype)))
        h = nn.Dense(self.hidden, name="dense_in", **kw)(x.reshape(batch, -1).astype(self.dtype))
        enabled, policy = remat_policy(self.remat)
        block = nn.remat(ResidualBlock, policy=policy) if enabled else ResidualBlock
        for i in range(self.depth):
            h = block(self.hidden, name=f"blocks_{i}", **kw)(h, temb)
        h = nn.LayerNorm(dtype=jnp.float32, param_dtype=self.param_dtype, name="norm_out")(h.astype(jnp.float32))
        out = nn.Dense(int(np.prod(x.shape[1:])), name="dense_out", **kw)(nn.silu(h).astype(self.dtype))
        return out.reshape(x.shape).astype(jnp.float32)


# ---------------------------------------------------------------------------------------------------------
# The method

class ToyDenoiser(Method):
    def __init__(self, config):
        super().__init__(config)
        policy = Policy.from_config(config)
        remat_policy(config.remat)  # validate early
        self.net = ToyDenoiserNet(hidden=config.model.hidden, depth=config.model.depth,
                                  time_embedding=config.model.time_embedding, dtype=policy.compute_dtype,
                                  param_dtype=policy.param_dtype, remat=config.remat)
        self.alphas_cumprod, self.prediction_type, self.sampler = diffusion_schedules(config)
        self.image_shape = (config.data.image_size, config.data.image_size, 3)

    def init(self, rng):
        x = jnp.zeros((1,) + self.image_shape, jnp.float32)
        return self.net.init(rng, x, jnp.zeros((1,), jnp.int32))["params"]

    def train_iterator(self, process_index: int, process_count: int):
        d = self.config.data
        images = make_images(d.seed, range(d.num_examples), d.image_size)
        return SyntheticIterator(images, self.config.batch_size, process_index, process_count, d.seed)

    def _prediction_and_target(self, params, batch, rng):
        x0 = batch["image"].astype(jnp.float32)
        keys = example_keys(rng, batch["id"])
        num_t = len(self.alphas_cumprod)
        kind = self.config.diffusion.timestep_sampler

        def draw(key):
            t_key, n_key = jax.random.split(key)
            return (forward.sample_timesteps(kind, t_key, 1, num_t)[0],
                    jax.random.normal(n_key, self.image_shape, jnp.float32))

        t, noise = jax.vmap(draw)(keys)
        x_t = forward.add_noise(self.alphas_cumprod, x0, noise, t)
        target = forward.training_target(self.prediction_type, self.alphas_cumprod, x0, noise, t)
        return self.net.apply({"params": params}, x_t, t), target, t

    def loss_fn(self, params, batch, rng):
        prediction, target, t = self._prediction_and_target(params, batch, rng)
        per_example = jnp.mean(jnp.square(prediction - target), axis=(1, 2, 3))
        high = t >= len(self.alphas_cumprod) // 2
        return jnp.mean(per_example), {"loss_high_t": jnp.sum(per_example * high) / jnp.maximum(jnp.sum(high), 1)}

    def heldout_losses(self, params, batch, rng):
        """(the loss, the loss of predicting zeros) on `batch`."""
        prediction, target, _ = self._prediction_and_target(params, batch, rng)
        return jnp.mean(jnp.square(prediction - target)), jnp.mean(jnp.square(target))

    def preview_batch(self, num: int) -> Optional[Dict[str, np.ndarray]]:
        return {"id": np.arange(num, dtype=np.int32)}

    def sample_fn(self, params, batch, rng):
        n = batch["id"].shape[0]
        x_T = jax.random.normal(rng, (n,) + self.image_shape, jnp.float32)

        def model_fn(x, t):
            return self.net.apply({"params": params}, x, jnp.full((x.shape[0],), t, jnp.int32))

        x0 = self.sampler.sample(model_fn, x_T, jax.random.fold_in(rng, 1),
                                 num_inference_steps=self.config.sampling.num_inference_steps)
        return jnp.clip((x0 + 1.0) / 2.0, 0.0, 1.0)


def build(config, saved_networks=None) -> ToyDenoiser:
    """The toy denoiser (it has no pretrained networks, so `saved_networks` is unused)."""
    return ToyDenoiser(config)


def _require_output_dir(output_dir) -> str:
    from pgpis_jax.config_checks import check_writable_directory

    if not output_dir:
        raise UserError("--output_dir is required (nothing is written into the run)")
    check_writable_directory(output_dir, "--output_dir")
    return output_dir


def sample(workdir: str, config, output_dir=None) -> None:
    """sample.py: a grid from the newest checkpoint's EMA (else raw) parameters -> <output_dir>/samples.png."""
    from pgpis_jax.trainer import inference, metrics

    path = epath.Path(_require_output_dir(output_dir)) / "samples.png"
    method = build(config)
    params, step = inference.load_params(method, config, workdir)
    rng = jax.random.key(config.seed)
    images = jax.jit(method.sample_fn)(params, method.preview_batch(config.logging.num_samples), rng)
    grid = metrics.image_grid(np.asarray(images))
    metrics.save_png(path, grid)
    print(f"{config.logging.num_samples} samples of checkpoint step {step} -> {path}", flush=True)


def eval(workdir: str, config, output_dir=None) -> None:  # noqa: A001 - the entry points call method.eval
    """eval.py: the denoising loss on held-out synthetic examples (ids after the training set) at the
    newest checkpoint, and the loss of predicting zeros -> <output_dir>/metrics.json."""
    from pgpis_jax.trainer import inference

    path = epath.Path(_require_output_dir(output_dir)) / "metrics.json"
    method = build(config)
    params, step = inference.load_params(method, config, workdir)
    d = config.data
    ids = np.arange(d.num_examples, d.num_examples + 256, dtype=np.int32)
    batch = {"image": make_images(d.seed, ids, d.image_size), "id": ids}
    rng = jax.random.key(config.seed + 1)
    loss, zeros = jax.jit(method.heldout_losses)(params, batch, rng)
    result = {"step": step, "heldout_loss": float(loss), "predict_zero_loss": float(zeros)}
    write_results(result, str(path))
    print(json.dumps(result), flush=True)
