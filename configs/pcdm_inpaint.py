"""PCDMs stage 2: the inpainting UNet on the [source | target] canvas.

Arguments (comma-separated): `demo` (tiny, CPU), `market` (Market-1501 128x64), `res=512` (DeepFashion
512x352). Example: --config=configs/pcdm_inpaint.py:demo
"""

import ml_collections

from configs import common, pcdm_common


def get_config(arg=None):
    config = pcdm_common.pcdm_config("pcdm_inpaint", arg, total_steps=200_000, batch_size=128)
    config.diffusion = ml_collections.ConfigDict(dict(
        train_scheduler=common.scheduler_config("DDPMScheduler", prediction_type="epsilon", **common.SD_SCHEDULE),
        noise_offset=0.1, timestep_sampler="uniform", condition_dropout=0.1))
    # Paper: DDIM, 20 steps, w = 2. The released code samples with UniPC (order 2, bh2) built from the
    # SD 2.1-base scheduler config and keeps the best of 4 samples by SSIM against the ground truth.
    config.sampling.scheduler = common.scheduler_config("DDIMScheduler", prediction_type="epsilon",
                                                        **pcdm_common.SD21_BASE_DDIM)
    return config
