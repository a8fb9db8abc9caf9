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
        config.total_steps = 560          # a refinement in place: fewer steps than stage 2 fit the demo's minutes
        config.checkpoint_every_steps = 560
    return config
