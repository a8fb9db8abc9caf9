"""The export and import format of RePoseDM (methods/common/exporting.py).

pidm   PIDM's checkpoint layout for the UNet and texture encoder, and the method's other networks as PyTorch state
       dicts with documented names:
         pidm_checkpoint.pt            torch.save({"ema": state dict}): PIDM's BeatGANsAutoencModel keys (UNet bare,
                                       texture encoder under "encoder."; pgpis_jax/weights/pidm_checkpoint.py) with
                                       the parameters PIDM creates but never uses as zeros, so PIDM's model loads it
                                       with strict=True and its predict.py reads it (ckpt["ema"]);
         alignment.safetensors         the recurrent pose alignment (names in pgpis_jax/weights/reposedm_checkpoint.py;
                                       not for B1)
         pose_estimator.safetensors    the heatmap estimator (torch Conv2d / GroupNorm names: down_0, down_0_norm, ...,
                                       head; without gradient guidance absent)
         position_scales.safetensors   the cross-attention position-encoding scalars ("<attention block>.position_scale",
                                       shape []; only with the UNet's position_encoding option, which PIDM lacks)
       Import (`export.py --import_original=<path> --format=pidm`): a PIDM checkpoint file (PIDM's train.py file or a
       pidm_checkpoint.pt; its "ema" state dict) gives the UNet and texture encoder, the rest of the stage keeps its
       fresh initialisation (configs/reposedm.py:B1 is PIDM itself; in RePoseDM the zero flow head makes the
       alignment the identity, and the estimator is untrained); a directory this format wrote gives every network
       it holds, strictly: each of its files must match a network of the stage and each network of the stage
       must have its file.
"""

from __future__ import annotations

import os
from typing import Dict

import jax
import numpy as np

from pgpis_jax.errors import UserError
from pgpis_jax.methods.common.exporting import Format, save_state_dict
from pgpis_jax.weights import pidm_checkpoint, reposedm_checkpoint
from pgpis_jax.weights.pytorch import check_params_match, state_dict_to_params

PIDM_FILE = "pidm_checkpoint.pt"
ALIGNMENT_FILE = "alignment.safetensors"
ESTIMATOR_FILE = "pose_estimator.safetensors"
POSITION_SCALES_FILE = "position_scales.safetensors"
POSITION_SCALE_SUFFIX = ".position_scale"


def _host(tree):
    return jax.tree.map(lambda x: np.asarray(x, np.float32), jax.device_get(tree))


def _write_pidm(trained, directory: str) -> Dict[str, str]:
    import torch
    from safetensors.numpy import save_file

    params = _host(trained.params)
    state = pidm_checkpoint.pidm_params_to_state_dict({"unet": params["unet"], "encoder": params["encoder"]})
    scales = {key: state.pop(key) for key in [k for k in state if k.endswith(POSITION_SCALE_SUFFIX)]}
    torch.save({"ema": {key: torch.from_numpy(value) for key, value in state.items()}},
               os.path.join(directory, PIDM_FILE))
    contents = {PIDM_FILE: "PIDM BeatGANsAutoencModel state dict under 'ema' (UNet and texture encoder; float32)"}
    if "alignment" in params:
        save_file(reposedm_checkpoint.alignment_params_to_state_dict(params["alignment"]),
                  os.path.join(directory, ALIGNMENT_FILE))
        contents[ALIGNMENT_FILE] = "recurrent pose alignment state dict (pgpis_jax/weights/reposedm_checkpoint.py)"
    if "pose_estimator" in params:
        save_state_dict(params["pose_estimator"], os.path.join(directory, ESTIMATOR_FILE), ())
        contents[ESTIMATOR_FILE] = f"pose-heatmap estimator state dict ({trained.method.estimator.config['kind']})"
    if scales:
        save_file(scales, os.path.join(directory, POSITION_SCALES_FILE))
        contents[POSITION_SCALES_FILE] = "cross-attention position-encoding scalars (not in PIDM)"
    return contents


def _read_pidm(path: str, abstract, method) -> Dict[str, dict]:
    """{network: params} of a PIDM checkpoint file or of a directory written by `_write_pidm` (module docstring)."""
    from safetensors.numpy import load_file

    del method
    directory = path if os.path.isdir(path) else None
    checkpoint = os.path.join(directory, PIDM_FILE) if directory else path
    if not os.path.isfile(checkpoint):
        raise UserError(f"--import_original={path}: no {PIDM_FILE} there (a directory written by --format=pidm, or "
                        "a PIDM checkpoint file)")
    state = pidm_checkpoint.read_pidm_state_dict(checkpoint)
    scales = os.path.join(directory, POSITION_SCALES_FILE) if directory else ""
    if scales and os.path.isfile(scales):
        state.update(load_file(scales))
    params = pidm_checkpoint.pidm_state_dict_to_params(state, {name: abstract[name] for name in ("unet", "encoder")},
                                                       checkpoint)
    if directory is None:
        return params
    for name, file, convert in (("alignment", ALIGNMENT_FILE, reposedm_checkpoint.alignment_state_dict_to_params),
                                ("pose_estimator", ESTIMATOR_FILE, _estimator_params)):
        file_path = os.path.join(directory, file)
        if (name in abstract) != os.path.isfile(file_path):
            problem = f"no {file} for the stage's {name}" if name in abstract else \
                f"{file} holds {name} parameters, which this stage does not have"
            raise UserError(f"--import_original={path}: {problem}")
        if name in abstract:
            params[name] = convert(load_file(file_path), abstract[name], file_path)
    return params


def _estimator_params(state_dict, expected, source: str):
    params = state_dict_to_params(state_dict)
    try:
        check_params_match(params, expected, "its state dict")
    except ValueError as error:
        raise UserError(f"{source}: not a matching pose-estimator state dict: {error}") from None
    return params


FORMATS = {"pidm": Format("pidm", "PIDM's checkpoint layout (UNet, texture encoder) and the alignment and estimator "
                                  "state dicts", _write_pidm, _read_pidm)}
