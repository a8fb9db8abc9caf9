"""Scaled dot-product attention through one function whose kernel is chosen by name.

Implementations:
  xla    the reference: einsum, softmax in float32, any dtype, any device;
  cudnn  cuDNN flash attention via jax.nn.dot_product_attention(implementation="cudnn"); NVIDIA GPUs,
         float16/bfloat16 inputs only.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from pgpis_jax.nn.initializers import torch_dense
from pgpis_jax.nn.resnet import GroupNorm

IMPLEMENTATIONS = ("xla", "cudnn")


def dot_product_attention(query, key, value, implementation: str = "xla", scale=None, bias=None,
                          dropout_rate: float = 0.0, dropout_rng=None):
    """softmax(q k^T * scale + bias) v per head.

    query [B, Lq, H, D], key and value [B, Lk, H, D] -> [B, Lq, H, D] in the query's dtype;
    scale defaults to 1 / sqrt(D); bias (optional, additive, e.g. a relative-position bias or a -100 mask) is
    4-D and broadcastable to [B, H, Lq, Lk]; the xla path adds it to the float32 logits. dropout_rate > 0
    (training only, xla only) drops attention weights with a Bernoulli mask from dropout_rng and rescales the
    kept ones by 1 / (1 - rate), as nn.Dropout / torch's attention dropout do.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r} is not supported; "
                         f"expected one of {IMPLEMENTATIONS}")
    head_dim = query.shape[-1]
    scale = head_dim**-0.5 if scale is None else scale
    if dropout_rate > 0 and (implementation != "xla" or dropout_rng is None):
        raise ValueError("attention dropout needs implementation='xla' and a dropout_rng "
                         f"(got implementation={implementation!r}, dropout_rng={dropout_rng!r})")
    if implementation == "cudnn":
        if query.dtype not in (jnp.bfloat16, jnp.float16):
            raise ValueError(f"cudnn attention needs bfloat16 or float16 inputs, got {query.dtype}; "
                             "set the compute dtype to bfloat16 or use implementation='xla'")
        if bias is not None:
            bias = jnp.asarray(bias).astype(query.dtype)
        return jax.nn.dot_product_attention(query, key, value, bias=bias, scale=scale, implementation="cudnn")
    logits = jnp.einsum("bqhd,bkhd->bhqk", query, key, preferred_element_type=jnp.float32) * scale
    if bias is not None:
        logits = logits + jnp.asarray(bias).astype(jnp.float32)
    weights = jax.nn.softmax(logits, axis=-1)
    if dropout_rate > 0:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, weights.shape)
        weights = jnp.where(keep, weights / (1.0 - dropout_rate), 0.0)
    weights = weights.astype(value.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, value)


class Attention(nn.Module):
    """diffusers' `Attention` (self- or cross-attention) with its parameter names: `to_q`, `to_k`, `to_v`,
    `to_out_0` (torch `to_out.0`) and, for the VAE's spatial attention, `group_norm`.

    hidden [B, L, C] or spatial [B, H, W, C] (flattened to H*W tokens, restored on output); context
    [B, Lc, Cc] for cross-attention (None: self-attention); query_bias [B, L, heads*dim_head] or None is
    added to the projected queries (CFLD's hybrid-granularity attention). With residual_connection the
    input is added back, then the result is divided by rescale_output_factor.
    """

    heads: int
    dim_head: int
    use_bias: bool = False
    out_bias: bool = True
    norm_num_groups: Optional[int] = None
    norm_eps: float = 1e-5
    residual_connection: bool = False
    rescale_output_factor: float = 1.0
    implementation: str = "xla"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden, context=None, query_bias=None):
        residual, spatial_shape = hidden, None
        if self.norm_num_groups is not None:
            hidden = GroupNorm(self.norm_num_groups, self.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                               name="group_norm")(hidden)
        if hidden.ndim == 4:
            spatial_shape = hidden.shape
            hidden = hidden.reshape(hidden.shape[0], -1, hidden.shape[-1])
        context = hidden if context is None else context
        inner = self.heads * self.dim_head

        def project(name, x, bias):
            return torch_dense(inner, x.shape[-1], name, self.dtype, self.param_dtype, use_bias=bias)(x)

        query = project("to_q", hidden, self.use_bias)
        if query_bias is not None:
            query = query + query_bias
        key, value = project("to_k", context, self.use_bias), project("to_v", context, self.use_bias)
        split = lambda x: x.reshape(x.shape[:2] + (self.heads, self.dim_head))  # noqa: E731
        out = dot_product_attention(split(query), split(key), split(value), self.implementation)
        out = out.reshape(out.shape[:2] + (inner,))
        out = torch_dense(residual.shape[-1], inner, "to_out_0", self.dtype, self.param_dtype,
                          use_bias=self.out_bias)(out)
        if spatial_shape is not None:
            out = out.reshape(spatial_shape)
        if self.residual_connection:
            out = out + residual
        return out / self.rescale_output_factor
