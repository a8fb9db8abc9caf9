"""PCDMs stage 3: the refining UNet conditioned on the stage-2 result.

Arguments (comma-separated): `demo` (tiny, CPU), `market` (Market-1501 128x64), `res=512` (DeepFashion
512x352). Example: --config=configs/pcdm_refine.py:demo
"""

import ml_collections

from configs import common, pcdm_common


def get_config(arg=None):
    config = pcdm_common.pcdm_config("pcdm_refine", arg, total_steps=100_000, batch_size=128)
    config.diffusion = ml_collections.ConfigDict(dict(
        train_scheduler=common.scheduler_config("DDPMScheduler", prediction_type="epsilon", **common.SD_SCHEDULE),
        noise_offset=0.1, timestep_sampler="uniform", condition_dropout=0.1))
    # Paper: DDIM, 20 steps, w = 2. The released code samples with UniPC and passes guidance_rescale = w.
    config.sampling.scheduler = common.scheduler_config("DDIMScheduler", prediction_type="epsilon",
                                                        **pcdm_common.SD21_BASE_DDIM)
    config.sampling.guidance_rescale = 0.0
    return config
