"""FPDM stage 2: the SD 2.1 (768-v) UNet conditioned on the stage-1 fusion embedding, the source's DINOv2-L tokens and
the target pose (config/c1.fpdm-deepfashion-dsrvd-ab6.yaml of the original).

The stage-1 run: `config.model.fusion_model.workdir` (a trained `fpdm_fusion` run directory; its fusion model is
copied into this run's frozen parameters when training starts).
Arguments: see configs/fpdm_common.py (`demo`, `res=512|256`).
Example: python train.py --config=configs/fpdm_diffusion.py:demo --workdir=runs/fpdm_demo \
             --config.model.fusion_model.workdir=runs/fpdm_fusion_demo
"""

import ml_collections

from configs import common, fpdm_common, pcdm_common

FUSION_DIM = 768   # CLIP ViT-L/14's projection_dim: the fusion embedding's width
# SD 2.1's scheduler config (a PNDMScheduler one) read by diffusers' DDPMScheduler.from_pretrained, as the original.
SD21_DDPM = dict(common.SD_SCHEDULE, prediction_type="v_prediction", clip_sample=False, steps_offset=1,
                 timestep_spacing="leading", variance_type="fixed_small")


def get_config(arg=None):
    arg = fpdm_common.parse(arg)
    config = fpdm_common.base("fpdm", arg)
    # 42 pairs per forward, 3 accumulated (126 per update); 100 epochs of ceil(2427 / 3) = 809 updates.
    config.batch_size = 126
    config.grad.accumulation_steps = 3
    updates_per_epoch = -(-(fpdm_common.TRAIN_PAIRS // 42) // 3)
    config.total_steps = 100 * updates_per_epoch
    config.checkpoint_every_steps = updates_per_epoch
    # AdamW lr 1e-4, no weight decay; WarmupStepLR per epoch: (e + 1) / 5 for epochs 0-4 (here a linear ramp from
    # 0.2 over the same 5 epochs), then 1e-4 until epoch 55 and 1e-5 after.
    config.optimizer = common.optimizer_config(learning_rate=1e-4, weight_decay=0.0, schedule="step_decay")
    config.lr_schedule = common.lr_schedule_config(warmup_steps=5 * updates_per_epoch, warmup_start_factor=0.2,
                                                   decay_boundaries=(55 * updates_per_epoch,), decay_factor=0.1)
    config.diffusion = ml_collections.ConfigDict(dict(
        train_scheduler=common.scheduler_config("DDPMScheduler", **SD21_DDPM),
        noise_offset=0.1,
        # each condition zeroed with p = 0.2 (pose_drop_rate, module_drop_rate x 2), one draw per batch ("batch",
        # as the original) or per example ("example")
        condition_dropout=dict(pose=0.2, tokens=0.2, fusion=0.2), condition_dropout_per="batch"))
    config.sampling = ml_collections.ConfigDict(dict(
        scheduler=common.scheduler_config("DDPMScheduler", **SD21_DDPM), num_inference_steps=20, guidance_scale=2.0))
    config.data = fpdm_common.data_config("fpdm", arg)
    config.model.update(dict(
        unet=fpdm_common.network(fpdm_common.SD21, "unet", keep_fresh=("class_embedding/.*",), overrides=dict(
            class_embed_type="mlp", projection_class_embeddings_input_dim=FUSION_DIM)),
        vae=ml_collections.ConfigDict(dict(kind="sd", **fpdm_common.network(fpdm_common.SD21, "vae"))),
        # transformers 4.40 resized DINOv2's 37x37 position table by scale factor (36.1 / 37) for 512 inputs
        src_image_encoder=fpdm_common.network(fpdm_common.DINOV2_LARGE,
                                              options=dict(position_interpolation="scale_factor")),
        srcimage_proj=ml_collections.ConfigDict(dict(hidden=768, dropout=0.2)),
        pose_encoder=ml_collections.ConfigDict(dict(block_out_channels=(16, 32, 96, 256))),
        # The frozen stage-1 model: its run directory, and the networks it is expected to hold (the run's own
        # configs are used when it is given; these declare them for the parameter report and for imports).
        # train_mode_dropout: the Combiner's dropout acts while stage 2 trains (Lightning's train mode), not when
        # sampling.
        fusion_model=ml_collections.ConfigDict(dict(
            workdir="", image_encoder=fpdm_common.network(fpdm_common.CLIP_VIT_L),
            combiner=fpdm_common.combiner_config(), train_mode_dropout=True))))
    config.param_groups.trainable = ("unet/.*", "srcimage_proj_model/.*", "pose_t_proj/.*")
    if arg.demo:
        demo(config)
    return config


def demo(config):
    """Tiny networks on 64x64 synthetic people, a parameter-free DCT code instead of the VAE (configs/pcdm_common.py),
    x0 prediction (as the PCDMs demo: v prediction learns far slower in a few hundred CPU steps), no guidance.
    Measured on the test pairs (docs/fpdm.md, "The demo"): the code scaled by 0.25, the DINOv2 LayerNorm's eps, w = 1
    and the learning rate's decay for the last quarter each raise SSIM."""
    config.batch_size = 16
    config.grad.accumulation_steps = 1
    config.total_steps = 1200
    config.checkpoint_every_steps = 1200
    config.optimizer = common.optimizer_config(learning_rate=1e-3, weight_decay=0.0, schedule="step_decay")
    config.lr_schedule = common.lr_schedule_config(warmup_steps=50, warmup_start_factor=0.1, decay_boundaries=(900,),
                                                   decay_factor=0.1)
    config.data.pipeline = dict(image_size=(fpdm_common.DEMO_SIZE, fpdm_common.DEMO_SIZE),
                                dino_size=fpdm_common.DEMO_ENCODER_SIZE, clip_size=fpdm_common.DEMO_ENCODER_SIZE,
                                low_res_size=fpdm_common.DEMO_ENCODER_SIZE // 2, keypoint_noise=0.12,
                                **fpdm_common.DEMO_POSE)
    unet = pcdm_common.demo_unet(pcdm_common.DEMO_LATENT_CHANNELS, class_embedding=False)
    unet.config.update(dict(class_embed_type="mlp", projection_class_embeddings_input_dim=fpdm_common.DEMO_EMBEDDING))
    config.model.unet = unet
    # The DC coefficients are 8x the block means (std 2.6 on these images, SD's scaled latents about 1): unscaled,
    # the first sampling step's x_t (sqrt(abar) = 0.09) still shows the training image's backdrop colour, which the
    # UNet learns to read there instead of from the source, and sampling starts from pure noise.
    config.model.vae = ml_collections.ConfigDict(dict(
        kind="pixel_shuffle", factor=pcdm_common.DEMO_LATENT_FACTOR, scaling=0.25, basis="dct",
        high_frequency_gain=1.0, low_pass=pcdm_common.DEMO_LOW_PASS))
    # A random frozen DINOv2 stands in for the pretrained one. Its random layers barely change the patch embeddings,
    # so with eps 1e-6 its final LayerNorm divides out each token's scale, and with it the source's brightness and
    # saturation; eps 1 (the tokens' variances are 0.05 to 0.9) keeps it.
    config.model.src_image_encoder = pcdm_common.demo_dinov2()
    config.model.src_image_encoder.config.layer_norm_eps = 1.0
    config.model.srcimage_proj.hidden = 64
    config.model.pose_encoder.block_out_channels = (4, 8, 16, 32)
    config.model.fusion_model.image_encoder = pcdm_common.demo_clip()
    config.model.fusion_model.combiner = fpdm_common.demo_combiner()
    sample = dict(SD21_DDPM, prediction_type="sample")
    config.diffusion.train_scheduler = common.scheduler_config("DDPMScheduler", **sample)
    config.sampling.scheduler = common.scheduler_config("DDPMScheduler", **sample)
    config.sampling.guidance_scale = 1.0
