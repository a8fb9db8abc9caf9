"""The networks of PCDMs (Progressive Conditional Diffusion Models) that are not the SD UNet, and the
canvas packing of its stage-2 / stage-3 UNet inputs. NHWC; parameter names mirror the original PyTorch
state dicts (see pgpis_jax/weights/pcdm_checkpoint.py).

Stage 1: `PriorTransformer` predicts the (normalised) CLIP image embedding of the target from the source's
CLIP embedding and both poses' keypoint coordinates. Stage 2 composes the SD UNet (in_channels 9,
projection class embedding) with `PoseEncoder` (added after conv_in) and `ImageProjector` (DINOv2 tokens to
cross-attention tokens); stage 3 the UNet (in_channels 8) with an `ImageProjector`.

Every linear and convolution starts from torch's default init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for
weights and biases (pgpis_jax.nn.initializers), as in the original, where the layers created fresh (pose
MLPs, projections, projector, pose encoder) keep it; the exceptions are the original's too: the pose
encoder's conv_out and the prior's positional_embedding and prd_embedding start at zero.
"""

from __future__ import annotations

from typing import Tuple

import flax.linen as nn
import jax.numpy as jnp

from pgpis_jax.nn.activations import gelu
from pgpis_jax.nn.embeddings import TimestepEmbedding, get_timestep_embedding
from pgpis_jax.nn.initializers import torch_dense
from pgpis_jax.nn.resnet import CONV_PADDING, conv3x3
from pgpis_jax.nn.transformer import BasicTransformerBlock, LayerNorm

# The fixed scalars PCDMs normalises the 1024-d CLIP image embedding with (one for all dimensions).
CLIP_EMBEDDING_MEAN = -0.016
CLIP_EMBEDDING_STD = 0.415
# The prior's tokens: source pose, target pose, source image, time, x_t, learned query.
PRIOR_NUM_TOKENS = 6


def normalize_clip_embedding(e):
    """CLIP image embedding -> the prior's diffusion space: (e - mean) / std."""
    return (e - CLIP_EMBEDDING_MEAN) / CLIP_EMBEDDING_STD


def denormalize_clip_embedding(x):
    """Inverse of `normalize_clip_embedding`: x * std + mean."""
    return x * CLIP_EMBEDDING_STD + CLIP_EMBEDDING_MEAN


def _gelu_mlp(x, hidden: int, features: int, kw, dropout: float = 0.0, deterministic: bool = True):
    """Linear `net_0`, exact GELU, dropout, LayerNorm `net_3` (eps 1e-5), Linear `net_4`, dropout (torch's
    net.2 and net.5) - inside the caller's compact scope, so the parameters are the caller's."""
    h = torch_dense(hidden, x.shape[-1], "net_0", **kw)(x.astype(kw["dtype"]))
    h = nn.Dropout(dropout)(gelu(h), deterministic=deterministic)
    h = torch_dense(features, hidden, "net_4", **kw)(LayerNorm(1e-5, name="net_3", **kw)(h))
    return nn.Dropout(dropout)(h, deterministic=deterministic)


class PoseCoordinateMLP(nn.Module):
    """Stage-1 pose MLP: Linear `net_0` (-> hidden), exact GELU, LayerNorm `net_3`, Linear `net_4`
    (-> features), LayerNorm `net_6` (eps 1e-5; torch's dropouts at indices 2 and 5 have p = 0).
    coords [B, 2K] (K keypoints, x y interleaved) -> [B, features]."""

    hidden: int = 512
    features: int = 1024
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, coords):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        return LayerNorm(1e-5, name="net_6", **kw)(_gelu_mlp(coords, self.hidden, self.features, kw))


class ImageProjector(nn.Module):
    """`image_proj_model_p` of stages 2 and 3, applied per token: Linear `net_0` (-> hidden), exact GELU,
    LayerNorm `net_3` (eps 1e-5), Linear `net_4` (-> features). tokens [B, N, C] -> [B, N, features].
    dropout (PCDMs: 0; FPDM's `srcimage_proj_model`, the same layout: 0.2) acts after the GELU and after
    `net_4` unless deterministic."""

    hidden: int = 768
    features: int = 1024
    dropout: float = 0.0
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens, deterministic: bool = True):
        return _gelu_mlp(tokens, self.hidden, self.features, dict(dtype=self.dtype, param_dtype=self.param_dtype),
                         self.dropout, deterministic)

    def init_params(self, rng, in_features: int = 1536):
        """Fresh parameters for tokens of width in_features (DINOv2-giant: 1536)."""
        return self.init(rng, jnp.zeros((1, 1, in_features), self.dtype))["params"]


class PoseEncoder(nn.Module):
    """`pose_proj` of stage 2 (diffusers' ControlNetConditioningEmbedding): 3x3 conv `conv_in`, SiLU, then
    per consecutive pair of block_out_channels a 3x3 conv keeping the width and a stride-2 3x3 conv widening
    it (`blocks_0` ... `blocks_5`), each followed by SiLU, then 3x3 conv `conv_out` (zero-initialised).
    All convs pad one pixel on each side. pose [B, H, W, 3] in [-1, 1] -> [B, ceil(H/8), ceil(W/8),
    features] for the default three stride-2 convs."""

    features: int = 320
    block_out_channels: Tuple[int, ...] = (16, 32, 96, 256)
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def _conv(self, features: int, in_channels: int, name: str, strides: int = 1):
        return conv3x3(features, in_channels, self.dtype, self.param_dtype, name, strides=strides)

    @nn.compact
    def __call__(self, pose):
        if pose.ndim != 4:
            raise ValueError(f"PoseEncoder input must be NHWC [B, H, W, C], got shape {pose.shape}")
        channels = self.block_out_channels
        h = nn.silu(self._conv(channels[0], pose.shape[-1], "conv_in")(pose.astype(self.dtype)))
        for i in range(len(channels) - 1):
            h = nn.silu(self._conv(channels[i], channels[i], f"blocks_{2 * i}")(h))
            h = nn.silu(self._conv(channels[i + 1], channels[i], f"blocks_{2 * i + 1}", strides=2)(h))
        return nn.Conv(self.features, (3, 3), padding=CONV_PADDING, kernel_init=nn.initializers.zeros,
                       dtype=self.dtype, param_dtype=self.param_dtype, name="conv_out")(h)

    def init_params(self, rng, in_channels: int = 3):
        """Fresh parameters (conv_out zero, the rest torch's default init)."""
        return self.init(rng, jnp.zeros((1, 8, 8, in_channels), self.dtype))["params"]


class PriorTransformer(nn.Module):
    """Stage 1 of PCDMs (the original's `Stage1_PriorTransformer`): an unCLIP-style prior over 6 tokens
    of width D = num_attention_heads * attention_head_dim, in this order:
      0 source pose   encoder_hidden_states_proj(pose_encoder(source_pose))
      1 target pose   encoder_hidden_states_proj1(pose_encoder1(target_pose))
      2 source image  embedding_proj(source_embedding)
      3 time          time_embedding(sinusoid(t), D; [cos, sin], shift 0)
      4 x_t           proj_in(noisy_embedding)
      5 query         prd_embedding
    plus positional_embedding [1, 6, D] (zero-initialised), then num_layers pre-LN transformer blocks
    (self-attention with biased q/k/v, exact-GELU feed-forward x4, no mask), norm_out, and
    proj_to_clip_embeddings of the last token.
    """

    embedding_dim: int = 1024
    num_layers: int = 20
    num_attention_heads: int = 32
    attention_head_dim: int = 64
    pose_dim: int = 36
    pose_hidden: int = 512
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    attention_implementation: str = "xla"
    remat: bool = False

    @nn.compact
    def __call__(self, noisy_embedding, timesteps, source_embedding, source_pose, target_pose):
        """noisy_embedding [B, E] (x_t in the normalised space), timesteps [B] or scalar (int or float),
        source_embedding [B, E] (raw CLIP image_embeds of the source), source_pose and target_pose
        [B, pose_dim] -> predicted x0 [B, E] (normalised space), float32."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        inner = self.num_attention_heads * self.attention_head_dim
        batch = noisy_embedding.shape[0]
        for name, value, width in (("noisy_embedding", noisy_embedding, self.embedding_dim),
                                   ("source_embedding", source_embedding, self.embedding_dim),
                                   ("source_pose", source_pose, self.pose_dim),
                                   ("target_pose", target_pose, self.pose_dim)):
            if value.shape != (batch, width):
                raise ValueError(f"PriorTransformer {name} must be [B, {width}] with B = {batch}, got shape "
                                 f"{value.shape}")

        def projection(name):
            return torch_dense(inner, self.embedding_dim, name, **kw)

        def pose_token(encoder, projection_name, pose):
            mlp = PoseCoordinateMLP(self.pose_hidden, self.embedding_dim, name=encoder, **kw)
            return projection(projection_name)(mlp(pose))

        timesteps = jnp.asarray(timesteps)
        timesteps = jnp.broadcast_to(timesteps.reshape(-1) if timesteps.ndim else timesteps[None], (batch,))
        sinusoid = get_timestep_embedding(timesteps, inner, flip_sin_to_cos=True, downscale_freq_shift=0)
        query = self.param("prd_embedding", nn.initializers.zeros, (1, 1, inner), self.param_dtype)
        tokens = jnp.stack([
            pose_token("pose_encoder", "encoder_hidden_states_proj", source_pose),
            pose_token("pose_encoder1", "encoder_hidden_states_proj1", target_pose),
            projection("embedding_proj")(source_embedding.astype(self.dtype)),
            TimestepEmbedding(inner, name="time_embedding", **kw)(sinusoid.astype(self.dtype)),
            projection("proj_in")(noisy_embedding.astype(self.dtype)),
            jnp.broadcast_to(query[0].astype(self.dtype), (batch, inner)),
        ], axis=1)
        positions = self.param("positional_embedding", nn.initializers.zeros, (1, PRIOR_NUM_TOKENS, inner),
                               self.param_dtype)
        h = tokens + positions.astype(self.dtype)

        block_class = nn.remat(BasicTransformerBlock, static_argnums=(4,)) if self.remat else BasicTransformerBlock
        for i in range(self.num_layers):
            block = block_class(self.num_attention_heads, self.attention_head_dim, has_cross_attention=False,
                                activation_fn="gelu", attention_bias=True,
                                attention_implementation=self.attention_implementation,
                                name=f"transformer_blocks_{i}", **kw)
            h = block(h, None, None, True)
        h = LayerNorm(1e-5, name="norm_out", **kw)(h)[:, -1]
        out = torch_dense(self.embedding_dim, inner, "proj_to_clip_embeddings", **kw)(h)
        return out.astype(jnp.float32)

    def init_params(self, rng):
        """Fresh parameters from minimal dummy inputs (wrap in jax.eval_shape for shapes only)."""
        embedding = jnp.zeros((1, self.embedding_dim), self.dtype)
        pose = jnp.zeros((1, self.pose_dim), self.dtype)
        return self.init(rng, embedding, jnp.zeros((1,), jnp.int32), embedding, pose, pose)["params"]


# ------------------------------------------------------------------------------------------ canvas inputs


def _check_even_width(array, what: str):
    if array.ndim != 4 or array.shape[2] % 2:
        raise ValueError(f"{what} must be an NHWC canvas [B, H, 2W, C] of even width, got shape {array.shape}")


def source_marker(batch: int, height: int, width: int, dtype=jnp.float32):
    """Stage 2's mask channel for a canvas of `width` (even) columns: [batch, height, width, 1], 1 on the left
    half (the known source), 0 on the right half (the target to generate) - PCDMs' convention, the opposite
    of diffusers' SD-inpainting mask."""
    if width % 2:
        raise ValueError(f"source_marker: the canvas width must be even (source | target), got {width}")
    columns = (jnp.arange(width) < width // 2).astype(dtype)
    return jnp.broadcast_to(columns[None, None, :, None], (batch, height, width, 1))


def pack_inpaint_input(noisy_latent, masked_latent):
    """Stage 2's UNet input: concat([noisy, marker, masked]) on channels.

    noisy_latent [B, h, 2w, C]: the noised latent of the [source | target] canvas; masked_latent
    [B, h, 2w, C]: the latent of [source | black]. Returns [B, h, 2w, 2C + 1] in noisy_latent's dtype.
    """
    _check_even_width(noisy_latent, "noisy_latent")
    if masked_latent.shape != noisy_latent.shape:
        raise ValueError(f"masked_latent shape {masked_latent.shape} differs from noisy_latent shape "
                         f"{noisy_latent.shape}")
    batch, height, width, _ = noisy_latent.shape
    marker = source_marker(batch, height, width, noisy_latent.dtype)
    return jnp.concatenate([noisy_latent, marker, masked_latent.astype(noisy_latent.dtype)], axis=-1)


def pack_refine_input(noisy_latent, coarse_latent):
    """Stage 3's UNet input: concat([noisy target latent, latent of the stage-2 output]) on channels,
    [B, h, w, C] each -> [B, h, w, 2C] in noisy_latent's dtype."""
    if noisy_latent.ndim != 4 or coarse_latent.shape != noisy_latent.shape:
        raise ValueError(f"pack_refine_input needs two NHWC latents of the same shape, got {noisy_latent.shape} "
                         f"and {coarse_latent.shape}")
    return jnp.concatenate([noisy_latent, coarse_latent.astype(noisy_latent.dtype)], axis=-1)


def split_canvas(canvas):
    """[B, H, 2W, C] -> (left [B, H, W, C] (source), right [B, H, W, C] (target))."""
    _check_even_width(canvas, "canvas")
    half = canvas.shape[2] // 2
    return canvas[:, :, :half], canvas[:, :, half:]


def join_canvas(left, right):
    """Inverse of `split_canvas`: two [B, H, W, C] images side by side -> [B, H, 2W, C]."""
    if left.ndim != 4 or left.shape != right.shape:
        raise ValueError(f"join_canvas needs two NHWC images of the same shape, got {left.shape} and {right.shape}")
    return jnp.concatenate([left, right], axis=2)
