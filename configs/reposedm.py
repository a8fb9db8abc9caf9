"""RePoseDM (Khandelwal): PIDM's pixel UNet and texture encoder, recurrent pose alignment of the source, gradient
guidance by a pose-heatmap estimator. The paper gives no hyper-parameters; every choice here is PIDM's code [C] or
the reference's proposal [PROP] (../shared/reference/reposedm.md).

Arguments (comma-separated, e.g. `:market,B2`):
  deepfashion256  DeepFashion at 256x256 (squashed from 256x176, as PIDM trains; the default)
  market          Market-1501 at 128x64 (the same UNet; the alignment at stride 4: a 32x16 grid)
  demo            tiny networks on `synthetic_people` (64x64_demo, trained and sampled at 32x32; 2-core CPU)
  B1              PIDM: no alignment, no gradient guidance, PIDM's null condition (the source alone dropped)
  B2              alignment without gradient guidance (no pose estimator)
  paper_literal   no warp loss (the paper's loss: L_simple + L_vlb)

Defaults [C]: Adam lr 2e-5 (warm-up from 0.04x over 5000 steps, then flat), grad clip 1.0, EMA 0.9999, 32 pairs a step
used in both directions (64 images), T = 1000 linear betas 1e-4 .. 0.02, condition dropout 0.1, DDIM 100 steps
(eta 0, no clipping) with guidance scale 2. [PROP]: the alignment defaults (Sec. 2.6), joint null condition,
warp loss weight 1, the tiny heatmap estimator trained with the run, gradient scale 1, threshold 0.1.
Weights: config.model.unet.weights may name PIDM's released checkpoint (its `ema` state dict) to start the UNet and
texture encoder from. Data: `tfds build data/deepfashion --config=256x176` (or market).
"""

import ml_collections

from configs import common
from configs.pcdm_common import network

ARGUMENTS = ("deepfashion256", "market", "demo", "B1", "B2", "paper_literal")
TRAIN_PAIRS = {"deepfashion": 101_966, "market": 263_632}
PAIRS_PER_STEP = 32

# PIDM's get_model_conf() (DeepFashion), PIDMUNet's fields.
PIDM_UNET = dict(image_size=256, in_channels=23, model_channels=128, out_channels=6, num_res_blocks=2,
                 channel_mult=(1, 1, 2, 2, 4, 4), attention_resolutions=(32, 16, 8), embed_channels=512, dropout=0.1)
# The reference's alignment defaults (Sec. 2.6), RecurrentPoseAlignment's fields.
ALIGNMENT = dict(image_channels=3, pose_channels=20, features=128, stem_channels=64, stage_channels=(96, 128, 128),
                 heads=4, kernels=(0, 9, 5, 3, 3, 3), radius=4, accumulate="compose", symmetric=False)
TINY_HEATMAP_NET = dict(kind="tiny", joints=18, channels=(32, 64), blocks=2)
# PIDM's diffusion: linear betas, epsilon prediction, learned-range variance.
PIDM_SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=2e-2,
                     prediction_type="epsilon")
# PIDM's evaluation sampler: DDIM, timesteps 990, 980, ..., 0, the last step to alpha_bar = 1, no clipping.
PIDM_DDIM = dict(PIDM_SCHEDULE, clip_sample=False, set_alpha_to_one=True, timestep_spacing="leading", steps_offset=0)


def parse(arg):
    parsed = ml_collections.ConfigDict(dict(dataset="deepfashion", demo=False, ablation="", paper_literal=False))
    for item in filter(None, (arg or "").split(",")):
        if item not in ARGUMENTS:
            raise ValueError(f"unknown config argument {item!r}; known: {', '.join(ARGUMENTS)}")
        if item == "market":
            parsed.dataset = "market"
        elif item == "demo":
            parsed.demo = True
        elif item in ("B1", "B2"):
            parsed.ablation = item
        elif item == "paper_literal":
            parsed.paper_literal = True
    return parsed


def get_config(arg=None):
    arg = parse(arg)
    config = common.base_config("reposedm")
    steps_per_epoch = TRAIN_PAIRS[arg.dataset] // PAIRS_PER_STEP
    config.batch_size = PAIRS_PER_STEP
    config.total_steps = 300 * steps_per_epoch
    config.log_every_steps = 100
    config.checkpoint_every_steps = 5 * steps_per_epoch
    config.optimizer = common.optimizer_config(name="adam", learning_rate=2e-5, weight_decay=0.0,
                                               schedule="linear_warmup")
    config.lr_schedule = common.lr_schedule_config(warmup_steps=5000, warmup_start_factor=0.04)
    config.grad.clip_norm = 1.0
    config.ema.decay = 0.9999
    size = (256, 256) if arg.dataset == "deepfashion" else (128, 64)
    config.data = ml_collections.ConfigDict(dict(
        layout="reposedm", dataset=arg.dataset, image_size=(256, 176) if arg.dataset == "deepfashion" else (128, 64),
        data_dir="", features_dir="",
        pipeline=dict(image_size=size, stickwidth=4, radius=4, scale_jitter=0.05, flip_prob=0.5, keypoints=True)))
    config.diffusion = ml_collections.ConfigDict(dict(
        train_scheduler=common.scheduler_config("DDPMScheduler", **PIDM_SCHEDULE, variance_type="learned_range",
                                                clip_sample=True),
        noise_offset=0.0, condition_dropout=0.1, both_directions=True))
    config.loss = ml_collections.ConfigDict(dict(
        vlb_weight=1.0,            # L = L_mse + L_vlb, PIDM's hybrid loss
        warp_weight=1.0,           # [PROP] auxiliary warp loss; 0 = the paper
        warp_gamma=0.8, warp_size=64,
        heatmap_weight=1.0,        # the pose estimator's own loss (it is trained with the run)
        heatmap_sigma=2.0))        # Gaussian target heatmaps, sigma in heatmap pixels (stride 4)
    config.sampling = ml_collections.ConfigDict(dict(
        scheduler=common.scheduler_config("DDIMScheduler", **PIDM_DDIM), num_inference_steps=100,
        guidance_scale=2.0, gradient_scale=1.0, heatmap_threshold=0.1, gradient_t_max=1000))
    unet = dict(PIDM_UNET)
    alignment = dict(ALIGNMENT)
    if arg.dataset == "market":
        unet["image_size"] = 128
        alignment["stage_channels"] = (96, 128)
    config.model = ml_collections.ConfigDict(dict(
        attention_implementation="xla", unet=network(config=unet), alignment=network(config=alignment),
        pose_estimator=network(config=TINY_HEATMAP_NET), rpa=True, gradient_guidance=True,
        null_condition="source_and_pose", concat_source=False))
    config.eval = common.eval_config(protocol="pidm")
    config.logging.num_samples = 4
    config.logging.sample_every_steps = 0
    if arg.demo:
        demo(config)
    if arg.paper_literal:
        config.loss.warp_weight = 0.0
    ablation(config, arg.ablation)
    return config


def ablation(config, name):
    """B1 (PIDM) and B2 (RPA only) of the paper's Table 2."""
    if name in ("B1", "B2"):
        config.model.gradient_guidance = False
        config.data.pipeline.keypoints = False
    if name == "B1":
        config.model.rpa = False
        config.model.null_condition = "source"


# The demo: synthetic people resized to 32x32 (the UNet's cost is per pixel: 64x64 does not train in the demo's
# minutes on two cores), a three-level UNet of widths 32, 32, 64 with cross-attention at 8 and the position encoding
# option, an alignment grid of 8x8 (stride 4).
DEMO_SIZE = 32


def demo(config):
    """Tiny networks on synthetic_people/64x64_demo (640 train / 96 test pairs) at DEMO_SIZE, CPU-sized training.
    Demo settings, not the paper's (README, RePoseDM): the texture encoder's image (the warped source; B1: the source)
    also concatenated to the UNet's input, x0 prediction without L_vlb, the learning rate's decay for the last
    quarter, no classifier-free guidance (w = 1), gradient guidance at scale 300 for t < 300."""
    config.total_steps = 300
    config.batch_size = 16
    config.log_every_steps = 100
    config.checkpoint_every_steps = 300
    config.optimizer.learning_rate = 1e-3
    config.optimizer.schedule = "step_decay"
    config.lr_schedule = common.lr_schedule_config(warmup_steps=50, warmup_start_factor=0.1, decay_boundaries=(225,),
                                                   decay_factor=0.1)
    config.ema.decay = 0.0
    config.diffusion.both_directions = False
    config.data.dataset = "synthetic_people"
    config.data.builder_config = "64x64_demo"
    config.data.image_size = (64, 64)
    config.data.pipeline = dict(image_size=DEMO_SIZE, stickwidth=1, radius=1, scale_jitter=0.05, flip_prob=0.5,
                                keypoints=True)
    # x0 prediction: epsilon prediction from a few hundred steps leaves high-frequency noise in the samples; the
    # variance channels stay untrained (L_vlb off), DDIM does not read them
    config.diffusion.train_scheduler.prediction_type = "sample"
    config.loss.vlb_weight = 0.0
    config.sampling.scheduler.prediction_type = "sample"
    config.sampling.num_inference_steps = 10
    # x0 clipped to [-1, 1] at each step (PIDM's DDPM does, its DDIM does not)
    config.sampling.scheduler.clip_sample = True
    # w = 2 pushes the pose map's colours into the figures (SSIM 0.657, w = 1: 0.737). Gradient scale 1 lowered the
    # pose distance by 0.04 %, 30 at every t raised it, 300 for t < 300 lowers it by 1.4 % (docs/reposedm_demo.md)
    config.sampling.guidance_scale = 1.0
    config.sampling.gradient_scale = 300.0
    config.sampling.gradient_t_max = 300
    config.eval = common.eval_config(metrics="ssim,psnr", protocol="standard")
    config.loss.heatmap_sigma = 1.0
    config.loss.warp_size = DEMO_SIZE
    m = config.model
    m.concat_source = True
    m.unet = network(config=dict(PIDM_UNET, image_size=DEMO_SIZE, in_channels=26, model_channels=32,
                                 num_res_blocks=1, channel_mult=(1, 1, 2), attention_resolutions=(8,),
                                 embed_channels=64, dropout=0.0, position_encoding=True))
    m.alignment = network(config=dict(ALIGNMENT, features=32, stem_channels=16, stage_channels=(24, 32), heads=2,
                                      kernels=(0, 5, 3), radius=2))
    m.pose_estimator = network(config=dict(TINY_HEATMAP_NET, channels=(16, 32), blocks=2))
