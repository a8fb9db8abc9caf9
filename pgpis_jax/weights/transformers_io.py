"""transformers model directories (config.json + model.safetensors / pytorch_model.bin) into our encoders.

`load_transformers` picks the module from the config's `architectures` (CLIPVisionModelWithProjection,
CLIPVisionModel, CLIPModel, Dinov2Model, SwinModel), converts the PyTorch weights with that encoder's
converter in encoder_checkpoints.py and checks them strictly against its `jax.eval_shape` tree.
`save_transformers` writes a CLIP vision or DINOv2 directory that transformers' `from_pretrained` loads.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp

from pgpis_jax.models.encoders.clip_vision import CLIPVisionModel
from pgpis_jax.models.encoders.dinov2 import Dinov2Model
from pgpis_jax.models.encoders.swin import SwinModel
from pgpis_jax.weights.encoder_checkpoints import (clip_vision_params_from_state_dict, dinov2_params_from_state_dict,
                                                   swin_params_from_state_dict)
from pgpis_jax.weights.files import CONFIG_NAME, read_config, read_state_dict, resolve_model_dir
from pgpis_jax.weights.pytorch import check_params_match, params_to_state_dict

# architecture -> (module class, converter(state_dict, config, module, options) -> params)
_ARCHITECTURES: Dict[str, Tuple[Any, Callable]] = {
    name: (CLIPVisionModel, lambda state, config, module, options: clip_vision_params_from_state_dict(
        state, config, with_projection=module.with_projection))
    for name in ("CLIPVisionModelWithProjection", "CLIPVisionModel", "CLIPModel")
}
_ARCHITECTURES["Dinov2Model"] = (Dinov2Model, lambda state, config, module, options:
                                 dinov2_params_from_state_dict(state, config))
_ARCHITECTURES["SwinModel"] = (SwinModel, lambda state, config, module, options:
                               swin_params_from_state_dict(state, config, **options))
_MODEL_TYPES = {"clip_vision_model": "CLIPVisionModelWithProjection", "clip": "CLIPModel", "dinov2": "Dinov2Model",
                "swin": "SwinModel"}
SUPPORTED_ARCHITECTURES = tuple(_ARCHITECTURES)


def _architecture(config: Mapping[str, Any]) -> str:
    architectures = config.get("architectures") or []
    name = architectures[0] if architectures else _MODEL_TYPES.get(config.get("model_type"))
    if name not in _ARCHITECTURES:
        raise ValueError(f"architecture {name!r} (model_type {config.get('model_type')!r}) is not supported; "
                         f"expected one of {', '.join(SUPPORTED_ARCHITECTURES)}")
    return name


def module_from_transformers_config(config: Mapping[str, Any], **module_options):
    """The linen module for a transformers config dict, chosen by its `architectures` (else `model_type`).

    module_options: our own fields (dtype, param_dtype, attention_implementation; for DINOv2 also
    position_interpolation="scale_factor", transformers 4.32's resize of the position table, which PCDMs'
    checkpoints were trained with, or "size", transformers 5's, the default) or config overrides (e.g.
    final_norm=False and window_size=16 for CFLD's Swin).
    """
    module_class, _ = _ARCHITECTURES[_architecture(config)]
    return module_class.from_config(dict(config), **module_options)


def load_transformers(path_or_repo_id: str, subfolder: Optional[str] = None, dtype=jnp.float32,
                      **module_options) -> Tuple[Any, Any]:
    """(module, params) from a transformers model directory or hub id; params cast to `dtype`.

    Missing or unexpected weights and wrong shapes are one error naming the directory and listing them.
    """
    directory = resolve_model_dir(path_or_repo_id, subfolder)
    config = read_config(directory)
    try:
        name = _architecture(config)
        module = module_from_transformers_config(config, **module_options)
    except ValueError as error:
        raise ValueError(f"{os.path.join(directory, CONFIG_NAME)}: {error}") from None
    state_dict = read_state_dict(directory, "pytorch_model")
    params = _ARCHITECTURES[name][1](state_dict, config, module, module_options)
    expected = jax.eval_shape(lambda: module.init_params(jax.random.key(0)))
    check_params_match(params, expected, directory)
    return module, jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype), params)


# linen list attributes named "<name>_<i>" where torch says "<name>.<i>" (CLIP's encoder.layers, DINOv2's encoder.layer)
SAVABLE_LIST_NAMES = {"CLIPVisionModelWithProjection": ("layers",), "CLIPVisionModel": ("layers",),
                      "Dinov2Model": ("layer",)}


def save_transformers(config: Mapping[str, Any], params, out_dir: str) -> str:
    """Writes config.json (`config`, a CLIP vision or DINOv2 config.json dict; a full CLIPConfig is written as the
    CLIPVisionModelWithProjection our module is) and model.safetensors (float32, the checkpoint layout transformers
    publishes) to out_dir, which must not exist; returns out_dir."""
    import numpy as np
    from safetensors.numpy import save_file

    name = _architecture(config)
    if name == "CLIPModel":   # our module holds its vision tower and projection: written as that model
        config, name = CLIPVisionModel.from_config(config).to_config(), "CLIPVisionModelWithProjection"
    if name not in SAVABLE_LIST_NAMES:
        raise ValueError(f"saving architecture {name!r} is not supported; expected one of "
                         f"{', '.join(SAVABLE_LIST_NAMES)}")
    os.makedirs(out_dir)
    state_dict = params_to_state_dict(jax.tree.map(lambda x: np.asarray(x, np.float32), params),
                                      SAVABLE_LIST_NAMES[name])
    with open(os.path.join(out_dir, CONFIG_NAME), "w") as f:
        json.dump(dict(config), f, indent=2)
    save_file(state_dict, os.path.join(out_dir, "model.safetensors"))
    return out_dir
