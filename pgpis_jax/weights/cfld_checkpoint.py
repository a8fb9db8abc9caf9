"""The original CFLD checkpoints (accelerate's save_state of a training run, as in the authors' release) to our
parameter trees and back, as pure functions on state dicts (NumPy arrays).

  pytorch_model.bin    the `build_model` container -> CFLDConditioner's params:
                       backbone.*            Microsoft's Swin layout (fused attn.qkv, patch_embed, ...) with its
                                             relative_position_index / attn_mask buffers, which are derived and
                                             dropped on import, written on export
                       appearance_encoder.*  zero_conv_ins.i, zero_conv_outs.i, blocks.i.k.* (HGA)
                       pose_encoder.*        conv_in, resnets.i.* (the adapter)
                       decoder.*             query_feat, pos_embed, kv_pos_embed, blocks.r.* (PRD); the
                                             ablations': decoder_fc (B5), none (B1), clip_model.transformer.*
                                             (B2's CLIP, transformers' CLIPVisionModel names), clip_model.mapper.*
                                             and clip_model.final_ln.*
                       learnable_vector      the null prompt
  pytorch_model_1.bin  the UNet wrapper: model.* = a complete SD-1.5 UNet2DConditionModel (diffusers names)
                       -> UNet2DConditionModel's params.
Every other key converts by rule (pgpis_jax.weights.pytorch). Imports are strict: missing, unexpected and
mis-shaped keys are one UserError naming the file. `read_torch_state_dict` (pgpis_jax.weights.files) reads
either file.
"""

from __future__ import annotations

import functools
from typing import Dict, Mapping

import jax
import numpy as np

from pgpis_jax.errors import UserError
from pgpis_jax.models.cfld import CFLDConditioner
from pgpis_jax.models.unet import UNet2DConditionModel
from pgpis_jax.weights.diffusers_io import LIST_NAMES as DIFFUSERS_LIST_NAMES
from pgpis_jax.weights.encoder_checkpoints import (clip_vision_params_from_state_dict, swin_params_from_state_dict,
                                                   swin_params_to_microsoft_state_dict)
from pgpis_jax.weights.pytorch import check_params_match, params_to_state_dict, state_dict_to_params

CONDITIONER_FILE = "pytorch_model.bin"
UNET_FILE = "pytorch_model_1.bin"
BACKBONE_PREFIX = "backbone."
CLIP_PREFIX = "decoder.clip_model.transformer."
UNET_PREFIX = "model."
# linen list attributes of the container's non-Swin modules, named "<name>_<i>" where torch says "<name>.<i>"
CONDITIONER_LIST_NAMES = ("blocks", "zero_conv_ins", "zero_conv_outs", "resnets", "to_out", "net", "layers",
                          "mapper", "resblocks")


@functools.lru_cache(maxsize=8)
def _abstract_params(module):
    """The module's parameter shapes (jax.eval_shape of its init_params), once per module configuration."""
    return jax.eval_shape(module.init_params, jax.random.key(0))


def _check(params, module, source: str):
    try:
        check_params_match(params, _abstract_params(module), "its state dict")
    except ValueError as error:
        raise UserError(f"{source}: not a matching CFLD checkpoint: {error}") from None


def _float32(params) -> dict:
    return jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), params)


def conditioner_params_from_state_dict(state_dict: Mapping[str, np.ndarray], module: CFLDConditioner,
                                       source: str = CONDITIONER_FILE) -> dict:
    """CFLDConditioner's params (float32 NumPy) from the state dict of the original's build_model
    (pytorch_model.bin), checked strictly against module's shapes (jax.eval_shape of its init); `source` names
    the file in the error. Relative-position tables must already have the module's windows (a trained CFLD
    checkpoint does; pretrained Swin weights go through load_swin_checkpoint instead)."""
    backbone = {key[len(BACKBONE_PREFIX):]: value for key, value in state_dict.items()
                if key.startswith(BACKBONE_PREFIX)}
    clip = {key[len(CLIP_PREFIX):]: value for key, value in state_dict.items() if key.startswith(CLIP_PREFIX)}
    rest = {key: value for key, value in state_dict.items() if not key.startswith((BACKBONE_PREFIX, CLIP_PREFIX))}
    params = state_dict_to_params(rest)
    if clip:
        params.setdefault("decoder", {}).setdefault("clip_model", {})["transformer"] = \
            clip_vision_params_from_state_dict(clip, {}, with_projection=False)
    if backbone:
        swin = module.backbone
        params["backbone"] = swin_params_from_state_dict(backbone, swin.to_config(), resize_tables=False,
                                                         final_norm=swin.final_norm,
                                                         add_pooling_layer=swin.add_pooling_layer)
    _check(params, module, source)
    return _float32(params)


def conditioner_state_dict(params: Mapping, module: CFLDConditioner) -> Dict[str, np.ndarray]:
    """The state dict of the original's build_model (pytorch_model.bin's layout, float32; the Swin buffers as
    the original saves them) for CFLDConditioner params."""
    params = dict(_float32(params))
    state = {} if module.backbone is None else {
        BACKBONE_PREFIX + key: value
        for key, value in swin_params_to_microsoft_state_dict(params.pop("backbone"), module.backbone).items()}
    state.update(params_to_state_dict(params, CONDITIONER_LIST_NAMES))
    return state


def unet_params_from_state_dict(state_dict: Mapping[str, np.ndarray], module: UNet2DConditionModel,
                                source: str = UNET_FILE) -> dict:
    """UNet2DConditionModel's params (float32 NumPy) from the original's UNet wrapper state dict
    (pytorch_model_1.bin: model.* = diffusers' SD-1.5 UNet names), checked strictly against module's shapes;
    keys outside model.* are reported as unexpected."""
    outside = sorted(key for key in state_dict if not key.startswith(UNET_PREFIX))
    if outside:
        shown = ", ".join(outside[:20]) + (" ..." if len(outside) > 20 else "")
        raise UserError(f"{source}: not a matching CFLD checkpoint: unexpected keys outside '{UNET_PREFIX}*' "
                        f"({len(outside)}): {shown}")
    params = state_dict_to_params({key[len(UNET_PREFIX):]: value for key, value in state_dict.items()})
    _check(params, module, source)
    return _float32(params)


def unet_state_dict(params: Mapping) -> Dict[str, np.ndarray]:
    """The state dict of the original's UNet wrapper (pytorch_model_1.bin's layout, float32) for UNet params."""
    return {UNET_PREFIX + key: value for key, value in params_to_state_dict(_float32(params),
                                                                             DIFFUSERS_LIST_NAMES).items()}
