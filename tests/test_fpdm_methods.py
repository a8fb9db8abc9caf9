"""FPDM methods (stage 1 `fpdm_fusion`, stage 2 `fpdm`): the published configs of the networks the configs name
against diffusers / transformers on the meta device, the parameter report of both full-size configs."""

import json
import os
import subprocess
import sys

import diffusers
import jax
import numpy as np
import torch
import transformers

from configs import fpdm_common
from pgpis_jax.weights import diffusers_io, transformers_io
from pgpis_jax.weights.published import published_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The issue's numbers (../shared/reference/fpdm.md) and the reference libraries' counts of the published configs.
SD21_UNET = 865_910_724
SD21_VAE = 83_653_863
CLIP_VIT_L_VISION = 303_966_208   # vision tower 303,179,776 + 1024 -> 768 projection
DINOV2_LARGE = 304_368_640
FUSION_MLP = 1_574_912
SOURCE_TOKEN_PROJECTOR = 1_576_192
POSE_ENCODER = 1_086_480
COMBINER = 4_133_377


def _count(tree):
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(tree))


def _torch_count(module):
    return sum(p.numel() for p in module.parameters())


def _ours(module):
    return _count(jax.eval_shape(lambda: module.init_params(jax.random.key(0))))


def _diffusers_kwargs(config):
    return {k: v for k, v in config.items() if not k.startswith("_")}


def test_published_configs_build_the_reference_libraries_networks():
    """Each published config of FPDM's networks builds, on the meta device, a diffusers / transformers model with
    as many parameters as our module built from the same config (and as the known totals)."""
    unet = published_config(fpdm_common.SD21, "unet")
    vae = published_config(fpdm_common.SD21, "vae")
    clip = published_config(fpdm_common.CLIP_VIT_L)
    dino = published_config(fpdm_common.DINOV2_LARGE)
    with torch.device("meta"):
        reference = {
            "unet": diffusers.UNet2DConditionModel(**_diffusers_kwargs(unet)),
            "vae": diffusers.AutoencoderKL(**_diffusers_kwargs(vae)),
            "clip": transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(
                **clip["vision_config"], projection_dim=clip["projection_dim"])),
            "dino": transformers.Dinov2Model(transformers.Dinov2Config(
                **{k: v for k, v in dino.items() if k != "architectures"})),
        }
    ours = {"unet": diffusers_io.module_from_diffusers_config(unet),
            "vae": diffusers_io.module_from_diffusers_config(vae),
            "clip": transformers_io.module_from_transformers_config(clip),
            "dino": transformers_io.module_from_transformers_config(dino)}
    expected = {"unet": SD21_UNET, "vae": SD21_VAE, "clip": CLIP_VIT_L_VISION, "dino": DINOV2_LARGE}
    for name, module in ours.items():
        count = _ours(module)
        print(f"{name}: ours {count:,}, reference library {_torch_count(reference[name]):,}")
        assert count == _torch_count(reference[name]) == expected[name], name
    assert reference["unet"].config.upcast_attention and reference["unet"].config.sample_size == 96
