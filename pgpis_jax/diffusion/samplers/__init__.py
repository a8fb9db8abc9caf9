"""Reverse-process samplers matching diffusers' schedulers, each one `lax.scan` over its steps."""

from pgpis_jax.diffusion.samplers.ancestral import DDPMSampler, UnCLIPSampler
from pgpis_jax.diffusion.samplers.base import ModelFn, Sampler
from pgpis_jax.diffusion.samplers.ddim import DDIMSampler
from pgpis_jax.diffusion.samplers.unipc import UniPCSampler

__all__ = ["DDIMSampler", "DDPMSampler", "ModelFn", "Sampler", "UnCLIPSampler", "UniPCSampler"]
