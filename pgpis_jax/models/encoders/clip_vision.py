"""The CLIP vision transformer (transformers' `CLIPVisionModel` and `CLIPVisionModelWithProjection`, and the
vision half of `CLIPModel`) in linen, NHWC, with transformers' parameter names:

  vision_model/embeddings/class_embedding                 [D]
  vision_model/embeddings/patch_embedding/kernel          [p, p, C, D]   (conv without bias)
  vision_model/embeddings/position_embedding/embedding    [1 + N, D]    (torch nn.Embedding)
  vision_model/pre_layrnorm/{scale,bias}                  (sic, transformers' spelling)
  vision_model/encoder/layers_i/{layer_norm1, self_attn/{q,k,v,out}_proj, layer_norm2, mlp/{fc1,fc2}}
  vision_model/post_layernorm/{scale,bias}
  visual_projection/kernel                                [D, projection_dim]  (with_projection only; no bias)

Forward: patch conv -> [CLS, patches] + position embeddings -> pre_layrnorm -> pre-LN encoder layers
(x += attn(ln1(x)); x += mlp(ln2(x)), mlp = fc1, hidden_act, fc2) -> last_hidden_state; pooler_output =
post_layernorm(last_hidden_state[:, 0]); image_embeds = visual_projection(pooler_output).

Used by PCDMs (OpenCLIP ViT-H/14 `image_embeds`, 1024-d), FPDM (OpenAI CLIP ViT-L/14, fine-tuned) and CFLD's
CLIP ablation (ViT-L/14 `last_hidden_state`). Not implemented: `interpolate_pos_encoding` (inputs must be
image_size x image_size), attention dropout (every released CLIP has attention_dropout 0).
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pgpis_jax.nn.activations import gelu
from pgpis_jax.nn.attention import IMPLEMENTATIONS, dot_product_attention
from pgpis_jax.nn.transformer import LayerNorm

ACTIVATIONS = ("quick_gelu", "gelu")

# CLIPVisionConfig keys that are fields of the module.
CONFIG_KEYS = ("hidden_size", "intermediate_size", "projection_dim", "num_hidden_layers", "num_attention_heads",
               "num_channels", "image_size", "patch_size", "hidden_act", "layer_norm_eps")
OWN_FIELDS = ("with_projection", "attention_implementation", "dtype", "param_dtype")
# Keys that change the network, supported only at these values.
_FIXED_CONFIG = {"attention_dropout": (0, 0.0), "pruned_heads": ({},)}
# Keys with no effect on the vision network's forward pass: initialisation, the unused `dropout` of old
# CLIPVisionConfigs, and the generic PretrainedConfig keys (generation, labels, tokens, bookkeeping) that
# transformers 4.x wrote into every sub-config.
_INERT_CONFIG = frozenset((
    "initializer_range", "initializer_factor", "dropout", "model_type", "architectures", "dtype", "torch_dtype",
    "transformers_version", "return_dict", "output_hidden_states", "output_attentions", "torchscript",
    "use_bfloat16", "tf_legacy_loss", "tie_word_embeddings", "chunk_size_feed_forward", "is_encoder_decoder",
    "is_decoder", "cross_attention_hidden_size", "add_cross_attention", "tie_encoder_decoder", "max_length",
    "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty",
    "temperature", "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "output_scores",
    "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens", "finetuning_task", "id2label",
    "label2id", "num_labels", "tokenizer_class", "prefix", "bos_token_id", "pad_token_id", "eos_token_id",
    "sep_token_id", "decoder_start_token_id", "task_specific_params", "problem_type", "gradient_checkpointing",
    "use_cache",
))
# Top-level CLIPConfig keys that concern the text tower or the contrastive head only.
_CLIP_TEXT_ONLY = frozenset(("text_config", "text_config_dict", "logit_scale_init_value"))
_ARCHITECTURES = {"CLIPVisionModel": False, "CLIPVisionModelWithProjection": True, "CLIPModel": True}


def _activation(name: str):
    if name == "quick_gelu":
        return lambda x: x * jax.nn.sigmoid(1.702 * x)
    if name == "gelu":
        return gelu
    raise ValueError(f"CLIP vision config hidden_act={name!r} is not supported; expected one of {ACTIVATIONS}")


def _square_size(value, key: str) -> int:
    """transformers accepts an int or an [h, w] pair for image_size / patch_size but only builds squares."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"CLIP vision config {key}={list(value)!r} is not supported; expected an int (square)")
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"CLIP vision config {key}={value!r} is not supported; expected an int")
    return int(value)


# --------------------------------------------------------------------------------------------------- layers


class CLIPVisionEmbeddings(nn.Module):
    """Patch conv (stride = kernel = patch_size, no bias), a learned class token and learned absolute position
    embeddings for 1 + (image_size // patch_size)^2 tokens."""

    hidden_size: int
    image_size: int
    patch_size: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values):
        batch = pixel_values.shape[0]
        num_positions = (self.image_size // self.patch_size) ** 2 + 1
        class_embedding = self.param("class_embedding", nn.initializers.normal(self.hidden_size**-0.5),
                                     (self.hidden_size,), self.param_dtype)
        patches = nn.Conv(self.hidden_size, (self.patch_size, self.patch_size), strides=self.patch_size,
                          padding="VALID", use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                          name="patch_embedding")(pixel_values.astype(self.dtype))
        patches = patches.reshape(batch, -1, self.hidden_size)
        cls = jnp.broadcast_to(class_embedding.astype(self.dtype), (batch, 1, self.hidden_size))
        positions = nn.Embed(num_positions, self.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                             name="position_embedding")(jnp.arange(num_positions))
        return jnp.concatenate([cls, patches], axis=1) + positions[None]


class CLIPAttention(nn.Module):
    """Multi-head self-attention with biased q/k/v/out projections, scale head_dim^-0.5, no mask."""

    hidden_size: int
    num_heads: int
    implementation: str = "xla"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        head_dim = self.hidden_size // self.num_heads
        dense = lambda name: nn.Dense(self.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,  # noqa: E731
                                      name=name)
        split = lambda t: t.reshape(t.shape[:2] + (self.num_heads, head_dim))  # noqa: E731
        out = dot_product_attention(split(dense("q_proj")(x)), split(dense("k_proj")(x)), split(dense("v_proj")(x)),
                                    self.implementation)
        return dense("out_proj")(out.reshape(out.shape[:2] + (self.hidden_size,)))


class CLIPMLP(nn.Module):
    """fc1 -> hidden_act -> fc2."""

    hidden_size: int
    intermediate_size: int
    hidden_act: str
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = nn.Dense(self.intermediate_size, name="fc1", **kw)(x)
        return nn.Dense(self.hidden_size, name="fc2", **kw)(_activation(self.hidden_act)(x))


class CLIPEncoderLayer(nn.Module):
    """Pre-LayerNorm transformer layer: x += self_attn(layer_norm1(x)); x += mlp(layer_norm2(x))."""

    hidden_size: int
    intermediate_size: int
    num_heads: int
    hidden_act: str
    layer_norm_eps: float
    attention_implementation: str = "xla"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = LayerNorm(self.layer_norm_eps, name="layer_norm1", **kw)(x)
        x = x + CLIPAttention(self.hidden_size, self.num_heads, self.attention_implementation, name="self_attn",
                              **kw)(h)
        h = LayerNorm(self.layer_norm_eps, name="layer_norm2", **kw)(x)
        return x + CLIPMLP(self.hidden_size, self.intermediate_size, self.hidden_act, name="mlp", **kw)(h)


class CLIPEncoder(nn.Module):
    """`num_hidden_layers` x CLIPEncoderLayer, named layers_0 ... (torch `encoder.layers.i`)."""

    num_hidden_layers: int
    layer: Mapping[str, Any]

    @nn.compact
    def __call__(self, x):
        for i in range(self.num_hidden_layers):
            x = CLIPEncoderLayer(name=f"layers_{i}", **self.layer)(x)
        return x


class CLIPVisionTransformer(nn.Module):
    """transformers' CLIPVisionModel body (torch module `vision_model` of the with-projection model): returns
    (last_hidden_state [B, 1 + N, D], pooler_output [B, D])."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    image_size: int
    patch_size: int
    hidden_act: str
    layer_norm_eps: float
    attention_implementation: str = "xla"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = CLIPVisionEmbeddings(self.hidden_size, self.image_size, self.patch_size, name="embeddings",
                                 **kw)(pixel_values)
        x = LayerNorm(self.layer_norm_eps, name="pre_layrnorm", **kw)(x)
        layer = dict(hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
                     num_heads=self.num_attention_heads, hidden_act=self.hidden_act,
                     layer_norm_eps=self.layer_norm_eps, attention_implementation=self.attention_implementation, **kw)
        x = CLIPEncoder(self.num_hidden_layers, layer, name="encoder")(x)
        pooled = LayerNorm(self.layer_norm_eps, name="post_layernorm", **kw)(x[:, 0])
        return x, pooled


# ------------------------------------------------------------------------------------------------ the model


class CLIPVisionModel(nn.Module):
    """CLIP's vision tower; with `with_projection` also transformers' `visual_projection` (the
    CLIPVisionModelWithProjection / CLIPModel image embedding). Fields mirror CLIPVisionConfig (defaults are
    transformers'); our own: with_projection, attention_implementation (see pgpis_jax.nn.attention), dtype
    (compute; LayerNorms and softmax in float32) and param_dtype.

    __call__(pixel_values [B, image_size, image_size, num_channels] float, NHWC, already normalised, e.g. by
    pgpis_jax.preprocessing.clip_preprocess) -> {"last_hidden_state": [B, 1 + N, D], "pooler_output": [B, D]
    (post_layernorm of the CLS token), and with_projection "image_embeds": [B, projection_dim]}, in `dtype`.
    transformers' CLIPVisionModelWithProjection returns no pooler_output; ours returns it anyway (the same
    tensor transformers' `vision_model` returns).
    """

    hidden_size: int = 768
    intermediate_size: int = 3072
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    with_projection: bool = False
    attention_implementation: str = "xla"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"CLIP vision config: hidden_size={self.hidden_size} is not a multiple of "
                             f"num_attention_heads={self.num_attention_heads}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"CLIP vision config hidden_act={self.hidden_act!r} is not supported; expected one of "
                             f"{ACTIVATIONS}")
        if self.attention_implementation not in IMPLEMENTATIONS:
            raise ValueError(f"CLIPVisionModel: attention_implementation={self.attention_implementation!r} is not "
                             f"supported; expected one of {IMPLEMENTATIONS}")
        if self.patch_size > self.image_size:
            raise ValueError(f"CLIP vision config: patch_size={self.patch_size} is larger than "
                             f"image_size={self.image_size}")
        super().__post_init__()

    # ------------------------------------------------------------------------------------------ config

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **options) -> "CLIPVisionModel":
        """The module for a transformers config.json dict: a CLIPVisionConfig (model_type "clip_vision_model") or
        a full CLIPConfig (model_type "clip": its vision_config, updated by a legacy vision_config_dict, and its
        top-level projection_dim; the text half is ignored).

        with_projection comes from `options` if given, else from `architectures` (CLIPVisionModel -> False;
        CLIPVisionModelWithProjection, CLIPModel -> True), else True for a full CLIPConfig; a CLIPVisionConfig
        without architectures needs the option. Other options set our own fields (attention_implementation,
        dtype, param_dtype) or override config keys. Keys that change the network at a value we do not build, and
        unknown keys, raise ValueError naming the key; keys starting with "_" and keys without effect on the
        vision network (initialisation, generation, labels, bookkeeping) are ignored.
        """
        vision, projection_dim = _vision_config(config)
        unknown = sorted(set(options) - set(CONFIG_KEYS) - set(OWN_FIELDS))
        if unknown:
            raise TypeError(f"CLIPVisionModel.from_config: unexpected option(s) {', '.join(unknown)}")
        values = {}
        for key, value in vision.items():
            if key.startswith("_") or key in _INERT_CONFIG:
                continue
            if key in _FIXED_CONFIG:
                if not any(value == allowed and type(value) is not bool for allowed in _FIXED_CONFIG[key]):
                    raise ValueError(f"CLIP vision config {key}={value!r} is not supported; expected "
                                     f"{' or '.join(map(repr, _FIXED_CONFIG[key]))}")
            elif key in CONFIG_KEYS:
                values[key] = value
            else:
                raise ValueError(f"unknown CLIP vision config key {key!r}")
        if projection_dim is not None:
            values["projection_dim"] = projection_dim
        if "with_projection" not in options:
            values["with_projection"] = _with_projection(config)
        values.update(options)
        for key in ("image_size", "patch_size"):
            if key in values:
                values[key] = _square_size(values[key], key)
        return cls(**values)

    def to_config(self) -> dict:
        """transformers' CLIPVisionConfig config.json content for this module, with `architectures` naming
        CLIPVisionModelWithProjection or CLIPVisionModel."""
        config = {"architectures": ["CLIPVisionModelWithProjection" if self.with_projection else "CLIPVisionModel"],
                  "model_type": "clip_vision_model", "attention_dropout": 0.0}
        config.update({key: getattr(self, key) for key in CONFIG_KEYS})
        return config

    def init_params(self, rng):
        """A fresh parameter tree (wrap in jax.eval_shape for shapes only)."""
        pixels = jnp.zeros((1, self.image_size, self.image_size, self.num_channels), self.dtype)
        return self.init(rng, pixels)["params"]

    # ------------------------------------------------------------------------------------------ forward

    @nn.compact
    def __call__(self, pixel_values, deterministic: bool = True):
        """See the class docstring; `deterministic` is accepted for the common encoder interface (CLIP's vision
        tower has no dropout)."""
        del deterministic
        expected = f"[B, {self.image_size}, {self.image_size}, {self.num_channels}] (NHWC)"
        shape = tuple(getattr(pixel_values, "shape", ()))
        if len(shape) != 4 or shape[-1] != self.num_channels:
            raise ValueError(f"CLIPVisionModel: pixel_values must be {expected} floating-point pixels, got shape "
                             f"{shape}" + (" (NCHW? transpose to NHWC)" if len(shape) == 4
                                           and shape[1] == self.num_channels else ""))
        if not jnp.issubdtype(pixel_values.dtype, jnp.floating):
            raise ValueError(f"CLIPVisionModel: pixel_values must be floating-point (normalised pixels, e.g. from "
                             f"pgpis_jax.preprocessing.clip_preprocess), got dtype {pixel_values.dtype}")
        if shape[1:3] != (self.image_size, self.image_size):
            raise ValueError(f"CLIPVisionModel: pixel_values must be {expected}, got shape {shape}; resize and crop "
                             f"to {self.image_size}x{self.image_size} (position-embedding interpolation is not "
                             "supported)")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        last_hidden_state, pooled = CLIPVisionTransformer(
            hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
            image_size=self.image_size, patch_size=self.patch_size, hidden_act=self.hidden_act,
            layer_norm_eps=self.layer_norm_eps, attention_implementation=self.attention_implementation,
            name="vision_model", **kw)(pixel_values)
        outputs = {"last_hidden_state": last_hidden_state, "pooler_output": pooled}
        if self.with_projection:
            outputs["image_embeds"] = nn.Dense(self.projection_dim, use_bias=False, name="visual_projection",
                                               **kw)(pooled)
        return outputs


# ------------------------------------------------------------------------------------------------ helpers


def is_full_clip_config(config: Mapping[str, Any]) -> bool:
    """Whether a config dict is a full CLIPConfig (vision and text towers) rather than a CLIPVisionConfig."""
    return config.get("model_type") == "clip" or "vision_config" in config or "vision_config_dict" in config


def _vision_config(config: Mapping[str, Any]):
    """(vision config dict, projection_dim override or None) of a CLIPVisionConfig or CLIPConfig dict."""
    if not isinstance(config, Mapping):
        raise ValueError(f"CLIP config must be a dict (the content of config.json), got {type(config).__name__}")
    model_type = config.get("model_type", "clip_vision_model")
    if not is_full_clip_config(config):
        if model_type != "clip_vision_model":
            raise ValueError(f"CLIP vision config: model_type={model_type!r}; expected 'clip_vision_model' or 'clip'")
        return dict(config), None
    if model_type != "clip":
        raise ValueError(f"CLIP config: model_type={model_type!r}; expected 'clip' for a config with a vision_config")
    for key, value in config.items():
        if key.startswith("_") or key in _INERT_CONFIG or key in _CLIP_TEXT_ONLY:
            continue
        if key not in ("vision_config", "vision_config_dict", "projection_dim"):
            raise ValueError(f"unknown CLIP config key {key!r}")
    vision = dict(config.get("vision_config") or {})
    vision.update(config.get("vision_config_dict") or {})  # transformers' legacy override, as CLIPConfig does
    vision.pop("projection_dim", None)  # CLIPModel's visual_projection uses the top-level projection_dim
    return vision, config.get("projection_dim", 512)


def _with_projection(config: Mapping[str, Any]) -> bool:
    architectures = config.get("architectures") or []
    known = [name for name in architectures if name in _ARCHITECTURES]
    if known:
        return _ARCHITECTURES[known[0]]
    if architectures:
        raise ValueError(f"CLIP config architectures={list(architectures)!r} is not supported; expected one of "
                         f"{sorted(_ARCHITECTURES)} (or pass with_projection=True/False)")
    if is_full_clip_config(config):
        return True
    raise ValueError("CLIP vision config has no 'architectures': pass with_projection=True "
                     "(CLIPVisionModelWithProjection) or with_projection=False (CLIPVisionModel)")


def from_config(config: Mapping[str, Any], **options) -> CLIPVisionModel:
    """`CLIPVisionModel.from_config`."""
    return CLIPVisionModel.from_config(config, **options)


__all__ = ["CLIPVisionModel", "from_config", "ACTIVATIONS"]
