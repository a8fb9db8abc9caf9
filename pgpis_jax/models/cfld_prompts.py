"""The coarse prompts of CFLD's ablations (Table 3; the original's Decoder with DEPTH < 1), in place of the
Perception-Refined Decoder (pgpis_jax.models.cfld), with the original's parameter names:

  B1  ZeroPromptDecoder    (DEPTH -1, `ape`)         zeros [B, L, width]: the appearance reaches the UNet only
                                                     through HGA's context residuals (multi-scale features)
  B2  CLIPPromptDecoder    (DEPTH 0, `clip_model`)   a frozen CLIP ViT-L/14's pooled output through a trainable
                                                     mapper: [B, 1, width]
  B5  LinearPromptDecoder  (DEPTH -2, `swin`)        the last Swin stage's tokens through one linear layer

Each has `num_queries`, `width` and `param_dtype` (the learned null prompt's shape and dtype).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from pgpis_jax.models.encoders.clip_vision import CLIPVisionModel
from pgpis_jax.nn.activations import gelu
from pgpis_jax.nn.attention import dot_product_attention
from pgpis_jax.nn.initializers import torch_dense
from pgpis_jax.nn.transformer import LayerNorm
from pgpis_jax.preprocessing import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD


def _check_tokens(tokens, num_queries: int, what: str):
    if tokens.ndim != 3 or tokens.shape[1] != num_queries:
        raise ValueError(f"{what} input must be tokens [B, {num_queries}, C], got shape {tokens.shape}")


class LinearPromptDecoder(nn.Module):
    """B5: the last Swin stage's tokens [B, L, C] through `decoder_fc` (Linear C -> width, no bias) -> [B, L, width].
    num_queries must equal L (the null prompt has that many tokens)."""

    num_queries: int = 64
    width: int = 768
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens):
        _check_tokens(tokens, self.num_queries, "LinearPromptDecoder")
        return torch_dense(self.width, tokens.shape[-1], "decoder_fc", self.dtype, self.param_dtype,
                           use_bias=False)(tokens.astype(self.dtype))


class ZeroPromptDecoder(nn.Module):
    """B1: the last Swin stage's tokens [B, L, C] -> zeros [B, L, width] (no parameters). The original multiplies
    the tokens by 0, so no gradient reaches the backbone through the prompt; the UNet tells this conditional prompt
    from the learned null prompt by its being zero (pgpis_jax.models.cfld.gate_context_residuals)."""

    num_queries: int = 64
    width: int = 768
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def __call__(self, tokens):
        _check_tokens(tokens, self.num_queries, "ZeroPromptDecoder")
        return jnp.zeros(tokens.shape[:2] + (self.width,), self.dtype)


class GlideAttention(nn.Module):
    """GLIDE's multi-head self-attention (the original's models/xf.py): `c_qkv` (Linear width -> 3 width), per head
    a [q | k | v] slice of its 3 width / heads channels, softmax(q k^T / sqrt(head_dim)) v (the original scales q and
    k by head_dim^-1/4 each), `c_proj`. x [B, L, width] -> [B, L, width]."""

    width: int
    heads: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        batch, length, _ = x.shape
        qkv = torch_dense(3 * self.width, self.width, "c_qkv", self.dtype, self.param_dtype)(x)
        q, k, v = jnp.split(qkv.reshape(batch, length, self.heads, -1), 3, axis=-1)
        out = dot_product_attention(q, k, v).reshape(batch, length, self.width)
        return torch_dense(self.width, self.width, "c_proj", self.dtype, self.param_dtype)(out)


class GlideMLP(nn.Module):
    """GLIDE's MLP: `c_fc` (width -> 4 width), exact GELU, `c_proj` (4 width -> width)."""

    width: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = torch_dense(4 * self.width, self.width, "c_fc", self.dtype, self.param_dtype)(x)
        return torch_dense(self.width, 4 * self.width, "c_proj", self.dtype, self.param_dtype)(
            gelu(h))


class GlideBlock(nn.Module):
    """GLIDE's ResidualAttentionBlock: x += attn(ln_1(x)); x += mlp(ln_2(x)), LayerNorms eps 1e-5 in float32."""

    width: int
    heads: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = x + GlideAttention(self.width, self.heads, name="attn", **kw)(LayerNorm(1e-5, name="ln_1", **kw)(x))
        return x + GlideMLP(self.width, name="mlp", **kw)(LayerNorm(1e-5, name="ln_2", **kw)(x))


class GlideTransformer(nn.Module):
    """GLIDE's Transformer: `layers` GlideBlocks `resblocks_i`. x [B, L, width] -> [B, L, width]."""

    width: int
    layers: int
    heads: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        for i in range(self.layers):
            x = GlideBlock(self.width, self.heads, name=f"resblocks_{i}", dtype=self.dtype,
                           param_dtype=self.param_dtype)(x)
        return x


class CLIPImageEmbedder(nn.Module):
    """The original's FrozenCLIPImageEmbedder: the frozen `transformer` (transformers' CLIPVisionModel, no
    projection) -> pooler_output [B, D] (no gradient flows into it) -> `mapper_0` (Linear D -> width, no bias) ->
    `mapper_1` (GlideTransformer, `layers` blocks of `heads` heads) -> `final_ln` (LayerNorm eps 1e-5).
    pixels [B, S, S, 3] CLIP-normalised -> [B, 1, width]."""

    transformer: CLIPVisionModel
    width: int = 768
    layers: int = 5
    heads: int = 1
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, pixels):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        pooled = jax.lax.stop_gradient(self.transformer(pixels)["pooler_output"])[:, None]
        h = torch_dense(self.width, pooled.shape[-1], "mapper_0", use_bias=False, **kw)(pooled.astype(self.dtype))
        h = GlideTransformer(self.width, self.layers, self.heads, name="mapper_1", **kw)(h)
        return LayerNorm(1e-5, name="final_ln", **kw)(h)


class CLIPPromptDecoder(nn.Module):
    """B2: condition images [B, S, S, 3] in [-1, 1] (S = the CLIP's image_size, 224) -> CLIP normalisation (OpenAI
    mean and std) -> `clip_model` (CLIPImageEmbedder) -> the prompt [B, 1, width]."""

    clip_model: CLIPImageEmbedder
    num_queries: int = 1
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @property
    def width(self) -> int:
        return self.clip_model.width

    @property
    def image_size(self) -> int:
        return self.clip_model.transformer.image_size

    def __call__(self, image):
        mean, std = jnp.asarray(OPENAI_CLIP_MEAN), jnp.asarray(OPENAI_CLIP_STD)
        pixels = ((image.astype(jnp.float32) * 0.5 + 0.5) - mean) / std
        return self.clip_model(pixels.astype(self.dtype))
