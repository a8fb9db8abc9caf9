"""FPDM stage 1: the image-pose fusion model (fine-tuned CLIP ViT-L/14 + Combiner), trained contrastively
(config/b1.fpdm-deepfashion.yaml of the original).

Arguments: see configs/fpdm_common.py (`demo`, `res=512|256`).
Example: python train.py --config=configs/fpdm_fusion.py:demo --workdir=runs/fpdm_fusion_demo
"""

import ml_collections

from configs import common, fpdm_common, pcdm_common


def get_config(arg=None):
    arg = fpdm_common.parse(arg)
    config = fpdm_common.base("fpdm_fusion", arg)
    # AdamW over CLIP and the Combiner, lr 1e-5, weight decay 1e-4, no schedule; batch 48, 5 epochs.
    config.batch_size = 48
    steps_per_epoch = fpdm_common.TRAIN_PAIRS // config.batch_size
    config.total_steps = 5 * steps_per_epoch
    config.checkpoint_every_steps = steps_per_epoch
    config.optimizer = common.optimizer_config(learning_rate=1e-5, weight_decay=1e-4)
    config.data = fpdm_common.data_config("fpdm_fusion", arg)
    config.model.img_encoder = fpdm_common.network(fpdm_common.CLIP_VIT_L)   # fine-tuned; also embeds the pose
    config.model.combiner = fpdm_common.combiner_config()
    # The source-enhanced InfoNCE (conbiner_self_learning), temperature 0.07, L1 weight 1e-4.
    config.loss = ml_collections.ConfigDict(dict(temperature=0.07, l1_weight=1e-4, source_enhanced=True))
    config.param_groups.trainable = ("img_encoder/.*", "combiner/.*")
    if arg.demo:
        config.batch_size = 32
        config.total_steps = 300
        config.checkpoint_every_steps = 300
        config.optimizer.learning_rate = 1e-3
        config.data.pipeline = dict(clip_size=fpdm_common.DEMO_ENCODER_SIZE, **fpdm_common.DEMO_POSE)
        config.model.img_encoder = pcdm_common.demo_clip()
        config.model.combiner = fpdm_common.demo_combiner()
    return config
