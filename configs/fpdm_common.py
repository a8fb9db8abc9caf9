"""What FPDM's two stages share (../shared/reference/fpdm.md): hub ids, the DeepFashion data section, the tiny demo
networks and the config arguments.

Arguments (comma-separated, e.g. `demo` or `res=256`):
  demo      tiny random networks on synthetic_people/64x64_demo, trained in minutes on a CPU (`make demo-fpdm`)
  res       512 (default): the code's resolution, targets 512x352 (H x W), the source 512x512 for DINOv2 and
            224x224 for CLIP, evaluated at 512x352; 256: the same training and sampling, evaluated at 256x176 (the
            paper's 256 numbers resize the 512x352 outputs, C2.eval.caculate_metrics.py)
"""

import ml_collections

from configs import common, pcdm_common

SD21 = "stabilityai/stable-diffusion-2-1"       # the 768-v model (v-prediction), not 2-1-base
CLIP_VIT_L = "openai/clip-vit-large-patch14"
DINOV2_LARGE = "facebook/dinov2-large"

# DeepFashion at the original's training size (`model_img_size` [352, 512]); CFLD's split.
TRAIN_PAIRS = 101_966
IMAGE_SIZE = (512, 352)

# The demo (64x64 synthetic people): encoders see 56x56 inputs (16 patches of 14 + CLS), skeletons are drawn on the
# 64x64 canvas with 2-pixel sticks and joints (the original's 4 px on 550x375 would be thinner than a pixel).
DEMO_SIZE = 64
DEMO_ENCODER_SIZE = pcdm_common.DEMO_ENCODER_SIZE
DEMO_EMBEDDING = pcdm_common.DEMO_EMBEDDING
DEMO_POSE = dict(pose_canvas=(DEMO_SIZE, DEMO_SIZE), stickwidth=2, radius=2)


def network(*args, **kwargs):
    return pcdm_common.network(*args, **kwargs)


def parse(arg):
    arg = common.parse_arg(arg, demo=False, res=512)
    if arg.res not in (512, 256):
        raise ValueError(f"config argument res={arg.res}: expected 512 or 256")
    return arg


def combiner_config(projection_dim=768, hidden_dim=768):
    """The Combiner's widths (the original hard-codes 768 for both) and its dropout rate."""
    return ml_collections.ConfigDict(dict(projection_dim=projection_dim, hidden_dim=hidden_dim, dropout=0.5))


def demo_combiner():
    return combiner_config(DEMO_EMBEDDING, DEMO_EMBEDDING)


def data_config(layout, arg, pipeline=None):
    """config.data: DeepFashion stored at 512x352 (`tfds build data/deepfashion`), or the demo's synthetic people."""
    data = ml_collections.ConfigDict(dict(layout=layout, dataset="deepfashion", image_size=IMAGE_SIZE, data_dir="",
                                          pipeline=dict(pipeline or {}), features_dir=""))
    if arg.demo:
        data.dataset = "synthetic_people"
        data.image_size = (DEMO_SIZE, DEMO_SIZE)
        data.builder_config = "64x64_demo"
    return data


def base(method, arg):
    """Shared settings: seed 7 (pl.seed_everything(7)), attention kernel, the evaluation protocol."""
    config = common.base_config(method)
    config.seed = 7
    config.model = ml_collections.ConfigDict(dict(attention_implementation="auto"))
    config.eval = common.eval_config(protocol="fpdm", eval_size="256x176" if arg.res == 256 else "")
    config.logging.num_samples = 4
    if arg.demo:
        config.log_every_steps = 50
        config.logging.sample_every_steps = 0
        config.eval.metrics = "ssim,psnr"
    return config
