"""Ancestral samplers: diffusers' `DDPMScheduler` and `UnCLIPScheduler`.

Both step x_t -> x_prev with the Gaussian posterior q(x_prev | x_t, x0_hat): mean c_x0 * x0_hat + c_x * x_t,
plus noise of a fixed or learned variance when t > 0. They differ in the timesteps they visit and in
details of the variance (`UnCLIPScheduler` takes beta from the table when prev = t - 1, and its learned
range does not clamp the small variance).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from pgpis_jax.diffusion import spacing
from pgpis_jax.diffusion.forward import x0_from_prediction
from pgpis_jax.diffusion.samplers.base import ModelFn, Plan, Sampler, check_choice, split_variance_channels

DDPM_VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "learned", "learned_range")
UNCLIP_VARIANCE_TYPES = ("fixed_small_log", "learned_range")
LEARNED_VARIANCE_TYPES = ("learned", "learned_range")


def previous_in_list(timesteps: np.ndarray) -> np.ndarray:
    """The timestep each step moves to: the next one in the list, and -1 after the last."""
    return np.append(timesteps[1:], -1)


def alphas_cumprod_at(alphas_cumprod: np.ndarray, timesteps: np.ndarray, below_zero: float) -> np.ndarray:
    """alpha_bar at each timestep, `below_zero` where the timestep is negative (float32).

    Plans of the ancestral and DDIM samplers are computed in float32 with diffusers' order of operations:
    their coefficients then agree with diffusers' to the last bit or so, float32 cancellation included.
    """
    values = alphas_cumprod.astype(np.float32)[np.maximum(timesteps, 0)]
    return np.where(timesteps >= 0, values, np.float32(below_zero))


def _posterior_plan(timesteps, alpha_bar, alpha_bar_prev, beta, alpha, std, min_log_variance) -> Plan:
    """The per-step constants of both ancestral samplers (inputs: float32 arrays over steps)."""
    return {
        "timestep": timesteps.astype(np.int32),
        "sqrt_alpha_bar": np.sqrt(alpha_bar).astype(np.float32),
        "sqrt_one_minus_alpha_bar": np.sqrt(1.0 - alpha_bar).astype(np.float32),
        "coef_x0": (np.sqrt(alpha_bar_prev) * beta / (1.0 - alpha_bar)).astype(np.float32),
        "coef_x": (np.sqrt(alpha) * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar)).astype(np.float32),
        "has_noise": timesteps > 0,
        "std": std.astype(np.float32),
        "min_log_variance": np.where(timesteps > 0, min_log_variance, 0.0).astype(np.float32),
        "max_log_variance": np.log(beta).astype(np.float32),
    }


@dataclasses.dataclass(frozen=True, eq=False)
class AncestralSampler(Sampler):
    """The step both ancestral samplers share: x0_hat from the model output (clipped with clip_sample),
    the posterior mean, and noise of the plan's or the model's (learned) variance when t > 0."""

    variance_type: str = "fixed_small"
    clip_sample: bool = True
    clip_sample_range: float = 1.0

    def is_stochastic(self) -> bool:
        return True

    def step(self, model_fn: ModelFn, x, c: Dict[str, jax.Array], noise: Optional[jax.Array]):
        output = model_fn(x, c["timestep"]).astype(jnp.float32)
        if self.variance_type in LEARNED_VARIANCE_TYPES:
            output, variance_values = split_variance_channels(output, x, self.variance_type)
        x0 = x0_from_prediction(self.prediction_type, output, x, c["sqrt_alpha_bar"], c["sqrt_one_minus_alpha_bar"])
        if self.clip_sample:
            x0 = jnp.clip(x0, -self.clip_sample_range, self.clip_sample_range)
        mean = c["coef_x0"] * x0 + c["coef_x"] * x
        if self.variance_type == "learned_range":
            frac = (variance_values + 1.0) / 2.0
            std = jnp.exp(0.5 * (frac * c["max_log_variance"] + (1.0 - frac) * c["min_log_variance"]))
        elif self.variance_type == "learned":
            std = jnp.sqrt(variance_values)
        else:
            std = c["std"]
        return mean + jnp.where(c["has_noise"], std * noise, 0.0)


@dataclasses.dataclass(frozen=True, eq=False)
class DDPMSampler(AncestralSampler):
    """diffusers' `DDPMScheduler` (ancestral DDPM, Ho et al. 2020) over `num_inference_steps` timesteps.

    variance_type: fixed_small (posterior variance), fixed_small_log (the same, via its log), fixed_large
    (beta), learned (the model's extra channels are the variance), learned_range (they interpolate the log
    variance between fixed_small and fixed_large, in [-1, 1]).
    """

    timestep_spacing: str = "leading"
    steps_offset: int = 0

    def __post_init__(self):
        super().__post_init__()
        check_choice("DDPMSampler", "variance_type", self.variance_type, DDPM_VARIANCE_TYPES)
        check_choice("DDPMSampler", "timestep_spacing", self.timestep_spacing, spacing.TIMESTEP_SPACINGS)

    def timesteps(self, num_inference_steps: int) -> np.ndarray:
        return spacing.ddpm_timesteps(self.timestep_spacing, self.num_train_timesteps, num_inference_steps,
                                      self.steps_offset)

    def plan(self, num_inference_steps: int) -> Plan:
        timesteps = self.timesteps(num_inference_steps)
        alpha_bar = alphas_cumprod_at(self.schedule.alphas_cumprod, timesteps, 1.0)
        alpha_bar_prev = alphas_cumprod_at(self.schedule.alphas_cumprod, previous_in_list(timesteps), 1.0)
        beta = 1.0 - alpha_bar / alpha_bar_prev
        small = np.maximum((1.0 - alpha_bar_prev) / (1.0 - alpha_bar) * beta, 1e-20)
        std = np.sqrt(beta if self.variance_type == "fixed_large" else small)
        return _posterior_plan(timesteps, alpha_bar, alpha_bar_prev, beta, 1.0 - beta, std, np.log(small))


@dataclasses.dataclass(frozen=True, eq=False)
class UnCLIPSampler(AncestralSampler):
    """diffusers' `UnCLIPScheduler` (Karlo/Kandinsky prior sampler; PCDMs stage 1), with the step's
    prev_timestep set to the next timestep in the list as the UnCLIP/Kandinsky pipelines pass it."""

    variance_type: str = "fixed_small_log"

    def __post_init__(self):
        check_choice("UnCLIPSampler", "variance_type", self.variance_type, UNCLIP_VARIANCE_TYPES)
        check_choice("UnCLIPSampler", "prediction_type", self.prediction_type, ("epsilon", "sample"))

    def timesteps(self, num_inference_steps: int) -> np.ndarray:
        return spacing.unclip_timesteps(self.num_train_timesteps, num_inference_steps)

    def plan(self, num_inference_steps: int) -> Plan:
        timesteps = self.timesteps(num_inference_steps)
        previous = previous_in_list(timesteps)
        previous[-1] = timesteps[-1] - 1
        alpha_bar = alphas_cumprod_at(self.schedule.alphas_cumprod, timesteps, 1.0)
        alpha_bar_prev = alphas_cumprod_at(self.schedule.alphas_cumprod, previous, 1.0)
        adjacent = previous == timesteps - 1
        beta = np.where(adjacent, self.schedule.betas[timesteps], 1.0 - alpha_bar / alpha_bar_prev)
        alpha = np.where(adjacent, self.schedule.alphas[timesteps], 1.0 - beta)
        small = (1.0 - alpha_bar_prev) / (1.0 - alpha_bar) * beta
        with np.errstate(divide="ignore"):
            min_log_variance = np.log(small)
        return _posterior_plan(timesteps, alpha_bar, alpha_bar_prev, beta, alpha, np.sqrt(np.maximum(small, 1e-20)),
                               min_log_variance)

