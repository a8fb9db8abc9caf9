"""Bytes per checkpoint step of the full-size PCDMs stages, from `jax.eval_shape` alone (no weights, no data).

The stages are built as for inference from a run (pgpis_jax/methods/common/run.py), with the published network
configs of SD 2.1-base (UNet, VAE), OpenCLIP ViT-H/14 (IP-Adapter's image encoder) and DINOv2-giant written out
with the diffusers / transformers config classes, then the trainer's setup gives the abstract state. Printed: the
bytes each checkpoint step holds now (trainable parameters, EMA, optimizer state) and once per run (frozen
parameters), and what a step held when every step carried the whole state (all parameters + EMA + optimizer).

    .venv/bin/python bench/checkpoint_bytes.py [--ema]
"""

import argparse
import importlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from pgpis_jax import methods  # noqa: E402
from pgpis_jax.trainer import checkpoints, loop  # noqa: E402
from pgpis_jax.trainer import mesh as mesh_lib  # noqa: E402


def published_networks():
    """{config key: network config} of the pretrained networks PCDMs starts from, before a stage's overrides."""
    from transformers import CLIPVisionConfig, Dinov2Config

    unet = dict(_class_name="UNet2DConditionModel", sample_size=64, cross_attention_dim=1024,
                attention_head_dim=[5, 10, 20, 20], use_linear_projection=True)
    vae = dict(
        _class_name="AutoencoderKL", block_out_channels=[128, 256, 512, 512], layers_per_block=2, sample_size=768,
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=4)
    clip = CLIPVisionConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                            patch_size=14, image_size=224, projection_dim=1024, hidden_act="gelu").to_dict()
    clip.update(architectures=["CLIPVisionModelWithProjection"], model_type="clip_vision_model")
    dino = Dinov2Config(hidden_size=1536, num_hidden_layers=40, num_attention_heads=24, mlp_ratio=4,
                        use_swiglu_ffn=True, image_size=518, patch_size=14).to_dict()
    dino.update(architectures=["Dinov2Model"], model_type="dinov2")
    return {"config.model.unet": unet, "config.model.vae": vae, "config.model.image_encoder": clip,
            "config.model.dinov2": dino}


def stage_networks(config, published):
    """The published configs with the stage's overrides, as a run records them (networks.json)."""
    saved = dict(published)
    if "unet" in config.model:
        saved["config.model.unet"] = {**published["config.model.unet"], **dict(config.model.unet.overrides)}
    return saved


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ema", action="store_true", help="with an EMA of the trainable parameters")
    args = parser.parse_args()
    published = published_networks()
    mesh = None
    print("| stage | trainable params | frozen params | per step now (params + EMA + optimizer) | frozen, once per "
          "run | per step before (whole state) |")
    print("|---|---|---|---|---|---|")
    for stage in ("prior", "inpaint", "refine"):
        config = importlib.import_module(f"configs.pcdm_{stage}").get_config()
        if args.ema:
            config.ema.decay = 0.9999
        if stage == "refine":
            config.data.pipeline = dict(config.data.pipeline, coarse_dir="unused")
        method = methods.get_method(config.method).build(config, saved_networks=stage_networks(config, published))
        mesh = mesh or mesh_lib.make_mesh(config)
        s = loop.setup(method, config, mesh)
        items, frozen = checkpoints.checkpoint_bytes(s)
        trainable = sum(leaf.size for leaf in jax.tree.leaves(s.opt.split(s.abstract_params)[0]))
        total = sum(leaf.size for leaf in jax.tree.leaves(s.abstract_params))
        step = sum(items.values())
        print(f"| {config.method} | {trainable:,} | {total - trainable:,} | {step / 2**30:.2f} GiB | "
              f"{frozen / 2**30:.2f} GiB | {(step + frozen) / 2**30:.2f} GiB |")


if __name__ == "__main__":
    main()
