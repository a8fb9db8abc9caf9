"""Settings the three PCDMs stages share (Shen et al., ICLR 2024, Sec. 4 and Appendix B).

Arguments of every PCDMs config (comma-separated, e.g. `:res=512,released`):
  demo      tiny random networks, a pixel-shuffle autoencoder and `synthetic_people` at 64x64 (2-core CPU)
  market    Market-1501 (128x64 stored, 128x128 squashed canvases)
  res=512   DeepFashion 512x352 (default 256x176); PCDMs squashes every image to a square of that height
  device_memory=16|32|80   per-device settings of stages 2 and 3 for a device of that many GB (TPU v5e, v4,
            A100 / H100): rows per device (the global batch kept, by accumulation), remat, the state sharded or
            not; chosen from bench/RESULTS.md's memory plan (DEVICE_MEMORY_PLANS)
  released  the released scripts' settings instead of the paper's (learning rates, batch sizes, gradient
            clipping, UniPC / UnCLIP samplers; ../shared/reference/pcdms.md Sec. 5), and DINOv2's position table
            resized as transformers 4.32 did (`position_interpolation="scale_factor"`), with which the released
            checkpoints were trained
"""

import ml_collections

from configs import common

SD21_BASE = "stabilityai/stable-diffusion-2-1-base"
# OpenCLIP ViT-H/14 vision tower with projection (1024-d image_embeds), as distributed with IP-Adapter.
CLIP_VIT_H = ("h94/IP-Adapter", "models/image_encoder")
DINOV2_GIANT = "facebook/dinov2-giant"
KANDINSKY_PRIOR = ("kandinsky-community/kandinsky-2-2-prior", "prior")

# SD 2.1-base's scheduler config (a PNDMScheduler one): the fields every sampler built from it shares.
SD21_BASE_SAMPLING = dict(common.SD_SCHEDULE, steps_offset=1, set_alpha_to_one=False, clip_sample=False,
                          prediction_type="epsilon")

# The demo's tiny random networks (CPU, 64x64 images). Its autoencoder is parameter-free (pgpis_jax/models/
# latent_codec.py): each 8x8 pixel block as its DCT coefficients with u + v < 4 (a JPEG-like low-pass code,
# high frequencies amplified by 1 + u + v), so latents are at 1/8 of the image size as the SD VAE's, with 30
# channels. Decoding the test targets' codes gives SSIM 0.90 against the targets; all 192 coefficients scored the
# same at the demo's earlier settings, with 6x wider UNet inputs and outputs (docs/pcdms_demo.md).
DEMO_EMBEDDING = 32
DEMO_LATENT_FACTOR = 8
DEMO_LOW_PASS = 4
DEMO_LATENT_CHANNELS = 3 * DEMO_LOW_PASS * (DEMO_LOW_PASS + 1) // 2
DEMO_ENCODER_SIZE = 56   # CLIP / DINOv2 input size in the demo (patch 14 -> 16 tokens + CLS)


def network(weights="", subfolder="", config=None, overrides=None, keep_fresh=(), drop_pretrained=(), options=None):
    """A network spec (pgpis_jax/methods/common/networks.py): pretrained `weights` (hub id or directory), or a
    full `config` for a random-init network; `options` are module options that are not config.json keys."""
    return ml_collections.ConfigDict(dict(weights=weights, subfolder=subfolder, config=config or {},
                                          overrides=overrides or {}, keep_fresh=tuple(keep_fresh),
                                          drop_pretrained=tuple(drop_pretrained), options=options or {}))


def demo_clip():
    return network(config=dict(
        architectures=["CLIPVisionModelWithProjection"], model_type="clip_vision_model", hidden_size=32,
        intermediate_size=64, projection_dim=DEMO_EMBEDDING, num_hidden_layers=2, num_attention_heads=2,
        image_size=DEMO_ENCODER_SIZE, patch_size=14, hidden_act="gelu"))


def demo_dinov2():
    return network(config=dict(
        architectures=["Dinov2Model"], model_type="dinov2", hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, mlp_ratio=2, image_size=DEMO_ENCODER_SIZE, patch_size=14))


def demo_unet(in_channels, class_embedding):
    """Three levels of width 64 (8x16, 4x8, 2x4 latents on the stage-2 canvas), self- and cross-attention in the
    first two, group norms over 8 channels. On a set with textured backdrops, stage-2 SSIM was 0.48 at width 32
    with one channel per group, 0.54 at width 32 with groups of 8 channels, 0.56 with this."""
    config = dict(
        _class_name="UNet2DConditionModel", sample_size=64 // DEMO_LATENT_FACTOR, in_channels=in_channels,
        out_channels=DEMO_LATENT_CHANNELS,
        down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"], block_out_channels=[64, 64, 64],
        layers_per_block=1, attention_head_dim=[1, 2, 2], cross_attention_dim=DEMO_EMBEDDING,
        use_linear_projection=True, norm_num_groups=8)
    if class_embedding:
        config.update(class_embed_type="projection", projection_class_embeddings_input_dim=DEMO_EMBEDDING)
    return network(config=config)


def sd21_unet(in_channels, class_embedding):
    """SD 2.1-base's UNet with a new conv_in kernel (its bias is kept, as ignore_mismatched_sizes keeps every
    tensor whose shape still fits) and, for stage 2, a new projection class embedding."""
    overrides = dict(in_channels=in_channels)
    keep_fresh = ["conv_in/kernel"]
    if class_embedding:
        overrides.update(class_embed_type="projection", projection_class_embeddings_input_dim=1024)
        keep_fresh.append("class_embedding/.*")
    return network(SD21_BASE, "unet", overrides=overrides, keep_fresh=keep_fresh)


def parse(arg):
    return common.parse_arg(arg, demo=False, market=False, res=256, released=False, device_memory=0)


# `device_memory=<GB>`: (stage, res, GB) -> (rows per device and micro-batch, mesh fsdp). From the compiled memory of
# the full-size train steps (bench/RESULTS.md, memory plan: fp32 parameters, AdamW moments and compute, pixel inputs,
# XLA's CPU compiler): the largest measured batch (1, 2, 4, 8) whose peak stays within 90 % of the device's memory.
# Remat stays off: on that compiler it lowered no peak by more than 2 %, for 9-12 % more FLOPs. 16 GB cannot hold the
# 14-17 GiB fp32 state, so it is sharded over all devices there (fsdp = -1; measured with 8).
DEVICE_MEMORY_PLANS = {
    ("pcdm_inpaint", 256, 80): (8, 1), ("pcdm_inpaint", 256, 32): (4, 1), ("pcdm_inpaint", 256, 16): (2, -1),
    ("pcdm_inpaint", 512, 80): (8, 1), ("pcdm_inpaint", 512, 32): (1, 1), ("pcdm_inpaint", 512, 16): (1, -1),
    ("pcdm_refine", 256, 80): (8, 1), ("pcdm_refine", 256, 32): (8, 1), ("pcdm_refine", 256, 16): (8, -1),
    ("pcdm_refine", 512, 80): (8, 1), ("pcdm_refine", 512, 32): (4, 1), ("pcdm_refine", 512, 16): (2, -1),
}


def apply_device_memory(config, method: str, arg) -> None:
    """Sets config.grad.max_per_device_batch, config.mesh and config.remat from DEVICE_MEMORY_PLANS."""
    key = (method, arg.res, arg.device_memory)
    known = sorted({gb for (_, _, gb) in DEVICE_MEMORY_PLANS})
    if arg.demo or arg.market or key not in DEVICE_MEMORY_PLANS:
        raise ValueError(f"device_memory={arg.device_memory}: planned for stages 2 and 3 (pcdm_inpaint, pcdm_refine) "
                         f"on DeepFashion at res=256 or res=512 (not demo or market), {', '.join(map(str, known))} GB")
    rows, fsdp = DEVICE_MEMORY_PLANS[key]
    config.grad.max_per_device_batch = rows
    config.mesh.data, config.mesh.fsdp = (1, -1) if fsdp == -1 else (-1, 1)
    config.remat = "none"


def pcdm_config(method, arg, total_steps, batch_size):
    """Base, optimizer, data and sampling settings of one stage. Table 4: AdamW, lr 1e-4, weight decay 0.01.

    Weights and data: `config.model.<network>.weights` (hub id or local directory) and `config.data.data_dir`
    (where `tfds build data/deepfashion` wrote the dataset). Encoders and the VAE are frozen.
    """
    arg = parse(arg)
    config = common.base_config(method)
    config.total_steps = total_steps
    config.batch_size = batch_size
    config.optimizer = common.optimizer_config(learning_rate=1e-4, weight_decay=0.01)
    config.sampling = ml_collections.ConfigDict(dict(num_inference_steps=20, guidance_scale=2.0,
                                                     guidance_rescale=0.0))
    config.data = ml_collections.ConfigDict(dict(
        layout=method,    # the batch layout (pgpis_jax/input_pipeline.py); each PCDMs stage reads its own
        dataset="market1501" if arg.market else "deepfashion",
        image_size=(128, 64) if arg.market else ((512, 352) if arg.res == 512 else (256, 176)),
        data_dir="", pipeline={},
        features_dir=""))   # offline features of the frozen networks (extract_features.py); "" reads pixels
    config.model = ml_collections.ConfigDict(dict(
        attention_implementation="auto",   # per device when called (pgpis_jax.nn.attention.resolve_implementation)
        image_encoder=network(*CLIP_VIT_H),
        dinov2=network(DINOV2_GIANT, options=dict(position_interpolation="scale_factor" if arg.released else "size"))))
    config.logging.num_samples = 4
    config.eval = common.eval_config()
    config.logging.sample_every_steps = 5_000
    if arg.demo:
        config.total_steps = 300
        config.batch_size = 16
        config.log_every_steps = 50
        config.checkpoint_every_steps = 300
        config.logging.sample_every_steps = 0
        config.optimizer.learning_rate = 1e-3
        config.data.dataset = "synthetic_people"
        config.eval.metrics = "ssim,psnr"
        config.data.image_size = (64, 64)
        config.data.builder_config = "64x64_demo"   # 320 train / 48 test identities, plain backdrops
        config.data.pipeline = dict(clip_size=DEMO_ENCODER_SIZE)
        config.model.image_encoder = demo_clip()
        config.model.dinov2 = demo_dinov2()
    if arg.device_memory:
        apply_device_memory(config, method, arg)
    return config, arg


def unet_stage_config(method, arg, total_steps, class_embedding):
    """Stages 2 and 3: SD 2.1-base UNets, epsilon prediction, noise offset 0.1, batch 128 (Table 4), the
    SD VAE, DINOv2-giant tokens through a trainable projector (1536 -> 768 -> 1024).

    Paper: DDIM, 20 steps, w = 2. The released code samples with UniPC (order 2, bh2) built from the SD
    2.1-base scheduler config (`released`) and keeps the best of 4 samples by SSIM against the ground truth
    (an oracle selection: sample.py --best_of=4 writes the candidates to <stage>_candidates/sample_0..3 and keeps
    the best; eval.py's pcdms protocol scores them).
    """
    config, arg = pcdm_config(method, arg, total_steps=total_steps, batch_size=128)
    config.diffusion = ml_collections.ConfigDict(dict(
        train_scheduler=common.scheduler_config("DDPMScheduler", prediction_type="epsilon", **common.SD_SCHEDULE),
        noise_offset=0.1, condition_dropout=0.1))
    sampler = "UniPCMultistepScheduler" if arg.released else "DDIMScheduler"
    config.sampling.scheduler = common.scheduler_config(sampler, **SD21_BASE_SAMPLING)
    config.data.pipeline = dict(config.data.pipeline, image_size=64 if arg.demo else (128 if arg.market else arg.res))
    config.model.unet = sd21_unet(4 * 2 + (1 if class_embedding else 0), class_embedding)
    config.model.vae = ml_collections.ConfigDict(dict(kind="sd", **network(SD21_BASE, "vae")))
    config.model.image_proj = ml_collections.ConfigDict(dict(hidden=768))
    config.param_groups.trainable = ("unet/.*", "image_proj_model_p/.*") + (("pose_proj/.*",) if class_embedding
                                                                             else ())
    if arg.released:
        config.grad.clip_norm = 1.0
    if arg.demo:
        config.model.unet = demo_unet(2 * DEMO_LATENT_CHANNELS + (1 if class_embedding else 0), class_embedding)
        config.model.vae = ml_collections.ConfigDict(dict(kind="pixel_shuffle", factor=DEMO_LATENT_FACTOR, scaling=1.0,
                                                          basis="dct", high_frequency_gain=1.0,
                                                          low_pass=DEMO_LOW_PASS))
        config.model.image_proj = ml_collections.ConfigDict(dict(hidden=64))
        # A network trained for minutes on a CPU: x0 prediction and no guidance give clean (if soft) samples,
        # where epsilon prediction and w = 2 leave visible noise (measured in the demo; see docs/pcdms_demo.md).
        config.total_steps = 760
        config.checkpoint_every_steps = 760
        config.diffusion.train_scheduler.prediction_type = "sample"
        config.sampling.scheduler = common.scheduler_config("DDIMScheduler",
                                                            **dict(SD21_BASE_SAMPLING, prediction_type="sample"))
        config.sampling.guidance_scale = 1.0
    return config, arg
