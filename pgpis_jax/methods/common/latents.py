"""Autoencoder latents as features and samples: posterior moments of images (what offline features store, so
that a posterior sample is still drawn every step), scaled posterior samples, and exact uint8 <-> [-1, 1]
conversions for compact pixel features. `codec` is a pgpis_jax.models.latent_codec codec."""

from __future__ import annotations

from typing import Any, Dict

import jax
import jax.numpy as jnp


def encode_latents(codec, vae_params, images, keys):
    """Posterior samples times the scaling factor for images [B, H, W, 3] in [-1, 1], one key per example."""
    return sample_latents(codec, *codec.moments(vae_params, images), keys)


def sample_latents(codec, mean, logvar, keys):
    """Posterior samples times the scaling factor from moments [B, h, w, C] (logvar None: deterministic)."""
    if logvar is None:
        return codec.latent(mean, None, None)
    return jax.vmap(codec.latent)(mean, logvar, keys)


def moments(codec, vae_params, images, name: str) -> Dict[str, Any]:
    """{name_mean, name_logvar (if the codec has one)}: the posterior moments of images, as features."""
    mean, logvar = codec.moments(vae_params, images)
    return {f"{name}_mean": mean, **({f"{name}_logvar": logvar} if logvar is not None else {})}


def latents_of(codec, inputs, name: str, keys):
    """Posterior samples from the features `moments` made."""
    return sample_latents(codec, inputs[f"{name}_mean"], inputs.get(f"{name}_logvar"), keys)


def signed_to_uint8(x):
    """[-1, 1] images made from uint8 (u / 127.5 - 1) back to uint8, exactly (compact features)."""
    return jnp.round((x + 1.0) * 127.5).astype(jnp.uint8)


def uint8_to_signed(x):
    """uint8 -> [-1, 1] as the input pipeline makes it (u / 127.5 - 1, float32)."""
    return x.astype(jnp.float32) / 127.5 - 1.0
