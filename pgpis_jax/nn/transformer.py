"""The spatial transformer of the Stable Diffusion UNet (diffusers' `FeedForward` with GEGLU or GELU,
`BasicTransformerBlock`, `Transformer2DModel` on continuous inputs), NHWC, with diffusers' parameter names;
linear layers and convolutions start from torch's default init, LayerNorms from ones and zeros, as in torch."""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from pgpis_jax.nn.activations import gelu
from pgpis_jax.nn.attention import Attention, CrossAttentionResidual
from pgpis_jax.nn.initializers import torch_conv, torch_dense
from pgpis_jax.nn.resnet import GroupNorm


class LayerNorm(nn.Module):
    """torch.nn.LayerNorm over the last axis, computed in float32, output in `dtype`; parameters `scale` and
    `bias` (torch's weight and bias)."""

    epsilon: float = 1e-5
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        channels = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (channels,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (channels,), self.param_dtype)
        x = x.astype(jnp.float32)
        mean = x.mean(axis=-1, keepdims=True)
        variance = jnp.square(x - mean).mean(axis=-1, keepdims=True)
        out = (x - mean) * jax.lax.rsqrt(variance + self.epsilon)
        return (out * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


class GEGLU(nn.Module):
    """Linear `proj` to 2 * dim_out, split into (value, gate) halves, value * exact GELU(gate)."""

    dim_out: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = torch_dense(2 * self.dim_out, x.shape[-1], "proj", self.dtype, self.param_dtype)(x)
        value, gate = jnp.split(x, 2, axis=-1)
        return value * gelu(gate)


class GELU(nn.Module):
    """Linear `proj` to dim_out, then exact (erf) GELU: diffusers' `GELU` activation module."""

    dim_out: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = torch_dense(self.dim_out, x.shape[-1], "proj", self.dtype, self.param_dtype)(x)
        return gelu(x)


FEED_FORWARD_ACTIVATIONS = {"geglu": GEGLU, "gelu": GELU}


class FeedForward(nn.Module):
    """diffusers' `FeedForward` with activation_fn "geglu" (the UNet) or "gelu" (the unCLIP / PCDMs prior):
    `net_0` (the activation module, projecting to mult * dim), dropout, `net_2` (Linear back to dim_out,
    default the input width). torch names `net.0.proj`, `net.2`."""

    mult: int = 4
    dim_out: Optional[int] = None
    dropout: float = 0.0
    activation_fn: str = "geglu"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        if self.activation_fn not in FEED_FORWARD_ACTIVATIONS:
            raise ValueError(f"FeedForward activation_fn {self.activation_fn!r} is not supported; expected one of "
                             f"{tuple(FEED_FORWARD_ACTIVATIONS)}")
        dim = x.shape[-1]
        activation = FEED_FORWARD_ACTIVATIONS[self.activation_fn]
        h = activation(dim * self.mult, dtype=self.dtype, param_dtype=self.param_dtype, name="net_0")(x)
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        return torch_dense(self.dim_out or dim, h.shape[-1], "net_2", self.dtype, self.param_dtype)(h)


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm transformer block (diffusers' `BasicTransformerBlock`, norm_type "layer_norm"):
    x += attn1(norm1(x)) (self-attention); x += attn2(norm2(x), context) (cross-attention, only when
    has_cross_attention); x += ff(norm3(x)). LayerNorm eps `norm_eps` (1e-5 in the UNet); dropout after each
    attention (diffusers' to_out.1) and inside the feed-forward. activation_fn "geglu" (the UNet) or "gelu"
    (the prior); attention_bias gives to_q / to_k / to_v biases (diffusers' attention_bias).
    double_self_attention (diffusers' option of that name, CFLD's hybrid-granularity attention): attn2 is a
    second self-attention, x += attn2(norm2(x)), and no context is taken.

    x [B, L, dim]; context [B, Lc, Dc]; residual: the cross-attention's CrossAttentionResidual or None.
    """

    heads: int
    dim_head: int
    has_cross_attention: bool = True
    dropout: float = 0.0
    norm_eps: float = 1e-5
    activation_fn: str = "geglu"
    attention_bias: bool = False
    double_self_attention: bool = False
    attention_implementation: str = "xla"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context=None, residual: Optional[CrossAttentionResidual] = None,
                 deterministic: bool = True):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attention = dict(heads=self.heads, dim_head=self.dim_head, use_bias=self.attention_bias,
                         implementation=self.attention_implementation, **kw)
        drop = nn.Dropout(self.dropout)

        h = LayerNorm(self.norm_eps, name="norm1", **kw)(x)
        x = drop(Attention(name="attn1", **attention)(h), deterministic=deterministic) + x
        if self.double_self_attention:
            if context is not None or residual is not None:
                raise ValueError("a BasicTransformerBlock with double_self_attention takes no context or residual")
            h = Attention(name="attn2", **attention)(LayerNorm(self.norm_eps, name="norm2", **kw)(x))
            x = drop(h, deterministic=deterministic) + x
        elif self.has_cross_attention:
            if context is None:
                raise ValueError("BasicTransformerBlock with cross-attention needs a context (encoder_hidden_states)")
            h = LayerNorm(self.norm_eps, name="norm2", **kw)(x)
            h = Attention(name="attn2", **attention)(h, context, residual)
            x = drop(h, deterministic=deterministic) + x
        elif residual is not None:
            raise ValueError("a cross-attention residual is given but this BasicTransformerBlock has no "
                             "cross-attention")
        h = LayerNorm(self.norm_eps, name="norm3", **kw)(x)
        feed_forward = FeedForward(dropout=self.dropout, activation_fn=self.activation_fn, name="ff", **kw)
        return feed_forward(h, deterministic=deterministic) + x


class Transformer2DModel(nn.Module):
    """diffusers' `Transformer2DModel` on continuous NHWC inputs: GroupNorm `norm` (eps 1e-6), `proj_in`
    (1x1 conv, or Linear with use_linear_projection) to heads * dim_head, `num_layers` x
    `transformer_blocks_i`, `proj_out` back to the input width, plus the input.

    x [B, H, W, C]; context [B, Lc, Dc]; residuals: None or a sequence with one entry (CrossAttentionResidual
    or None) per transformer block, for its cross-attention.
    """

    heads: int
    dim_head: int
    num_layers: int = 1
    norm_num_groups: int = 32
    use_linear_projection: bool = False
    has_cross_attention: bool = True
    dropout: float = 0.0
    attention_implementation: str = "xla"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context=None, residuals=None, deterministic: bool = True):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        batch, height, width, channels = x.shape
        inner = self.heads * self.dim_head
        if residuals is None:
            residuals = (None,) * self.num_layers
        if len(residuals) != self.num_layers:
            raise ValueError(f"Transformer2DModel has {self.num_layers} transformer blocks but got "
                             f"{len(residuals)} cross-attention residuals")
        shortcut = x
        h = GroupNorm(self.norm_num_groups, 1e-6, name="norm", **kw)(x)
        if self.use_linear_projection:
            h = torch_dense(inner, channels, "proj_in", **kw)(h.reshape(batch, height * width, channels))
        else:
            h = torch_conv(inner, 1, channels, "proj_in", **kw)(h).reshape(batch, height * width, inner)
        for i, cross_residual in enumerate(residuals):
            h = BasicTransformerBlock(self.heads, self.dim_head, has_cross_attention=self.has_cross_attention,
                                      dropout=self.dropout, attention_implementation=self.attention_implementation,
                                      name=f"transformer_blocks_{i}", **kw)(h, context, cross_residual, deterministic)
        if self.use_linear_projection:
            h = torch_dense(channels, inner, "proj_out", **kw)(h).reshape(batch, height, width, channels)
        else:
            h = torch_conv(channels, 1, inner, "proj_out", **kw)(h.reshape(batch, height, width, inner))
        return h + shortcut
