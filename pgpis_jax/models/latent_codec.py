"""Image <-> latent maps the latent-diffusion methods train in: the SD VAE, or a parameter-free stand-in.

Both expose the same three functions, so a method never asks which one it has:

    codec.moments(params, images)        images [B, H, W, 3] in [-1, 1] -> (mean, logvar) [B, H/f, W/f, C],
                                         unscaled (logvar None: a deterministic code)
    codec.latent(mean, logvar, rng)      a posterior sample times the scaling factor (the diffusion's x0)
    codec.decode(params, latents)        scaled latents -> images [B, H, W, 3], roughly in [-1, 1]

`VAECodec` is diffusers' AutoencoderKL (Stable Diffusion: f = 8, C = 4, scaling 0.18215). `PixelShuffleCodec`
rearranges each f x f pixel block into channels (C = 3 f^2), as pixels or as frequency-weighted DCT coefficients
(optionally only the low frequencies): no parameters, exactly invertible unless it drops frequencies. The CPU demo
uses it in place of the SD VAE.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

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
    """Space-to-depth by `factor`: [B, H, W, 3] -> [B, H/f, W/f, 3 f^2] (channels ordered (y, x, colour)), times
    `scaling` (default 1).

    basis "dct": each f x f block is replaced by its orthonormal 2-D DCT-II coefficients (channels ordered (u, v,
    colour); (0, 0) is f times the block mean), and coefficient (u, v) is multiplied by 1 + high_frequency_gain
    * (u + v). With gain 0 this is a rotation of the pixel basis (the same squared errors, the same signal-to-
    noise ratio per frequency); with a gain, errors in high-frequency channels decode attenuated by it, so an
    imprecise network gives smooth rather than speckled images. Still exactly invertible.

    low_pass K > 0 (basis "dct") keeps only the coefficients with u + v < K, in (u, v, colour) order (C = 3 x their
    count, e.g. 30 for f = 8, K = 4): a lossy code, as JPEG drops high frequencies; decoding fills in zeros."""

    factor: int = 4
    scaling: float = 1.0
    basis: str = "pixels"
    high_frequency_gain: float = 0.0
    low_pass: int = 0

    def __post_init__(self):
        if self.basis not in ("pixels", "dct"):
            raise ValueError(f"PixelShuffleCodec basis {self.basis!r}: expected 'pixels' or 'dct'")
        if self.basis == "pixels" and (self.high_frequency_gain or self.low_pass):
            raise ValueError("PixelShuffleCodec: high_frequency_gain and low_pass need basis 'dct'")
        if not 0 <= self.low_pass <= 2 * self.factor - 1:
            raise ValueError(f"PixelShuffleCodec low_pass={self.low_pass}: expected 0 (keep all) to "
                             f"{2 * self.factor - 1} (u + v < low_pass)")

    def _kept(self) -> np.ndarray:
        """Indices into the f * f (u, v) coefficients of those the code keeps (static, numpy)."""
        u = np.arange(self.factor)
        total = (u[:, None] + u[None, :]).reshape(-1)
        return np.flatnonzero(total < self.low_pass) if self.low_pass else np.arange(total.size)

    @property
    def channels(self) -> int:
        return 3 * len(self._kept())

    def init_params(self, rng) -> dict:
        return {}

    def _dct_matrix(self):
        """[u, y]: the orthonormal DCT-II basis of length f."""
        f = self.factor
        u, y = jnp.arange(f)[:, None], jnp.arange(f)[None, :]
        basis = jnp.cos(jnp.pi * (2 * y + 1) * u / (2 * f)) * jnp.sqrt(2.0 / f)
        return basis.at[0].multiply(1 / jnp.sqrt(2.0))

    def _gain(self):
        u = jnp.arange(self.factor)
        return (1.0 + self.high_frequency_gain * (u[:, None] + u[None, :]))[..., None]   # [u, v, 1]

    def moments(self, params, images) -> Tuple[jax.Array, None]:
        b, h, w, c = images.shape
        f = self.factor
        if h % f or w % f:
            raise ValueError(f"PixelShuffleCodec: image size {h}x{w} is not a multiple of factor {f}")
        blocks = images.astype(jnp.float32).reshape(b, h // f, f, w // f, f, c).transpose(0, 1, 3, 2, 4, 5)
        if self.basis == "dct":
            d = self._dct_matrix()
            blocks = jnp.einsum("uy,...yxc,vx->...uvc", d, blocks, d, precision="highest") * self._gain()
            blocks = blocks.reshape(b, h // f, w // f, f * f, c)[..., self._kept(), :]
        return blocks.reshape(b, h // f, w // f, -1), None

    def latent(self, mean, logvar, rng):
        return mean * self.scaling

    def decode(self, params, latents):
        b, h, w, _ = latents.shape
        f = self.factor
        blocks = (latents.astype(jnp.float32) / self.scaling).reshape(b, h, w, -1, 3)
        if self.basis == "dct":
            coefficients = jnp.zeros((b, h, w, f * f, 3), blocks.dtype).at[..., self._kept(), :].set(blocks)
            d = self._dct_matrix()
            blocks = jnp.einsum("uy,...uvc,vx->...yxc", d, coefficients.reshape(b, h, w, f, f, 3) / self._gain(), d,
                                precision="highest")
        else:
            blocks = blocks.reshape(b, h, w, f, f, 3)
        return blocks.transpose(0, 1, 3, 2, 4, 5).reshape(b, h * f, w * f, 3)


Codec = Any  # VAECodec | PixelShuffleCodec
