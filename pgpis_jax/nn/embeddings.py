"""Timestep embeddings of the diffusion UNets (diffusers' `get_timestep_embedding`, `Timesteps`,
`TimestepEmbedding`), with diffusers' parameter names, and FPDM's MLP class embedding."""

from __future__ import annotations

import math
from typing import Optional

import flax.linen as nn
import jax.numpy as jnp

from pgpis_jax.nn.activations import gelu
from pgpis_jax.nn.initializers import torch_dense


def get_timestep_embedding(timesteps, embedding_dim: int, flip_sin_to_cos: bool = False,
                           downscale_freq_shift: float = 1.0, scale: float = 1.0,
                           max_period: float = 10000.0):
    """Sinusoidal embeddings [N, embedding_dim] (float32) of N timesteps (int or fractional), as in DDPM.

    Frequency k of half = embedding_dim // 2 is exp(-log(max_period) k / (half - downscale_freq_shift));
    the result is [sin, cos] of scale * t * frequency, or [cos, sin] with flip_sin_to_cos, zero-padded by
    one column when embedding_dim is odd. Computed in float32 whatever the caller's dtype, as diffusers does.
    """
    timesteps = jnp.asarray(timesteps)
    if timesteps.ndim != 1:
        raise ValueError(f"timesteps must be a 1-D array, got shape {timesteps.shape}")
    half = embedding_dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - downscale_freq_shift)
    angles = scale * (timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :])
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if embedding_dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """Linear `linear_1` -> SiLU -> Linear `linear_2` (diffusers' `TimestepEmbedding` with act_fn "silu"),
    also used on arbitrary vectors (class_embed_type "projection"). out_dim defaults to time_embed_dim. Both
    linears start from torch's default init, as diffusers' do (PCDMs' class embedding is created fresh)."""

    time_embed_dim: int
    out_dim: Optional[int] = None
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = torch_dense(self.time_embed_dim, x.shape[-1], "linear_1", **kw)(x)
        return torch_dense(self.out_dim or self.time_embed_dim, self.time_embed_dim, "linear_2", **kw)(nn.silu(x))


class MLPClassEmbedding(nn.Module):
    """FPDM's class embedding (class_embed_type "mlp" of its modified diffusers UNet, the original's
    `ImageProjModel_g`): Linear `net_0` (-> hidden), exact GELU, dropout, Linear `net_3` (-> time_embed_dim),
    dropout (torch's net.2 and net.4 have no parameters). x [B, D] -> [B, time_embed_dim]. Both linears start
    from torch's default init; the original hard-codes hidden 768 and dropout 0.2."""

    time_embed_dim: int
    hidden: int = 768
    dropout: float = 0.2
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = gelu(torch_dense(self.hidden, x.shape[-1], "net_0", **kw)(x))
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        h = torch_dense(self.time_embed_dim, self.hidden, "net_3", **kw)(h)
        return nn.Dropout(self.dropout)(h, deterministic=deterministic)
