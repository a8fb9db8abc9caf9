"""A tiny MLP diffusion model on synthetic 8x8 images: exercises the whole trainer on a CPU.

Arguments: `demo` (200 steps, a few seconds). Example: --config=configs/toy_denoiser.py:demo
"""

import ml_collections

from configs import common


def get_config(arg=None):
    arg = common.parse_arg(arg, demo=False)
    config = common.base_config("toy_denoiser")
    config.seed = 0
    config.total_steps = 2000
    config.batch_size = 64
    config.log_every_steps = 50
    config.checkpoint_every_steps = 500
    config.optimizer = common.optimizer_config(learning_rate=1e-3, weight_decay=0.0, schedule="linear_warmup")
    config.lr_schedule = common.lr_schedule_config(warmup_steps=100)
    config.ema.decay = 0.99
    config.model = ml_collections.ConfigDict(dict(hidden=256, depth=3, time_embedding=64))
    config.data = ml_collections.ConfigDict(dict(image_size=8, num_examples=2048, seed=0))
    linear = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                  clip_sample=False, prediction_type="epsilon")
    config.diffusion = ml_collections.ConfigDict(dict(
        train_scheduler=common.scheduler_config("DDPMScheduler", **linear), timestep_sampler="uniform"))
    config.sampling = ml_collections.ConfigDict(dict(
        scheduler=common.scheduler_config("DDIMScheduler", set_alpha_to_one=False, steps_offset=1, **linear),
        num_inference_steps=20))
    config.logging.sample_every_steps = 500
    if arg.demo:
        config.total_steps = 200
        config.batch_size = 32
        config.log_every_steps = 20
        config.checkpoint_every_steps = 100
        config.lr_schedule.warmup_steps = 20
        config.model.hidden = 128
        config.model.depth = 2
        config.data.num_examples = 512
        config.logging.sample_every_steps = 100
    return config
