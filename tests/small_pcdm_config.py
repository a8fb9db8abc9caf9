"""train.py config for end-to-end tests of PCDMs stages 2 and 3: the `:demo` stage with a one-level UNet (a cross-
attention down block, the cross-attention mid block, a cross-attention up block; width 32), which compiles in a
fraction of the demo UNet's time. For tests whose assertions (same losses across processes, what a command writes
or refuses) do not depend on the network's depth. Usage: --config=tests/small_pcdm_config.py:inpaint (or :refine).
"""

from configs import pcdm_inpaint, pcdm_refine

STAGES = {"inpaint": pcdm_inpaint, "refine": pcdm_refine}


def get_config(stage="inpaint"):
    config = STAGES[stage].get_config("demo")
    config.model.unet.config.update(down_block_types=["CrossAttnDownBlock2D"], up_block_types=["CrossAttnUpBlock2D"],
                                    block_out_channels=[32], attention_head_dim=[1])
    return config
