"""train.py config for end-to-end tests of PCDMs stages 2 and 3: the `:demo` stage with a one-level UNet without
attention outside its mid block (a down block, the cross-attention mid block, an up block; width 32) and one-layer
image encoders, which compiles in a fraction of the demo's time. For tests whose assertions (same losses across
processes, what a command writes or refuses) do not depend on the networks' depth.
Usage: --config=tests/small_pcdm_config.py:inpaint (or :refine).
"""

from configs import pcdm_inpaint, pcdm_refine

STAGES = {"inpaint": pcdm_inpaint, "refine": pcdm_refine}


def get_config(stage="inpaint"):
    config = STAGES[stage].get_config("demo")
    config.model.unet.config.update(down_block_types=["DownBlock2D"], up_block_types=["UpBlock2D"],
                                    block_out_channels=[32], attention_head_dim=[1])
    for encoder in ("image_encoder", "dinov2"):
        config.model[encoder].config.update(num_hidden_layers=1)
    return config
