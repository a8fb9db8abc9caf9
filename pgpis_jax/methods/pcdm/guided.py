"""PCDMs' guided denoising loop, the part of every stage's sampler after the conditions are encoded (the stages'
`sample_*` methods, and bench/sample_pcdm.py through them)."""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax

from pgpis_jax.diffusion import guidance


def sample(sampler, denoise: Callable, cond: Any, uncond: Optional[Any], x_T: jax.Array, rng: jax.Array,
           num_inference_steps: int, guidance_scale: float, guidance_rescale: float = 0.0) -> jax.Array:
    """x0 (x_T's shape) from `sampler` over denoise(x, t, condition) starting at x_T.

    With guidance_scale > 1 both branches run in one batched call per step, [uncond, cond], combined by
    guidance.pcdm (classifier-free guidance, optionally rescaled); otherwise cond alone, and uncond may be None.
    rng: the sampler's per-step noise key (unused by deterministic samplers such as DDIM with eta = 0)."""
    branches = [uncond, cond] if guidance_scale > 1.0 else [cond]
    model_fn = guidance.guided(denoise, branches,
                               lambda u, c: guidance.pcdm(u, c, guidance_scale, guidance_rescale))
    return sampler.sample(model_fn, x_T, rng, num_inference_steps=num_inference_steps)
