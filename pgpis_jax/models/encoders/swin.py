"""The Swin Transformer (v1) in linen, NHWC, with the parameter names of transformers' PyTorch `SwinModel`
(`embeddings.patch_embeddings.projection`, `embeddings.norm`, `encoder.layers.N.blocks.M.{layernorm_before,
attention.self.{query,key,value,relative_position_bias_table}, attention.output.dense, layernorm_after,
intermediate.dense, output.dense}`, `encoder.layers.N.downsample.{reduction,norm}`, `layernorm`), as CFLD uses
it for its source-image encoder (Swin-B, window 16, 256x256, no final LayerNorm, stochastic depth 0.2).

Semantics follow transformers' SwinModel (and Microsoft's original, which agrees in evaluation):
- patch embedding: pad H, W up to a multiple of the patch size, conv patch x patch / stride patch, LayerNorm
  (eps 1e-5, as transformers: the config's layer_norm_eps is only used by the block norms and the final norm);
- per stage, a window and shift fixed by the stage resolution: when min(H, W) <= window_size the window is
  min(H, W) and there is no shift (transformers' `set_shift_and_window_size`), otherwise window_size and a
  shift of window_size // 2 on odd blocks; the relative-position-bias table is (2w - 1)^2 x heads for the
  stage's window w (Microsoft's and CFLD's layout; for a window clipped below window_size transformers keeps
  a (2 window_size - 1)^2 table and fails at run time);
- block: x + DropPath(W-MSA(LN(x))), x + DropPath(MLP(LN(x))); windows are padded (zeros after the norm) to a
  multiple of the window, cyclically shifted by -shift, and shifted windows get the -100 region mask;
  MLP = Linear(mlp_ratio C), exact GELU, Linear;
- patch merging: pad to even H, W, concatenate the sub-grids (0::2, 0::2), (1::2, 0::2), (0::2, 1::2),
  (1::2, 1::2), LayerNorm(4C, eps 1e-5), Linear(4C -> 2C, no bias);
- outputs: `last_hidden_state` [B, N4, C4] after the final LayerNorm (absent with final_norm=False: then the
  un-normalised stage-4 tokens), `pooler_output` [B, C4] = their mean over tokens (with add_pooling_layer),
  and `stage_features`: the tokens of every stage BEFORE its patch merging, un-normalised, [B, Hs*Ws, Cs]
  (transformers' reshaped_hidden_states[1:] with output_hidden_states_before_downsampling=True, flattened
  row-major). CFLD consumes stage_features.

Difference from transformers (training only): stochastic depth is applied to both residual branches, as in
Microsoft's code that CFLD trains with; transformers applies it to the attention branch only.
Dropout: hidden_dropout_prob is applied where transformers applies it; attention-probability dropout is not
implemented (a non-zero attention_probs_dropout_prob raises when the module runs with deterministic=False).

Weights (pgpis_jax.weights.encoder_checkpoints): `swin_params_from_state_dict` reads transformers' layout
(save_pretrained, with or without the `swin.` prefix of SwinForImageClassification; also the renamed in-memory
layout of transformers >= 5) and the official Microsoft layout (`patch_embed`, `layers.N.blocks.M.attn.qkv`,
...). Relative-position tables of a different window are resized as CFLD does (torch bicubic,
align_corners=False, on the (S, S) grid per head). `load_swin_checkpoint` reads a Microsoft `.pth` file.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pgpis_jax.nn.activations import gelu
from pgpis_jax.nn.attention import IMPLEMENTATIONS, dot_product_attention
from pgpis_jax.nn.transformer import LayerNorm

# Swin-B as CFLD builds it (models/swin_transformer.py, defaults/deepfashion.py): use with
# SwinModel.from_config(CFLD_SWIN_B_CONFIG, final_norm=False).
CFLD_SWIN_B_CONFIG = dict(image_size=256, patch_size=4, num_channels=3, embed_dim=128, depths=[2, 2, 18, 2],
                          num_heads=[4, 8, 16, 32], window_size=16, mlp_ratio=4.0, qkv_bias=True,
                          hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, drop_path_rate=0.2,
                          hidden_act="gelu", use_absolute_embeddings=False, layer_norm_eps=1e-5)

# The norms that transformers builds with torch's default eps rather than config.layer_norm_eps.
_TORCH_LAYER_NORM_EPS = 1e-5
_MASK_VALUE = -100.0

# Our own fields (not transformers config keys).
_OWN_FIELDS = ("add_pooling_layer", "final_norm", "attention_implementation", "dtype", "param_dtype")
# SwinConfig keys derived from others: checked for consistency, not stored.
_DERIVED_CONFIG = ("num_layers", "hidden_size")
# Config keys without effect on the vision network (SwinModel ignores them, or they only concern other heads).
_INERT_CONFIG = frozenset((
    "encoder_stride", "out_features", "out_indices", "stage_names", "path_norm", "chunk_size_feed_forward",
    "architectures", "id2label", "label2id", "num_labels", "torch_dtype", "dtype", "transformers_version",
    "model_type", "problem_type", "output_hidden_states", "output_attentions", "return_dict", "use_return_dict",
    "torchscript", "finetuning_task", "tie_word_embeddings", "is_encoder_decoder", "is_decoder",
    "add_cross_attention", "cross_attention_hidden_size", "pruned_heads", "tokenizer_class", "prefix",
    "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id",
    "task_specific_params", "tf_legacy_loss", "use_bfloat16", "name_or_path", "max_length", "min_length",
    "do_sample", "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty", "temperature", "top_k",
    "top_p", "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "output_scores",
    "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
))


def _pair(value) -> Tuple[int, int]:
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ValueError(f"expected an int or a pair of ints, got {value!r}")
        return int(value[0]), int(value[1])
    return int(value), int(value)


def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


# ---------------------------------------------------------------------------------------------- geometry

def stage_resolutions(height: int, width: int, patch_size, num_stages: int) -> Tuple[Tuple[int, int], ...]:
    """The token grid of every stage for an input of height x width pixels (the patch embedding pads up to a
    multiple of the patch, each patch merging pads up to even sizes)."""
    patch_h, patch_w = _pair(patch_size)
    grid = (-(-height // patch_h), -(-width // patch_w))
    sizes = [grid]
    for _ in range(num_stages - 1):
        grid = ((grid[0] + 1) // 2, (grid[1] + 1) // 2)
        sizes.append(grid)
    return tuple(sizes)


def window_and_shift(resolution: Tuple[int, int], window_size: int) -> Tuple[int, int]:
    """(window, shift of the odd blocks) of a stage at this token resolution: transformers'
    set_shift_and_window_size clips the window to min(resolution) and drops the shift when
    min(resolution) <= window_size."""
    if min(resolution) <= window_size:
        return min(resolution), 0
    return window_size, window_size // 2


def relative_position_index(window: int) -> np.ndarray:
    """[w*w, w*w] int32 index into the (2w-1)^2 relative-position-bias table (rows: query token, columns: key
    token, tokens row-major in the window): (dy + w - 1) * (2w - 1) + (dx + w - 1)."""
    coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing="ij")).reshape(2, -1)
    relative = coords[:, :, None] - coords[:, None, :] + (window - 1)
    return (relative[0] * (2 * window - 1) + relative[1]).astype(np.int32)


def _partition(x, window: int):
    """[B, H, W, C] (H, W multiples of window) -> [B, nW, window*window, C], windows row-major."""
    batch, height, width, channels = x.shape
    x = x.reshape(batch, height // window, window, width // window, window, channels)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(batch, -1, window * window, channels)


def _merge(windows, window: int, height: int, width: int):
    """The inverse of _partition: [B, nW, window*window, C] -> [B, H, W, C]."""
    batch, channels = windows.shape[0], windows.shape[-1]
    x = windows.reshape(batch, height // window, width // window, window, window, channels)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(batch, height, width, channels)


def shifted_window_mask(height: int, width: int, window: int, shift: int) -> np.ndarray:
    """[nW, N, N] float32 additive mask of shifted-window attention on a (padded) height x width grid: 0 between
    tokens of the same region of the cyclically shifted map, -100 otherwise (Swin's mask, as transformers)."""
    rows, cols = np.arange(height), np.arange(width)
    row_region = (rows >= height - window).astype(np.int32) + (rows >= height - shift)
    col_region = (cols >= width - window).astype(np.int32) + (cols >= width - shift)
    labels = (row_region[:, None] * 3 + col_region[None, :])[None, :, :, None]
    labels = np.asarray(_partition(labels, window))[0, :, :, 0]  # [nW, N]
    return np.where(labels[:, None, :] != labels[:, :, None], _MASK_VALUE, 0.0).astype(np.float32)


def drop_path(x, rate: float, rng):
    """Stochastic depth per sample (timm / transformers): keep a sample with probability 1 - rate and scale it
    by 1 / (1 - rate), zero it otherwise."""
    keep = 1.0 - rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = jnp.floor(keep + jax.random.uniform(rng, shape, jnp.float32))
    return (x / keep * mask.astype(x.dtype)).astype(x.dtype)


# ------------------------------------------------------------------------------------------- modules

class _Dense(nn.Module):
    """A module holding one Linear called `dense` (transformers' SwinIntermediate / SwinOutput /
    SwinSelfOutput)."""

    features: int
    kernel_init: Any = nn.initializers.lecun_normal()
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.features, kernel_init=self.kernel_init, dtype=self.dtype, param_dtype=self.param_dtype,
                        name="dense")(x)


class SwinSelfAttention(nn.Module):
    """Window multi-head self-attention with a relative-position bias: `query`, `key`, `value` and the
    [(2w-1)^2, heads] `relative_position_bias_table` (torch `attention.self.*`)."""

    num_heads: int
    window: int
    qkv_bias: bool = True
    kernel_init: Any = nn.initializers.lecun_normal()
    implementation: str = "xla"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, windows, mask: Optional[np.ndarray] = None):
        """windows [B, nW, N, C] (N = window^2); mask [nW, N, N] additive or None -> [B, nW, N, C]."""
        batch, num_windows, tokens, channels = windows.shape
        if channels % self.num_heads:
            raise ValueError(f"Swin stage width {channels} is not divisible by its {self.num_heads} heads")
        head_dim = channels // self.num_heads
        table = self.param("relative_position_bias_table", nn.initializers.zeros,
                           ((2 * self.window - 1) ** 2, self.num_heads), self.param_dtype)

        def project(name):
            out = nn.Dense(channels, use_bias=self.qkv_bias, kernel_init=self.kernel_init, dtype=self.dtype,
                           param_dtype=self.param_dtype, name=name)(windows)
            return out.reshape(batch * num_windows, tokens, self.num_heads, head_dim)

        query, key, value = project("query"), project("key"), project("value")
        index = relative_position_index(self.window).reshape(-1)
        bias = table.astype(jnp.float32)[index].reshape(tokens, tokens, self.num_heads).transpose(2, 0, 1)
        if mask is None:
            bias = bias[None]  # [1, heads, N, N]
        else:
            bias = bias[None] + jnp.asarray(mask)[:, None]  # [nW, heads, N, N]
            bias = jnp.broadcast_to(bias[None], (batch,) + bias.shape).reshape(-1, self.num_heads, tokens, tokens)
        out = dot_product_attention(query, key, value, self.implementation, bias=bias)
        return out.reshape(batch, num_windows, tokens, channels)


class SwinAttention(nn.Module):
    """`self` (SwinSelfAttention) then `output.dense` (torch `attention.output.dense`)."""

    num_heads: int
    window: int
    qkv_bias: bool = True
    kernel_init: Any = nn.initializers.lecun_normal()
    implementation: str = "xla"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, windows, mask=None):
        kw = dict(kernel_init=self.kernel_init, dtype=self.dtype, param_dtype=self.param_dtype)
        out = SwinSelfAttention(self.num_heads, self.window, self.qkv_bias, implementation=self.implementation,
                                name="self", **kw)(windows, mask)
        return _Dense(windows.shape[-1], name="output", **kw)(out)


class SwinLayer(nn.Module):
    """One Swin block (W-MSA or SW-MSA, then MLP), pre-norm residual, on tokens [B, H*W, C]."""

    num_heads: int
    window: int
    shift: int
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    layer_norm_eps: float = 1e-5
    drop_path_rate: float = 0.0
    hidden_dropout_prob: float = 0.0
    kernel_init: Any = nn.initializers.lecun_normal()
    implementation: str = "xla"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def _residual(self, x, branch, deterministic):
        if self.drop_path_rate > 0.0 and not deterministic:
            branch = drop_path(branch, self.drop_path_rate, self.make_rng("dropout"))
        return x + branch

    @nn.compact
    def __call__(self, x, resolution: Tuple[int, int], deterministic: bool = True):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        batch, _, channels = x.shape
        height, width = resolution
        window, shift = self.window, self.shift
        dropout = nn.Dropout(self.hidden_dropout_prob)

        h = LayerNorm(self.layer_norm_eps, name="layernorm_before", **kw)(x).reshape(batch, height, width, channels)
        pad_h, pad_w = (-height) % window, (-width) % window
        if pad_h or pad_w:
            h = jnp.pad(h, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
        padded_h, padded_w = height + pad_h, width + pad_w
        mask = None
        if shift:
            h = jnp.roll(h, (-shift, -shift), axis=(1, 2))
            mask = shifted_window_mask(padded_h, padded_w, window, shift)
        h = SwinAttention(self.num_heads, window, self.qkv_bias, self.kernel_init, self.implementation,
                          name="attention", **kw)(_partition(h, window), mask)
        h = dropout(h, deterministic=deterministic)
        h = _merge(h, window, padded_h, padded_w)
        if shift:
            h = jnp.roll(h, (shift, shift), axis=(1, 2))
        h = h[:, :height, :width].reshape(batch, height * width, channels)
        x = self._residual(x, h, deterministic)

        h = LayerNorm(self.layer_norm_eps, name="layernorm_after", **kw)(x)
        h = _Dense(int(self.mlp_ratio * channels), self.kernel_init, name="intermediate", **kw)(h)
        h = gelu(h)
        h = _Dense(channels, self.kernel_init, name="output", **kw)(h)
        h = dropout(h, deterministic=deterministic)
        return self._residual(x, h, deterministic)


class SwinPatchMerging(nn.Module):
    """2x2 patch merging: `norm` (LayerNorm(4C), eps 1e-5) then `reduction` (Linear 4C -> 2C, no bias)."""

    kernel_init: Any = nn.initializers.lecun_normal()
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, resolution: Tuple[int, int]):
        batch, _, channels = x.shape
        height, width = resolution
        x = x.reshape(batch, height, width, channels)
        if height % 2 or width % 2:
            x = jnp.pad(x, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)))
        x = jnp.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], axis=-1)
        x = x.reshape(batch, -1, 4 * channels)
        x = LayerNorm(_TORCH_LAYER_NORM_EPS, dtype=self.dtype, param_dtype=self.param_dtype, name="norm")(x)
        return nn.Dense(2 * channels, use_bias=False, kernel_init=self.kernel_init, dtype=self.dtype,
                        param_dtype=self.param_dtype, name="reduction")(x)


class SwinPatchEmbeddings(nn.Module):
    """transformers' SwinPatchEmbeddings: pad to a multiple of the patch, then the patch `projection` conv;
    [B, H, W, C_in] -> [B, H', W', embed_dim]."""

    embed_dim: int
    patch: Tuple[int, int]
    kernel_init: Any = nn.initializers.lecun_normal()
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        pad_h, pad_w = (-x.shape[1]) % self.patch[0], (-x.shape[2]) % self.patch[1]
        if pad_h or pad_w:
            x = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
        return nn.Conv(self.embed_dim, self.patch, strides=self.patch, padding="VALID", kernel_init=self.kernel_init,
                       dtype=self.dtype, param_dtype=self.param_dtype, name="projection")(x)


class SwinEmbeddings(nn.Module):
    """`patch_embeddings`, `norm` (LayerNorm, eps 1e-5), optional `position_embeddings` [1, patches, C] (only
    at the grid of image_size), dropout; [B, H, W, C_in] -> tokens [B, H'*W', embed_dim]."""

    embed_dim: int
    patch: Tuple[int, int]
    position_grid: Optional[Tuple[int, int]] = None  # use_absolute_embeddings: the grid of image_size
    dropout: float = 0.0
    kernel_init: Any = nn.initializers.lecun_normal()
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values, deterministic: bool = True):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = SwinPatchEmbeddings(self.embed_dim, self.patch, self.kernel_init, name="patch_embeddings", **kw)(
            pixel_values)
        x = x.reshape(x.shape[0], -1, self.embed_dim)
        x = LayerNorm(_TORCH_LAYER_NORM_EPS, name="norm", **kw)(x)
        if self.position_grid is not None:
            patches = self.position_grid[0] * self.position_grid[1]
            positions = self.param("position_embeddings", nn.initializers.zeros, (1, patches, self.embed_dim),
                                   self.param_dtype)
            if patches != x.shape[1]:
                raise ValueError(f"Swin absolute position embeddings cover {patches} patches (image_size) but the "
                                 f"input gives {x.shape[1]}")
            x = x + positions.astype(x.dtype)
        return nn.Dropout(self.dropout)(x, deterministic=deterministic)


class SwinStage(nn.Module):
    """`blocks_j` (SwinLayer, shift on odd blocks) then `downsample` (SwinPatchMerging, all stages but the
    last). Returns (output, tokens before the patch merging)."""

    depth: int
    num_heads: int
    window: int
    shift: int
    downsample: bool
    drop_path_rates: Tuple[float, ...]
    layer_kw: Any = None  # the SwinLayer fields shared by all blocks (dict)
    kernel_init: Any = nn.initializers.lecun_normal()
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, resolution: Tuple[int, int], deterministic: bool = True):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for j in range(self.depth):
            x = SwinLayer(self.num_heads, self.window, self.shift if j % 2 else 0,
                          drop_path_rate=self.drop_path_rates[j], kernel_init=self.kernel_init, name=f"blocks_{j}",
                          **dict(self.layer_kw or {}), **kw)(x, resolution, deterministic)
        before = x
        if self.downsample:
            x = SwinPatchMerging(self.kernel_init, name="downsample", **kw)(x, resolution)
        return x, before


class SwinEncoder(nn.Module):
    """`layers_i` (SwinStage); returns (last stage output, per-stage tokens before patch merging)."""

    depths: Tuple[int, ...]
    num_heads: Tuple[int, ...]
    windows: Tuple[Tuple[int, int], ...]  # (window, shift) per stage
    drop_path_rate: float = 0.0
    layer_kw: Any = None
    kernel_init: Any = nn.initializers.lecun_normal()
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, resolutions, deterministic: bool = True):
        total = sum(self.depths)
        rates = [self.drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        features, first = [], 0
        for i, depth in enumerate(self.depths):
            window, shift = self.windows[i]
            x, before = SwinStage(depth, self.num_heads[i], window, shift, i < len(self.depths) - 1,
                                  tuple(rates[first:first + depth]), self.layer_kw, self.kernel_init,
                                  dtype=self.dtype, param_dtype=self.param_dtype, name=f"layers_{i}")(
                x, resolutions[i], deterministic)
            features.append(before)
            first += depth
        return x, tuple(features)


class SwinModel(nn.Module):
    """transformers' SwinModel in linen (NHWC input), plus `stage_features` and the CFLD options.

    Fields mirror SwinConfig's keys; our own fields: add_pooling_layer (SwinModel's constructor argument),
    final_norm (False: no final LayerNorm, as CFLD's LAST_NORM=False; the `layernorm` parameters are then
    absent), attention_implementation (see pgpis_jax.nn.attention; not "splash", which takes no additive bias and
    every window attention adds its relative position bias), dtype (compute) and param_dtype. Norms, attention
    softmax and the position bias are float32.

    The relative-position tables are sized for the stage windows at `image_size`; an input whose stage
    resolutions give other windows (the window is clipped when a stage is at most window_size tokens wide)
    raises ValueError. Other sizes are padded as transformers pads them.
    """

    image_size: Union[int, Tuple[int, int]] = 224
    patch_size: Union[int, Tuple[int, int]] = 4
    num_channels: int = 3
    embed_dim: int = 96
    depths: Tuple[int, ...] = (2, 2, 6, 2)
    num_heads: Tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 7
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    drop_path_rate: float = 0.1
    hidden_act: str = "gelu"
    use_absolute_embeddings: bool = False
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-5

    add_pooling_layer: bool = True
    final_norm: bool = True
    attention_implementation: str = "xla"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    # ------------------------------------------------------------------------------------------ config

    def __post_init__(self):
        self._validate()
        super().__post_init__()

    def _validate(self):
        def unsupported(key, expected):
            return ValueError(f"Swin config {key!r}={getattr(self, key)!r} is not supported; expected {expected}")

        if len(self.depths) != len(self.num_heads) or not self.depths:
            raise ValueError(f"Swin config: depths {tuple(self.depths)} and num_heads {tuple(self.num_heads)} must "
                             "be non-empty and of the same length")
        if self.hidden_act != "gelu":
            raise unsupported("hidden_act", "'gelu' (exact GELU)")
        if self.attention_implementation not in IMPLEMENTATIONS or self.attention_implementation == "splash":
            raise unsupported("attention_implementation", " or ".join(repr(name) for name in IMPLEMENTATIONS
                                                                       if name != "splash")
                              + " (splash takes no additive bias; Swin adds its relative position bias)")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise unsupported("drop_path_rate", "a rate in [0, 1)")
        for i, heads in enumerate(self.num_heads):
            if (self.embed_dim * 2**i) % heads:
                raise ValueError(f"Swin config: stage {i} width {self.embed_dim * 2**i} is not divisible by "
                                 f"num_heads[{i}]={heads}")
        _pair(self.image_size), _pair(self.patch_size)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **options) -> "SwinModel":
        """The module for a transformers SwinConfig (the dict of its config.json). Keys starting with "_" and
        keys without effect on SwinModel (architectures, id2label, torch_dtype, encoder_stride, ...) are
        ignored; num_layers / hidden_size must agree with depths / embed_dim; model_type must be "swin"; any
        other unknown key raises ValueError naming it. options set our own fields (add_pooling_layer,
        final_norm, attention_implementation, dtype, param_dtype) or override config keys (e.g. CFLD's
        window_size=16)."""
        fields = {f.name for f in dataclasses.fields(cls)} - {"parent", "name"} - set(_OWN_FIELDS)
        unknown = set(options) - fields - set(_OWN_FIELDS)
        if unknown:
            raise ValueError(f"unknown SwinModel option(s) {sorted(unknown)}")
        model_type = config.get("model_type", "swin")
        if model_type != "swin":
            raise ValueError(f"Swin config 'model_type'={model_type!r} is not supported; expected 'swin'")
        arguments = {}
        for key, value in config.items():
            if key.startswith("_") or key in _INERT_CONFIG or key in _DERIVED_CONFIG:
                continue
            if key not in fields:
                raise ValueError(f"unknown Swin config key {key!r}")
            arguments[key] = _as_tuple(value)
        arguments.update({k: _as_tuple(v) for k, v in options.items()})
        module = cls(**arguments)
        derived = {"num_layers": len(module.depths),
                   "hidden_size": int(module.embed_dim * 2 ** (len(module.depths) - 1))}
        for key, expected in derived.items():
            if key in config and key not in options and config[key] != expected:
                raise ValueError(f"Swin config {key!r}={config[key]!r} does not agree with depths / embed_dim "
                                 f"(expected {expected})")
        return module

    def to_config(self) -> dict:
        """transformers' SwinConfig content for this module (without our own fields)."""
        config = {"model_type": "swin"}
        for field in dataclasses.fields(self):
            if field.name not in _OWN_FIELDS and field.name not in ("parent", "name"):
                value = getattr(self, field.name)
                config[field.name] = list(value) if isinstance(value, tuple) else value
        config["num_layers"] = len(self.depths)
        config["hidden_size"] = self.num_features
        return config

    @property
    def num_features(self) -> int:
        return int(self.embed_dim * 2 ** (len(self.depths) - 1))

    def stage_windows(self, height: Optional[int] = None, width: Optional[int] = None):
        """((window, shift), ...) per stage for an input of height x width pixels (default image_size)."""
        if height is None:
            height, width = _pair(self.image_size)
        return tuple(window_and_shift(r, self.window_size)
                     for r in stage_resolutions(height, width, self.patch_size, len(self.depths)))

    def init_params(self, rng):
        """A fresh parameter tree (wrap in jax.eval_shape for shapes only) from a dummy image_size input."""
        height, width = _pair(self.image_size)
        return self.init(rng, jnp.zeros((1, height, width, self.num_channels), self.dtype))["params"]

    # ------------------------------------------------------------------------------------------- forward

    def _check_pixels(self, pixel_values):
        if not hasattr(pixel_values, "shape") or not hasattr(pixel_values, "dtype"):
            raise ValueError(f"Swin pixel_values must be an array [B, H, W, {self.num_channels}], "
                             f"got {type(pixel_values).__name__}")
        if pixel_values.ndim != 4 or pixel_values.shape[-1] != self.num_channels:
            raise ValueError(f"Swin pixel_values must be NHWC [B, H, W, {self.num_channels}], got shape "
                             f"{tuple(pixel_values.shape)}")
        if not jnp.issubdtype(pixel_values.dtype, jnp.floating):
            raise ValueError(f"Swin pixel_values must be floating point (normalised images), got dtype "
                             f"{pixel_values.dtype}")

    @nn.compact
    def __call__(self, pixel_values, deterministic: bool = True):
        """pixel_values [B, H, W, num_channels] float. Returns {"last_hidden_state": [B, N_last, C_last],
        "pooler_output": [B, C_last] (with add_pooling_layer), "stage_features": per stage [B, Hs*Ws, Cs]
        before its patch merging, un-normalised}."""
        self._check_pixels(pixel_values)
        if self.attention_probs_dropout_prob > 0.0 and not deterministic:
            raise ValueError("Swin attention_probs_dropout_prob > 0 is not implemented for training "
                             "(deterministic=False); set it to 0")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        kernel_init = nn.initializers.normal(self.initializer_range)
        height, width = pixel_values.shape[1:3]
        resolutions = stage_resolutions(height, width, self.patch_size, len(self.depths))
        windows = self.stage_windows()
        for i, (resolution, (window, _)) in enumerate(zip(resolutions, windows)):
            runtime_window = window_and_shift(resolution, self.window_size)[0]
            if runtime_window != window:
                raise ValueError(
                    f"Swin input {height}x{width} gives stage {i} a {resolution[0]}x{resolution[1]} grid and a "
                    f"window of {runtime_window}, but the model (image_size {self.image_size}) has "
                    f"relative-position tables for window {window}; build it with this image_size")
        runtime = tuple((windows[i][0], window_and_shift(r, self.window_size)[1]) for i, r in enumerate(resolutions))
        position_grid = None
        if self.use_absolute_embeddings:
            position_grid = stage_resolutions(*_pair(self.image_size), self.patch_size, 1)[0]
        x = SwinEmbeddings(self.embed_dim, _pair(self.patch_size), position_grid, self.hidden_dropout_prob,
                           kernel_init, name="embeddings", **kw)(pixel_values.astype(self.dtype), deterministic)
        layer_kw = dict(mlp_ratio=self.mlp_ratio, qkv_bias=self.qkv_bias, layer_norm_eps=self.layer_norm_eps,
                        hidden_dropout_prob=self.hidden_dropout_prob, implementation=self.attention_implementation)
        x, stage_features = SwinEncoder(tuple(self.depths), tuple(self.num_heads), runtime, self.drop_path_rate,
                                        layer_kw, kernel_init, name="encoder", **kw)(x, resolutions, deterministic)
        if self.final_norm:
            x = LayerNorm(self.layer_norm_eps, name="layernorm", **kw)(x)
        outputs = {"last_hidden_state": x}
        if self.add_pooling_layer:
            outputs["pooler_output"] = x.astype(jnp.float32).mean(axis=1).astype(x.dtype)
        outputs["stage_features"] = stage_features
        return outputs
