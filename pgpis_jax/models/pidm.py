"""PIDM's networks (Bhunia et al., CVPR 2023; the baseline of RePoseDM): the pixel-space denoising UNet
(`BeatGANsAutoencModel`) and the texture encoder (`BeatGANsEncoder`) whose feature maps the UNet's
cross-attention blocks read as keys and values. NHWC; parameter names mirror PIDM's state dict, so its
checkpoints convert by rule (pgpis_jax/weights/pidm_checkpoint.py).

Layout (DeepFashion: 256x256, channel_mult (1, 1, 2, 2, 4, 4), 2 ResBlocks per level, attention at 32, 16, 8):
  input blocks   `input_blocks_0_0` conv3x3; per level `num_res_blocks` ResBlocks, then (all levels but the
                 last) a down-ResBlock (2x2 average pool inside, channels kept) - 18 blocks. At each level
                 whose resolution (image_size / 2^level) is in attention_resolutions, the level's last
                 ResBlock is followed by a cross-attention block.
  middle         ResBlock, cross-attention, ResBlock.
  output blocks  per level, deepest first, num_res_blocks + 1 ResBlocks, each concatenating one input-block
                 activation of its level (popped in reverse) before its first norm; cross-attention after the
                 level's block number num_res_blocks - 1 (same resolution rule); an up-ResBlock (nearest x2)
                 ends every level but the first.
  out            GroupNorm, SiLU, conv3x3 (zero-initialised).
The texture encoder is the input path alone (3 input channels, no time embedding, no attention) and returns
all input-block activations. Cross-attention site -> encoder map: input block k reads map k, the middle block
the last map, output block k map (number of input blocks - 1 - k); query and map have the same shape.

ResBlock (PIDM's `ResBlock`, use_condition, scale-shift norm): h = conv(SiLU(GN(x))) (a down/up-ResBlock
resamples after the SiLU, and resamples x too); with a time embedding, (scale, shift) = Linear(SiLU(emb))
and h = GN(h) * (1 + scale) + shift, else h = GN(h); h = conv(Dropout(SiLU(h))) (zero-initialised);
out = skip(x) + h, skip a 1x1 conv when the width changes. GroupNorm: min(32, C) groups, eps 1e-5, float32.

Cross-attention (PIDM's `AttentionBlock`; its self-attention is commented out): q = to_q(GN(x)),
[k | v] = to_kv(map) (no norm on the map), single head, softmax(q k^T / sqrt(C)) v, proj_out2 (zero-init),
plus x. Projections are PIDM's 1x1 Conv1d, here Dense layers (the converter squeezes the kernel axis).

Parameters PIDM creates but never uses, which these modules therefore do not have (the converter drops them):
  cond_emb_layers.1 of every ResBlock   TimestepEmbedSequential passes cond=None to ResBlocks;
  qkv and proj_out1 of every attention  the self-attention branch is commented out;
  encoder.time_embed.0/.2               BeatGANsEncoder.forward never computes a time embedding;
  emb_layers.1 of encoder ResBlocks     the encoder calls its blocks with emb=None.
Every other convolution and linear layer starts from torch's default init, norms from ones and zeros.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp

from pgpis_jax.models.reposedm import sine_position_encoding
from pgpis_jax.nn.attention import IMPLEMENTATIONS, dot_product_attention
from pgpis_jax.nn.embeddings import get_timestep_embedding
from pgpis_jax.nn.initializers import torch_conv, torch_dense
from pgpis_jax.nn.resnet import CONV_PADDING, GroupNorm, conv3x3, upsample_nearest

RESAMPLES = (None, "down", "up")


def pidm_group_norm(channels: int, dtype, param_dtype, name: str) -> GroupNorm:
    """PIDM's `normalization`: GroupNorm with min(32, channels) groups, eps 1e-5, in float32."""
    return GroupNorm(min(32, channels), 1e-5, dtype=dtype, param_dtype=param_dtype, name=name)


def pack_unet_input(noisy_image, pose_map):
    """The UNet input as PIDM feeds it: concat([x_t, pose], channels), [B, H, W, 3] and [B, H, W, 20] ->
    [B, H, W, 23] in noisy_image's dtype."""
    if noisy_image.ndim != 4 or pose_map.ndim != 4 or noisy_image.shape[:3] != pose_map.shape[:3]:
        raise ValueError(f"pack_unet_input needs NHWC noisy_image and pose_map of the same batch and size, got "
                         f"{noisy_image.shape} and {pose_map.shape}")
    return jnp.concatenate([noisy_image, pose_map.astype(noisy_image.dtype)], axis=-1)


@dataclasses.dataclass(frozen=True)
class InputBlock:
    """One input block: its level (resolution image_size / 2^level), output channels, and kind: "conv" (the
    first block), "res" (a ResBlock, `index` within its level from 0) or "down" (the down-ResBlock that opens
    level `level`; it keeps the width of the level before)."""

    level: int
    channels: int
    kind: str
    index: int = 0


def input_blocks(model_channels: int, channel_mult: Sequence[int], num_res_blocks: int) -> Tuple[InputBlock, ...]:
    """The input blocks of PIDM's UNet, which are also the texture encoder's blocks and its output maps, in
    order (18 for DeepFashion)."""
    blocks = [InputBlock(0, model_channels * channel_mult[0], "conv")]
    for level, mult in enumerate(channel_mult):
        if level:
            blocks.append(InputBlock(level, blocks[-1].channels, "down"))
        blocks.extend(InputBlock(level, model_channels * mult, "res", i) for i in range(num_res_blocks))
    return tuple(blocks)


def _check_image(x, channels: int, levels: int, what: str):
    factor = 2 ** (levels - 1)
    if x.ndim != 4 or x.shape[-1] != channels or x.shape[1] % factor or x.shape[2] % factor:
        raise ValueError(f"{what} must be NHWC [B, H, W, {channels}] with H and W multiples of {factor}, got shape "
                         f"{x.shape}")


class ResBlock(nn.Module):
    """PIDM's `ResBlock` (see the module docstring). x [B, H, W, C]; emb [B, E] or None (the texture encoder:
    then no `emb_layers_1`); lateral [B, H, W, C'] or None (output blocks: concatenated after x first).
    resample None, "down" (2x2 average pool) or "up" (nearest x2). Returns [B, H', W', out_channels]."""

    out_channels: int
    resample: Optional[str] = None
    dropout: float = 0.0
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def _resample(self, x):
        if self.resample == "down":
            return nn.avg_pool(x, (2, 2), strides=(2, 2))
        return upsample_nearest(x) if self.resample == "up" else x

    @nn.compact
    def __call__(self, x, emb=None, lateral=None, deterministic: bool = True):
        if self.resample not in RESAMPLES:
            raise ValueError(f"ResBlock resample {self.resample!r} is not supported; expected one of {RESAMPLES}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if lateral is not None:
            x = jnp.concatenate([x, lateral.astype(x.dtype)], axis=-1)
        channels, out = x.shape[-1], self.out_channels
        h = nn.silu(pidm_group_norm(channels, name="in_layers_0", **kw)(x))
        h = conv3x3(out, channels, self.dtype, self.param_dtype, "in_layers_2")(self._resample(h))
        x = self._resample(x)
        h = pidm_group_norm(out, name="out_layers_0", **kw)(h)
        if emb is not None:
            scale_shift = torch_dense(2 * out, emb.shape[-1], "emb_layers_1", **kw)(nn.silu(emb))
            scale, shift = jnp.split(scale_shift[:, None, None, :].astype(h.dtype), 2, axis=-1)
            h = h * (1 + scale) + shift
        h = nn.Dropout(self.dropout)(nn.silu(h), deterministic=deterministic)
        h = nn.Conv(out, (3, 3), padding=CONV_PADDING, kernel_init=nn.initializers.zeros,
                    bias_init=nn.initializers.zeros, name="out_layers_3", **kw)(h)
        if channels != out:
            x = torch_conv(out, 1, channels, "skip_connection", **kw)(x)
        return x + h


class CrossAttention(nn.Module):
    """PIDM's `AttentionBlock` (cross-attention only, one head). x [B, H, W, C] (queries, normalised);
    source [B, H', W', C] (keys and values, not normalised; PIDM's maps have the queries' shape) ->
    x + proj_out2(attention) [B, H, W, C].

    position_encoding (RePoseDM option `xattn_pos_enc`, not PIDM's): a fixed 2-D sine encoding of the positions
    (GMFlow's, pgpis_jax/models/reposedm.py) times a learned scalar `position_scale` (zero-initialised, so the block
    starts as PIDM's) is added to the queries and the keys, letting attention prefer the source position under
    the query (an aligned source then helps by where its features are, not only by what they are)."""

    attention_implementation: str = "xla"
    position_encoding: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, source):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        batch, height, width, channels = x.shape
        if source.ndim != 4 or source.shape[0] != batch or source.shape[-1] != channels:
            raise ValueError(f"cross-attention source map must be [{batch}, h, w, {channels}] for queries of shape "
                             f"{x.shape}, got {source.shape}")
        query = torch_dense(channels, channels, "to_q", **kw)(pidm_group_norm(channels, name="norm", **kw)(x))
        key_value = torch_dense(2 * channels, channels, "to_kv", **kw)(source.astype(self.dtype))
        key, value = jnp.split(key_value.reshape(batch, -1, 1, 2 * channels), 2, axis=-1)
        if self.position_encoding:
            scale = self.param("position_scale", nn.initializers.zeros, (), self.param_dtype)
            query = query + (scale * sine_position_encoding(height, width, channels)).astype(query.dtype)
            key = key + (scale * sine_position_encoding(*source.shape[1:3], channels)).reshape(
                1, -1, 1, channels).astype(key.dtype)
        h = dot_product_attention(query.reshape(batch, -1, 1, channels), key, value, self.attention_implementation)
        h = nn.Dense(channels, kernel_init=nn.initializers.zeros, bias_init=nn.initializers.zeros,
                     name="proj_out2", **kw)(h.reshape(x.shape))
        return x + h


class TimeEmbed(nn.Module):
    """PIDM's `TimeStyleSeperateEmbed` (its style path is the identity): Linear `time_embed_0`, SiLU, Linear
    `time_embed_2`, on the sinusoidal embedding [B, T] -> [B, features]."""

    features: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, t_emb):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = torch_dense(self.features, t_emb.shape[-1], "time_embed_0", **kw)(t_emb)
        return torch_dense(self.features, self.features, "time_embed_2", **kw)(nn.silu(h))


@dataclasses.dataclass(frozen=True)
class OutputBlock:
    """One output block: its level, output channels, whether cross-attention follows its ResBlock, and
    whether an up-ResBlock ends it."""

    level: int
    channels: int
    attention: bool
    up: bool


class PIDMTextureEncoder(nn.Module):
    """PIDM's texture encoder (`BeatGANsEncoder`): the UNet's input path on the source image. image
    [B, H, W, in_channels] in [-1, 1] (H, W multiples of 2^(levels - 1)) -> a tuple of one feature map per
    input block (`input_blocks`), map k [B, H / 2^level, W / 2^level, channels], all in `dtype`. PIDM's null
    condition is the encoding of a zero image."""

    in_channels: int = 3
    model_channels: int = 128
    channel_mult: Tuple[int, ...] = (1, 1, 2, 2, 4, 4)
    num_res_blocks: int = 2
    dropout: float = 0.1
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, image, deterministic: bool = True):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        _check_image(image, self.in_channels, len(self.channel_mult), "texture encoder image")
        blocks = input_blocks(self.model_channels, self.channel_mult, self.num_res_blocks)
        h = conv3x3(blocks[0].channels, self.in_channels, self.dtype, self.param_dtype, "input_blocks_0_0")(
            image.astype(self.dtype))
        features = [h]
        for k, block in enumerate(blocks[1:], start=1):
            resample = "down" if block.kind == "down" else None
            h = ResBlock(block.channels, resample, self.dropout, name=f"input_blocks_{k}_0", **kw)(
                h, deterministic=deterministic)
            features.append(h)
        return tuple(features)

    def init_params(self, rng):
        """Fresh parameters (wrap in jax.eval_shape for shapes only)."""
        size = 2 ** (len(self.channel_mult) - 1)
        return self.init(rng, jnp.zeros((1, size, size, self.in_channels), self.dtype))["params"]


class PIDMUNet(nn.Module):
    """PIDM's denoising UNet (`BeatGANsAutoencModel` without its texture encoder; see the module docstring).

    Fields as PIDM's config; the defaults are its DeepFashion `get_model_conf()` (in_channels 23 = noisy
    image 3 + pose map 20; out_channels 6 = epsilon 3 + variance interpolant 3). image_size only places the attention
    blocks (resolution image_size / 2^level in attention_resolutions), inputs of any size divisible by
    2^(levels - 1) run. One attention head, as PIDM's num_heads 1 (with more, its legacy QKV split would mix
    query and key channels). Our own fields: position_encoding (CrossAttention's, off = PIDM),
    attention_implementation ("xla" or "cudnn"), dtype (compute), param_dtype.
    """

    image_size: int = 256
    in_channels: int = 23
    model_channels: int = 128
    out_channels: int = 6
    num_res_blocks: int = 2
    channel_mult: Tuple[int, ...] = (1, 1, 2, 2, 4, 4)
    attention_resolutions: Tuple[int, ...] = (32, 16, 8)
    embed_channels: int = 512
    dropout: float = 0.1
    position_encoding: bool = False
    attention_implementation: str = "xla"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def texture_encoder(self, **kwargs) -> PIDMTextureEncoder:
        """The texture encoder of this UNet's configuration (kwargs override fields, e.g. dtype)."""
        fields = dict(model_channels=self.model_channels, channel_mult=self.channel_mult,
                      num_res_blocks=self.num_res_blocks, dropout=self.dropout, dtype=self.dtype,
                      param_dtype=self.param_dtype)
        return PIDMTextureEncoder(**{**fields, **kwargs}, parent=None)  # unbound: not a submodule of this UNet

    def _has_attention(self, level: int) -> bool:
        return self.image_size // 2**level in self.attention_resolutions

    def input_blocks(self) -> Tuple[InputBlock, ...]:
        """The input blocks (and texture-encoder maps), in order."""
        return input_blocks(self.model_channels, self.channel_mult, self.num_res_blocks)

    def output_blocks(self) -> Tuple[OutputBlock, ...]:
        """The output blocks, in order (deepest level first)."""
        return tuple(OutputBlock(level, self.model_channels * mult,
                                 i == self.num_res_blocks - 1 and self._has_attention(level),
                                 level > 0 and i == self.num_res_blocks)
                     for level, mult in reversed(tuple(enumerate(self.channel_mult)))
                     for i in range(self.num_res_blocks + 1))

    def attention_sites(self) -> Tuple[Tuple[str, int], ...]:
        """(module name, index of the texture-encoder map it reads) of every cross-attention block, in
        execution order. DeepFashion: input blocks 11, 14, 17 read maps 11, 14, 17; the middle block map 17;
        output blocks 1, 4, 7 maps 16, 13, 10."""
        blocks = self.input_blocks()
        last = len(blocks) - 1
        sites = [(f"input_blocks_{k}_1", k) for k, block in enumerate(blocks)
                 if block.kind == "res" and block.index == self.num_res_blocks - 1 and self._has_attention(block.level)]
        sites.append(("middle_block_1", last))
        sites += [(f"output_blocks_{k}_1", last - k) for k, block in enumerate(self.output_blocks()) if block.attention]
        return tuple(sites)

    @nn.compact
    def __call__(self, x, timesteps, source_features: Sequence, deterministic: bool = True):
        """x [B, H, W, in_channels] (`pack_unet_input`: noisy image and pose map); timesteps scalar or [B]
        (PIDM's integer t, not rescaled); source_features: the texture encoder's maps (all of them, in order;
        only those of `attention_sites` are read - RePoseDM passes the encoding of the warped source).
        Returns [B, H, W, out_channels] in `dtype`: epsilon (first 3) and the variance interpolant."""
        if self.attention_implementation not in IMPLEMENTATIONS:
            raise ValueError(f"PIDMUNet attention_implementation {self.attention_implementation!r} is not "
                             f"supported; expected one of {IMPLEMENTATIONS}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        levels = len(self.channel_mult)
        _check_image(x, self.in_channels, levels, "PIDMUNet input x")
        blocks = self.input_blocks()
        source_features = tuple(source_features)
        if len(source_features) != len(blocks):
            raise ValueError(f"source_features must hold the texture encoder's {len(blocks)} maps, got "
                             f"{len(source_features)}")
        sources = dict(self.attention_sites())
        resblock = dict(dropout=self.dropout, **kw)

        def attend(h, name):
            source = source_features[sources[name]]
            if tuple(source.shape) != h.shape:
                raise ValueError(f"source_features[{sources[name]}] (read by {name}) must have shape {h.shape}, got "
                                 f"{tuple(source.shape)}")
            return CrossAttention(self.attention_implementation, self.position_encoding, name=name, **kw)(h, source)

        batch = x.shape[0]
        timesteps = jnp.asarray(timesteps)
        timesteps = jnp.broadcast_to(timesteps.reshape(-1) if timesteps.ndim else timesteps[None], (batch,))
        t_emb = get_timestep_embedding(timesteps, self.model_channels, flip_sin_to_cos=True, downscale_freq_shift=0)
        emb = TimeEmbed(self.embed_channels, name="time_embed", **kw)(t_emb.astype(self.dtype))

        h = conv3x3(blocks[0].channels, self.in_channels, self.dtype, self.param_dtype, "input_blocks_0_0")(
            x.astype(self.dtype))
        laterals = [[] for _ in range(levels)]
        laterals[0].append(h)
        for k, block in enumerate(blocks[1:], start=1):
            resample = "down" if block.kind == "down" else None
            h = ResBlock(block.channels, resample, name=f"input_blocks_{k}_0", **resblock)(h, emb, None, deterministic)
            if f"input_blocks_{k}_1" in sources:
                h = attend(h, f"input_blocks_{k}_1")
            laterals[block.level].append(h)

        channels = blocks[-1].channels
        h = ResBlock(channels, name="middle_block_0", **resblock)(h, emb, None, deterministic)
        h = attend(h, "middle_block_1")
        h = ResBlock(channels, name="middle_block_2", **resblock)(h, emb, None, deterministic)

        for k, block in enumerate(self.output_blocks()):
            lateral = laterals[block.level].pop()
            h = ResBlock(block.channels, name=f"output_blocks_{k}_0", **resblock)(h, emb, lateral, deterministic)
            if block.attention:
                h = attend(h, f"output_blocks_{k}_1")
            if block.up:
                name = f"output_blocks_{k}_{2 if block.attention else 1}"
                h = ResBlock(block.channels, "up", name=name, **resblock)(h, emb, None, deterministic)

        h = nn.silu(pidm_group_norm(h.shape[-1], name="out_0", **kw)(h))
        return nn.Conv(self.out_channels, (3, 3), padding=CONV_PADDING, kernel_init=nn.initializers.zeros,
                       bias_init=nn.initializers.zeros, name="out_2", **kw)(h)

    def init_params(self, rng):
        """Fresh parameters (wrap in jax.eval_shape for shapes only), with zero source maps of matching shapes."""
        size = 2 ** (len(self.channel_mult) - 1)
        features = [jnp.zeros((1, size // 2**b.level, size // 2**b.level, b.channels), self.dtype)
                    for b in self.input_blocks()]
        return self.init(rng, jnp.zeros((1, size, size, self.in_channels), self.dtype), jnp.zeros((1,), jnp.int32),
                         features)["params"]
