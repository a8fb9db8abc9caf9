"""PCDMs stage 1: the prior transformer predicting the target's CLIP image embedding.

Arguments (comma-separated): `demo` (tiny, CPU), `market` (Market-1501 128x64), `res=512` (DeepFashion
512x352). Example: --config=configs/pcdm_prior.py:demo
"""

import ml_collections

from configs import common, pcdm_common


def get_config(arg=None):
    config = pcdm_common.pcdm_config("pcdm_prior", arg, total_steps=100_000, batch_size=256)
    # Cosine schedule, x0 prediction; noise offset 0.1, one scalar per sample (released code).
    config.diffusion = ml_collections.ConfigDict(dict(
        train_scheduler=common.scheduler_config("DDPMScheduler", beta_schedule="squaredcos_cap_v2",
                                                num_train_timesteps=1000, prediction_type="sample"),
        noise_offset=0.1, timestep_sampler="uniform", condition_dropout=0.1))
    # The paper samples every stage with DDIM; the released stage-1 code uses Kandinsky's UnCLIPScheduler
    # (fixed_small_log, clip_sample_range 10) with guidance off (scale 0).
    config.sampling.scheduler = common.scheduler_config(
        "DDIMScheduler", beta_schedule="squaredcos_cap_v2", num_train_timesteps=1000, prediction_type="sample",
        clip_sample=False, set_alpha_to_one=True, timestep_spacing="leading")
    return config
