"""train.py config for the multi-host comparison of PCDMs stage 2: the demo stage with a two-level UNet (cross-
attention in the first level only), which compiles in less time; the comparison of processes does not depend on
the network's depth. Usage: --config=tests/multihost_pcdm_config.py"""

from configs import pcdm_inpaint


def get_config():
    config = pcdm_inpaint.get_config("demo")
    unet = config.model.unet.config
    unet.down_block_types = ["CrossAttnDownBlock2D", "DownBlock2D"]
    unet.up_block_types = ["UpBlock2D", "CrossAttnUpBlock2D"]
    unet.block_out_channels = [64, 64]
    unet.attention_head_dim = [1, 2]
    return config
