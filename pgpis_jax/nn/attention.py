"""Scaled dot-product attention through one function whose kernel is chosen by name.

Implementations:
  xla      the reference: einsum, softmax in float32, any dtype, any device; builds the whole
           [B, H, Lq, Lk] float32 logits.
  cudnn    cuDNN flash attention via jax.nn.dot_product_attention(implementation="cudnn"); NVIDIA GPUs,
           float16/bfloat16 inputs only.
  splash   TPU Pallas splash attention (jax.experimental.pallas.ops.tpu.splash_attention); in interpret mode
           (slow, for tests) off TPU. No additive bias: Swin's window attention, the one module that passes
           a bias (its relative position bias), cannot use it. Sequence lengths are padded to the block size
           (padded keys masked out, padded queries dropped).
  chunked  memory-efficient attention in plain JAX on any device (pgpis_jax.nn.chunked_attention): query blocks
           x key blocks with a running max / sum softmax in float32, so only one [B, H, block, block] logits
           block lives at a time; a FlashAttention-2 style backward recomputes each block's logits. Bias
           supported (and differentiated).
  auto     chosen when called: splash on TPU (xla for a call with a bias or dropout), cudnn on GPU with
           bfloat16/float16 inputs, on CPU chunked over CPU_BLOCK_SIZE-token blocks for key sequences of at
           least CPU_CHUNKED_MIN_KEYS (its blocks stay in cache: 2-3x faster than xla at 1,024 tokens, forward
           and backward), else xla (see resolve_implementation).

xla, splash and chunked scale the queries (in float32, then back to their dtype) rather than the logits; cudnn
takes the scale itself.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention

from pgpis_jax.nn.chunked_attention import chunked_attention, pad_axis, round_up
from pgpis_jax.nn.initializers import torch_dense
from pgpis_jax.nn.resnet import GroupNorm

IMPLEMENTATIONS = ("xla", "cudnn", "splash", "chunked", "auto")
# Query / key block length of the splash and chunked kernels when the caller names none.
DEFAULT_BLOCK_SIZE = 512
# Splash blocks are whole TPU vector lanes: block sizes (and so padded lengths) are multiples of this.
SPLASH_LANES = 128
HALF_PRECISION = (jnp.bfloat16, jnp.float16)
# "auto" on CPU: chunked attention for key sequences at least this long, over blocks of CPU_BLOCK_SIZE tokens
# (measured on the 2-core CPU, 4 x 2 heads of 16: at 1,024 tokens 256-token blocks beat 128 and 512 and run 2-3x
# faster than xla, forward and backward; at 256 tokens the forward 1.3 against 10 ms, the backward on par).
CPU_CHUNKED_MIN_KEYS = 256
CPU_BLOCK_SIZE = 256


def resolve_implementation(implementation: str, dtype, platform: Optional[str] = None, has_bias: bool = False,
                           dropout: bool = False, key_length: int = 0) -> str:
    """The kernel `implementation` names; "auto" becomes one for `platform` (default: jax.default_backend()):
    tpu -> "splash" ("xla" for a call with a bias or dropout), gpu with bfloat16/float16 `dtype` -> "cudnn"
    ("xla" with dropout), cpu with key_length >= CPU_CHUNKED_MIN_KEYS -> "chunked" ("xla" with dropout),
    anything else -> "xla"."""
    if implementation != "auto":
        return implementation
    platform = jax.default_backend() if platform is None else platform
    if dropout:
        return "xla"
    if platform == "tpu":
        return "xla" if has_bias else "splash"
    if platform == "gpu" and jnp.dtype(dtype) in HALF_PRECISION:
        return "cudnn"
    if platform == "cpu" and key_length >= CPU_CHUNKED_MIN_KEYS:
        return "chunked"
    return "xla"


def dot_product_attention(query, key, value, implementation: str = "xla", scale=None, bias=None,
                          dropout_rate: float = 0.0, dropout_rng=None, block_size: Optional[int] = None):
    """softmax(q k^T * scale + bias) v per head.

    query [B, Lq, H, D], key and value [B, Lk, H, D] -> [B, Lq, H, D] in the query's dtype;
    scale defaults to 1 / sqrt(D); bias (optional, additive, e.g. a relative-position bias or a -100 mask) is
    4-D and broadcastable to [B, H, Lq, Lk]; it is added to the float32 logits (not with splash). dropout_rate
    > 0 (training only, xla only) drops attention weights with a Bernoulli mask from dropout_rng and rescales
    the kept ones by 1 / (1 - rate), as nn.Dropout / torch's attention dropout do. block_size: the query and key
    block length of splash (a multiple of 128) and chunked (None: DEFAULT_BLOCK_SIZE, or CPU_BLOCK_SIZE where
    "auto" chose chunked on CPU; shortened to the sequence when shorter).
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r} is not supported; "
                         f"expected one of {IMPLEMENTATIONS}")
    requested = implementation
    implementation = resolve_implementation(implementation, query.dtype, has_bias=bias is not None,
                                            dropout=dropout_rate > 0, key_length=key.shape[1])
    if requested == "auto" and implementation == "chunked":
        block_size = block_size or CPU_BLOCK_SIZE
    head_dim = query.shape[-1]
    scale = head_dim**-0.5 if scale is None else scale
    if dropout_rate > 0 and (implementation != "xla" or dropout_rng is None):
        raise ValueError("attention dropout needs implementation='xla' and a dropout_rng "
                         f"(got implementation={implementation!r}, dropout_rng={dropout_rng!r})")
    if block_size is not None and block_size < 1:
        raise ValueError(f"attention block_size must be a positive int, got {block_size!r}")
    if implementation == "cudnn":
        if query.dtype not in HALF_PRECISION:
            raise ValueError(f"cudnn attention needs bfloat16 or float16 inputs, got {query.dtype}; "
                             "set the compute dtype to bfloat16 or use implementation='xla'")
        if bias is not None:
            bias = jnp.asarray(bias).astype(query.dtype)
        return jax.nn.dot_product_attention(query, key, value, bias=bias, scale=scale, implementation="cudnn")
    if implementation == "splash" and bias is not None:
        raise ValueError(f"attention implementation 'splash' takes no additive bias (got a bias of shape "
                         f"{jnp.shape(bias)}; Swin's relative position bias is one); use 'chunked', 'xla' or 'auto'")
    scaled_query = (query.astype(jnp.float32) * scale).astype(query.dtype)
    if implementation == "splash":
        return _splash_attention(scaled_query, key, value, block_size or DEFAULT_BLOCK_SIZE)
    if implementation == "chunked":
        return chunked_attention(scaled_query, key, value, bias, block_size or DEFAULT_BLOCK_SIZE)
    logits = jnp.einsum("bqhd,bkhd->bhqk", scaled_query, key, preferred_element_type=jnp.float32)
    if bias is not None:
        logits = logits + jnp.asarray(bias).astype(jnp.float32)
    weights = jax.nn.softmax(logits, axis=-1)
    if dropout_rate > 0:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, weights.shape)
        weights = jnp.where(keep, weights / (1.0 - dropout_rate), 0.0)
    weights = weights.astype(value.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, value)


def _splash_attention(query, key, value, block_size: int):
    """Splash attention on [B, L, H, D] inputs (queries already scaled): per example (vmap over B) [H, L, D],
    lengths padded to whole blocks; padded keys get another segment id than every query, so no query attends to
    them; padded query rows are dropped."""
    if block_size % SPLASH_LANES:
        raise ValueError(f"splash attention block_size must be a multiple of {SPLASH_LANES}, got {block_size}")
    query_length, key_length, heads = query.shape[1], key.shape[1], query.shape[2]
    block_q = min(block_size, round_up(query_length, SPLASH_LANES))
    block_kv = min(block_size, round_up(key_length, SPLASH_LANES))
    padded_q, padded_kv = round_up(query_length, block_q), round_up(key_length, block_kv)
    blocks = splash_attention.BlockSizes(block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
                                         block_q_dkv=block_q, block_kv_dkv=block_kv, block_kv_dkv_compute=block_kv,
                                         block_q_dq=block_q, block_kv_dq=block_kv)
    mask = splash_attention.MultiHeadMask([splash_attention.FullMask((padded_q, padded_kv))] * heads)
    kernel = splash_attention.make_splash_mha_single_device(mask, block_sizes=blocks,
                                                            interpret=jax.default_backend() != "tpu")
    segment_ids = None
    if padded_kv != key_length:
        segment_ids = splash_attention.SegmentIds(q=jnp.zeros((padded_q,), jnp.int32),
                                                  kv=(jnp.arange(padded_kv) >= key_length).astype(jnp.int32))
    heads_first = lambda x, length: pad_axis(jnp.swapaxes(x, 1, 2), 2, length)  # noqa: E731
    out = jax.vmap(lambda q, k, v: kernel(q, k, v, segment_ids=segment_ids))(
        heads_first(query, padded_q), heads_first(key, padded_kv), heads_first(value, padded_kv))
    return jnp.swapaxes(out[:, :, :query_length], 1, 2).astype(query.dtype)


class CrossAttentionResidual(NamedTuple):
    """Additive inputs of one cross-attention (CFLD's hybrid-granularity attention and its ablation B1): `query`
    [B, L, heads*dim_head] is added to the projected queries (after to_q), `context` [B, Lc, Cc] to the context
    tokens before to_k / to_v. Either may be None."""

    query: Optional[Any] = None
    context: Optional[Any] = None


class Attention(nn.Module):
    """diffusers' `Attention` (self- or cross-attention) with its parameter names: `to_q`, `to_k`, `to_v`,
    `to_out_0` (torch `to_out.0`) and, for the VAE's spatial attention, `group_norm`.

    hidden [B, L, C] or spatial [B, H, W, C] (flattened to H*W tokens, restored on output); context
    [B, Lc, Cc] for cross-attention (None: self-attention); residual: a CrossAttentionResidual or None. With
    residual_connection the input is added back, then the result is divided by rescale_output_factor.
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
    def __call__(self, hidden, context=None, residual: Optional[CrossAttentionResidual] = None):
        shortcut, spatial_shape = hidden, None
        if self.norm_num_groups is not None:
            hidden = GroupNorm(self.norm_num_groups, self.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                               name="group_norm")(hidden)
        if hidden.ndim == 4:
            spatial_shape = hidden.shape
            hidden = hidden.reshape(hidden.shape[0], -1, hidden.shape[-1])
        context = hidden if context is None else context
        residual = residual or CrossAttentionResidual()
        if residual.context is not None:
            context = context + residual.context.astype(context.dtype)
        inner = self.heads * self.dim_head

        def project(name, x, bias):
            return torch_dense(inner, x.shape[-1], name, self.dtype, self.param_dtype, use_bias=bias)(x)

        query = project("to_q", hidden, self.use_bias)
        if residual.query is not None:
            query = query + residual.query
        key, value = project("to_k", context, self.use_bias), project("to_v", context, self.use_bias)
        split = lambda x: x.reshape(x.shape[:2] + (self.heads, self.dim_head))  # noqa: E731
        out = dot_product_attention(split(query), split(key), split(value), self.implementation)
        out = out.reshape(out.shape[:2] + (inner,))
        out = torch_dense(shortcut.shape[-1], inner, "to_out_0", self.dtype, self.param_dtype,
                          use_bias=self.out_bias)(out)
        if spatial_shape is not None:
            out = out.reshape(spatial_shape)
        if self.residual_connection:
            out = out + shortcut
        return out / self.rescale_output_factor
