"""The export formats of CFLD (methods/common/exporting.py).

original   the two files of the original's accelerate checkpoint (weights/cfld_checkpoint.py), as its test script
           loads them and as the authors released them:
             pytorch_model.bin    the build_model container: backbone.* (Microsoft's Swin layout with its buffers),
                                  appearance_encoder.*, pose_encoder.*, decoder.*, learnable_vector
             pytorch_model_1.bin  the UNet wrapper: model.* = the complete SD-1.5 UNet (diffusers names)
           `export.py --import_original=<folder holding both>` (or either file) reads them into a new run.
diffusers  unet/ and vae/ (diffusers' from_pretrained; no vae/ for the demo's parameter-free autoencoder) and
           conditioner.safetensors: the build_model state dict under the original's names (as pytorch_model.bin).
"""

from __future__ import annotations

import os
from typing import Dict

import numpy as np

from pgpis_jax.errors import UserError
from pgpis_jax.methods.common.exporting import Format
from pgpis_jax.weights import cfld_checkpoint, diffusers_io
from pgpis_jax.weights.files import read_torch_state_dict

CONDITIONER_SAFETENSORS = "conditioner.safetensors"


def _conditioner_state(trained) -> Dict[str, np.ndarray]:
    method = trained.method
    return cfld_checkpoint.conditioner_state_dict(method.conditioner_params(trained.params), method.conditioner)


def _torch_save(state: Dict[str, np.ndarray], path: str) -> None:
    import torch

    torch.save({key: torch.from_numpy(np.array(value)) for key, value in state.items()}, path)


def _write_original(trained, directory: str) -> Dict[str, str]:
    _torch_save(_conditioner_state(trained), os.path.join(directory, cfld_checkpoint.CONDITIONER_FILE))
    _torch_save(cfld_checkpoint.unet_state_dict(trained.params["unet"]),
                os.path.join(directory, cfld_checkpoint.UNET_FILE))
    return {cfld_checkpoint.CONDITIONER_FILE: "the build_model state dict (backbone, appearance_encoder, "
                                              "pose_encoder, decoder, learnable_vector; float32)",
            cfld_checkpoint.UNET_FILE: "the UNet wrapper state dict (model.*: the complete SD-1.5 UNet; float32)"}


def _read_original(path: str, abstract_params, method) -> Dict[str, object]:
    """{conditioner networks..., "unet"} from a folder holding pytorch_model.bin and pytorch_model_1.bin (or the
    path of either file, the other beside it)."""
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    files = {name: os.path.join(folder, name) for name in (cfld_checkpoint.CONDITIONER_FILE, cfld_checkpoint.UNET_FILE)}
    absent = [name for name, file in files.items() if not os.path.isfile(file)]
    if absent:
        raise UserError(f"--import_original={path}: {' and '.join(absent)} not found in {folder}; a CFLD checkpoint "
                        f"folder holds {cfld_checkpoint.CONDITIONER_FILE} and {cfld_checkpoint.UNET_FILE}")
    conditioner_file, unet_file = files[cfld_checkpoint.CONDITIONER_FILE], files[cfld_checkpoint.UNET_FILE]
    params = cfld_checkpoint.conditioner_params_from_state_dict(read_torch_state_dict(conditioner_file),
                                                                method.conditioner, conditioner_file)
    params["unet"] = cfld_checkpoint.unet_params_from_state_dict(read_torch_state_dict(unet_file),
                                                                 method.unet.module, unet_file)
    return params


def _write_diffusers(trained, directory: str) -> Dict[str, str]:
    from safetensors.numpy import save_file

    contents = {}
    for name in ("unet", "vae"):
        config = trained.method.builder.recorded.get(f"config.model.{name}")
        if name in trained.params and config is not None:
            module = diffusers_io.module_from_diffusers_config(config)
            diffusers_io.save_diffusers(module, trained.params[name], os.path.join(directory, name))
            contents[f"{name}/"] = f"diffusers {config['_class_name']} (from_pretrained)"
    save_file(_conditioner_state(trained), os.path.join(directory, CONDITIONER_SAFETENSORS))
    contents[CONDITIONER_SAFETENSORS] = "the build_model state dict under the original's names (pytorch_model.bin)"
    return contents


FORMATS = {
    "diffusers": Format("diffusers", "diffusers UNet / VAE directories and the conditioner as safetensors",
                        _write_diffusers),
    "original": Format("original", "the original CFLD checkpoint (pytorch_model.bin, pytorch_model_1.bin)",
                       _write_original, _read_original),
}
