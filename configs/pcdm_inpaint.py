"""PCDMs stage 2: the inpainting UNet on the [source | target] canvas.

Arguments (comma-separated): `demo` (tiny, CPU), `market` (Market-1501 128x64), `res=512` (DeepFashion
512x352). Example: --config=configs/pcdm_inpaint.py:demo
"""

from configs import pcdm_common


def get_config(arg=None):
    return pcdm_common.unet_stage_config("pcdm_inpaint", arg, total_steps=200_000)
