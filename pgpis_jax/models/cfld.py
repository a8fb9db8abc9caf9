"""The networks CFLD (Coarse-to-Fine Latent Diffusion, CVPR 2024) adds to Stable Diffusion 1.5, NHWC, with the
parameter names of the original's `build_model` container (pgpis_jax/weights/cfld_checkpoint.py converts its
pytorch_model.bin by rule):

  backbone            H_S  Swin-B, window 16, 256x256, no final LayerNorm (pgpis_jax.models.encoders.swin);
                           its stage tokens before each patch merging feed the modules below
  decoder             H_D  `PerceptionRefinedDecoder`: learned queries refined by cross-attention-first
                           blocks over the last stage -> the coarse prompt c [B, 16, 768] (the UNet's
                           encoder_hidden_states)
  appearance_encoder  H_A  `HybridGranularityAttention`: one zero-convolution-framed transformer branch per
                           up-block cross-attention of the UNet -> additive biases of its queries (B1: of
                           its context tokens)
  pose_encoder        H_P  `PoseAdapter`: pixel-unshuffle + ResNet blocks on the 21-channel pose map -> the
                           T2I-adapter residuals of down blocks 0-2
  learnable_vector         the learned null prompt [1, 16, 768] of classifier-free guidance
The ablations' prompts in place of the PRD (B1, B2, B5) are in pgpis_jax.models.cfld_prompts.

`CFLDConditioner` holds the four modules and the null prompt; its outputs plug into
pgpis_jax.models.unet.UNet2DConditionModel as `encoder_hidden_states`, `down_block_additional_residuals` and
`up_cross_attention_residuals`. `cfld_conditioner()` builds the full-size configuration.

Initialisation as the original: linear layers and convolutions torch's default, LayerNorms ones and zeros; the
decoder's queries and positional embeddings N(0, 0.02); HGA's zero convolutions zero (so every query bias is zero
at step 0); the null prompt N(0, 1). The Swin backbone starts from pretrained weights
(pgpis_jax.weights.encoder_checkpoints.load_swin_checkpoint).
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax.numpy as jnp

from pgpis_jax.models.cfld_prompts import CLIPPromptDecoder, LinearPromptDecoder, ZeroPromptDecoder
from pgpis_jax.models.encoders.swin import CFLD_SWIN_B_CONFIG, SwinModel
from pgpis_jax.nn.attention import Attention, CrossAttentionResidual
from pgpis_jax.nn.initializers import torch_conv
from pgpis_jax.nn.resnet import ResnetBlock2D
from pgpis_jax.nn.transformer import BasicTransformerBlock, FeedForward, LayerNorm

# The UNet block index of each HGA branch (the original's ATTN_RESIDUAL_BLOCK_IDX): up block i (0..3) of the SD
# UNet, transformer j (0..2) is block 3 i + j; up block 0 has no attention, so the nine cross-attentions are
# blocks 3..11 and branch 0 (the finest Swin stage) feeds block 11 (the last transformer of the 64x64 up block).
HGA_BLOCK_INDICES = (11, 10, 9, 8, 7, 6, 5, 4, 3)
# The original's query / positional-embedding init std (nn.init.normal_(std=0.02)) and null-prompt std.
EMBEDDING_INIT_STD = 0.02
NULL_PROMPT_INIT_STD = 1.0
# Where HGA's outputs go: the cross-attention queries (CFLD) or the context tokens before to_k / to_v (ablation B1).
HGA_TARGETS = ("query", "context")
# The original's test for the zero prompt of B1 (mean |c| per example below this): only then are HGA's context
# residuals added, so the learned null prompt of classifier-free guidance stays unconditional.
ZERO_PROMPT_TOLERANCE = 1e-4


def pixel_unshuffle(x, factor: int):
    """torch.nn.PixelUnshuffle on NHWC: [B, H, W, C] -> [B, H/f, W/f, C f^2], output channel c f^2 + dy f + dx
    holding input pixel (f y + dy, f x + dx) of channel c."""
    batch, height, width, channels = x.shape
    if height % factor or width % factor:
        raise ValueError(f"pixel_unshuffle: {height}x{width} is not divisible by the factor {factor}")
    x = x.reshape(batch, height // factor, factor, width // factor, factor, channels)
    return x.transpose(0, 1, 3, 5, 2, 4).reshape(batch, height // factor, width // factor, channels * factor**2)


def _square_grid(tokens, what: str) -> int:
    side = math.isqrt(tokens.shape[1]) if tokens.ndim == 3 else 0
    if side * side != tokens.shape[1] or tokens.ndim != 3:
        raise ValueError(f"{what} must be tokens [B, H*W, C] of a square grid, got shape {tokens.shape}")
    return side


class CrossAttentionFirstBlock(nn.Module):
    """The decoder block (the original's CrossAttnFirstTransformerBlock, a diffusers BasicTransformerBlock run in
    another order), pre-LayerNorm (eps 1e-5), with the query positional embedding added to the residual stream
    itself before each attention:
        h += pos; h += attn2(norm2(h), context);  h += pos; h += attn1(norm1(h));  h += ff(norm3(h))  (GEGLU)
    h [B, Q, heads * dim_head], pos [B or 1, Q, heads * dim_head], context [B, L, C]."""

    heads: int
    dim_head: int
    attention_implementation: str = "xla"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, h, pos, context):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attention = dict(heads=self.heads, dim_head=self.dim_head, implementation=self.attention_implementation, **kw)
        h = h + pos
        h = h + Attention(name="attn2", **attention)(LayerNorm(1e-5, name="norm2", **kw)(h), context)
        h = h + pos
        h = h + Attention(name="attn1", **attention)(LayerNorm(1e-5, name="norm1", **kw)(h))
        return h + FeedForward(name="ff", **kw)(LayerNorm(1e-5, name="norm3", **kw)(h))


class PerceptionRefinedDecoder(nn.Module):
    """H_D (the original's Decoder, DEPTH > 0, LAST_NORM False): `query_feat` [Q, width] broadcast over the batch
    and refined by `depth` CrossAttentionFirstBlocks (`blocks_r`, heads x width/heads) with `pos_embed` [Q, width]
    as the query positional embedding; keys and values are the last Swin stage's tokens plus `kv_pos_embed`
    [1, L, C] (L and C taken from the tokens at init). No final norm.

    tokens [B, L, C] -> the coarse prompt [B, Q, width] in `dtype`."""

    num_queries: int = 16
    width: int = 768
    depth: int = 8
    heads: int = 24
    remat: bool = False
    attention_implementation: str = "xla"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens):
        if tokens.ndim != 3:
            raise ValueError(f"PerceptionRefinedDecoder input must be tokens [B, L, C], got shape {tokens.shape}")
        if self.width % self.heads:
            raise ValueError(f"PerceptionRefinedDecoder width {self.width} is not divisible by heads {self.heads}")
        init = nn.initializers.normal(EMBEDDING_INIT_STD)
        queries = self.param("query_feat", init, (self.num_queries, self.width), self.param_dtype)
        pos = self.param("pos_embed", init, (self.num_queries, self.width), self.param_dtype).astype(self.dtype)
        kv_pos = self.param("kv_pos_embed", init, (1,) + tokens.shape[1:], self.param_dtype)
        context = tokens.astype(self.dtype) + kv_pos.astype(self.dtype)
        h = jnp.broadcast_to(queries.astype(self.dtype), (tokens.shape[0],) + queries.shape)
        block_class = nn.remat(CrossAttentionFirstBlock) if self.remat else CrossAttentionFirstBlock
        for r in range(self.depth):
            h = block_class(self.heads, self.width // self.heads, self.attention_implementation, dtype=self.dtype,
                            param_dtype=self.param_dtype, name=f"blocks_{r}")(h, pos[None], context)
        return h


class HybridGranularityAttention(nn.Module):
    """H_A (the original's AppearanceEncoder): branch i takes a Swin stage's tokens [B, H*W, in_channels[i]]
    (square grid), applies `zero_conv_ins_i` (-> embed_dims[i]; kernel = stride = conv_in_kernels[i], 1 when
    empty; weight and bias zero at init), `depth` BasicTransformerBlocks `blocks_i_k` (two self-attentions then
    GEGLU, heads[i] heads of embed_dims[i] / heads[i], no positional embedding) and the 1x1 `zero_conv_outs_i`
    (-> out_channels[i], zero at init), giving [B, (H/k)*(W/k), out_channels[i]] for UNet block
    block_indices[i]: the bias of its cross-attention queries (target "query", CFLD's TO_QUERIES) or a residual of
    its context tokens (target "context", ablation B1's TO_KEYS and TO_VALUES, with 8 / 4 / 2 strided convs).

    Stages are consumed front to back as the original does: branch 0 reads stage 0, and the stage advances after
    branch i when in_channels[i + 1] differs from in_channels[i] (defaults: stages 0, 1, 2 for branches 0-2,
    3-5, 6-8).

    stage_features: the Swin stage tokens (more may be given than used). Returns one CrossAttentionResidual per
    branch ordered by ascending block index, which is the UNet's execution order: the tuple to pass as
    `up_cross_attention_residuals` (block_indices must be a permutation of consecutive integers, as 3..11).
    """

    block_indices: Tuple[int, ...] = HGA_BLOCK_INDICES
    in_channels: Tuple[int, ...] = (128,) * 3 + (256,) * 3 + (512,) * 3
    embed_dims: Tuple[int, ...] = (64,) * 3 + (128,) * 3 + (256,) * 3
    heads: Tuple[int, ...] = (2,) * 3 + (4,) * 3 + (8,) * 3
    out_channels: Tuple[int, ...] = (320,) * 3 + (640,) * 3 + (1280,) * 3
    depth: int = 4
    conv_in_kernels: Tuple[int, ...] = ()
    target: str = "query"
    remat: bool = False
    attention_implementation: str = "xla"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def __post_init__(self):
        n = len(self.block_indices)
        if self.target not in HGA_TARGETS:
            raise ValueError(f"HybridGranularityAttention target {self.target!r}; expected one of "
                             f"{', '.join(HGA_TARGETS)}")
        for key in ("in_channels", "embed_dims", "heads", "out_channels") + (
                ("conv_in_kernels",) if self.conv_in_kernels else ()):
            if len(getattr(self, key)) != n:
                raise ValueError(f"HybridGranularityAttention {key} has {len(getattr(self, key))} entries but "
                                 f"block_indices has {n}")
        if sorted(self.block_indices) != list(range(min(self.block_indices), min(self.block_indices) + n)):
            raise ValueError(f"HybridGranularityAttention block_indices {tuple(self.block_indices)} must be a "
                             "permutation of consecutive integers (one bias per up-block cross-attention)")
        for embed, heads in zip(self.embed_dims, self.heads):
            if embed % heads:
                raise ValueError(f"HybridGranularityAttention embed dim {embed} is not divisible by {heads} heads")
        super().__post_init__()

    def stage_of_branch(self) -> Tuple[int, ...]:
        """The Swin stage each branch reads."""
        stages, stage = [], 0
        for i, channels in enumerate(self.in_channels):
            stages.append(stage)
            if i + 1 < len(self.in_channels) and self.in_channels[i + 1] != channels:
                stage += 1
        return tuple(stages)

    @nn.compact
    def __call__(self, stage_features: Sequence):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        zero = dict(kernel_init=nn.initializers.zeros, bias_init=nn.initializers.zeros, **kw)
        block_class = nn.remat(BasicTransformerBlock, static_argnums=(4,)) if self.remat else BasicTransformerBlock
        stages = self.stage_of_branch()
        if len(stage_features) <= stages[-1]:
            raise ValueError(f"HybridGranularityAttention reads {stages[-1] + 1} Swin stages, got "
                             f"{len(stage_features)}")
        outputs: Dict[int, CrossAttentionResidual] = {}
        kernels = self.conv_in_kernels or (1,) * len(self.block_indices)
        for i, block_index in enumerate(self.block_indices):
            tokens = stage_features[stages[i]]
            side = _square_grid(tokens, f"Swin stage {stages[i]} (HGA branch {i})")
            if tokens.shape[-1] != self.in_channels[i]:
                raise ValueError(f"HGA branch {i} expects {self.in_channels[i]} channels from Swin stage {stages[i]}, "
                                 f"got {tokens.shape[-1]}")
            kernel = kernels[i]
            if side % kernel:
                raise ValueError(f"HGA branch {i}: the {side}x{side} grid of Swin stage {stages[i]} is not divisible "
                                 f"by its conv_in kernel {kernel}")
            batch, side_out = tokens.shape[0], side // kernel
            grid = tokens.astype(self.dtype).reshape(batch, side, side, tokens.shape[-1])
            h = nn.Conv(self.embed_dims[i], (kernel, kernel), strides=(kernel, kernel), padding="VALID",
                        name=f"zero_conv_ins_{i}", **zero)(grid)
            h = h.reshape(batch, side_out * side_out, self.embed_dims[i])
            for k in range(self.depth):
                h = block_class(self.heads[i], self.embed_dims[i] // self.heads[i], has_cross_attention=False,
                                double_self_attention=True, attention_implementation=self.attention_implementation,
                                name=f"blocks_{i}_{k}", **kw)(h, None, None, True)
            h = nn.Conv(self.out_channels[i], (1, 1), name=f"zero_conv_outs_{i}", **zero)(
                h.reshape(batch, side_out, side_out, self.embed_dims[i]))
            h = h.reshape(batch, side_out * side_out, self.out_channels[i])
            outputs[block_index] = CrossAttentionResidual(**{self.target: h})
        return tuple(outputs[index] for index in sorted(outputs))


class PoseAdapter(nn.Module):
    """H_P (the original's PoseEncoder, T2I-adapter style): PixelUnshuffle(downscale_factor), 1x1 `conv_in`
    (-> in_channels), then per stage i a diffusers ResnetBlock2D `resnets_i` (-> channels[i]; GroupNorm
    norm_num_groups groups, eps 1e-6, no time embedding, 1x1 shortcut when the width changes) whose output is
    stage feature i, followed by a 2x2 average pool before the next stage.

    pose [B, H, W, C] -> tuple of [B, H / (f 2^i), W / (f 2^i), channels[i]] (defaults: 21-channel 256x256 maps ->
    64x64x320, 32x32x640, 16x16x1280, the residuals of the UNet's down blocks 0-2)."""

    downscale_factor: int = 4
    in_channels: int = 320
    channels: Tuple[int, ...] = (320, 640, 1280)
    norm_num_groups: int = 32
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, pose):
        if pose.ndim != 4:
            raise ValueError(f"PoseAdapter input must be NHWC [B, H, W, C], got shape {pose.shape}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = pixel_unshuffle(pose.astype(self.dtype), self.downscale_factor)
        h = torch_conv(self.in_channels, 1, h.shape[-1], "conv_in", **kw)(h)
        features = []
        for i, channels in enumerate(self.channels):
            if i:
                h = nn.avg_pool(h, (2, 2), strides=(2, 2))
            h = ResnetBlock2D(channels, groups=self.norm_num_groups, eps=1e-6, name=f"resnets_{i}", **kw)(h)
            features.append(h)
        return tuple(features)


def gate_context_residuals(prompt, residuals):
    """HGA's outputs as the UNet takes them: context residuals (B1) kept only for the examples whose prompt
    [B, Q, width] is all zero (mean |c| < ZERO_PROMPT_TOLERANCE, the original's test in every cross-attention: the
    conditional zero prompt, not the learned null prompt); query biases unchanged. residuals: a tuple of
    CrossAttentionResidual or None."""
    if residuals is None:
        return None
    zero = jnp.mean(jnp.abs(prompt.astype(jnp.float32)), axis=(1, 2)) < ZERO_PROMPT_TOLERANCE
    keep = zero.astype(prompt.dtype)[:, None, None]
    return tuple(r._replace(context=None if r.context is None else r.context * keep) for r in residuals)


class CFLDConditioner(nn.Module):
    """The original's `build_model`: `backbone` (SwinModel with final_norm False; None in B2, whose prompt reads
    the image), `appearance_encoder` (HGA; None in the ablations without it, B2 - B4), `pose_encoder`
    (PoseAdapter), `decoder` (the PRD, or an ablation's prompt from pgpis_jax.models.cfld_prompts) and the null
    prompt `learnable_vector` [1, Q, width] (N(0, 1) at init). Build the full-size one with `cfld_conditioner()`.

    __call__(image [B, H, W, 3] in [-1, 1], pose [B, H', W', 21], deterministic) -> {
        "prompt": the coarse prompt c [B, Q, width],
        "null_prompt": the learned null prompt broadcast to [B, Q, width],
        "pose_residuals": tuple of the adapter's features (down_block_additional_residuals),
        "appearance_residuals": tuple of HGA's CrossAttentionResiduals for UNet blocks 3..11
        (up_cross_attention_residuals, after gate_context_residuals), or None without HGA}.
    `encode_appearance`, `encode_pose` and `null_prompt` give the parts (e.g. source appearance and target pose
    at sampling). deterministic=False enables the Swin's stochastic depth (rng stream "dropout").
    """

    backbone: Optional[SwinModel]
    appearance_encoder: Optional[HybridGranularityAttention]
    pose_encoder: PoseAdapter
    decoder: Union[PerceptionRefinedDecoder, LinearPromptDecoder, ZeroPromptDecoder, CLIPPromptDecoder]

    def setup(self):
        if self.backbone is None:
            if not isinstance(self.decoder, CLIPPromptDecoder) or self.appearance_encoder is not None:
                raise ValueError("CFLDConditioner without a backbone needs the CLIP prompt (B2) and no HGA")
        elif self.backbone.final_norm:
            raise ValueError("CFLDConditioner's backbone must have final_norm=False (CFLD's LAST_NORM False: the "
                             "decoder reads un-normalised last-stage tokens)")
        self.learnable_vector = self.param("learnable_vector", nn.initializers.normal(NULL_PROMPT_INIT_STD),
                                           (1, self.decoder.num_queries, self.decoder.width),
                                           self.decoder.param_dtype)

    def encode_appearance(self, image, deterministic: bool = True):
        """image [B, H, W, 3] -> (prompt [B, Q, width], HGA's residuals in UNet order or None without HGA)."""
        if self.backbone is None:
            return self.decoder(image), None
        stages = self.backbone(image, deterministic=deterministic)["stage_features"]
        residuals = None if self.appearance_encoder is None else self.appearance_encoder(stages)
        return self.decoder(stages[-1]), residuals

    def encode_pose(self, pose):
        """pose [B, H, W, 21] -> the adapter residuals of the UNet's down blocks."""
        return self.pose_encoder(pose)

    def null_prompt(self, batch: int):
        """The learned null prompt broadcast to [batch, Q, width] in the decoder's dtype."""
        vector = self.learnable_vector.astype(self.decoder.dtype)
        return jnp.broadcast_to(vector, (batch,) + vector.shape[1:])

    def __call__(self, image, pose, deterministic: bool = True):
        prompt, residuals = self.encode_appearance(image, deterministic)
        return {"prompt": prompt, "null_prompt": self.null_prompt(image.shape[0]),
                "pose_residuals": self.encode_pose(pose),
                "appearance_residuals": gate_context_residuals(prompt, residuals)}

    def condition_size(self) -> Tuple[int, int]:
        """(height, width) of the condition image: the backbone's image_size, or B2's CLIP's."""
        size = self.decoder.image_size if self.backbone is None else self.backbone.image_size
        return (size, size) if isinstance(size, int) else tuple(size)

    def init_params(self, rng, pose_channels: int = 21, pose_size: Optional[Tuple[int, int]] = None):
        """A fresh parameter tree (wrap in jax.eval_shape for shapes only) from dummy inputs at condition_size();
        the pose map has the same size unless pose_size is given (B2's 224x224 condition, 256x256 poses)."""
        height, width = self.condition_size()
        image = jnp.zeros((1, height, width, 3), self.decoder.dtype)
        pose = jnp.zeros((1,) + tuple(pose_size or (height, width)) + (pose_channels,), self.decoder.dtype)
        return self.init(rng, image, pose)["params"]


def cfld_conditioner(attention_implementation: str = "xla", remat: bool = False, dtype=jnp.float32,
                     param_dtype=jnp.float32) -> CFLDConditioner:
    """CFLD's full-size conditioner (defaults/deepfashion.py): Swin-B window 16 at 256x256 without the final norm
    (drop path 0.2), HGA with K = 4 layers, the adapter [320, 640, 1280], the decoder R = 8, Q = 16, width 768,
    24 heads. remat recomputes the decoder's and HGA's transformer blocks in the backward pass."""
    kw = dict(attention_implementation=attention_implementation, dtype=dtype, param_dtype=param_dtype)
    backbone = SwinModel.from_config(CFLD_SWIN_B_CONFIG, final_norm=False, add_pooling_layer=False, **kw)
    return CFLDConditioner(backbone=backbone, appearance_encoder=HybridGranularityAttention(remat=remat, **kw),
                           pose_encoder=PoseAdapter(dtype=dtype, param_dtype=param_dtype),
                           decoder=PerceptionRefinedDecoder(remat=remat, **kw))
