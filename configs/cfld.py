"""CFLD (Lu et al., CVPR 2024): Coarse-to-Fine Latent Diffusion on Stable Diffusion 1.5.

Arguments (comma-separated, e.g. `:512,B3`):
  256       DeepFashion, outputs resized to 256x176 (the default)
  512       the same model, outputs resized to 512x352 (the original's configs/fashion_512.yaml)
  demo      tiny random networks, a parameter-free DCT autoencoder and `synthetic_people` at 64x64 (2-core CPU);
            with no pretrained SD to keep frozen its whole UNet trains, with x0 prediction (see demo())
  B1 .. B5  the paper's ablations (Table 3), as the original's configs/ablation_study/*.yaml: B1 multi-scale
            features as the prompt (ape: a zero prompt of the last Swin stage's tokens, HGA's branches strided to
            that grid and added to the context tokens of the up-block cross-attentions, not to the queries), B2 a
            CLIP prompt (clip_model: no Swin, no HGA; a frozen CLIP ViT-L/14 on 224x224 condition images, its
            pooled output through a trained linear layer and 5-block GLIDE transformer to one token), B3 no HGA
            (no_app), B4 no HGA and the cross-attention queries trained too (no_app_trainq), B5 HGA with the last
            Swin stage through a linear layer as the prompt instead of the PRD (swin).

Defaults are the original's defaults/deepfashion.py (../shared/reference/cfld.md): global batch 224 pairs (448
UNet samples: source and target of each pair), 100 epochs of 455 steps, Adam lr 1e-4 without weight decay, the
warm-up from 0.1x over 1000 steps and one decay by 0.1 at epoch 50, cubic timesteps, condition dropout 0.2 with the
learned null prompt, DDPM 50 steps, cumulative guidance w_pose = w_app = 2.

Weights: config.model.unet / vae (SD 1.5, hub id or local directory) and config.model.backbone.weights (the Swin-B
checkpoint the original starts from, swin_base_patch4_window12_384_22kto1k.pth, from Microsoft's Swin release;
its window-12 bias tables are resized to window 16 as the original does). Data: `tfds build data/deepfashion
--config=512x352` (the 512x512 training images are squashed from the stored 512x352 ones; the original squashes
the 750x1101 originals).
"""

import ml_collections
import numpy as np

from configs import common

SD15 = "runwayml/stable-diffusion-v1-5"
SWIN_B_CHECKPOINT = "pretrained_models/swin/swin_base_patch4_window12_384_22kto1k.pth"
ABLATIONS = ("B1", "B2", "B3", "B4", "B5")
CLIP_VIT_L = "openai/clip-vit-large-patch14"
# B2's CLIP prompt (the original's models/xf.py FrozenCLIPImageEmbedder): Linear(1024 -> 768) and a GLIDE
# transformer of 5 one-head blocks on one token; 224x224 condition images.
CLIP_MAPPER = dict(layers=5, heads=1)
CLIP_IMAGE_SIZE = 224
DEMO_CLIP_MAPPER = dict(layers=1, heads=1)

# Swin-B as the original builds it (models/swin_transformer.py): window 16 at 256x256, stochastic depth 0.2, no
# final LayerNorm (the model's final_norm option), in transformers' SwinConfig keys.
SWIN_B = dict(model_type="swin", image_size=256, patch_size=4, num_channels=3, embed_dim=128, depths=[2, 2, 18, 2],
              num_heads=[4, 8, 16, 32], window_size=16, mlp_ratio=4.0, qkv_bias=True, drop_path_rate=0.2,
              hidden_act="gelu", layer_norm_eps=1e-5)
SWIN_OPTIONS = dict(final_norm=False, add_pooling_layer=False)

STEPS_PER_EPOCH = 101_966 // 224     # 455: DeepFashion's training pairs in whole batches of 224

# SD 1.5's noise schedule; the original samples with DDPMScheduler built from it ("leading", steps_offset 1).
SD15_DDPM = dict(common.SD_SCHEDULE, prediction_type="epsilon", variance_type="fixed_small", clip_sample=False,
                 timestep_spacing="leading", steps_offset=1)
# The UNet parameters CFLD trains: attn2.to_k / to_v of every up-block transformer (blocks 3..11 of the original).
UP_CROSS_ATTENTION = r"unet/up_blocks_\d+/attentions_\d+/transformer_blocks_\d+/attn2"

# The demo: 64x64 images and an 8x8 block DCT code (8x8 latents, as the PCDMs demo's), a Swin of three stages with
# 8x8 patches (8, 4, 2 tokens a side: the first two are the grids of the UNet's two cross-attention levels, as CFLD ties
# its 256x256 condition to 64x64 latents), HGA on the four up-block cross-attentions of a three-level UNet, the
# adapter on 64x64 pose maps unshuffled by 8.
DEMO_SIZE = 64
DEMO_LATENT_FACTOR = 8
DEMO_LOW_PASS = 4
DEMO_LATENT_CHANNELS = 3 * DEMO_LOW_PASS * (DEMO_LOW_PASS + 1) // 2
DEMO_WIDTH = 64
DEMO_PROMPT = 32


def parse(arg):
    """{res, demo, ablation} from the argument items (256 / 512, demo, B1 .. B5)."""
    parsed = ml_collections.ConfigDict(dict(res=256, demo=False, ablation=""))
    for item in filter(None, (arg or "").split(",")):
        if item in ("256", "512"):
            parsed.res = int(item)
        elif item == "demo":
            parsed.demo = True
        elif item in ABLATIONS:
            parsed.ablation = item
        else:
            raise ValueError(f"unknown config argument {item!r}; known: 256, 512, demo, {', '.join(ABLATIONS)}")
    return parsed


def network(weights="", subfolder="", config=None, overrides=None, options=None):
    """A network spec (pgpis_jax/methods/common/networks.py)."""
    return ml_collections.ConfigDict(dict(weights=weights, subfolder=subfolder, config=config or {},
                                          overrides=overrides or {}, keep_fresh=(), drop_pretrained=(),
                                          options=options or {}))


def hga(in_channels, embed_dims, heads, out_channels, depth, block_indices=tuple(range(11, 2, -1)),
        conv_in_kernels=(), target="query"):
    """Hybrid-Granularity Attention: one branch per up-block cross-attention, ordered as the original's
    ATTN_RESIDUAL_BLOCK_IDX (11, 10, ..., 3); block_indices () = no HGA. conv_in_kernels: kernel = stride of each
    branch's input convolution (() = 1x1); target "query" (biases of the queries) or "context" (B1)."""
    return ml_collections.ConfigDict(dict(block_indices=tuple(block_indices), in_channels=tuple(in_channels),
                                          embed_dims=tuple(embed_dims), heads=tuple(heads),
                                          out_channels=tuple(out_channels), depth=depth,
                                          conv_in_kernels=tuple(conv_in_kernels), target=target))


def demo_unet():
    return network(config=dict(
        _class_name="UNet2DConditionModel", sample_size=DEMO_SIZE // DEMO_LATENT_FACTOR,
        in_channels=DEMO_LATENT_CHANNELS, out_channels=DEMO_LATENT_CHANNELS,
        down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"], block_out_channels=[DEMO_WIDTH] * 3,
        layers_per_block=1, attention_head_dim=[1, 2, 2], cross_attention_dim=DEMO_PROMPT, norm_num_groups=8))


def demo_swin():
    return network(config=dict(model_type="swin", image_size=DEMO_SIZE, patch_size=DEMO_LATENT_FACTOR, num_channels=3,
                               embed_dim=32, depths=[2, 2, 2], num_heads=[1, 2, 4], window_size=4, mlp_ratio=4.0,
                               qkv_bias=True, drop_path_rate=0.1, hidden_act="gelu", layer_norm_eps=1e-5),
                   options=SWIN_OPTIONS)


def demo_clip():
    return network(config=dict(model_type="clip_vision_model", architectures=["CLIPVisionModel"], hidden_size=64,
                               intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=DEMO_SIZE,
                               patch_size=DEMO_LATENT_FACTOR, projection_dim=DEMO_PROMPT))


def get_config(arg=None):
    arg = parse(arg)
    config = common.base_config("cfld")
    config.seed = 3407
    config.batch_size = 224
    config.total_steps = 100 * STEPS_PER_EPOCH
    config.log_every_steps = 10
    config.checkpoint_every_steps = 5 * STEPS_PER_EPOCH
    config.optimizer = common.optimizer_config(name="adam", learning_rate=1e-4, weight_decay=0.0,
                                               schedule="step_decay")
    config.lr_schedule = common.lr_schedule_config(warmup_steps=1000, warmup_start_factor=0.1,
                                                   decay_boundaries=(50 * STEPS_PER_EPOCH,), decay_factor=0.1)
    config.data = ml_collections.ConfigDict(dict(
        layout="cfld", dataset="deepfashion", image_size=(512, 352), data_dir="", features_dir="",
        pipeline=dict(image_size=512, condition_size=256, pose_size=256, sigma=6.0, flip_prob=0.5)))
    config.diffusion = ml_collections.ConfigDict(dict(
        train_scheduler=common.scheduler_config("DDPMScheduler", **SD15_DDPM), timestep_sampler="cubic",
        noise_offset=0.0, condition_dropout=0.2))
    config.sampling = ml_collections.ConfigDict(dict(
        scheduler=common.scheduler_config("DDPMScheduler", **SD15_DDPM), num_inference_steps=50,
        guidance="uc_down_full",    # uc_down_full (Eq. 7), uc_full (null prompt, no pose, no HGA vs all) or full
        pose_scale=2.0, appearance_scale=2.0,
        output_size=(512, 352) if arg.res == 512 else (256, 176)))   # the generated 512x512 resized to this
    config.model = ml_collections.ConfigDict(dict(
        attention_implementation="auto",
        unet=network(SD15, "unet"),
        vae=ml_collections.ConfigDict(dict(kind="sd", **network(SD15, "vae"))),
        backbone=network(SWIN_B_CHECKPOINT, config=SWIN_B, options=SWIN_OPTIONS),
        appearance_encoder=hga((128,) * 3 + (256,) * 3 + (512,) * 3, (64,) * 3 + (128,) * 3 + (256,) * 3,
                               (2,) * 3 + (4,) * 3 + (8,) * 3, (320,) * 3 + (640,) * 3 + (1280,) * 3, depth=4),
        pose_encoder=ml_collections.ConfigDict(dict(downscale_factor=4, in_channels=320, channels=(320, 640, 1280),
                                                    norm_num_groups=32)),
        decoder=ml_collections.ConfigDict(dict(kind="prd", num_queries=16, width=768, depth=8, heads=24))))
    config.eval = common.eval_config(protocol="cfld", eval_size="512x352" if arg.res == 512 else "")
    config.logging.num_samples = 4
    config.logging.sample_every_steps = 5 * STEPS_PER_EPOCH
    if arg.demo:
        demo(config)
    ablation(config, arg.ablation, arg.demo)
    config.param_groups.trainable = trainable(config, arg.ablation, whole_unet=arg.demo)
    return config


def demo(config):
    """Tiny networks on synthetic_people/64x64_demo (640 train / 96 test pairs), CPU-sized training. Unlike CFLD
    its random UNet cannot stay frozen (CFLD keeps a pretrained SD 1.5): the whole UNet trains, and, as in the
    PCDMs demo (docs/pcdms_demo.md), with x0 prediction, a DDIM sampler and no guidance, which give clean samples
    after minutes of training (800 steps, 10 DDIM steps: test SSIM 0.651 unguided, 0.620 with w_pose = w_app =
    1.5, 0.573 with 2; the source copied scores 0.581)."""
    config.total_steps = 800
    config.batch_size = 16
    config.log_every_steps = 50
    config.checkpoint_every_steps = 800
    config.logging.sample_every_steps = 0
    config.optimizer.learning_rate = 1e-3
    config.lr_schedule = common.lr_schedule_config(warmup_steps=50, warmup_start_factor=0.1,
                                                   decay_boundaries=(600,), decay_factor=0.1)
    config.diffusion.train_scheduler.prediction_type = "sample"
    config.sampling.scheduler = common.scheduler_config("DDIMScheduler", **common.SD_SCHEDULE, steps_offset=1,
                                                        set_alpha_to_one=False, clip_sample=False,
                                                        prediction_type="sample")
    config.data.dataset = "synthetic_people"
    config.data.image_size = (DEMO_SIZE, DEMO_SIZE)
    config.data.builder_config = "64x64_demo"
    config.data.pipeline = dict(image_size=DEMO_SIZE, condition_size=DEMO_SIZE, pose_size=DEMO_SIZE,
                                sigma=6.0 * DEMO_SIZE / 256, flip_prob=0.5)
    config.sampling.output_size = (DEMO_SIZE, DEMO_SIZE)
    config.sampling.num_inference_steps = 10
    config.sampling.guidance = "full"
    config.eval = common.eval_config(metrics="ssim,psnr", protocol="standard")
    m = config.model
    m.unet = demo_unet()
    m.vae = ml_collections.ConfigDict(dict(kind="pixel_shuffle", factor=DEMO_LATENT_FACTOR, scaling=1.0, basis="dct",
                                           high_frequency_gain=1.0, low_pass=DEMO_LOW_PASS))
    m.backbone = demo_swin()
    # up-block cross-attentions in execution order 0..3 (4x4, 4x4, 8x8, 8x8); branches 0, 1 read the 8x8 stage
    m.appearance_encoder = hga((32, 32, 64, 64), (16, 16, 32, 32), (1, 1, 2, 2), (DEMO_WIDTH,) * 4, depth=1,
                               block_indices=(3, 2, 1, 0))
    m.pose_encoder = ml_collections.ConfigDict(dict(downscale_factor=DEMO_LATENT_FACTOR, in_channels=DEMO_WIDTH,
                                                    channels=(DEMO_WIDTH,) * 2, norm_num_groups=8))
    m.decoder = ml_collections.ConfigDict(dict(kind="prd", num_queries=8, width=DEMO_PROMPT, depth=2, heads=2))


def ablation(config, name, demo=False):
    """Table 3's ablations as the original's configs/ablation_study/*.yaml set them (demo: B2 with a tiny random
    CLIP at the demo's condition size)."""
    m = config.model
    if not name:
        return
    swin = m.backbone.config
    grids = [swin.image_size // swin.patch_size // 2 ** i for i in range(len(swin.depths))]
    if name == "B1":              # ape: zero prompt, HGA strided to the last grid and added to the context tokens
        branches = m.appearance_encoder
        stage = np.cumsum([0] + [a != b for a, b in zip(branches.in_channels, branches.in_channels[1:])])
        m.appearance_encoder = hga(branches.in_channels, branches.embed_dims, branches.heads,
                                   (m.decoder.width,) * len(stage), branches.depth, branches.block_indices,
                                   conv_in_kernels=[int(grids[i] // grids[-1]) for i in stage], target="context")
        m.decoder = ml_collections.ConfigDict(dict(kind="zero", num_queries=grids[-1] ** 2, width=m.decoder.width,
                                                   depth=0, heads=0))
    if name == "B2":              # clip_model: no Swin, no HGA; a frozen CLIP's pooled output through a mapper
        del m["backbone"]
        m.appearance_encoder = hga((), (), (), (), m.appearance_encoder.depth, block_indices=())
        if demo:
            m.image_encoder, mapper = demo_clip(), DEMO_CLIP_MAPPER
        else:
            m.image_encoder, mapper = network(CLIP_VIT_L, options=dict(with_projection=False)), CLIP_MAPPER
            config.data.pipeline.condition_size = CLIP_IMAGE_SIZE
        m.decoder = ml_collections.ConfigDict(dict(kind="clip", num_queries=1, width=m.decoder.width, **mapper))
    if name in ("B3", "B4"):      # no_app, no_app_trainq: no HGA
        m.appearance_encoder = hga((), (), (), (), m.appearance_encoder.depth, block_indices=())
    if name == "B5":              # swin: the last stage's tokens through Linear(C -> 768, no bias) as the prompt
        m.decoder = ml_collections.ConfigDict(dict(kind="linear", num_queries=grids[-1] ** 2, width=m.decoder.width,
                                                   depth=0, heads=0))


def trainable(config, name, whole_unet=False):
    """Regexes of the trained parameters: the whole conditioner (B2: but its CLIP) and, in the UNet, attn2.to_k /
    to_v of the up blocks (B4 also to_q), or with whole_unet (the demo's random UNet) all of it."""
    projections = "[qkv]" if name == "B4" else "[kv]"
    m = config.model
    modules = (["backbone"] if m.get("backbone") else []) + ["pose_encoder"]
    modules += {"zero": [], "clip": [r"decoder/clip_model/mapper_\d+", "decoder/clip_model/final_ln"]}.get(
        m.decoder.kind, ["decoder"])
    if m.appearance_encoder.block_indices:
        modules.append("appearance_encoder")
    unet = "unet/.*" if whole_unet else f"{UP_CROSS_ATTENTION}/to_{projections}/.*"
    return tuple(f"{name}/.*" for name in modules) + ("learnable_vector", unet)
