"""PCDMs stage 2: the inpainting UNet on the [source | target] canvas.

Arguments: see configs/pcdm_common.py (`demo`, `market`, `res=512`, `released`).
Example: python train.py --config=configs/pcdm_inpaint.py:demo --workdir=runs/pcdm_inpaint_demo
"""

import ml_collections

from configs import pcdm_common


def get_config(arg=None):
    config, arg = pcdm_common.unet_stage_config("pcdm_inpaint", arg, total_steps=200_000,
                                                class_embedding=True)
    # ControlNet-style pose encoder on the [source | target] skeleton canvas, zero-initialised output.
    config.model.pose_encoder = ml_collections.ConfigDict(dict(block_out_channels=(16, 32, 96, 256)))
    if arg.released:
        config.batch_size = 64            # 8 GPUs x 8; lr 1e-4 as the paper
        config.total_steps = 1_000_000    # the script's maximum
    if arg.demo:
        config.model.pose_encoder.block_out_channels = (4, 8, 16, 32)   # 8x down, as the latents
        # 640 steps (not 760) leave stage 3 the minutes it needs; 5 DDIM steps scored as well as 20 (test SSIM 0.651
        # vs 0.648 at 760 steps) and are also how stage 3's training inputs are made (demo.py), so both match.
        config.total_steps = 640
        config.checkpoint_every_steps = 640
        config.sampling.num_inference_steps = 5
    return config
