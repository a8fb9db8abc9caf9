"""diffusers' `DDIMScheduler` (Song et al. 2021): deterministic at eta = 0, ancestral-like as eta -> 1."""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from pgpis_jax.diffusion import spacing
from pgpis_jax.diffusion.forward import epsilon_from_prediction, x0_from_prediction
from pgpis_jax.diffusion.samplers.ancestral import alphas_cumprod_at
from pgpis_jax.diffusion.samplers.base import ModelFn, Plan, Sampler, check_choice


@dataclasses.dataclass(frozen=True, eq=False)
class DDIMSampler(Sampler):
    """x_prev = sqrt(a_prev) x0_hat + sqrt(1 - a_prev - s^2) eps_hat + s z, s = eta * posterior std.

    As in diffusers, the step goes from t to t - T // num_inference_steps (not necessarily the next listed
    timestep), and below 0 uses alpha_bar = 1 (set_alpha_to_one) or alpha_bar[0]. With
    use_clipped_model_output the direction term uses the eps implied by the clipped x0_hat. Noise is added
    at every step when eta > 0.
    """

    eta: float = 0.0
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    use_clipped_model_output: bool = False

    def __post_init__(self):
        super().__post_init__()
        check_choice("DDIMSampler", "timestep_spacing", self.timestep_spacing, spacing.TIMESTEP_SPACINGS)
        if self.eta < 0:
            raise ValueError(f"DDIMSampler eta={self.eta} must be >= 0")

    def is_stochastic(self) -> bool:
        return self.eta > 0

    def timesteps(self, num_inference_steps: int) -> np.ndarray:
        return spacing.ddpm_timesteps(self.timestep_spacing, self.num_train_timesteps, num_inference_steps,
                                      self.steps_offset)

    def plan(self, num_inference_steps: int) -> Plan:
        timesteps = self.timesteps(num_inference_steps)
        previous = timesteps - self.num_train_timesteps // num_inference_steps
        final = 1.0 if self.set_alpha_to_one else float(self.schedule.alphas_cumprod[0])
        alpha_bar = alphas_cumprod_at(self.schedule.alphas_cumprod, timesteps, 1.0)
        alpha_bar_prev = alphas_cumprod_at(self.schedule.alphas_cumprod, previous, final)
        variance = (1.0 - alpha_bar_prev) / (1.0 - alpha_bar) * (1.0 - alpha_bar / alpha_bar_prev)
        std = self.eta * np.sqrt(variance)
        return {
            "timestep": timesteps.astype(np.int32),
            "sqrt_alpha_bar": np.sqrt(alpha_bar).astype(np.float32),
            "sqrt_one_minus_alpha_bar": np.sqrt(1.0 - alpha_bar).astype(np.float32),
            "sqrt_alpha_bar_prev": np.sqrt(alpha_bar_prev).astype(np.float32),
            "direction": np.sqrt(1.0 - alpha_bar_prev - std**2).astype(np.float32),
            "std": std.astype(np.float32),
        }

    def step(self, model_fn: ModelFn, x, c: Dict[str, jax.Array], noise: Optional[jax.Array]):
        output = model_fn(x, c["timestep"]).astype(jnp.float32)
        signal, sigma = c["sqrt_alpha_bar"], c["sqrt_one_minus_alpha_bar"]
        x0 = x0_from_prediction(self.prediction_type, output, x, signal, sigma)
        eps = epsilon_from_prediction(self.prediction_type, output, x, signal, sigma)
        if self.clip_sample:
            x0 = jnp.clip(x0, -self.clip_sample_range, self.clip_sample_range)
            if self.use_clipped_model_output:
                eps = (x - signal * x0) / sigma
        x_prev = c["sqrt_alpha_bar_prev"] * x0 + c["direction"] * eps
        if self.is_stochastic():
            x_prev = x_prev + c["std"] * noise
        return x_prev
