"""The diffusion training objective of a stage, from config.diffusion and config.sampling:

    train_scheduler     a diffusers-style scheduler config: the noise schedule and the prediction type
                        (epsilon, sample = x0, v_prediction)
    timestep_sampler    "uniform" (t ~ U{0..T-1}) or "cubic" (CFLD: t = floor((1 - u^3) T)); default uniform
    noise_offset        offset noise: N(0, 1) plus noise_offset x one normal per (example, varying axis)
    loss_weighting      "none" (plain mean squared error) or "min_snr" (per example min(SNR(t), gamma) / SNR(t)
                        for epsilon, min(SNR, gamma) for x0, min(SNR, gamma) / (SNR + 1) for v; Hang et al. 2023),
                        with min_snr_gamma (default 5)

A method with a learned variance (RePoseDM's L_vlb) adds its per-example term through `loss(..., extra=...)`.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from pgpis_jax.diffusion import forward
from pgpis_jax.errors import UserError
from pgpis_jax.methods.base import diffusion_schedules

LOSS_WEIGHTINGS = ("none", "min_snr")


class DiffusionObjective:
    """Noising, regression targets and the loss of one stage; `sampler` is the configured inference sampler."""

    def __init__(self, config):
        d = config.diffusion
        self.alphas_cumprod, self.prediction_type, self.sampler = diffusion_schedules(config)
        self.num_train_timesteps = len(self.alphas_cumprod)
        self.noise_offset = float(d.noise_offset)
        self.timestep_sampler = d.get("timestep_sampler", "uniform")
        if self.timestep_sampler not in forward.TIMESTEP_SAMPLERS:
            raise UserError(f"config.diffusion.timestep_sampler={self.timestep_sampler!r}; expected one of "
                            f"{', '.join(sorted(forward.TIMESTEP_SAMPLERS))}")
        self.loss_weighting = d.get("loss_weighting", "none")
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise UserError(f"config.diffusion.loss_weighting={self.loss_weighting!r}; expected one of "
                            f"{', '.join(LOSS_WEIGHTINGS)}")
        self.min_snr_gamma = float(d.get("min_snr_gamma", 5.0))

    def training_pair(self, keys, x0, varying_axes=(0, -1)):
        """(t [B], x_t, regression target) for clean samples x0 [B, ...] with one key per example [B]: t from
        the timestep sampler, noise with `noise_offset` along `varying_axes` (of the whole batch's shape)."""
        def draw(key, x):
            t_key, noise_key = jax.random.split(key)
            t = forward.sample_timesteps(self.timestep_sampler, t_key, 1, self.num_train_timesteps)[0]
            noise = forward.offset_noise(noise_key, (1,) + x.shape, self.noise_offset, varying_axes)[0]
            return t, noise

        t, noise = jax.vmap(draw)(keys, x0)
        x_t = forward.add_noise(self.alphas_cumprod, x0, noise, t)
        return t, x_t, forward.training_target(self.prediction_type, self.alphas_cumprod, x0, noise, t)

    def weights(self, t):
        """Per-example loss weights [B] (float32) of timesteps t [B]."""
        if self.loss_weighting == "none":
            return jnp.ones(t.shape, jnp.float32)
        alpha_bar = jnp.asarray(self.alphas_cumprod)[t]
        snr = alpha_bar / (1.0 - alpha_bar)
        clipped = jnp.minimum(snr, self.min_snr_gamma)
        return {"epsilon": clipped / snr, "sample": clipped, "v_prediction": clipped / (snr + 1.0)}[
            self.prediction_type]

    def loss(self, prediction, target, t, extra: Optional[jax.Array] = None):
        """The batch mean of weight(t) x mean squared error per example (float32), plus the per-example `extra`
        terms [B] when given."""
        error = jnp.square(prediction.astype(jnp.float32) - target.astype(jnp.float32))
        per_example = jnp.mean(error.reshape(error.shape[0], -1), axis=1) * self.weights(t)
        if extra is not None:
            per_example = per_example + extra
        return jnp.mean(per_example)
