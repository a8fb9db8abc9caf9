"""PyTorch checkpoints of the image encoders (pgpis_jax.models.encoders) into our parameter trees.

One function per encoder turns a state dict (NumPy arrays) of any checkpoint layout we read into the
module's parameter tree; keys we do not know stay in the tree, so that check_params_match reports them:
  clip_vision_params_from_state_dict: transformers' CLIPVisionModel(WithProjection) / CLIPModel;
  dinov2_params_from_state_dict: the Hub DINOv2 checkpoints, transformers 5's in-memory layout,
      Dinov2ForImageClassification;
  swin_params_from_state_dict: transformers' SwinModel (also `swin.`-prefixed and transformers 5's names) and
      Microsoft's original layout, with relative-position tables resized to the module's windows as CFLD does.
`load_swin_checkpoint` reads a Swin `.pth` / `.bin` file and checks it against the module;
`swin_params_to_microsoft_state_dict` writes a Swin tree in Microsoft's layout (CFLD's `backbone.*`).
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, Mapping, Optional

import jax
import numpy as np

from pgpis_jax.interpolation import resize_bicubic
from pgpis_jax.models.encoders.clip_vision import is_full_clip_config
from pgpis_jax.models.encoders.swin import (SwinModel, relative_position_index, shifted_window_mask,
                                            stage_resolutions)
from pgpis_jax.weights.pytorch import check_params_match, params_to_state_dict, state_dict_to_params

# ------------------------------------------------------------------------------------------------------ CLIP

# Top-level torch modules of a CLIPVisionModel saved by transformers >= 5 (no "vision_model." prefix).
_BARE_VISION_MODULES = ("embeddings", "encoder", "pre_layrnorm", "post_layernorm")


def clip_vision_params_from_state_dict(state_dict: Mapping[str, np.ndarray], config: Mapping[str, Any],
                                       with_projection: Optional[bool] = None) -> dict:
    """CLIPVisionModel's parameter tree from a PyTorch state dict (NumPy arrays) of
      - CLIPVisionModelWithProjection: `vision_model.*`, `visual_projection.weight`;
      - CLIPVisionModel: `vision_model.*` (transformers 4) or the same keys without the prefix
        (`embeddings.*`, `encoder.*`, `pre_layrnorm.*`, `post_layernorm.*`, transformers >= 5);
      - CLIPModel (when `config` is a full CLIPConfig): its `text_model.*`, `text_projection.*` and
        `logit_scale` are dropped.
    The `embeddings.position_ids` buffer that transformers < 4.31 saved is dropped; with
    with_projection=False `visual_projection.*` is dropped too (a CLIPModel checkpoint loaded into the bare
    vision tower). Any other key survives into the tree, so that check_params_match reports it.
    """
    full = is_full_clip_config(config)
    renamed = {}
    for key, value in state_dict.items():
        if full and (key.startswith(("text_model.", "text_projection.")) or key == "logit_scale"):
            continue
        if key in ("vision_model.embeddings.position_ids", "embeddings.position_ids"):
            continue
        if with_projection is False and key.startswith("visual_projection."):
            continue
        if key.split(".", 1)[0] in _BARE_VISION_MODULES:
            key = "vision_model." + key
        renamed[key] = value
    return state_dict_to_params(renamed, embedding_modules=("vision_model.embeddings.position_embedding",))


# ---------------------------------------------------------------------------------------------------- DINOv2


def dinov2_params_from_state_dict(state_dict: Mapping[str, np.ndarray],
                                  config: Optional[Mapping[str, Any]] = None) -> dict:
    """Dinov2Model's parameter tree from a PyTorch state dict (NumPy arrays) of
      - a Hub DINOv2 checkpoint / transformers' save_pretrained (attention.attention.{query,key,value},
        attention.output.dense, mlp.{fc1,fc2} or mlp.{weights_in,weights_out}); Dinov2Backbone has the
        same keys;
      - transformers 5's in-memory Dinov2Model.state_dict() (attention.{q,k,v,o}_proj; mlp.gate_proj and
        mlp.up_proj, concatenated into weights_in, mlp.down_proj -> weights_out);
      - Dinov2ForImageClassification (either layout, keys prefixed `dinov2.`): its `classifier.*` head is
        dropped.
    Any other key survives into the tree, so that check_params_match reports it. `config` is accepted for
    the common encoder interface and not needed."""
    del config
    items = dict(state_dict)
    if any(key.startswith("dinov2.") for key in items):
        items = {key[len("dinov2."):] if key.startswith("dinov2.") else key: value
                 for key, value in items.items() if not key.startswith("classifier.")}
    renamed = {}
    for key, value in items.items():
        key = re.sub(r"\.attention\.([qkv])_proj\.",
                     lambda m: {"q": ".attention.attention.query.", "k": ".attention.attention.key.",
                                "v": ".attention.attention.value."}[m[1]], key)
        key = re.sub(r"\.attention\.o_proj\.", ".attention.output.dense.", key)
        key = re.sub(r"\.mlp\.down_proj\.", ".mlp.weights_out.", key)
        if key in renamed:
            raise ValueError(f"two state-dict entries map to {key!r}")
        renamed[key] = value
    for key in [k for k in renamed if ".mlp.gate_proj." in k]:
        up_key = key.replace(".mlp.gate_proj.", ".mlp.up_proj.")
        fused_key = key.replace(".mlp.gate_proj.", ".mlp.weights_in.")
        if up_key in renamed and fused_key not in renamed:
            renamed[fused_key] = np.concatenate([np.asarray(renamed.pop(key)), np.asarray(renamed.pop(up_key))],
                                                axis=0)
    return state_dict_to_params(renamed)


# ------------------------------------------------------------------------------------------------------ Swin


def resize_relative_position_bias_table(table: np.ndarray, window: int) -> np.ndarray:
    """A [(2w'-1)^2, heads] relative-position-bias table resized for window `window` exactly as CFLD does:
    torch F.interpolate(table.permute(1, 0).view(1, heads, S, S), size=(S', S'), mode='bicubic',
    align_corners=False) then back to [(S')^2, heads]; S' = 2 window - 1. Returned in the table's dtype."""
    table = np.asarray(table)
    rows, heads = table.shape
    side = math.isqrt(rows)
    if side * side != rows:
        raise ValueError(f"relative_position_bias_table with {rows} rows is not a square grid")
    new_side = 2 * window - 1
    if side == new_side:
        return table
    if not np.issubdtype(table.dtype, np.floating):
        raise ValueError(f"relative_position_bias_table must be floating point, got {table.dtype}")
    grid = table.T.reshape(1, heads, side, side)
    resized = resize_bicubic(grid, size=(new_side, new_side))
    return np.ascontiguousarray(resized.reshape(heads, new_side * new_side).T)


def swin_params_from_state_dict(state_dict: Mapping[str, np.ndarray], config: Mapping[str, Any],
                                resize_tables: bool = True, **options) -> dict:
    """SwinModel's parameter tree from a PyTorch state dict (NumPy arrays) in one of these layouts:
    - transformers' SwinModel (save_pretrained: `embeddings.*`, `encoder.layers.N.blocks.M.attention.self.
      query`, ...; a `swin.` prefix (SwinForImageClassification) is stripped; transformers >= 5's in-memory
      names `attention.q_proj` / `o_proj` / `relative_position_bias.*` / `mlp.fc1` are accepted too);
      `relative_position_index` buffers and `classifier.*` / `pooler.*` keys are dropped;
    - Microsoft's original (`patch_embed.*`, `layers.N.blocks.M.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1,
      mlp.fc2}`, `norm`): the fused qkv is split into query, key, value; `relative_position_index`,
      `attn_mask` and `head.*` are dropped.
    The final norm (`layernorm` / `norm`) is dropped when the module has final_norm=False (options).
    Relative-position tables of another window are resized to the module's stage windows as CFLD does
    (torch bicubic, see resize_relative_position_bias_table), unless resize_tables=False. Keys we do not
    know stay in the tree, so that check_params_match reports them.
    config: the transformers SwinConfig dict; options as for SwinModel.from_config (e.g. final_norm=False)."""
    module = SwinModel.from_config(config, **options)
    state = {k: np.asarray(v) for k, v in state_dict.items()}
    if any(k.startswith(("patch_embed.", "layers.")) for k in state):
        state = _swin_from_microsoft_layout(state)
    else:
        state = _swin_from_transformers_layout(state)
    if not module.final_norm:
        state = {k: v for k, v in state.items() if not k.startswith("layernorm.")}
    if resize_tables:
        windows = module.stage_windows()
        for key, value in state.items():
            parts = key.split(".")
            if (parts[-1] == "relative_position_bias_table" and parts[:2] == ["encoder", "layers"]
                    and parts[2].isdigit() and int(parts[2]) < len(windows) and value.ndim == 2
                    and math.isqrt(value.shape[0]) ** 2 == value.shape[0]):
                state[key] = resize_relative_position_bias_table(value, windows[int(parts[2])][0])
    return state_dict_to_params(state)


_SWIN_TRANSFORMERS_V5_RENAMES = (
    (".attention.q_proj.", ".attention.self.query."),
    (".attention.k_proj.", ".attention.self.key."),
    (".attention.v_proj.", ".attention.self.value."),
    (".attention.o_proj.", ".attention.output.dense."),
    (".attention.relative_position_bias.relative_position_bias_table", ".attention.self.relative_position_bias_table"),
    (".attention.relative_position_bias.relative_position_index", ".attention.self.relative_position_index"),
    (".mlp.fc1.", ".intermediate.dense."),
    (".mlp.fc2.", ".output.dense."),
)


def _swin_from_transformers_layout(state: dict) -> dict:
    """transformers' saved or in-memory names -> its save_pretrained names (prefix, heads and buffers dropped)."""
    if any(k.startswith("swin.") for k in state):  # SwinForImageClassification / SwinForMaskedImageModeling
        state = {k[len("swin."):] if k.startswith("swin.") else k: v for k, v in state.items()}
    out = {}
    for key, value in state.items():
        if key.startswith(("classifier.", "pooler.")):  # heads of SwinForImageClassification and the like
            continue
        if key.startswith("encoder."):
            for old, new in _SWIN_TRANSFORMERS_V5_RENAMES:
                key = key.replace(old, new)
            if key.endswith(".attention.self.relative_position_index"):  # a buffer (older transformers)
                continue
        out[key] = value
    return out


_SWIN_MICROSOFT_BLOCK_RENAMES = {
    "norm1": "layernorm_before", "attn.proj": "attention.output.dense",
    "norm2": "layernorm_after", "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense",
}


def _swin_from_microsoft_layout(state: dict) -> dict:
    """Microsoft's swin_transformer.py names -> transformers' names (qkv split; buffers and head dropped)."""
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "head" or parts[-1] in ("relative_position_index", "attn_mask"):
            continue
        if parts[0] == "patch_embed" and len(parts) == 3 and parts[1] in ("proj", "norm"):
            module = "patch_embeddings.projection" if parts[1] == "proj" else "norm"
            out[f"embeddings.{module}.{parts[2]}"] = value
        elif key == "absolute_pos_embed":
            out["embeddings.position_embeddings"] = value
        elif parts[0] == "norm" and len(parts) == 2:
            out[f"layernorm.{parts[1]}"] = value
        elif parts[0] == "layers" and len(parts) >= 4 and parts[2] == "downsample":
            out["encoder." + key] = value
        elif parts[0] == "layers" and len(parts) >= 6 and parts[2] == "blocks":
            prefix, inner, leaf = f"encoder.layers.{parts[1]}.blocks.{parts[3]}", ".".join(parts[4:-1]), parts[-1]
            if inner == "attn.qkv":
                if value.shape[0] % 3:
                    raise ValueError(f"{key}: fused qkv of {value.shape[0]} rows is not divisible by 3")
                for name, chunk in zip(("query", "key", "value"), np.split(value, 3, axis=0)):
                    out[f"{prefix}.attention.self.{name}.{leaf}"] = chunk
            elif inner in _SWIN_MICROSOFT_BLOCK_RENAMES:
                out[f"{prefix}.{_SWIN_MICROSOFT_BLOCK_RENAMES[inner]}.{leaf}"] = value
            elif inner == "attn" and leaf == "relative_position_bias_table":
                out[f"{prefix}.attention.self.relative_position_bias_table"] = value
            else:
                out[key] = value
        else:
            out[key] = value
    return out


def swin_params_to_microsoft_state_dict(params: Mapping, module: SwinModel) -> dict:
    """The state dict (NumPy arrays) of Microsoft's SwinTransformer (the layout CFLD's backbone saves) for
    SwinModel params: `patch_embed.{proj,norm}`, `layers.N.blocks.M.{norm1, attn.qkv (query, key, value rows
    fused), attn.proj, attn.relative_position_bias_table, norm2, mlp.fc1, mlp.fc2}`, `layers.N.downsample.*`,
    `norm` (final_norm) and `absolute_pos_embed`, plus the buffers that module saves: every block's
    `attn.relative_position_index` (int64) and each shifted block's `attn_mask` ([nW, N, N] float32, -100 / 0)
    at the module's image_size. The inverse of swin_params_from_state_dict on that layout (which drops the
    buffers); values are copied exactly."""
    state = params_to_state_dict(params, ("layers", "blocks"))
    renames = {v: k for k, v in _SWIN_MICROSOFT_BLOCK_RENAMES.items()}
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[:2] == ["embeddings", "patch_embeddings"]:
            out[f"patch_embed.proj.{parts[-1]}"] = value
        elif parts[:2] == ["embeddings", "norm"]:
            out[f"patch_embed.norm.{parts[-1]}"] = value
        elif key == "embeddings.position_embeddings":
            out["absolute_pos_embed"] = value
        elif parts[0] == "layernorm":
            out[f"norm.{parts[-1]}"] = value
        elif parts[3] == "downsample":
            out[".".join(parts[1:])] = value
        else:
            block, inner, leaf = ".".join(parts[1:5]), ".".join(parts[5:-1]), parts[-1]
            if inner == "attention.self.query":
                fused = [state[".".join(parts[:5] + ["attention", "self", name, leaf])]
                         for name in ("query", "key", "value")]
                out[f"{block}.attn.qkv.{leaf}"] = np.concatenate(fused, axis=0)
            elif leaf == "relative_position_bias_table":
                out[f"{block}.attn.relative_position_bias_table"] = value
            elif inner not in ("attention.self.key", "attention.self.value"):
                out[f"{block}.{renames[inner]}.{leaf}"] = value
    height, width = (module.image_size,) * 2 if isinstance(module.image_size, int) else module.image_size
    resolutions = stage_resolutions(height, width, module.patch_size, len(module.depths))
    for i, ((window, shift), (rows, cols)) in enumerate(zip(module.stage_windows(), resolutions)):
        for j in range(module.depths[i]):
            out[f"layers.{i}.blocks.{j}.attn.relative_position_index"] = relative_position_index(window).astype(
                np.int64)
            if shift and j % 2:
                out[f"layers.{i}.blocks.{j}.attn_mask"] = shifted_window_mask(-(-rows // window) * window,
                                                                              -(-cols // window) * window,
                                                                              window, shift)
    return out


def load_swin_checkpoint(path: str, config: Mapping[str, Any], prefix: str = "", **options) -> dict:
    """SwinModel's parameter tree from a PyTorch checkpoint file of the Microsoft layout (e.g.
    swin_base_patch4_window12_384_22kto1k.pth, read with torch.load(weights_only=True), its "model" entry
    when present) or of transformers' layout. prefix: take only the keys under it (e.g. "backbone." in CFLD's
    pytorch_model.bin; the rest belong to other modules). The tree is checked against the module's shapes
    (ValueError listing missing / unexpected / mis-shaped keys). config / options as for
    SwinModel.from_config, e.g. load_swin_checkpoint(path, CFLD_SWIN_B_CONFIG, final_norm=False) (tables
    resized from window 12)."""
    import torch

    if not os.path.isfile(path):
        raise FileNotFoundError(f"Swin checkpoint {path!r} does not exist")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(checkpoint, Mapping) and "model" in checkpoint and isinstance(checkpoint["model"], Mapping):
        checkpoint = checkpoint["model"]
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"Swin checkpoint {path!r} holds a {type(checkpoint).__name__}, not a state dict")
    state = {}
    for key, value in checkpoint.items():
        if not key.startswith(prefix):
            continue
        if not torch.is_tensor(value):
            raise ValueError(f"Swin checkpoint {path!r}: entry {key!r} is a {type(value).__name__}, not a tensor")
        value = value.detach().cpu()
        if value.dtype == torch.bfloat16:
            value = value.float()
        state[key[len(prefix):]] = value.numpy()
    if not state:
        raise ValueError(f"Swin checkpoint {path!r} has no keys under the prefix {prefix!r}")
    params = swin_params_from_state_dict(state, config, **options)
    module = SwinModel.from_config(config, **options)
    check_params_match(params, jax.eval_shape(module.init_params, jax.random.key(0)), f"Swin checkpoint {path!r}")
    return params
