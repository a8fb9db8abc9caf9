"""PCDMs stage 3: the refining UNet conditioned on the stage-2 result.

Training needs the stage-2 results for the training pairs in config.data.pipeline.coarse_dir
(<source>_to_<target>.png), made with the true target embedding and the best of 4 as the original does:
    python sample.py --config=configs/pcdm_inpaint.py --workdir=runs/pcdm_inpaint --ablation=true \
        --split=train --best_of=4 --output_dir=runs/coarse_train
then train with `--config.data.pipeline.coarse_dir=runs/coarse_train/stage2`.
Arguments: see configs/pcdm_common.py (`demo`, `market`, `res=512`, `released`).
"""

from configs import pcdm_common


def get_config(arg=None):
    config, arg = pcdm_common.unet_stage_config("pcdm_refine", arg, total_steps=100_000, class_embedding=False)
    config.data.pipeline = dict(config.data.pipeline, coarse_dir="")
    # The released stage-3 script passes guidance_rescale = w (= 2), almost certainly unintended; 0 here.
    if arg.released:
        config.optimizer.learning_rate = 1e-5
        config.total_steps = 1_000_000    # the script's maximum; global batch 128 as the paper
    if arg.demo:
        # The refiner was undertrained at 560 steps (SSIM 0.61 < stage 2's 0.65, its loss still falling): 1600 steps
        # at lr 2e-3 and no condition dropout (guidance is off, so the coarse-free branch is never sampled). On the
        # same stage 2 (SSIM 0.600): 1100 steps 0.604, 1600 steps 0.624 (docs/pcdms_demo.md).
        config.total_steps = 1600
        config.checkpoint_every_steps = 1600
        config.optimizer.learning_rate = 2e-3
        config.diffusion.condition_dropout = 0.0
    return config
