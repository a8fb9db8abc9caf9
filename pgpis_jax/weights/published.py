"""The config.json of the pretrained networks the configs name by hub id, so that a config's networks can be built
(and counted with `jax.eval_shape`) on a machine that has neither the weights nor a network connection.

Only architecture fields are kept: the values that decide the modules and their parameter shapes, as published
under each (hub id, subfolder). A local directory with a config.json always takes precedence (networks.py).
A new method adds the networks it names here.
"""

from __future__ import annotations

import copy
from typing import Any, Dict, Optional, Tuple

_SD_DOWN = ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
_SD_UP = ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
_SD_UNET = dict(
    _class_name="UNet2DConditionModel", act_fn="silu", block_out_channels=[320, 640, 1280, 1280],
    center_input_sample=False, down_block_types=_SD_DOWN, up_block_types=_SD_UP, downsample_padding=1,
    flip_sin_to_cos=True, freq_shift=0, in_channels=4, out_channels=4, layers_per_block=2, mid_block_scale_factor=1,
    norm_eps=1e-5, norm_num_groups=32)
_SD_VAE = dict(
    _class_name="AutoencoderKL", act_fn="silu", block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4, in_channels=3,
    out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32)

PUBLISHED: Dict[Tuple[str, str], Dict[str, Any]] = {
    ("runwayml/stable-diffusion-v1-5", "unet"): dict(_SD_UNET, attention_head_dim=8, cross_attention_dim=768,
                                                     sample_size=64),
    ("runwayml/stable-diffusion-v1-5", "vae"): dict(_SD_VAE, sample_size=512),
    ("stabilityai/stable-diffusion-2-1-base", "unet"): dict(_SD_UNET, attention_head_dim=[5, 10, 20, 20],
                                                            cross_attention_dim=1024, sample_size=64,
                                                            use_linear_projection=True),
    ("stabilityai/stable-diffusion-2-1-base", "vae"): dict(_SD_VAE, sample_size=768),
    # SD 2.1 768-v (FPDM stage 2): the base model's blocks at sample size 96, with fp32-upcast attention.
    ("stabilityai/stable-diffusion-2-1", "unet"): dict(_SD_UNET, attention_head_dim=[5, 10, 20, 20],
                                                       cross_attention_dim=1024, sample_size=96,
                                                       use_linear_projection=True, upcast_attention=True),
    ("stabilityai/stable-diffusion-2-1", "vae"): dict(_SD_VAE, sample_size=768),
    # OpenCLIP ViT-H/14's vision tower with its 1024-d projection, as IP-Adapter distributes it.
    ("h94/IP-Adapter", "models/image_encoder"): dict(
        architectures=["CLIPVisionModelWithProjection"], model_type="clip_vision_model", hidden_size=1280,
        intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16, patch_size=14, image_size=224,
        projection_dim=1024, hidden_act="gelu", layer_norm_eps=1e-5, num_channels=3),
    # OpenAI CLIP ViT-L/14 (a full CLIPConfig; its vision tower with the 768-d projection is what is built).
    ("openai/clip-vit-large-patch14", ""): dict(
        architectures=["CLIPModel"], model_type="clip", projection_dim=768,
        vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                           patch_size=14, image_size=224, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                           num_channels=3)),
    ("facebook/dinov2-large", ""): dict(
        architectures=["Dinov2Model"], model_type="dinov2", hidden_size=1024, num_hidden_layers=24,
        num_attention_heads=16, mlp_ratio=4, use_swiglu_ffn=False, image_size=518, patch_size=14, num_channels=3,
        layer_norm_eps=1e-6, layerscale_value=1.0, qkv_bias=True),
    ("facebook/dinov2-giant", ""): dict(
        architectures=["Dinov2Model"], model_type="dinov2", hidden_size=1536, num_hidden_layers=40,
        num_attention_heads=24, mlp_ratio=4, use_swiglu_ffn=True, image_size=518, patch_size=14, num_channels=3,
        layer_norm_eps=1e-6, layerscale_value=1.0, qkv_bias=True),
}


def published_config(weights: str, subfolder: str = "") -> Optional[Dict[str, Any]]:
    """A copy of the published config.json of hub id `weights` (inside `subfolder`), or None if not listed."""
    config = PUBLISHED.get((weights, subfolder or ""))
    return copy.deepcopy(config) if config is not None else None
