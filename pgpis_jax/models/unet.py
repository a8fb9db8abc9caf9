"""The Stable Diffusion UNet (diffusers' `UNet2DConditionModel`) in linen, NHWC, with diffusers' parameter
names, so that `pgpis_jax.weights.pytorch.state_dict_to_params(torch_unet.state_dict())` is its params tree.

Supported: the SD 1.x / 2.x family (CrossAttnDownBlock2D / DownBlock2D, UNetMidBlock2DCrossAttn,
CrossAttnUpBlock2D / UpBlock2D, conv or linear transformer projections, per-block heads / layers /
transformer depth, class_embed_type None, "projection" or FPDM's "mlp"), plus the hooks the PGPIS methods need:
`conv_in_residual` (PCDMs / FPDM pose features added after conv_in), `down_block_additional_residuals` and
`mid_block_additional_residual` (T2I-adapter or ControlNet residuals, diffusers' semantics) and
`up_cross_attention_residuals` (CFLD's hybrid-granularity attention). Any other diffusers option at a
non-default value raises ValueError naming the key.

Initialisation: every convolution and linear layer starts from torch's default init (U(-1/sqrt(fan_in),
1/sqrt(fan_in)) for weights and biases, pgpis_jax.nn.initializers), norms from ones and zeros, as diffusers'
UNet2DConditionModel does; this matters for the layers PCDMs creates fresh on top of SD 2.1 (conv_in of
another width, the projection class embedding) and for UNets trained from scratch.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from pgpis_jax.nn.attention import IMPLEMENTATIONS
from pgpis_jax.nn.embeddings import MLPClassEmbedding, TimestepEmbedding, get_timestep_embedding
from pgpis_jax.nn.initializers import torch_default_kernel_init
from pgpis_jax.nn.resnet import Downsample2D, GroupNorm, ResnetBlock2D, Upsample2D, conv3x3
from pgpis_jax.nn.transformer import Transformer2DModel

IntOrTuple = Union[int, Tuple[int, ...]]

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn",)
# "mlp" is not diffusers': FPDM's modified UNet (pgpis_jax.nn.embeddings.MLPClassEmbedding).
CLASS_EMBED_TYPES = (None, "projection", "mlp")

# diffusers config keys that we support only at these values (the first is diffusers' default).
_FIXED_CONFIG = {
    "reverse_transformer_layers_per_block": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "addition_embed_type": (None,),
    "addition_time_embed_dim": (None,),
    "num_class_embeds": (None,),
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1.0,),
    "time_embedding_type": ("positional",),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "attention_type": ("default",),
    "class_embeddings_concat": (False,),
    "mid_block_only_cross_attention": (None, False),
    "cross_attention_norm": (None,),
}
# diffusers config keys without effect under the supported options (used only with addition_embed_type).
_INERT_CONFIG = ("addition_embed_type_num_heads",)


def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def _same(value, allowed) -> bool:
    if allowed is None or isinstance(allowed, bool):
        return value is allowed
    if isinstance(allowed, (int, float)):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and value == allowed
    return value == allowed


def _per_block(value, n: int, key: str) -> tuple:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"UNet config {key!r} has {len(value)} entries but the UNet has {n} blocks")
        return tuple(value)
    return (value,) * n


def _add(x, residual, what: str):
    """x + residual (cast to x's dtype); the residual may broadcast but must not change x's shape."""
    residual = jnp.asarray(residual)
    try:
        shape = jnp.broadcast_shapes(x.shape, residual.shape)
    except ValueError:
        shape = None
    if shape != x.shape:
        raise ValueError(f"{what} has shape {residual.shape}, which does not add onto the UNet activation of "
                         f"shape {x.shape}")
    return x + residual.astype(x.dtype)


# ------------------------------------------------------------------------------------------------- blocks


class _BlockBase(nn.Module):
    out_channels: int
    num_layers: int = 1
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    dropout: float = 0.0
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def _resnet(self, i: int, **kwargs):
        return ResnetBlock2D(self.out_channels, groups=self.norm_num_groups, eps=self.norm_eps,
                             dropout=self.dropout, dtype=self.dtype, param_dtype=self.param_dtype,
                             name=f"resnets_{i}", **kwargs)


    def _downsample(self, hidden, skips):
        """(add_downsample) the stride-2 conv `downsamplers_0`, whose output is also the last skip."""
        if not self.add_downsample:
            return hidden, skips
        hidden = Downsample2D(self.out_channels, padding=self.downsample_padding, dtype=self.dtype,
                              param_dtype=self.param_dtype, name="downsamplers_0")(hidden)
        return hidden, skips + (hidden,)


class _CrossAttnBase(_BlockBase):
    heads: int = 8
    transformer_layers: int = 1
    use_linear_projection: bool = False
    attention_implementation: str = "xla"

    def _transformer(self, i: int):
        return Transformer2DModel(self.heads, self.out_channels // self.heads, num_layers=self.transformer_layers,
                                  norm_num_groups=self.norm_num_groups,
                                  use_linear_projection=self.use_linear_projection,
                                  attention_implementation=self.attention_implementation, dtype=self.dtype,
                                  param_dtype=self.param_dtype, name=f"attentions_{i}")


class DownBlock2D(_BlockBase):
    """`num_layers` ResNet blocks, then (add_downsample) a stride-2 conv `downsamplers_0`. Returns the output
    and the tuple of skip activations (each resnet output, then the downsampled one)."""

    add_downsample: bool = True
    downsample_padding: int = 1
    has_cross_attention = False

    @nn.compact
    def __call__(self, hidden, temb, deterministic: bool = True):
        skips = ()
        for i in range(self.num_layers):
            hidden = self._resnet(i)(hidden, temb, deterministic)
            skips += (hidden,)
        return self._downsample(hidden, skips)


class CrossAttnDownBlock2D(_CrossAttnBase):
    """`num_layers` x (ResNet block, Transformer2DModel), then (add_downsample) `downsamplers_0`.
    additional_residual (T2I-adapter) is added after the last (resnet, transformer) pair, before the
    downsampler, and the sum is also that pair's skip activation."""

    add_downsample: bool = True
    downsample_padding: int = 1
    has_cross_attention = True

    @nn.compact
    def __call__(self, hidden, temb, context, additional_residual=None, deterministic: bool = True):
        skips = ()
        for i in range(self.num_layers):
            hidden = self._resnet(i)(hidden, temb, deterministic)
            hidden = self._transformer(i)(hidden, context, None, deterministic)
            if i == self.num_layers - 1 and additional_residual is not None:
                hidden = _add(hidden, additional_residual, "a down_block_additional_residuals entry")
            skips += (hidden,)
        return self._downsample(hidden, skips)


class UNetMidBlock2DCrossAttn(_CrossAttnBase):
    """ResNet block, then `num_layers` x (Transformer2DModel, ResNet block); resnets divide by
    output_scale_factor (the UNet's mid_block_scale_factor)."""

    output_scale_factor: float = 1.0
    has_cross_attention = True

    @nn.compact
    def __call__(self, hidden, temb, context, deterministic: bool = True):
        resnet = dict(output_scale_factor=self.output_scale_factor)
        hidden = self._resnet(0, **resnet)(hidden, temb, deterministic)
        for i in range(self.num_layers):
            hidden = self._transformer(i)(hidden, context, None, deterministic)
            hidden = self._resnet(i + 1, **resnet)(hidden, temb, deterministic)
        return hidden


class UpBlock2D(_BlockBase):
    """`num_layers` ResNet blocks, each on [hidden, last remaining skip] concatenated on channels, then
    (add_upsample) nearest x2 (or to upsample_size) + conv `upsamplers_0`."""

    add_upsample: bool = True
    has_cross_attention = False

    @nn.compact
    def __call__(self, hidden, res_hidden_states, temb, upsample_size=None, deterministic: bool = True):
        skips = tuple(res_hidden_states)
        for i in range(self.num_layers):
            hidden = jnp.concatenate([hidden, skips[-1].astype(hidden.dtype)], axis=-1)
            skips = skips[:-1]
            hidden = self._resnet(i)(hidden, temb, deterministic)
        if self.add_upsample:
            hidden = Upsample2D(self.out_channels, dtype=self.dtype, param_dtype=self.param_dtype,
                                name="upsamplers_0")(hidden, upsample_size)
        return hidden


class CrossAttnUpBlock2D(_CrossAttnBase):
    """UpBlock2D with a Transformer2DModel after each ResNet block. residuals: None or one entry per
    transformer block of this up block, in execution order (CrossAttentionResidual or None), for its
    cross-attention."""

    add_upsample: bool = True
    has_cross_attention = True

    @nn.compact
    def __call__(self, hidden, res_hidden_states, temb, context, residuals=None, upsample_size=None,
                 deterministic: bool = True):
        skips = tuple(res_hidden_states)
        per_layer = self.transformer_layers
        if residuals is None:
            residuals = (None,) * (self.num_layers * per_layer)
        for i in range(self.num_layers):
            hidden = jnp.concatenate([hidden, skips[-1].astype(hidden.dtype)], axis=-1)
            skips = skips[:-1]
            hidden = self._resnet(i)(hidden, temb, deterministic)
            layer_residuals = tuple(residuals[i * per_layer:(i + 1) * per_layer])
            hidden = self._transformer(i)(hidden, context, layer_residuals, deterministic)
        if self.add_upsample:
            hidden = Upsample2D(self.out_channels, dtype=self.dtype, param_dtype=self.param_dtype,
                                name="upsamplers_0")(hidden, upsample_size)
        return hidden


# Positions (self = 0) of the static (non-array) arguments of each block's __call__, for nn.remat.
_STATIC_ARGNUMS = {
    DownBlock2D: (3,),
    CrossAttnDownBlock2D: (5,),
    UNetMidBlock2DCrossAttn: (4,),
    UpBlock2D: (4, 5),
    CrossAttnUpBlock2D: (6, 7),
}


# --------------------------------------------------------------------------------------------------- UNet

# UNet2DConditionModel fields that are ours, not diffusers config keys.
_OWN_FIELDS = ("attention_implementation", "remat", "dtype", "param_dtype")


class UNet2DConditionModel(nn.Module):
    """diffusers' `UNet2DConditionModel` (0.42 semantics), NHWC. Fields named as diffusers' config keys take
    diffusers' defaults (the SD 1.x layout); `from_config` builds one from a diffusers config.json dict.

    Note diffusers' naming quirk: with num_attention_heads None (the only value diffusers accepts),
    attention_head_dim is the number of HEADS per block (int or per-block tuple); the head width is
    channels // heads.

    Our own fields: attention_implementation (one of pgpis_jax.nn.attention.IMPLEMENTATIONS, for every
    attention), remat (wrap each down / mid / up block in nn.remat), dtype (compute) and param_dtype.
    """

    sample_size: Optional[IntOrTuple] = None
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    down_block_types: Tuple[str, ...] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                         "DownBlock2D")
    mid_block_type: Optional[str] = "UNetMidBlock2DCrossAttn"
    up_block_types: Tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                       "CrossAttnUpBlock2D")
    only_cross_attention: Union[bool, Tuple[bool, ...]] = False
    block_out_channels: Tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: IntOrTuple = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    dropout: float = 0.0
    act_fn: str = "silu"
    norm_num_groups: Optional[int] = 32
    norm_eps: float = 1e-5
    cross_attention_dim: IntOrTuple = 1280
    transformer_layers_per_block: IntOrTuple = 1
    attention_head_dim: IntOrTuple = 8
    num_attention_heads: Optional[IntOrTuple] = None
    dual_cross_attention: bool = False
    use_linear_projection: bool = False
    class_embed_type: Optional[str] = None
    projection_class_embeddings_input_dim: Optional[int] = None
    upcast_attention: bool = False  # accepted; attention logits and softmax are always float32 here
    time_embedding_dim: Optional[int] = None

    attention_implementation: str = "xla"
    remat: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    # ------------------------------------------------------------------------------------------ config

    def __post_init__(self):
        self._validate()
        super().__post_init__()

    def _validate(self):
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(f"UNet config: down_block_types ({len(self.down_block_types)}), up_block_types "
                             f"({len(self.up_block_types)}) and block_out_channels ({n}) must have the same length")
        for key, allowed in (("down_block_types", DOWN_BLOCK_TYPES), ("up_block_types", UP_BLOCK_TYPES)):
            for block in getattr(self, key):
                if block not in allowed:
                    raise ValueError(f"UNet config {key!r}: block type {block!r} is not supported; "
                                     f"expected one of {allowed}")

        def unsupported(key, expected):
            return ValueError(f"UNet config {key!r}={getattr(self, key)!r} is not supported; expected {expected}")

        if self.mid_block_type not in MID_BLOCK_TYPES:
            raise unsupported("mid_block_type", " or ".join(map(repr, MID_BLOCK_TYPES)))
        if any(_per_block(self.only_cross_attention, n, "only_cross_attention")):
            raise unsupported("only_cross_attention", "False")
        if self.dual_cross_attention:
            raise unsupported("dual_cross_attention", "False")
        if self.num_attention_heads is not None:  # diffusers' UNet2DConditionModel rejects it too
            raise unsupported("num_attention_heads", "None (attention_head_dim gives the number of heads)")
        if self.act_fn not in ("silu", "swish"):
            raise unsupported("act_fn", "'silu'")
        if not isinstance(self.norm_num_groups, int):
            raise unsupported("norm_num_groups", "an int")
        if self.class_embed_type not in CLASS_EMBED_TYPES:
            raise unsupported("class_embed_type", "None, 'projection' or 'mlp'")
        if not isinstance(self.cross_attention_dim, int):
            raise unsupported("cross_attention_dim", "an int")
        if self.downsample_padding not in (0, 1):
            raise unsupported("downsample_padding", "0 or 1")
        if not all(isinstance(v, int) for v in _per_block(self.transformer_layers_per_block, n,
                                                           "transformer_layers_per_block")):
            raise unsupported("transformer_layers_per_block", "an int or a tuple of ints, one per block")
        if self.attention_implementation not in IMPLEMENTATIONS:
            raise unsupported("attention_implementation", " or ".join(map(repr, IMPLEMENTATIONS)))
        if self.class_embed_type is not None and self.projection_class_embeddings_input_dim is None:
            raise ValueError(f"UNet config class_embed_type={self.class_embed_type!r} needs "
                             "'projection_class_embeddings_input_dim'")
        _per_block(self.layers_per_block, n, "layers_per_block")
        _per_block(self.attention_head_dim, n, "attention_head_dim")

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **kwargs) -> "UNet2DConditionModel":
        """The module for a diffusers UNet2DConditionModel config (the dict of its config.json). Keys starting
        with "_" (diffusers metadata) are skipped; an unknown key, or a known one at a value we do not
        support, raises ValueError naming it. kwargs set our own fields (dtype, param_dtype,
        attention_implementation, remat) or override config keys."""
        fields = {f.name for f in dataclasses.fields(cls)} - {"parent", "name"} - set(_OWN_FIELDS)
        arguments = {}
        for key, value in config.items():
            if key.startswith("_"):
                continue
            value = _as_tuple(value)
            if key in _FIXED_CONFIG:
                if not any(_same(value, allowed) for allowed in _FIXED_CONFIG[key]):
                    raise ValueError(f"UNet config {key!r}={value!r} is not supported; expected "
                                     f"{' or '.join(map(repr, _FIXED_CONFIG[key]))}")
            elif key in _INERT_CONFIG:
                continue
            elif key in fields:
                arguments[key] = value
            else:
                raise ValueError(f"unknown UNet2DConditionModel config key {key!r}")
        arguments.update(kwargs)
        return cls(**arguments)

    def to_config(self) -> dict:
        """diffusers' config.json content for this module: `_class_name` and every config-key field."""
        config = {"_class_name": "UNet2DConditionModel"}
        for field in dataclasses.fields(self):
            if field.name not in _OWN_FIELDS and field.name not in ("parent", "name"):
                value = getattr(self, field.name)
                config[field.name] = list(value) if isinstance(value, tuple) else value
        return config

    def init_params(self, rng):
        """A fresh parameter tree (wrap in jax.eval_shape for shapes only) from minimal dummy inputs."""
        size = 2 ** (len(self.block_out_channels) - 1)
        class_labels = None
        if self.class_embed_type is not None:
            class_labels = jnp.zeros((1, self.projection_class_embeddings_input_dim), self.dtype)
        return self.init(rng, jnp.zeros((1, size, size, self.in_channels), self.dtype), jnp.zeros((1,), jnp.int32),
                         jnp.zeros((1, 1, self.cross_attention_dim), self.dtype), class_labels=class_labels)["params"]

    # ------------------------------------------------------------------------------------------- counts

    def _layout(self):
        n = len(self.block_out_channels)
        return (n, _per_block(self.attention_head_dim, n, "attention_head_dim"),
                _per_block(self.layers_per_block, n, "layers_per_block"),
                _per_block(self.transformer_layers_per_block, n, "transformer_layers_per_block"))

    @property
    def num_up_cross_attention_layers(self) -> int:
        """How many entries `up_cross_attention_residuals` takes: the transformer blocks of the up blocks."""
        n, _, layers, tlayers = self._layout()
        return sum((layers[n - 1 - i] + 1) * tlayers[n - 1 - i]
                   for i, block in enumerate(self.up_block_types) if block == "CrossAttnUpBlock2D")

    # ------------------------------------------------------------------------------------------ forward

    def _block(self, cls):
        return nn.remat(cls, static_argnums=_STATIC_ARGNUMS[cls]) if self.remat else cls

    @nn.compact
    def __call__(self, sample, timestep, encoder_hidden_states, class_labels=None,
                 down_block_additional_residuals: Optional[Sequence[Any]] = None,
                 mid_block_additional_residual=None, conv_in_residual=None,
                 up_cross_attention_residuals: Optional[Sequence[Any]] = None, deterministic: bool = True):
        """sample [B, H, W, in_channels]; timestep scalar or [B] (int or float); encoder_hidden_states
        [B, L, cross_attention_dim]; class_labels [B, projection_class_embeddings_input_dim] (with a class
        embedding only: "projection" or FPDM's "mlp", whose dropout follows `deterministic`; either is added to
        the time embedding). Returns [B, H, W, out_channels] in `dtype`.

        conv_in_residual [B, H, W, block_out_channels[0]] is added right after conv_in (the sum is also the
        first skip). down_block_additional_residuals without mid_block_additional_residual: T2I-adapter
        residuals, consumed in order: by each CrossAttnDownBlock2D inside the block (after its last
        resnet/transformer pair, before the downsampler), by each DownBlock2D after the block (output and its
        last skip), then by the mid block output if one is left with its shape; all must be used. With
        mid_block_additional_residual: ControlNet residuals, one per skip activation, added to the skips, and
        the mid residual added to the mid block output. up_cross_attention_residuals: one entry per up-block
        transformer block, in execution order (`num_up_cross_attention_layers`), each a CrossAttentionResidual
        (pgpis_jax.nn.attention: a query bias [B, H*W, inner] added after to_q, a context residual
        [B, L, cross_attention_dim] added to encoder_hidden_states before to_k / to_v) or None.
        """
        n, heads, layers, tlayers = self._layout()
        channels = self.block_out_channels
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        block_kw = dict(norm_num_groups=self.norm_num_groups, norm_eps=self.norm_eps, dropout=self.dropout, **kw)
        attention_kw = dict(use_linear_projection=self.use_linear_projection,
                            attention_implementation=self.attention_implementation)

        if sample.ndim != 4 or sample.shape[-1] != self.in_channels:
            raise ValueError(f"UNet sample must be NHWC with {self.in_channels} channels, got shape {sample.shape}")
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[-1] != self.cross_attention_dim:
            raise ValueError(f"encoder_hidden_states must be [B, L, {self.cross_attention_dim}], got shape "
                             f"{encoder_hidden_states.shape}")
        batch = sample.shape[0]
        forward_upsample_size = any(d % 2 ** (n - 1) for d in sample.shape[1:3])

        # 1. time (and class) embedding
        if self.center_input_sample:
            sample = 2 * sample - 1.0
        timesteps = jnp.asarray(timestep)
        timesteps = jnp.broadcast_to(timesteps.reshape(-1) if timesteps.ndim else timesteps[None], (batch,))
        t_emb = get_timestep_embedding(timesteps, channels[0], flip_sin_to_cos=self.flip_sin_to_cos,
                                       downscale_freq_shift=self.freq_shift).astype(self.dtype)
        time_embed_dim = self.time_embedding_dim or channels[0] * 4
        emb = TimestepEmbedding(time_embed_dim, name="time_embedding", **kw)(t_emb)
        if self.class_embed_type is not None:
            if class_labels is None:
                raise ValueError(f"class_labels must be given: this UNet has a {self.class_embed_type!r} class "
                                 "embedding")
            class_labels = jnp.asarray(class_labels).astype(self.dtype)
            if class_labels.shape != (batch, self.projection_class_embeddings_input_dim):
                raise ValueError(f"class_labels must be [B, {self.projection_class_embeddings_input_dim}] with "
                                 f"B = {batch}, got shape {class_labels.shape}")
            if self.class_embed_type == "projection":
                emb = emb + TimestepEmbedding(time_embed_dim, name="class_embedding", **kw)(class_labels)
            else:
                emb = emb + MLPClassEmbedding(time_embed_dim, name="class_embedding", **kw)(class_labels,
                                                                                           deterministic)
        elif class_labels is not None:
            raise ValueError("class_labels were given but this UNet has no class embedding (class_embed_type None)")

        # 2. hooks: which residual mode
        if mid_block_additional_residual is not None and down_block_additional_residuals is None:
            raise ValueError("mid_block_additional_residual needs down_block_additional_residuals (ControlNet mode)")
        controlnet = mid_block_additional_residual is not None
        adapter = [] if controlnet or down_block_additional_residuals is None else list(
            down_block_additional_residuals)
        up_residuals = up_cross_attention_residuals
        if up_residuals is not None:
            up_residuals = tuple(up_residuals)
            if len(up_residuals) != self.num_up_cross_attention_layers:
                raise ValueError(f"up_cross_attention_residuals needs {self.num_up_cross_attention_layers} entries "
                                 f"(one per up-block cross-attention layer), got {len(up_residuals)}")

        # 3. conv_in and down blocks
        hidden = conv3x3(channels[0], self.in_channels, self.dtype, self.param_dtype, "conv_in")(sample)
        if conv_in_residual is not None:
            hidden = _add(hidden, conv_in_residual, "conv_in_residual")
        skips = (hidden,)
        for i, block_type in enumerate(self.down_block_types):
            common = dict(out_channels=channels[i], num_layers=layers[i], add_downsample=i < n - 1,
                          downsample_padding=self.downsample_padding, name=f"down_blocks_{i}", **block_kw)
            if block_type == "CrossAttnDownBlock2D":
                residual = adapter.pop(0) if adapter else None
                block = self._block(CrossAttnDownBlock2D)(heads=heads[i], transformer_layers=tlayers[i],
                                                          **attention_kw, **common)
                hidden, block_skips = block(hidden, emb, encoder_hidden_states, residual, deterministic)
            else:
                hidden, block_skips = self._block(DownBlock2D)(**common)(hidden, emb, deterministic)
                if adapter:
                    # diffusers adds in place, so the block's last skip (the same tensor) changes too
                    hidden = _add(hidden, adapter.pop(0), "a down_block_additional_residuals entry")
                    block_skips = block_skips[:-1] + (hidden,)
            skips += block_skips

        if controlnet:
            residuals = tuple(down_block_additional_residuals)
            if len(residuals) != len(skips):
                raise ValueError(f"down_block_additional_residuals (ControlNet mode) needs {len(skips)} entries, "
                                 f"one per skip activation, got {len(residuals)}")
            skips = tuple(_add(s, r, f"down_block_additional_residuals[{j}]")
                          for j, (s, r) in enumerate(zip(skips, residuals)))

        # 4. mid block
        mid = self._block(UNetMidBlock2DCrossAttn)(out_channels=channels[-1], heads=heads[-1],
                                                    transformer_layers=tlayers[-1],
                                                    output_scale_factor=self.mid_block_scale_factor,
                                                    name="mid_block", **attention_kw, **block_kw)
        hidden = mid(hidden, emb, encoder_hidden_states, deterministic)
        if adapter and tuple(np.shape(adapter[0])) == hidden.shape:
            hidden = _add(hidden, adapter.pop(0), "a down_block_additional_residuals entry")
        if adapter:
            raise ValueError(f"{len(adapter)} of the down_block_additional_residuals (adapter mode) were not used: "
                             "there is one per down block, then one for the mid block output (with its shape)")
        if controlnet:
            hidden = _add(hidden, mid_block_additional_residual, "mid_block_additional_residual")

        # 5. up blocks
        upsample_size = None
        residual_index = 0
        for i, block_type in enumerate(self.up_block_types):
            j = n - 1 - i  # the matching down level
            num_layers = layers[j] + 1
            block_skips, skips = skips[-num_layers:], skips[:-num_layers]
            final = i == n - 1
            if not final and forward_upsample_size:
                upsample_size = tuple(skips[-1].shape[1:3])
            common = dict(out_channels=channels[j], num_layers=num_layers, add_upsample=not final,
                          name=f"up_blocks_{i}", **block_kw)
            if block_type == "CrossAttnUpBlock2D":
                count = num_layers * tlayers[j]
                block_residuals = None if up_residuals is None else \
                    up_residuals[residual_index:residual_index + count]
                residual_index += count
                block = self._block(CrossAttnUpBlock2D)(heads=heads[j], transformer_layers=tlayers[j],
                                                        **attention_kw, **common)
                hidden = block(hidden, block_skips, emb, encoder_hidden_states, block_residuals, upsample_size,
                               deterministic)
            else:
                hidden = self._block(UpBlock2D)(**common)(hidden, block_skips, emb, upsample_size, deterministic)

        # 6. output
        hidden = GroupNorm(self.norm_num_groups, self.norm_eps, name="conv_norm_out", **kw)(hidden)
        return conv3x3(self.out_channels, channels[0], self.dtype, self.param_dtype, "conv_out")(nn.silu(hidden))



# ------------------------------------------------------------------------------------------------ weights


def widen_conv_in(params: Mapping[str, Any], new_in_channels: int, mode: str, rng=None) -> dict:
    """UNet params with `conv_in` taking new_in_channels input channels (a shallow copy; others shared).

    mode "zeros": the pretrained kernel is kept for the first channels and the new channels get zero weights,
        so the extra inputs contribute nothing until trained (new_in_channels >= the old count).
    mode "random": the kernel is drawn afresh like torch's default Conv2d init, U(-1/sqrt(fan_in),
        1/sqrt(fan_in)) with fan_in = new_in_channels * 3 * 3, from `rng`; the pretrained bias is kept. This is
        what diffusers' from_pretrained(..., in_channels=N, ignore_mismatched_sizes=True,
        low_cpu_mem_usage=False) gives (PCDMs): only conv_in.weight mismatches in shape, so only it stays
        randomly initialised, while conv_in.bias is loaded.
    """
    if "conv_in" not in params:
        raise ValueError("widen_conv_in: params has no 'conv_in'; pass the UNet's params tree (variables['params'])")
    conv = params["conv_in"]
    kernel = jnp.asarray(conv["kernel"])
    kh, kw, old_in, out = kernel.shape
    if mode == "zeros":
        if new_in_channels < old_in:
            raise ValueError(f"widen_conv_in: mode 'zeros' cannot narrow conv_in from {old_in} to "
                             f"{new_in_channels} input channels")
        new_kernel = jnp.zeros((kh, kw, new_in_channels, out), kernel.dtype).at[:, :, :old_in].set(kernel)
    elif mode == "random":
        if rng is None:
            raise ValueError("widen_conv_in: mode 'random' needs an rng key")
        new_kernel = torch_default_kernel_init(rng, (kh, kw, new_in_channels, out)).astype(kernel.dtype)
    else:
        raise ValueError(f"widen_conv_in: mode {mode!r} is not supported; expected 'zeros' or 'random'")
    widened = dict(params)
    widened["conv_in"] = {**conv, "kernel": new_kernel}
    return widened
