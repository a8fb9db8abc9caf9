"""The export formats of FPDM's two stages (methods/common/exporting.py).

original   last.ckpt, a PyTorch Lightning checkpoint as the original's ModelCheckpoint writes it: {"state_dict",
           "global_step", "pytorch-lightning_version", "hparams_name": "args", "hyper_parameters": the original's
           config keys} (plain types only, so torch.load(weights_only=True) reads it). Stage 1 holds the FusionModel
           (img_encoder.*, its duplicate pose_encoder.*, combiner.*), stage 2 the FPDM module (unet.* and its
           duplicate sd_model.unet.*, sd_model.srcimage_proj_model.*, sd_model.pose_t_proj.*, and the frozen vae.*,
           src_image_encoder.*, fusion_model.*); keys as pgpis_jax/weights/fpdm_checkpoint.py. `export.py
           --import_original` reads these files and the original's own.
diffusers  library directories and safetensors with the original's module names:
             stage 1: img_encoder/ (transformers CLIPVisionModelWithProjection), combiner.safetensors
             stage 2: unet/ (diffusers UNet2DConditionModel *without* the fusion MLP: stock diffusers builds no
                      class embedding for the original's class_embed_type "mlp"), class_embedding.safetensors (the
                      fusion MLP, net.0 / net.3 = Linear 768 -> 768, GELU, dropout, Linear 768 -> 1280, dropout),
                      vae/ (when the run has an SD VAE), src_image_encoder/ (transformers Dinov2Model),
                      srcimage_proj_model.safetensors, pose_t_proj.safetensors (diffusers'
                      ControlNetConditioningEmbedding), fusion_model/img_encoder/, fusion_model/combiner.safetensors,
                      scheduler/scheduler_config.json (the sampling scheduler).
           To run the stage-2 UNet in diffusers: UNet2DConditionModel.from_pretrained(d / "unet",
           class_embed_type="identity") (diffusers then adds class_embedding(class_labels) to the time embedding),
           set `unet.class_embedding` to an nn.Sequential(Linear, GELU, Dropout, Linear, Dropout) loaded from
           class_embedding.safetensors, and add pose_t_proj(pose) to conv_in's output (a forward hook), as the
           original's modified UNet does (tests/test_fpdm_export.py does exactly this).
"""

from __future__ import annotations

import collections
import json
import os
from typing import Dict

import jax
import numpy as np

from pgpis_jax.methods.common.exporting import Format, save_state_dict
from pgpis_jax.weights import diffusers_io, fpdm_checkpoint, transformers_io

LIGHTNING_CHECKPOINT = "last.ckpt"
LIGHTNING_VERSION = "2.2.1"   # the original's requirements.txt
FUSION_CLIP_KEY = "config.model.fusion_model.image_encoder"


def _write_lightning(state_dict, hyper_parameters, step: int, path: str) -> None:
    import torch

    tensors = collections.OrderedDict((key, torch.from_numpy(np.array(value, np.float32)))
                                      for key, value in state_dict.items())
    torch.save({"global_step": int(step), "pytorch-lightning_version": LIGHTNING_VERSION, "state_dict": tensors,
                "hparams_name": "args", "hyper_parameters": dict(hyper_parameters)}, path)


def _host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


# ------------------------------------------------------------------------------------------------- stage 1


def fusion_hyper_parameters(config, method) -> dict:
    """The keys of config/b1.fpdm-deepfashion.yaml that FusionModel reads, from a stage-1 config and stage."""
    return {"encoder_type": "clip", "img_encoder_path": config.model.img_encoder.weights or "",
            "img_encoder_update": True, "combiner_hidden_dim": int(method.combiner.feature_dim),
            "temperature": float(config.loss.temperature), "lambda_l1": float(config.loss.l1_weight),
            "conbiner_self_learning": bool(config.loss.source_enhanced), "lr": float(config.optimizer.learning_rate),
            "weight_decay": float(config.optimizer.weight_decay), "batch_size": int(config.batch_size),
            "img_pose_drop_rate": 0.0, "img_size": [int(method.clip.module.image_size)] * 2}


def _fusion_subtrees(params):
    return {name: params[name] for name in fpdm_checkpoint.FUSION_SUBTREES}


def _write_fusion_original(trained, directory: str) -> Dict[str, str]:
    state = fpdm_checkpoint.fusion_state_dict_from_params(_host(_fusion_subtrees(trained.params)))
    hyper = fusion_hyper_parameters(trained.config, trained.method)
    _write_lightning(state, hyper, trained.step, os.path.join(directory, LIGHTNING_CHECKPOINT))
    return {LIGHTNING_CHECKPOINT: "FPDM stage-1 FusionModel Lightning checkpoint (img_encoder, pose_encoder = the "
                                  "same CLIP, combiner; float32)"}


def _read_fusion_original(path: str, abstract_params, method) -> Dict[str, object]:
    return fpdm_checkpoint.load_fusion_checkpoint(path, _fusion_subtrees(abstract_params))


def _write_combiner(params, path: str) -> None:
    save_state_dict(params, path, fpdm_checkpoint.LIST_NAMES)


def _write_fusion_diffusers(trained, directory: str) -> Dict[str, str]:
    params = _host(trained.params)
    transformers_io.save_transformers(trained.method.builder.recorded["config.model.img_encoder"],
                                      params["img_encoder"], os.path.join(directory, "img_encoder"))
    _write_combiner(params["combiner"], os.path.join(directory, "combiner.safetensors"))
    return {"img_encoder/": "transformers CLIPVisionModelWithProjection (the fine-tuned CLIP; source and pose)",
            "combiner.safetensors": "the Combiner state dict (original module names)"}


def fusion_formats() -> Dict[str, Format]:
    return {"diffusers": Format("diffusers", "a transformers CLIP directory and the Combiner as safetensors",
                                _write_fusion_diffusers),
            "original": Format("original", "the original FusionModel Lightning checkpoint (last.ckpt)",
                               _write_fusion_original, _read_fusion_original)}


# ------------------------------------------------------------------------------------------------- stage 2


def diffusion_hyper_parameters(config, trained_method) -> dict:
    """The keys of config/c1.fpdm-deepfashion-dsrvd-ab6.yaml that the FPDM module and C1 read, from a stage-2
    config."""
    m, drops = config.model, config.diffusion.condition_dropout
    options = trained_method.layout_options
    height, width = (int(v) for v in options["image_size"])
    return {"pretrained_model_name_or_path": m.unet.weights or "",
            "src_encoder_path": m.src_image_encoder.weights or "",
            "fusion_encoder_path": m.fusion_model.image_encoder.weights or "",
            "fusion_model_path": m.fusion_model.workdir or "", "src_encoder_type": "dino",
            "fusion_encoder_type": "clip", "init_src_image_encoder": True, "fusion_image_encoder": True,
            "class_embed_type": "mlp", "patch_proj_in_dim": int(trained_method.token_dim),
            "proj_drop_rate": float(m.srcimage_proj.dropout), "pose_drop_rate": float(drops["pose"]),
            "module_drop_rate": float(drops["tokens"]), "noise_offset": float(config.diffusion.noise_offset),
            "guidance_scale": float(config.sampling.guidance_scale),
            "num_inference_steps": int(config.sampling.num_inference_steps),
            "lr": float(config.optimizer.learning_rate),
            "weight_decay": float(config.optimizer.weight_decay),
            "batch_size": config.batch_size // config.grad.accumulation_steps,
            "accumulate_grad_batches": int(config.grad.accumulation_steps), "seed_number": int(config.seed),
            "unet_conv_in_kenel": 3, "model_img_size": [width, height], "input_t_img_size": [width, height],
            "src_encoder_size": [int(options["dino_size"])] * 2, "loss_type": "mse_loss"}


def _write_diffusion_original(trained, directory: str) -> Dict[str, str]:
    state = fpdm_checkpoint.diffusion_state_dict_from_params(_host(trained.params))
    hyper = diffusion_hyper_parameters(trained.config, trained.method)
    _write_lightning(state, hyper, trained.step, os.path.join(directory, LIGHTNING_CHECKPOINT))
    held = ", ".join(sorted(trained.params))
    return {LIGHTNING_CHECKPOINT: f"FPDM stage-2 Lightning checkpoint ({held}; float32)"}


def _read_diffusion_original(path: str, abstract_params, method) -> Dict[str, object]:
    return fpdm_checkpoint.load_diffusion_checkpoint(path, abstract_params)


def _write_diffusion_diffusers(trained, directory: str) -> Dict[str, str]:
    params = _host(trained.params)
    method, recorded = trained.method, trained.method.builder.recorded
    unet_params = {k: v for k, v in params["unet"].items() if k != "class_embedding"}
    plain_unet = method.unet.module.clone(class_embed_type=None, projection_class_embeddings_input_dim=None)
    diffusers_io.save_diffusers(plain_unet, unet_params, os.path.join(directory, "unet"))
    save_state_dict(params["unet"]["class_embedding"], os.path.join(directory, "class_embedding.safetensors"),
                    fpdm_checkpoint.LIST_NAMES)
    contents = {"unet/": "diffusers UNet2DConditionModel without the fusion MLP (see class_embedding.safetensors)",
                "class_embedding.safetensors": "the fusion MLP (the original's unet.class_embedding, net.0 / net.3)"}
    if "vae" in params:
        diffusers_io.save_diffusers(method.vae.module, params["vae"], os.path.join(directory, "vae"))
        contents["vae/"] = "diffusers AutoencoderKL (frozen)"
    transformers_io.save_transformers(recorded["config.model.src_image_encoder"], params["src_image_encoder"],
                                      os.path.join(directory, "src_image_encoder"))
    contents["src_image_encoder/"] = "transformers Dinov2Model (frozen source encoder)"
    for name in ("srcimage_proj_model", "pose_t_proj"):
        save_state_dict(params[name], os.path.join(directory, f"{name}.safetensors"), fpdm_checkpoint.LIST_NAMES)
    contents.update({"srcimage_proj_model.safetensors": "the DINOv2-token projector (SrcImage_ProjModel)",
                     "pose_t_proj.safetensors": "the pose encoder (diffusers ControlNetConditioningEmbedding)"})
    fusion = params["fusion_model"]
    transformers_io.save_transformers(recorded[FUSION_CLIP_KEY], fusion["img_encoder"],
                                      os.path.join(directory, "fusion_model", "img_encoder"))
    _write_combiner(fusion["combiner"], os.path.join(directory, "fusion_model", "combiner.safetensors"))
    contents.update({"fusion_model/img_encoder/": "transformers CLIPVisionModelWithProjection (frozen stage 1)",
                     "fusion_model/combiner.safetensors": "the stage-1 Combiner (frozen)"})
    os.makedirs(os.path.join(directory, "scheduler"))
    with open(os.path.join(directory, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(trained.config.sampling.scheduler.to_dict(), f, indent=2)
    contents["scheduler/scheduler_config.json"] = "the sampling scheduler (diffusers config)"
    return contents


def diffusion_formats() -> Dict[str, Format]:
    return {"diffusers": Format("diffusers", "diffusers / transformers directories and safetensors (the UNet without "
                                "its fusion MLP, which is class_embedding.safetensors)", _write_diffusion_diffusers),
            "original": Format("original", "the original FPDM Lightning checkpoint (last.ckpt)",
                               _write_diffusion_original, _read_diffusion_original)}
