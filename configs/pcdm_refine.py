"""PCDMs stage 3: the refining UNet conditioned on the stage-2 result.

Arguments (comma-separated): `demo` (tiny, CPU), `market` (Market-1501 128x64), `res=512` (DeepFashion
512x352). Example: --config=configs/pcdm_refine.py:demo
"""

from configs import pcdm_common


def get_config(arg=None):
    config = pcdm_common.unet_stage_config("pcdm_refine", arg, total_steps=100_000)
    # The released stage-3 script passes guidance_rescale = w (= 2), almost certainly unintended.
    config.sampling.guidance_rescale = 0.0
    return config
