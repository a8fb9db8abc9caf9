"""The current demo: sample an 8-mode 2-D Gaussian mixture with its exact denoiser through each sampler
of the diffusion core, as diffusers schedulers configure them. No network and no data are involved.

Arguments: `quick` (fewer samples). Example: --config=configs/toy_mixture.py
"""

import ml_collections

from configs import common


def get_config(arg=None):
    arg = common.parse_arg(arg, quick=False)
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.num_samples = 500 if arg.quick else 4000
    config.mixture = ml_collections.ConfigDict(dict(num_modes=8, radius=3.0, std=0.4))
    sd = dict(common.SD_SCHEDULE, clip_sample=False)
    config.samplers = ml_collections.ConfigDict({
        "ddpm_50": dict(steps=50, scheduler=dict(sd, _class_name="DDPMScheduler")),
        "ddim_50": dict(steps=50, scheduler=dict(sd, _class_name="DDIMScheduler", steps_offset=1)),
        "unipc_20": dict(steps=20, scheduler=dict(common.SD_SCHEDULE, _class_name="UniPCMultistepScheduler")),
        "unipc_10_v": dict(steps=10, scheduler=dict(common.SD_SCHEDULE, _class_name="UniPCMultistepScheduler",
                                                     prediction_type="v_prediction", solver_order=3)),
        "unclip_20_x0": dict(steps=20, scheduler=dict(_class_name="UnCLIPScheduler", prediction_type="sample",
                                                       clip_sample_range=10.0)),
    })
    return config
