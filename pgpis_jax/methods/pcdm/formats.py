"""The export formats of the three PCDMs stages (methods/common/exporting.py).

diffusers  unet/ and vae/ (diffusers directories), image_encoder/ and dinov2/ (transformers directories), and the
           stage's own networks as safetensors in the original's module names:
             prior.safetensors               Stage1_PriorTransformer (stage 1)
             pose_proj.safetensors           the pose encoder added after conv_in (stage 2)
             image_proj_model_p.safetensors  the DINOv2-token projector (stages 2 and 3)
original   mp_rank_00_model_states.pt, the DeepSpeed file the original stage scripts load from their weights folder
           ({"module": state dict}, keys as in weights/pcdm_checkpoint.py); it imports back with
           `export.py --import_original` (also the released files, and the simplified stage-2 PCDMs_ckpt.pt where
           its networks fit the config).
"""

from __future__ import annotations

import os
from typing import Dict

from pgpis_jax.methods.common.exporting import Format, write_library_layout
from pgpis_jax.weights import pcdm_checkpoint

OWN_NETWORKS = {
    "prior": "Stage1_PriorTransformer state dict (the original's bare keys)",
    "pose_proj": "the stage-2 pose encoder state dict (original module pose_proj)",
    "image_proj_model_p": "the DINOv2-token projector state dict (original module image_proj_model_p)",
}


def _write_diffusers(trained, directory: str) -> Dict[str, str]:
    return write_library_layout(trained, directory, OWN_NETWORKS, pcdm_checkpoint.LIST_NAMES)


def _stage_params(params, stage: str):
    """The stage's part of a parameter tree in the layout of pcdm_checkpoint (the prior's own tree, or the
    {"unet", "pose_proj", "image_proj_model_p"} subtrees)."""
    subtrees = pcdm_checkpoint.STAGE_SUBTREES[stage]
    return {name: params[name] for name in subtrees} if subtrees else params["prior"]


def _original_format(stage: str) -> Format:
    def write(trained, directory: str) -> Dict[str, str]:
        path = os.path.join(directory, pcdm_checkpoint.DEEPSPEED_MODEL_STATES)
        pcdm_checkpoint.save_pcdm_checkpoint(_stage_params(trained.params, stage), stage, path)
        what = ", ".join(pcdm_checkpoint.STAGE_SUBTREES[stage]) or "the prior"
        return {pcdm_checkpoint.DEEPSPEED_MODEL_STATES: f"PCDMs {stage} DeepSpeed model states ({what}; float32)"}

    def read(path: str, abstract_params, method) -> Dict[str, object]:
        params = pcdm_checkpoint.load_pcdm_checkpoint(path, stage, _stage_params(abstract_params, stage))
        return params if pcdm_checkpoint.STAGE_SUBTREES[stage] else {"prior": params}

    return Format("original", "the original PCDMs checkpoint layout (mp_rank_00_model_states.pt)", write, read)


def formats(stage: str) -> Dict[str, Format]:
    """{format name: Format} of PCDMs stage `stage` ("prior", "inpaint", "refine")."""
    return {"diffusers": Format("diffusers", "diffusers / transformers directories and safetensors",
                                _write_diffusers),
            "original": _original_format(stage)}
