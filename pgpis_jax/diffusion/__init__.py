"""The diffusion core: schedules, forward noising and targets, timestep samplers, reverse samplers and
guidance rules. Pure JAX; knows nothing of any method or network."""

from pgpis_jax.diffusion import forward, guidance, spacing
from pgpis_jax.diffusion.diffusers_config import SUPPORTED_CLASSES, from_diffusers_config, read_scheduler_config
from pgpis_jax.diffusion.forward import (
    add_noise,
    convert_prediction,
    cubic_timesteps,
    offset_noise,
    predict_epsilon,
    predict_x0,
    sample_timesteps,
    training_target,
    uniform_timesteps,
    velocity,
)
from pgpis_jax.diffusion.samplers import DDIMSampler, DDPMSampler, Sampler, UnCLIPSampler, UniPCSampler
from pgpis_jax.diffusion.schedules import NoiseSchedule, beta_schedule

__all__ = [
    "DDIMSampler", "DDPMSampler", "NoiseSchedule", "SUPPORTED_CLASSES", "Sampler", "UnCLIPSampler",
    "UniPCSampler", "add_noise", "beta_schedule", "convert_prediction", "cubic_timesteps", "forward",
    "from_diffusers_config", "guidance", "offset_noise", "predict_epsilon", "predict_x0",
    "read_scheduler_config", "sample_timesteps", "spacing", "training_target", "uniform_timesteps", "velocity",
]
