"""The export format of RePoseDM (methods/common/exporting.py).

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
"""

from __future__ import annotations

import os
from typing import Dict

import jax
import numpy as np

from pgpis_jax.methods.common.exporting import Format, save_state_dict
from pgpis_jax.weights import pidm_checkpoint, reposedm_checkpoint

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


FORMATS = {"pidm": Format("pidm", "PIDM's checkpoint layout (UNet, texture encoder) and the alignment and estimator "
                                  "state dicts", _write_pidm)}
