"""diffusers' `AutoencoderKL` (the Stable Diffusion VAE) in linen, NHWC, with diffusers' parameter names.

`pgpis_jax.weights.pytorch.state_dict_to_params(vae.state_dict())` of a diffusers `AutoencoderKL` is the
parameter tree of the `AutoencoderKL` below built from the same config (`AutoencoderKL.from_config`):

  encoder/conv_in, encoder/down_blocks_{i}/resnets_{j}, encoder/down_blocks_{i}/downsamplers_0/conv,
  encoder/mid_block/{resnets_0, attentions_0, resnets_1}, encoder/conv_norm_out, encoder/conv_out,
  quant_conv, post_quant_conv,
  decoder/conv_in, decoder/mid_block/..., decoder/up_blocks_{i}/resnets_{j}, decoder/up_blocks_{i}/upsamplers_0/conv,
  decoder/conv_norm_out, decoder/conv_out.

Usage:
  vae = AutoencoderKL.from_config(config)                       # config: diffusers' config.json as a dict
  posterior = vae.apply({"params": p}, x, method="encode")      # x [B, H, W, in_channels] in [-1, 1]
  z = posterior.sample(rng) * vae.scaling_factor                 # or posterior.mode(); [B, H/f, W/f, latent]
  image = vae.apply({"params": p}, z / vae.scaling_factor, method="decode")

Only the blocks of the KL autoencoders of Stable Diffusion 1.x / 2.x / XL / 3 are built
(DownEncoderBlock2D, UpDecoderBlock2D, SiLU, group norm); other config values raise ValueError naming
the key. Differences from diffusers: the posterior's mean and logvar are returned in float32 whatever
the compute dtype (they feed fp32 diffusion math); tiling and slicing are not implemented (batch slicing
is the caller's `lax.map`); `force_upcast`, `shift_factor`, `latents_mean` and `latents_std` are kept as
attributes for pipelines and do not change the network, as in diffusers. Convolutions and linear layers start
from torch's default init (pgpis_jax.nn.initializers), as diffusers' do.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Tuple, Union

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from pgpis_jax.nn.attention import IMPLEMENTATIONS, Attention
from pgpis_jax.nn.initializers import torch_conv
from pgpis_jax.nn.resnet import Downsample2D, GroupNorm, ResnetBlock2D, Upsample2D, conv3x3

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0
VAE_EPS = 1e-6  # diffusers' Encoder and Decoder use eps 1e-6 for every norm
DOWN_BLOCK = "DownEncoderBlock2D"
UP_BLOCK = "UpDecoderBlock2D"
ACTIVATIONS = ("silu", "swish")  # the same function in diffusers' get_activation


# ------------------------------------------------------------------------------------------- posterior

def sample_posterior(mean, logvar, rng):
    """A draw from N(mean, exp(logvar)): mean + exp(0.5 * clip(logvar, -30, 20)) * noise, with
    noise = jax.random.normal(rng, mean.shape, mean.dtype)."""
    logvar = jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)
    noise = jax.random.normal(rng, mean.shape, mean.dtype)
    return mean + jnp.exp(0.5 * logvar) * noise


@flax.struct.dataclass
class DiagonalGaussian:
    """diffusers' `DiagonalGaussianDistribution` on NHWC moments (a pytree: it passes through jit).

    mean, logvar [B, h, w, latent_channels]; logvar is already clipped to [-30, 20] when made by
    `from_moments` (as diffusers clips it in its constructor)."""

    mean: jax.Array
    logvar: jax.Array

    @classmethod
    def from_moments(cls, moments) -> "DiagonalGaussian":
        """From the concatenated [mean, logvar] channels (the quant_conv output), as torch.chunk(.., 2, dim=1)."""
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return cls(mean=mean, logvar=jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX))

    @property
    def std(self):
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self):
        return jnp.exp(self.logvar)

    def mode(self):
        return self.mean

    def sample(self, rng):
        return sample_posterior(self.mean, self.logvar, rng)

    def kl(self, other: Optional["DiagonalGaussian"] = None):
        """KL(self || other), other = N(0, I) by default, summed over h, w and channels -> [B]."""
        if other is None:
            terms = jnp.square(self.mean) + self.var - 1.0 - self.logvar
        else:
            terms = (jnp.square(self.mean - other.mean) / other.var + self.var / other.var - 1.0
                     - self.logvar + other.logvar)
        return 0.5 * jnp.sum(terms, axis=(1, 2, 3))


# ---------------------------------------------------------------------------------------------- blocks

class DownEncoderBlock2D(nn.Module):
    """`num_layers` ResnetBlock2D (no time embedding) `resnets_{i}`, then optionally the stride-2
    `downsamplers_0` (padding 0: pad bottom/right only, as the VAE encoder does)."""

    out_channels: int
    num_layers: int = 1
    resnet_eps: float = 1e-6
    resnet_groups: int = 32
    dropout: float = 0.0
    output_scale_factor: float = 1.0
    add_downsample: bool = True
    downsample_padding: int = 1
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        for i in range(self.num_layers):
            x = ResnetBlock2D(self.out_channels, groups=self.resnet_groups, eps=self.resnet_eps, dropout=self.dropout,
                              output_scale_factor=self.output_scale_factor, dtype=self.dtype,
                              param_dtype=self.param_dtype, name=f"resnets_{i}")(x, deterministic=deterministic)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, padding=self.downsample_padding, dtype=self.dtype,
                             param_dtype=self.param_dtype, name="downsamplers_0")(x)
        return x


class UpDecoderBlock2D(nn.Module):
    """`num_layers` ResnetBlock2D `resnets_{i}` (temb optional), then optionally the nearest x2 +
    conv `upsamplers_0`."""

    out_channels: int
    num_layers: int = 1
    resnet_eps: float = 1e-6
    resnet_groups: int = 32
    dropout: float = 0.0
    output_scale_factor: float = 1.0
    add_upsample: bool = True
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb=None, deterministic: bool = True):
        for i in range(self.num_layers):
            x = ResnetBlock2D(self.out_channels, groups=self.resnet_groups, eps=self.resnet_eps, dropout=self.dropout,
                              output_scale_factor=self.output_scale_factor, dtype=self.dtype,
                              param_dtype=self.param_dtype, name=f"resnets_{i}")(x, temb, deterministic=deterministic)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, dtype=self.dtype, param_dtype=self.param_dtype, name="upsamplers_0")(x)
        return x


class UNetMidBlock2D(nn.Module):
    """`resnets_0`, then `num_layers` x (spatial self-attention `attentions_{i}`, `resnets_{i+1}`), all at the
    input's channel count. Attention: channels // attention_head_dim heads (attention_head_dim None: one
    head over all channels), biased projections, group norm with attn_groups (None: resnet_groups) groups
    and eps resnet_eps, residual connection, output divided by output_scale_factor."""

    num_layers: int = 1
    resnet_eps: float = 1e-6
    resnet_groups: int = 32
    attn_groups: Optional[int] = None
    add_attention: bool = True
    attention_head_dim: Optional[int] = None
    dropout: float = 0.0
    output_scale_factor: float = 1.0
    attention_implementation: str = "xla"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb=None, deterministic: bool = True):
        channels = x.shape[-1]
        head_dim = self.attention_head_dim or channels
        if channels % head_dim:
            raise ValueError(f"UNetMidBlock2D: {channels} channels do not split into heads of {head_dim}")

        def resnet(i, h):
            return ResnetBlock2D(channels, groups=self.resnet_groups, eps=self.resnet_eps, dropout=self.dropout,
                                 output_scale_factor=self.output_scale_factor, dtype=self.dtype,
                                 param_dtype=self.param_dtype, name=f"resnets_{i}")(h, temb, deterministic=deterministic)

        x = resnet(0, x)
        for i in range(self.num_layers):
            if self.add_attention:
                x = Attention(heads=channels // head_dim, dim_head=head_dim, use_bias=True,
                              norm_num_groups=self.attn_groups or self.resnet_groups, norm_eps=self.resnet_eps,
                              residual_connection=True, rescale_output_factor=self.output_scale_factor,
                              implementation=self.attention_implementation, dtype=self.dtype,
                              param_dtype=self.param_dtype, name=f"attentions_{i}")(x)
            x = resnet(i + 1, x)
        return x


def _maybe_remat(cls, remat: bool):
    """nn.remat(cls) when remat (the blocks are called with the array argument only)."""
    return nn.remat(cls) if remat else cls


def _mid_block(coder, **kw):
    """The `mid_block` (UNetMidBlock2D) of an Encoder or Decoder, built from that coder's fields."""
    return _maybe_remat(UNetMidBlock2D, coder.remat)(
        resnet_eps=VAE_EPS, resnet_groups=coder.norm_num_groups, add_attention=coder.mid_block_add_attention,
        attention_head_dim=coder.block_out_channels[-1], attention_implementation=coder.attention_implementation,
        name="mid_block", **kw)


class Encoder(nn.Module):
    """diffusers' VAE `Encoder`: conv_in, one DownEncoderBlock2D per entry of block_out_channels (all but the
    last downsample), mid block, GroupNorm-SiLU-conv_out to 2 * out_channels (double_z) or out_channels.
    x [B, H, W, C] -> [B, H / 2^(n-1), W / 2^(n-1), (2 *) out_channels]. remat: each block in nn.remat."""

    out_channels: int = 3
    block_out_channels: Tuple[int, ...] = (64,)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    double_z: bool = True
    mid_block_add_attention: bool = True
    attention_implementation: str = "xla"
    remat: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = conv3x3(self.block_out_channels[0], x.shape[-1], name="conv_in", **kw)(x)
        last = len(self.block_out_channels) - 1
        for i, channels in enumerate(self.block_out_channels):
            x = _maybe_remat(DownEncoderBlock2D, self.remat)(
                channels, num_layers=self.layers_per_block, resnet_eps=VAE_EPS, resnet_groups=self.norm_num_groups,
                add_downsample=i != last, downsample_padding=0, name=f"down_blocks_{i}", **kw)(x)
        x = _mid_block(self, **kw)(x)
        x = GroupNorm(self.norm_num_groups, VAE_EPS, name="conv_norm_out", **kw)(x)
        out = 2 * self.out_channels if self.double_z else self.out_channels
        return conv3x3(out, x.shape[-1], name="conv_out", **kw)(nn.silu(x))


class Decoder(nn.Module):
    """diffusers' VAE `Decoder`: conv_in to block_out_channels[-1], mid block, one UpDecoderBlock2D of
    layers_per_block + 1 resnets per entry of reversed(block_out_channels) (all but the last upsample),
    GroupNorm-SiLU-conv_out. z [B, h, w, latent] -> [B, h * 2^(n-1), w * 2^(n-1), out_channels].
    remat: each block in nn.remat."""

    out_channels: int = 3
    block_out_channels: Tuple[int, ...] = (64,)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    mid_block_add_attention: bool = True
    attention_implementation: str = "xla"
    remat: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, z):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = conv3x3(self.block_out_channels[-1], z.shape[-1], name="conv_in", **kw)(z)
        x = _mid_block(self, **kw)(x)
        reversed_channels = tuple(reversed(self.block_out_channels))
        last = len(reversed_channels) - 1
        for i, channels in enumerate(reversed_channels):
            x = _maybe_remat(UpDecoderBlock2D, self.remat)(
                channels, num_layers=self.layers_per_block + 1, resnet_eps=VAE_EPS,
                resnet_groups=self.norm_num_groups, add_upsample=i != last, name=f"up_blocks_{i}", **kw)(x)
        x = GroupNorm(self.norm_num_groups, VAE_EPS, name="conv_norm_out", **kw)(x)
        return conv3x3(self.out_channels, x.shape[-1], name="conv_out", **kw)(nn.silu(x))


# ------------------------------------------------------------------------------------------ the model

CONFIG_KEYS = ("in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
               "layers_per_block", "act_fn", "latent_channels", "norm_num_groups", "sample_size",
               "scaling_factor", "shift_factor", "latents_mean", "latents_std", "force_upcast", "use_quant_conv",
               "use_post_quant_conv", "mid_block_add_attention")
OWN_FIELDS = ("attention_implementation", "remat", "dtype", "param_dtype")
_TUPLE_KEYS = ("down_block_types", "up_block_types", "block_out_channels", "latents_mean", "latents_std")


def check_config(config: Mapping[str, Any]) -> None:
    """Raises ValueError naming the first key whose value this implementation does not build."""
    if config["act_fn"] not in ACTIVATIONS:
        raise ValueError(f"AutoencoderKL config: act_fn={config['act_fn']!r} is not supported; expected one of "
                         f"{ACTIVATIONS}")
    n = len(config["block_out_channels"])
    if n == 0:
        raise ValueError("AutoencoderKL config: block_out_channels is empty")
    for key, block in (("down_block_types", DOWN_BLOCK), ("up_block_types", UP_BLOCK)):
        types = tuple(config[key])
        if any(t != block for t in types):
            raise ValueError(f"AutoencoderKL config: {key}={list(types)} is not supported; only {block!r} "
                             "blocks are implemented")
        if len(types) != n:
            raise ValueError(f"AutoencoderKL config: {key} has {len(types)} entries but block_out_channels has {n}")


class AutoencoderKL(nn.Module):
    """The KL autoencoder of Stable Diffusion. Fields mirror diffusers' config keys (see `from_config`);
    our own fields: attention_implementation (see pgpis_jax.nn.attention), remat (each encoder / decoder
    block in nn.remat), dtype (compute) and param_dtype.

    encode(x [B, H, W, in_channels]) -> DiagonalGaussian (mean, logvar in float32, [B, h, w, latent_channels]);
    decode(z [B, h, w, latent_channels]) -> [B, H, W, out_channels] in `dtype`;
    __call__(x, rng=None, sample_posterior=False): decode(posterior.sample(rng) or posterior.mode()).
    """

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: Tuple[str, ...] = (DOWN_BLOCK,)
    up_block_types: Tuple[str, ...] = (UP_BLOCK,)
    block_out_channels: Tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: Union[int, Tuple[int, int]] = 32
    scaling_factor: float = 0.18215
    shift_factor: Optional[float] = None
    latents_mean: Optional[Tuple[float, ...]] = None
    latents_std: Optional[Tuple[float, ...]] = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    attention_implementation: str = "xla"
    remat: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    # ------------------------------------------------------------------------------------------ config

    def __post_init__(self):
        check_config({k: getattr(self, k) for k in CONFIG_KEYS})
        if self.attention_implementation not in IMPLEMENTATIONS:
            raise ValueError(f"AutoencoderKL: attention_implementation={self.attention_implementation!r} is not "
                             f"supported; expected one of {IMPLEMENTATIONS}")
        super().__post_init__()

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **kwargs) -> "AutoencoderKL":
        """From diffusers' AutoencoderKL config (config.json as a dict, or `vae.config`); missing keys take
        diffusers' defaults, keys starting with "_" other than `_class_name` are ignored, unknown keys and
        unsupported values raise ValueError naming the key. kwargs set our own fields
        (attention_implementation, remat, dtype, param_dtype) or override config keys."""
        class_name = config.get("_class_name", "AutoencoderKL")
        if class_name != "AutoencoderKL":
            raise ValueError(f"AutoencoderKL config: _class_name={class_name!r}; expected 'AutoencoderKL'")
        unknown = sorted(k for k in config if not k.startswith("_") and k not in CONFIG_KEYS)
        if unknown:
            raise ValueError(f"AutoencoderKL config: unknown key(s) {', '.join(unknown)}")
        bad_kwargs = sorted(set(kwargs) - set(CONFIG_KEYS) - set(OWN_FIELDS))
        if bad_kwargs:
            raise TypeError(f"AutoencoderKL.from_config: unexpected argument(s) {', '.join(bad_kwargs)}")
        values = {k: config[k] for k in CONFIG_KEYS if k in config}
        values.update(kwargs)
        for key in _TUPLE_KEYS:
            if values.get(key) is not None:
                values[key] = tuple(values[key])
        if isinstance(values.get("sample_size"), (list, tuple)):
            values["sample_size"] = tuple(values["sample_size"])
        return cls(**values)

    def to_config(self) -> dict:
        """diffusers' config.json content for this module: `_class_name` and every config key."""
        config = {"_class_name": "AutoencoderKL"}
        for key in CONFIG_KEYS:
            value = getattr(self, key)
            config[key] = list(value) if isinstance(value, tuple) else value
        return config

    @property
    def downsampling_factor(self) -> int:
        """Image size / latent size (8 for Stable Diffusion)."""
        return 2 ** (len(self.block_out_channels) - 1)

    def init_params(self, rng):
        """A fresh parameter tree (wrap in jax.eval_shape for shapes only); spatial size does not matter."""
        size = 2 * self.downsampling_factor
        return self.init(rng, jnp.zeros((1, size, size, self.in_channels), self.dtype))["params"]

    # ------------------------------------------------------------------------------------------ forward

    def setup(self):
        common = dict(block_out_channels=tuple(self.block_out_channels), layers_per_block=self.layers_per_block,
                      norm_num_groups=self.norm_num_groups, mid_block_add_attention=self.mid_block_add_attention,
                      attention_implementation=self.attention_implementation, remat=self.remat, dtype=self.dtype,
                      param_dtype=self.param_dtype)
        self.encoder = Encoder(out_channels=self.latent_channels, double_z=True, **common)
        self.decoder = Decoder(out_channels=self.out_channels, **common)
        moments, latent = 2 * self.latent_channels, self.latent_channels
        self.quant_conv = (torch_conv(moments, 1, moments, None, self.dtype, self.param_dtype)
                           if self.use_quant_conv else None)
        self.post_quant_conv = (torch_conv(latent, 1, latent, None, self.dtype, self.param_dtype)
                                if self.use_post_quant_conv else None)

    def encode(self, x) -> DiagonalGaussian:
        if x.shape[-1] != self.in_channels:
            raise ValueError(f"AutoencoderKL.encode: expected NHWC images with {self.in_channels} channels, "
                             f"got shape {x.shape}")
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return DiagonalGaussian.from_moments(moments.astype(jnp.float32))

    def decode(self, z):
        if z.shape[-1] != self.latent_channels:
            raise ValueError(f"AutoencoderKL.decode: expected NHWC latents with {self.latent_channels} channels, "
                             f"got shape {z.shape}")
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, x, rng=None, sample_posterior: bool = False):
        posterior = self.encode(x)
        if sample_posterior:
            if rng is None:
                raise ValueError("AutoencoderKL: sample_posterior=True needs an rng key")
            z = posterior.sample(rng)
        else:
            z = posterior.mode()
        return self.decode(z)


def from_config(config: Mapping[str, Any], **kwargs) -> AutoencoderKL:
    """`AutoencoderKL.from_config`."""
    return AutoencoderKL.from_config(config, **kwargs)


__all__ = ["AutoencoderKL", "DiagonalGaussian", "Decoder", "DownEncoderBlock2D", "Encoder", "UNetMidBlock2D",
           "UpDecoderBlock2D", "check_config", "from_config", "sample_posterior"]
