"""diffusers model directories (config.json + diffusion_pytorch_model.{safetensors,bin}) in and out.

`load_diffusers` reads a local directory (or, on a machine that is online, a Hugging Face hub id), builds
our linen module from the config, converts the PyTorch weights by rule and checks them strictly against
the module's `jax.eval_shape` tree. `save_diffusers` writes a directory that diffusers'
`from_pretrained` loads.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from pgpis_jax.models.unet import UNet2DConditionModel
from pgpis_jax.models.vae import AutoencoderKL
from pgpis_jax.weights.files import CONFIG_NAME, read_config, read_state_dict, resolve_model_dir
from pgpis_jax.weights.pytorch import check_params_match, params_to_state_dict, state_dict_to_params

WEIGHTS_STEM = "diffusion_pytorch_model"
SAFETENSORS_NAME = f"{WEIGHTS_STEM}.safetensors"
DIFFUSERS_CLASSES = {"UNet2DConditionModel": UNet2DConditionModel, "AutoencoderKL": AutoencoderKL}
# linen list attributes of these modules, named "<name>_<i>" where torch says "<name>.<i>"
LIST_NAMES = ("down_blocks", "up_blocks", "resnets", "attentions", "downsamplers", "upsamplers",
              "transformer_blocks", "to_out", "net")
_DEPRECATED_ATTENTION = re.compile(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")
_DEPRECATED_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def rename_deprecated_attention(state_dict: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Old VAE checkpoints name the mid-block attention query/key/value/proj_attn; diffusers renames them
    to to_q/to_k/to_v/to_out.0 on load, and so do we."""
    renamed = {}
    for key, value in state_dict.items():
        match = _DEPRECATED_ATTENTION.match(key)
        if match:
            key = f"{match[1]}.{_DEPRECATED_NAMES[match[2]]}.{match[3]}"
        renamed[key] = value
    return renamed


def module_from_diffusers_config(config: Mapping[str, Any], **module_options):
    """The linen module for a diffusers config dict (UNet2DConditionModel or AutoencoderKL).

    module_options: our own fields such as dtype, param_dtype, attention_implementation, remat.
    """
    class_name = config.get("_class_name")
    if class_name not in DIFFUSERS_CLASSES:
        raise ValueError(f"config _class_name {class_name!r} is not supported; expected one of "
                         f"{', '.join(DIFFUSERS_CLASSES)}")
    return DIFFUSERS_CLASSES[class_name].from_config(dict(config), **module_options)


def abstract_params(module) -> Any:
    """The module's parameter tree as ShapeDtypeStructs (jax.eval_shape of init; nothing allocated)."""
    return jax.eval_shape(lambda: module.init_params(jax.random.key(0)))


def load_diffusers(path_or_repo_id: str, subfolder: Optional[str] = None, dtype=jnp.float32,
                   variant: Optional[str] = None, **module_options) -> Tuple[Any, Any]:
    """(module, params) from a diffusers model directory or hub id; params are cast to `dtype`.

    Every weight must match the module: missing or unexpected keys and wrong shapes are one error listing
    them, naming the directory.
    """
    directory = resolve_model_dir(path_or_repo_id, subfolder)
    config = read_config(directory)
    try:
        module = module_from_diffusers_config(config, **module_options)
    except ValueError as error:
        raise ValueError(f"{os.path.join(directory, CONFIG_NAME)}: {error}") from None
    state_dict = read_state_dict(directory, WEIGHTS_STEM, variant)
    if config["_class_name"] == "AutoencoderKL":
        state_dict = rename_deprecated_attention(state_dict)
    params = state_dict_to_params(state_dict)
    check_params_match(params, abstract_params(module), directory)
    return module, jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype), params)


def save_diffusers(module, params, out_dir: str) -> str:
    """Writes config.json and diffusion_pytorch_model.safetensors (float32) to out_dir, which must not
    already hold a model; returns out_dir."""
    from safetensors.numpy import save_file

    if os.path.exists(os.path.join(out_dir, CONFIG_NAME)):
        raise FileExistsError(f"{out_dir} already holds a model ({CONFIG_NAME}); choose an empty directory")
    os.makedirs(out_dir, exist_ok=True)
    state_dict = params_to_state_dict(jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), params),
                                      LIST_NAMES)
    with open(os.path.join(out_dir, CONFIG_NAME), "w") as f:
        json.dump(module.to_config(), f, indent=2)
    save_file(state_dict, os.path.join(out_dir, SAFETENSORS_NAME))
    return out_dir
