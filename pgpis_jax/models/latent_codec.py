"""Image <-> latent maps the latent-diffusion methods train in: the SD VAE, or a parameter-free stand-in.

Both expose the same three functions, so a method never asks which one it has:

    codec.moments(params, images)        images [B, H, W, 3] in [-1, 1] -> (mean, logvar) [B, H/f, W/f, C],
                                         unscaled (logvar None: a deterministic code)
    codec.latent(mean, logvar, rng)      a posterior sample times the scaling factor (the diffusion's x0)
    codec.decode(params, latents)        scaled latents -> images [B, H, W, 3], roughly in [-1, 1]

`VAECodec` is diffusers' AutoencoderKL (Stable Diffusion: f = 8, C = 4, scaling 0.18215). `PixelShuffleCodec`
rearranges each f x f pixel block into channels (C = 3 f^2): exactly invertible, no parameters. The CPU demo uses
it in place of the SD VAE.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp

from pgpis_jax.models.vae import AutoencoderKL, sample_posterior


@dataclasses.dataclass(frozen=True)
class VAECodec:
    """diffusers' AutoencoderKL; the posterior is sampled (as the PCDMs code does), not its mode."""

    module: AutoencoderKL

    @property
    def factor(self) -> int:
        return self.module.downsampling_factor

    @property
    def channels(self) -> int:
        return self.module.latent_channels

    def init_params(self, rng):
        return self.module.init_params(rng)

    def moments(self, params, images) -> Tuple[jax.Array, Optional[jax.Array]]:
        posterior = self.module.apply({"params": params}, images, method="encode")
        return posterior.mean, posterior.logvar

    def latent(self, mean, logvar, rng):
        return sample_posterior(mean, logvar, rng) * self.module.scaling_factor

    def decode(self, params, latents):
        images = self.module.apply({"params": params}, latents / self.module.scaling_factor, method="decode")
        return images.astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class PixelShuffleCodec:
    """Space-to-depth by `factor`: [B, H, W, 3] -> [B, H/f, W/f, 3 f^2], times `scaling` (default 1)."""

    factor: int = 4
    scaling: float = 1.0

    @property
    def channels(self) -> int:
        return 3 * self.factor ** 2

    def init_params(self, rng) -> dict:
        return {}

    def moments(self, params, images) -> Tuple[jax.Array, None]:
        b, h, w, c = images.shape
        f = self.factor
        if h % f or w % f:
            raise ValueError(f"PixelShuffleCodec: image size {h}x{w} is not a multiple of factor {f}")
        blocks = images.reshape(b, h // f, f, w // f, f, c).transpose(0, 1, 3, 2, 4, 5)
        return blocks.reshape(b, h // f, w // f, f * f * c).astype(jnp.float32), None

    def latent(self, mean, logvar, rng):
        return mean * self.scaling

    def decode(self, params, latents):
        b, h, w, _ = latents.shape
        f = self.factor
        blocks = (latents / self.scaling).reshape(b, h, w, f, f, 3).transpose(0, 1, 3, 2, 4, 5)
        return blocks.reshape(b, h * f, w * f, 3).astype(jnp.float32)


Codec = Any  # VAECodec | PixelShuffleCodec
