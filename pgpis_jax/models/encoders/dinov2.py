"""DINOv2 (transformers' `Dinov2Model`, 5.23 semantics) in linen, NHWC, with the parameter names of the
DINOv2 checkpoints on the Hub (facebook/dinov2-*: model.safetensors as transformers' save_pretrained writes it):

  embeddings/{cls_token [1, 1, D], mask_token [1, D], position_embeddings [1, 1 + N, D]},
  embeddings/patch_embeddings/projection (conv, kernel = stride = patch_size, with bias),
  encoder/layer_{i}/{norm1, attention/attention/{query, key, value}, attention/output/dense,
                     layer_scale1/lambda1, norm2, mlp/{fc1, fc2} or mlp/{weights_in, weights_out},
                     layer_scale2/lambda1},
  layernorm.

`pgpis_jax.weights.encoder_checkpoints.dinov2_params_from_state_dict` converts that layout, transformers 5's
in-memory layout (attention.q_proj / k_proj / v_proj / o_proj, mlp.gate_proj / up_proj / down_proj) and the
`dinov2.`-prefixed state dict of Dinov2ForImageClassification.

Block (pre-norm, eval): x += layer_scale1 * attention(norm1(x)); x += layer_scale2 * mlp(norm2(x)), with
stochastic depth (drop_path_rate, per sample) on both branches in training. The MLP is fc1 -> hidden_act
(exact GELU by default) -> fc2 with int(hidden_size * mlp_ratio) units, or with use_swiglu_ffn (DINOv2-giant)
SwiGLU: weights_in to 2 * h units split into (gate, value) halves, silu(gate) * value, weights_out; h =
int(int(hidden_size * mlp_ratio) * 2 / 3) rounded up to a multiple of 8 (4096 for the giant).
Outputs: last_hidden_state [B, 1 + N, D] after the final layernorm, pooler_output [B, D] its CLS token.

Position embeddings: transformers' `Dinov2Embeddings.interpolate_pos_encoding`: the table is used as is when
the input has as many patches as the table and height == width (in pixels); otherwise its patch part,
reshaped to a square int(sqrt(N)) grid, goes through torch's bicubic resize (align_corners=False: a = -0.75,
no antialias) to the input's (H // patch, W // patch) grid, in one of two ways (field `position_interpolation`):
  "size" (transformers 5.23): `F.interpolate(size=(H // ph, W // pw))` in float32, cast back to the table's
      dtype; source positions step by sqrt(N) / (H // ph).
  "scale_factor" (transformers 4.32, which the released PCDMs checkpoints were trained with):
      `F.interpolate(scale_factor=((H // ph + 0.1) / sqrt(N), (W // pw + 0.1) / sqrt(N)))`; torch then steps
      the source positions by the reciprocal of that scale factor (output size floor(sqrt(N) * scale) =
      H // ph), so the grid is sampled at slightly different places (for PCDMs' 224 input on DINOv2's 37 x 37
      table: steps of 37 / 16.1 instead of 37 / 16).
JAX's bicubic (a = -0.5, antialiased) is neither, so we apply torch's bicubic as two fixed linear maps
(option (a)): the [out, in] matrices of `pgpis_jax.interpolation.bicubic_weights`, computed in NumPy from the
static input shape with torch's float32 arithmetic, are einsum-ed with the table inside the module: exact (to
float32 rounding) and differentiable.

Deviations: the native patch grid (image_size // patch_size) must be square, as for every DINOv2 checkpoint
(transformers reshapes the table to a square grid whenever it interpolates); `bool_masked_pos` (optional)
replaces masked patch embeddings by mask_token as transformers does; only the xla attention applies attention
dropout (training with attention_probs_dropout_prob > 0 needs "xla" or "auto", which then picks it).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pgpis_jax.interpolation import bicubic_weights
from pgpis_jax.nn.activations import gelu
from pgpis_jax.nn.attention import IMPLEMENTATIONS, dot_product_attention
from pgpis_jax.nn.transformer import LayerNorm

IntOrPair = Union[int, Tuple[int, int]]

ACTIVATIONS = {
    "gelu": gelu,
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "relu": nn.relu,
    "silu": nn.silu,
    "swish": nn.silu,
    "quick_gelu": lambda x: x * nn.sigmoid(1.702 * x),
}

# Our own fields, not transformers config keys.
_OWN_FIELDS = ("position_interpolation", "attention_implementation", "dtype", "param_dtype")
# `position_interpolation` values: how the position table is resized (module docstring).
POSITION_INTERPOLATIONS = ("size", "scale_factor")
# Config keys without effect on Dinov2Model: bookkeeping, labels, generation, output switches, and the
# Dinov2Backbone-only options.
_INERT_CONFIG = frozenset({
    "architectures", "dtype", "torch_dtype", "transformers_version", "id2label", "label2id", "num_labels",
    "problem_type", "output_attentions", "output_hidden_states", "return_dict", "use_return_dict",
    "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder", "add_cross_attention", "torchscript",
    "tie_word_embeddings", "tie_encoder_decoder", "finetuning_task", "use_bfloat16", "tf_legacy_loss",
    "tokenizer_class", "prefix", "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id",
    "decoder_start_token_id", "task_specific_params", "cross_attention_hidden_size",
    "apply_layernorm", "reshape_hidden_states", "out_features", "out_indices", "stage_names",
})


def _pair(value, key: str) -> Tuple[int, int]:
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ValueError(f"DINOv2 config {key!r}={value!r}: expected an int or a pair of ints")
        return int(value[0]), int(value[1])
    return int(value), int(value)


def swiglu_hidden_features(hidden_size: int, mlp_ratio: float) -> int:
    """The SwiGLU hidden width of transformers' Dinov2SwiGLUFFN: two thirds of int(hidden_size * mlp_ratio),
    rounded up to a multiple of 8."""
    hidden = int(hidden_size * mlp_ratio)
    return (int(hidden * 2 / 3) + 7) // 8 * 8


def interpolate_pos_encoding(position_embeddings, height: int, width: int, patch_size: IntOrPair,
                             mode: str = "size"):
    """transformers' `Dinov2Embeddings.interpolate_pos_encoding` for an input of height x width pixels:
    position_embeddings [1, 1 + N, D] -> [1, 1 + (height // ph) * (width // pw), D] in its own dtype.

    The table is returned as is when (height // ph) * (width // pw) == N and height == width; otherwise the
    CLS entry is kept and the patch entries, as a square sqrt(N) grid, go through torch's bicubic resize
    (align_corners=False) in float32, as two constant linear maps (one per axis). mode "size": resized to the
    new grid as transformers 5.23 does; "scale_factor": with the scale factor (new side + 0.1) / sqrt(N) per
    axis as transformers 4.32 does (module docstring)."""
    if mode not in POSITION_INTERPOLATIONS:
        raise ValueError(f"DINOv2 position_interpolation={mode!r} is not supported; expected "
                         f"{' or '.join(map(repr, POSITION_INTERPOLATIONS))}")
    patch_h, patch_w = _pair(patch_size, "patch_size")
    num_positions = position_embeddings.shape[1] - 1
    grid_h, grid_w = height // patch_h, width // patch_w
    if grid_h * grid_w == num_positions and height == width:
        return position_embeddings
    side = int(num_positions**0.5)
    if side * side != num_positions:
        raise ValueError(f"the position-embedding table has {num_positions} patch entries, not a square grid; "
                         "transformers can only interpolate a square one")
    if grid_h < 1 or grid_w < 1:
        raise ValueError(f"a {height}x{width} input has no {patch_h}x{patch_w} patch")
    dim = position_embeddings.shape[-1]

    def axis_map(grid):
        # with the scale factor, torch's output size floor(side * (grid + 0.1) / side) is grid again
        scale = (grid + 0.1) / math.sqrt(num_positions) if mode == "scale_factor" else None
        return jnp.asarray(bicubic_weights(side, grid, scale_factor=scale, precision=np.float32), jnp.float32)

    table = position_embeddings[0, 1:].astype(jnp.float32).reshape(side, side, dim)
    table = jnp.einsum("oi,ijd->ojd", axis_map(grid_h), table, precision=jax.lax.Precision.HIGHEST)
    table = jnp.einsum("pj,ojd->opd", axis_map(grid_w), table, precision=jax.lax.Precision.HIGHEST)
    patches = table.reshape(1, grid_h * grid_w, dim).astype(position_embeddings.dtype)
    return jnp.concatenate([position_embeddings[:, :1], patches], axis=1)


def _trunc_normal(std: float):
    """torch's trunc_normal_(std=std) (cut at -2 and 2 absolute), as transformers initialises DINOv2."""
    return nn.initializers.truncated_normal(stddev=std, lower=-2.0 / std, upper=2.0 / std)


# ----------------------------------------------------------------------------------------------- modules


class Dinov2Embeddings(nn.Module):
    """Patch conv `patch_embeddings/projection`, CLS token, (mask token), position embeddings (interpolated
    to the input's patch grid as `position_interpolation` says), dropout. pixel_values [B, H, W, C] -> [B, 1 + (H//ph) * (W//pw), D]."""

    hidden_size: int
    image_size: Tuple[int, int]
    patch_size: Tuple[int, int]
    use_mask_token: bool = True
    hidden_dropout_prob: float = 0.0
    initializer_range: float = 0.02
    position_interpolation: str = "size"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values, bool_masked_pos=None, deterministic: bool = True):
        batch, height, width, _ = pixel_values.shape
        init = _trunc_normal(self.initializer_range)
        dim = self.hidden_size
        patches = _PatchEmbeddings(dim, self.patch_size, init, self.dtype, self.param_dtype,
                                   name="patch_embeddings")(pixel_values)
        cls_token = self.param("cls_token", init, (1, 1, dim), self.param_dtype)
        mask_token = (self.param("mask_token", nn.initializers.zeros, (1, dim), self.param_dtype)
                      if self.use_mask_token else None)
        num_patches = (self.image_size[0] // self.patch_size[0]) * (self.image_size[1] // self.patch_size[1])
        table = self.param("position_embeddings", init, (1, num_patches + 1, dim), self.param_dtype)

        if bool_masked_pos is not None:
            if mask_token is None:
                raise ValueError("bool_masked_pos needs a mask token; this DINOv2 has use_mask_token=False")
            mask = jnp.asarray(bool_masked_pos)
            if mask.shape != patches.shape[:2]:
                raise ValueError(f"bool_masked_pos must be [B, num_patches] = {patches.shape[:2]}, got {mask.shape}")
            mask = mask[..., None].astype(patches.dtype)
            patches = patches * (1 - mask) + mask_token.astype(patches.dtype)[None] * mask

        cls = jnp.broadcast_to(cls_token.astype(self.dtype), (batch, 1, dim))
        embeddings = jnp.concatenate([cls, patches], axis=1)
        positions = interpolate_pos_encoding(table, height, width, self.patch_size, self.position_interpolation)
        embeddings = embeddings + positions.astype(self.dtype)
        return nn.Dropout(self.hidden_dropout_prob)(embeddings, deterministic=deterministic)


class _PatchEmbeddings(nn.Module):
    """transformers' Dinov2PatchEmbeddings: `projection`, a conv with kernel = stride = patch size (the
    remainder of H and W that does not fill a patch is dropped), flattened row-major to [B, N, D]."""

    hidden_size: int
    patch_size: Tuple[int, int]
    kernel_init: Any
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values):
        x = nn.Conv(self.hidden_size, self.patch_size, strides=self.patch_size, padding="VALID",
                    kernel_init=self.kernel_init, dtype=self.dtype, param_dtype=self.param_dtype,
                    name="projection")(pixel_values.astype(self.dtype))
        return x.reshape(x.shape[0], -1, x.shape[-1])


class _SelfAttention(nn.Module):
    """Multi-head self-attention with `query`, `key`, `value` projections; returns the heads concatenated."""

    num_heads: int
    head_dim: int
    qkv_bias: bool = True
    dropout: float = 0.0
    implementation: str = "xla"
    kernel_init: Any = nn.initializers.lecun_normal()
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        inner = self.num_heads * self.head_dim

        def project(name):
            dense = nn.Dense(inner, use_bias=self.qkv_bias, kernel_init=self.kernel_init, dtype=self.dtype,
                             param_dtype=self.param_dtype, name=name)
            return dense(x).reshape(x.shape[:2] + (self.num_heads, self.head_dim))

        query, key, value = project("query"), project("key"), project("value")
        training_dropout = self.dropout if not deterministic else 0.0
        out = dot_product_attention(query, key, value, self.implementation, dropout_rate=training_dropout,
                                    dropout_rng=self.make_rng("dropout") if training_dropout > 0 else None)
        return out.reshape(x.shape[:2] + (inner,))


class _Attention(nn.Module):
    """transformers' (checkpoint-layout) Dinov2Attention: `attention` (query/key/value) and `output/dense`."""

    hidden_size: int
    num_heads: int
    head_dim: int
    qkv_bias: bool = True
    dropout: float = 0.0
    implementation: str = "xla"
    kernel_init: Any = nn.initializers.lecun_normal()
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        kw = dict(kernel_init=self.kernel_init, dtype=self.dtype, param_dtype=self.param_dtype)
        h = _SelfAttention(self.num_heads, self.head_dim, self.qkv_bias, self.dropout, self.implementation,
                           name="attention", **kw)(x, deterministic)
        return _Output(self.hidden_size, name="output", **kw)(h)


class _Output(nn.Module):
    """A module holding one Linear called `dense` (transformers' Dinov2SelfOutput; its dropout is never used
    by Dinov2Attention)."""

    features: int
    kernel_init: Any = nn.initializers.lecun_normal()
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.features, kernel_init=self.kernel_init, dtype=self.dtype, param_dtype=self.param_dtype,
                        name="dense")(x)


class _LayerScale(nn.Module):
    """x * lambda1 (per channel), lambda1 initialised to layerscale_value."""

    layerscale_value: float = 1.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("lambda1", nn.initializers.constant(self.layerscale_value), (x.shape[-1],),
                           self.param_dtype)
        return x * scale.astype(self.dtype)


class _MLP(nn.Module):
    """fc1 -> activation -> fc2 (transformers' Dinov2MLP)."""

    hidden_size: int
    hidden_features: int
    hidden_act: str = "gelu"
    kernel_init: Any = nn.initializers.lecun_normal()
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(kernel_init=self.kernel_init, dtype=self.dtype, param_dtype=self.param_dtype)
        h = ACTIVATIONS[self.hidden_act](nn.Dense(self.hidden_features, name="fc1", **kw)(x))
        return nn.Dense(self.hidden_size, name="fc2", **kw)(h)


class _SwiGLUFFN(nn.Module):
    """SwiGLU in the checkpoint layout: `weights_in` to 2 * hidden_features units, split into (gate, value)
    halves (transformers 5's gate_proj and up_proj), silu(gate) * value, `weights_out` (down_proj)."""

    hidden_size: int
    hidden_features: int
    kernel_init: Any = nn.initializers.lecun_normal()
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(kernel_init=self.kernel_init, dtype=self.dtype, param_dtype=self.param_dtype)
        gate, value = jnp.split(nn.Dense(2 * self.hidden_features, name="weights_in", **kw)(x), 2, axis=-1)
        return nn.Dense(self.hidden_size, name="weights_out", **kw)(nn.silu(gate) * value)


class DropPath(nn.Module):
    """Stochastic depth per sample (transformers' Dinov2DropPath): in training each sample's branch is kept
    with probability 1 - rate (then divided by 1 - rate) or zeroed; identity when deterministic or rate 0.
    Uses the "dropout" RNG stream."""

    rate: float = 0.0

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        if deterministic or self.rate == 0.0:
            return x
        keep_prob = 1.0 - self.rate
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        keep = jnp.floor(jax.random.uniform(self.make_rng("dropout"), shape, x.dtype) + keep_prob)
        return x / keep_prob * keep


class Dinov2Layer(nn.Module):
    """One pre-norm block: norm1, attention, layer_scale1, drop path, residual; norm2, mlp, layer_scale2, drop
    path, residual."""

    hidden_size: int
    num_heads: int
    head_dim: int
    mlp_features: int
    use_swiglu_ffn: bool = False
    hidden_act: str = "gelu"
    qkv_bias: bool = True
    layer_norm_eps: float = 1e-6
    layerscale_value: float = 1.0
    attention_dropout: float = 0.0
    drop_path_rate: float = 0.0
    initializer_range: float = 0.02
    attention_implementation: str = "xla"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        init = _trunc_normal(self.initializer_range)
        drop_path = DropPath(self.drop_path_rate)

        h = LayerNorm(self.layer_norm_eps, name="norm1", **kw)(x)
        h = _Attention(self.hidden_size, self.num_heads, self.head_dim, self.qkv_bias, self.attention_dropout,
                       self.attention_implementation, init, name="attention", **kw)(h, deterministic)
        h = _LayerScale(self.layerscale_value, name="layer_scale1", **kw)(h)
        x = drop_path(h, deterministic) + x

        h = LayerNorm(self.layer_norm_eps, name="norm2", **kw)(x)
        if self.use_swiglu_ffn:
            h = _SwiGLUFFN(self.hidden_size, self.mlp_features, init, name="mlp", **kw)(h)
        else:
            h = _MLP(self.hidden_size, self.mlp_features, self.hidden_act, init, name="mlp", **kw)(h)
        h = _LayerScale(self.layerscale_value, name="layer_scale2", **kw)(h)
        return drop_path(h, deterministic) + x


class _Encoder(nn.Module):
    """`layer_{i}` for i < num_hidden_layers."""

    num_hidden_layers: int
    layer: Tuple[Tuple[str, Any], ...]  # Dinov2Layer's fields, as (name, value) pairs

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        for i in range(self.num_hidden_layers):
            x = Dinov2Layer(name=f"layer_{i}", **dict(self.layer))(x, deterministic)
        return x


# ------------------------------------------------------------------------------------------------- model


class Dinov2Model(nn.Module):
    """transformers' `Dinov2Model`, NHWC. Fields named as Dinov2Config keys take its defaults (DINOv2-base);
    `from_config` builds one from a config.json dict. Our own fields: position_interpolation ("size":
    transformers 5.23, the default; "scale_factor": transformers 4.32, as PCDMs was trained; module docstring),
    attention_implementation (see pgpis_jax.nn.attention), dtype (compute) and param_dtype; LayerNorms and softmax
    run in float32.

    __call__(pixel_values [B, H, W, num_channels] floating, deterministic=True, bool_masked_pos=None) ->
    {"last_hidden_state": [B, 1 + (H // ph) * (W // pw), D], "pooler_output": [B, D]} in `dtype`. Any H, W of
    at least one patch: the position embeddings are interpolated as `position_interpolation` says.
    Training (deterministic=False) needs a "dropout" RNG when hidden_dropout_prob, attention_probs_dropout_prob
    or drop_path_rate is non-zero.
    """

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    mlp_ratio: float = 4
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-6
    image_size: IntOrPair = 224
    patch_size: IntOrPair = 14
    num_channels: int = 3
    qkv_bias: bool = True
    layerscale_value: float = 1.0
    drop_path_rate: float = 0.0
    use_swiglu_ffn: bool = False
    use_mask_token: bool = True

    position_interpolation: str = "size"
    attention_implementation: str = "xla"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    # ------------------------------------------------------------------------------------------ config

    def __post_init__(self):
        self._validate()
        super().__post_init__()

    def _validate(self):
        def unsupported(key, expected):
            return ValueError(f"DINOv2 config {key!r}={getattr(self, key)!r} is not supported; expected {expected}")

        image, patch = _pair(self.image_size, "image_size"), _pair(self.patch_size, "patch_size")
        if min(image + patch) < 1 or image[0] < patch[0] or image[1] < patch[1]:
            raise ValueError(f"DINOv2 config: image_size {self.image_size!r} must hold at least one patch of "
                             f"patch_size {self.patch_size!r}")
        if image[0] // patch[0] != image[1] // patch[1]:
            raise unsupported("image_size", f"a square grid of patches (image_size // patch_size equal on both "
                                            f"axes; patch_size is {self.patch_size!r})")
        if self.hidden_size < self.num_attention_heads or self.num_attention_heads < 1:
            raise unsupported("num_attention_heads", f"between 1 and hidden_size ({self.hidden_size})")
        if not self.use_swiglu_ffn and self.hidden_act not in ACTIVATIONS:
            raise unsupported("hidden_act", " or ".join(map(repr, ACTIVATIONS)))
        if self.attention_implementation not in IMPLEMENTATIONS:
            raise unsupported("attention_implementation", " or ".join(map(repr, IMPLEMENTATIONS)))
        if self.position_interpolation not in POSITION_INTERPOLATIONS:
            raise ValueError(f"DINOv2 option position_interpolation={self.position_interpolation!r} is not "
                             f"supported; expected {' or '.join(map(repr, POSITION_INTERPOLATIONS))}")

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **options) -> "Dinov2Model":
        """The module for a transformers Dinov2Config (the dict of its config.json). Keys starting with "_" and
        keys without effect on Dinov2Model (bookkeeping, labels, output switches, Dinov2Backbone options) are
        ignored; model_type other than "dinov2", a head_dim other than hidden_size // num_attention_heads,
        non-empty pruned_heads and unknown keys raise ValueError naming the key. options set our own fields
        (position_interpolation, attention_implementation, dtype, param_dtype) or override config keys."""
        fields = {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}
        config_fields = fields - set(_OWN_FIELDS)
        arguments = {}
        for key, value in config.items():
            if key.startswith("_") or key in _INERT_CONFIG:
                continue
            if key == "model_type":
                if value != "dinov2":
                    raise ValueError(f"DINOv2 config 'model_type'={value!r}: expected 'dinov2'")
            elif key == "pruned_heads":
                if value:
                    raise ValueError(f"DINOv2 config 'pruned_heads'={value!r} is not supported; expected none")
            elif key == "head_dim":
                continue  # checked below, once hidden_size and num_attention_heads are known
            elif key in config_fields:
                arguments[key] = tuple(value) if isinstance(value, list) else value
            else:
                raise ValueError(f"unknown DINOv2 config key {key!r}")
        unknown = sorted(set(options) - fields)
        if unknown:
            raise TypeError(f"Dinov2Model.from_config: unexpected option(s) {', '.join(unknown)}")
        arguments.update(options)
        module = cls(**arguments)
        if config.get("head_dim") is not None and config["head_dim"] != module.head_dim:
            raise ValueError(f"DINOv2 config 'head_dim'={config['head_dim']!r} is not supported; expected "
                             f"hidden_size // num_attention_heads = {module.head_dim}")
        return module

    def to_config(self) -> dict:
        """A transformers Dinov2Config dict (config.json content) for this module."""
        config = {"architectures": ["Dinov2Model"], "model_type": "dinov2"}
        for field in dataclasses.fields(self):
            if field.name not in _OWN_FIELDS and field.name not in ("parent", "name"):
                value = getattr(self, field.name)
                config[field.name] = list(value) if isinstance(value, tuple) else value
        return config

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def mlp_features(self) -> int:
        """The MLP hidden width: int(hidden_size * mlp_ratio), or the SwiGLU width (`swiglu_hidden_features`)."""
        if self.use_swiglu_ffn:
            return swiglu_hidden_features(self.hidden_size, self.mlp_ratio)
        return int(self.hidden_size * self.mlp_ratio)

    def init_params(self, rng):
        """A fresh parameter tree (wrap in jax.eval_shape for shapes only), initialised as transformers does
        (truncated normal weights, zero biases and mask token, lambda1 = layerscale_value), from a one-patch
        dummy input."""
        patch = _pair(self.patch_size, "patch_size")
        return self.init(rng, jnp.zeros((1,) + patch + (self.num_channels,), self.dtype))["params"]

    # ------------------------------------------------------------------------------------------ forward

    def _check_pixels(self, pixel_values):
        shape, dtype = getattr(pixel_values, "shape", None), getattr(pixel_values, "dtype", None)
        if shape is None or dtype is None:
            pixel_values = np.asarray(pixel_values)
            shape, dtype = pixel_values.shape, pixel_values.dtype
        if len(shape) != 4 or shape[-1] != self.num_channels:
            raise ValueError(f"DINOv2 pixel_values must be NHWC [B, H, W, {self.num_channels}], got shape "
                             f"{tuple(shape)}")
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"DINOv2 pixel_values must be floating point (normalised images), got dtype {dtype}")
        patch = _pair(self.patch_size, "patch_size")
        if shape[1] < patch[0] or shape[2] < patch[1]:
            raise ValueError(f"DINOv2 pixel_values of {shape[1]}x{shape[2]} pixels hold no {patch[0]}x{patch[1]} "
                             "patch")
        return jnp.asarray(pixel_values)

    @nn.compact
    def __call__(self, pixel_values, deterministic: bool = True, bool_masked_pos=None):
        pixel_values = self._check_pixels(pixel_values)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        embeddings = Dinov2Embeddings(self.hidden_size, _pair(self.image_size, "image_size"),
                                      _pair(self.patch_size, "patch_size"), self.use_mask_token,
                                      self.hidden_dropout_prob, self.initializer_range,
                                      self.position_interpolation, name="embeddings", **kw)
        hidden = embeddings(pixel_values, bool_masked_pos, deterministic)
        layer = dict(hidden_size=self.hidden_size, num_heads=self.num_attention_heads, head_dim=self.head_dim,
                     mlp_features=self.mlp_features, use_swiglu_ffn=self.use_swiglu_ffn, hidden_act=self.hidden_act,
                     qkv_bias=self.qkv_bias, layer_norm_eps=self.layer_norm_eps,
                     layerscale_value=self.layerscale_value, attention_dropout=self.attention_probs_dropout_prob,
                     drop_path_rate=self.drop_path_rate, initializer_range=self.initializer_range,
                     attention_implementation=self.attention_implementation, **kw)
        hidden = _Encoder(self.num_hidden_layers, tuple(layer.items()), name="encoder")(hidden, deterministic)
        hidden = LayerNorm(self.layer_norm_eps, name="layernorm", **kw)(hidden)
        return {"last_hidden_state": hidden, "pooler_output": hidden[:, 0]}


def from_config(config: Mapping[str, Any], **options) -> Dinov2Model:
    """`Dinov2Model.from_config`."""
    return Dinov2Model.from_config(config, **options)


__all__ = ["ACTIVATIONS", "POSITION_INTERPOLATIONS", "DropPath", "Dinov2Embeddings", "Dinov2Layer", "Dinov2Model", "from_config",
           "interpolate_pos_encoding", "swiglu_hidden_features"]
