"""Settings the three PCDMs stages share (Shen et al., ICLR 2024, Sec. 4 and Appendix B)."""

import ml_collections

from configs import common

# Stages 2-3 fine-tune SD 2.1-base; DDIM with the fields of its scheduler config (a PNDMScheduler one).
SD21_BASE_DDIM = dict(common.SD_SCHEDULE, steps_offset=1, set_alpha_to_one=False, clip_sample=False)


def pcdm_config(method, arg, total_steps, batch_size):
    """Base, optimizer and sampling settings of one stage. Table 4: AdamW, lr 1e-4 in every stage.

    The released scripts differ: lr 1e-5 in stages 1 and 3, global batch 1024 / 64 / 128, up to 1M steps
    in stages 2-3, grad-clip 10 / 1 / 1 (see ../shared/reference/pcdms.md, Sec. 5).
    """
    arg = common.parse_arg(arg, demo=False, market=False, res=256)
    config = common.base_config(method)
    config.total_steps = total_steps
    config.batch_size = batch_size
    config.optimizer = ml_collections.ConfigDict(
        dict(name="adamw", learning_rate=1e-4, weight_decay=0.01, b1=0.9, b2=0.999, eps=1e-8,
             schedule="constant"))
    config.sampling = ml_collections.ConfigDict(dict(num_inference_steps=20, guidance_scale=2.0))
    config.data = ml_collections.ConfigDict(
        dict(dataset="market1501" if arg.market else "deepfashion",
             image_size=(128, 64) if arg.market else ((512, 352) if arg.res == 512 else (256, 176))))
    if arg.demo:
        config.total_steps = 200
        config.batch_size = 8
        config.log_every_steps = 10
        config.checkpoint_every_steps = 100
        config.data.dataset = "synthetic_people"
        config.data.image_size = (64, 64)
    return config


def unet_stage_config(method, arg, total_steps):
    """Stages 2 and 3: SD 2.1-base UNets, epsilon prediction, noise offset 0.1, batch 128 (Table 4).

    Paper: DDIM, 20 steps, w = 2. The released code samples with UniPC (order 2, bh2) built from the SD
    2.1-base scheduler config and keeps the best of 4 samples by SSIM against the ground truth.
    """
    config = pcdm_config(method, arg, total_steps=total_steps, batch_size=128)
    config.diffusion = ml_collections.ConfigDict(dict(
        train_scheduler=common.scheduler_config("DDPMScheduler", prediction_type="epsilon", **common.SD_SCHEDULE),
        noise_offset=0.1, timestep_sampler="uniform", condition_dropout=0.1))
    config.sampling.scheduler = common.scheduler_config("DDIMScheduler", prediction_type="epsilon", **SD21_BASE_DDIM)
    return config
