"""PCDMs stage 1: the prior transformer predicting the target's CLIP image embedding.

Arguments: see configs/pcdm_common.py (`demo`, `market`, `res=512`, `released`).
Example: python train.py --config=configs/pcdm_prior.py:demo --workdir=runs/pcdm_prior_demo
"""

import ml_collections

from configs import common, pcdm_common

# Training schedule (released code): cosine betas, x0 ("sample") prediction.
COSINE_X0 = dict(beta_schedule="squaredcos_cap_v2", num_train_timesteps=1000, prediction_type="sample")

# Kandinsky 2.2's prior initialises the blocks, time embedding, query token and output norm. Fresh: the pose
# MLPs and their projections, the weight matrices of the 1280-d input / output layers (their biases still fit
# and are kept, as ignore_mismatched_sizes keeps every tensor whose shape fits), the 6-token positional
# embedding (zeros). Kandinsky's learned clip_mean / clip_std are dropped for PCDMs' two scalars.
KANDINSKY_KEEP_FRESH = ("pose_encoder/.*", "pose_encoder1/.*", "encoder_hidden_states_proj1/.*",
                        "encoder_hidden_states_proj/kernel", "embedding_proj/kernel", "proj_in/kernel",
                        "proj_to_clip_embeddings/.*", "positional_embedding")


def get_config(arg=None):
    config, arg = pcdm_common.pcdm_config("pcdm_prior", arg, total_steps=100_000, batch_size=256)
    config.diffusion = ml_collections.ConfigDict(dict(
        train_scheduler=common.scheduler_config("DDPMScheduler", **COSINE_X0),
        noise_offset=0.1,         # one scalar per example, shared over the embedding
        condition_dropout=0.1))   # source CLIP pixels, source pose, target pose: each zeroed with p = 0.1
    # The paper samples every stage with DDIM, 20 steps, and classifier-free guidance w = 2 (Eq. 4, Appendix B);
    # the released test uses Kandinsky's UnCLIPScheduler and scale 0, i.e. no guidance (`released`).
    config.sampling.scheduler = common.scheduler_config(
        "DDIMScheduler", clip_sample=False, set_alpha_to_one=True, **COSINE_X0)
    config.sampling.guidance_scale = 2.0
    config.model.prior = pcdm_common.network(*pcdm_common.KANDINSKY_PRIOR, keep_fresh=KANDINSKY_KEEP_FRESH,
                                             drop_pretrained=("clip_mean", "clip_std"))
    config.model.prior.update(dict(num_layers=20, num_attention_heads=32, attention_head_dim=64, pose_hidden=512,
                                   embedding_mean=-0.016, embedding_std=0.415))
    config.param_groups.trainable = ("prior/.*",)
    if arg.released:
        config.batch_size = 1024           # 8 GPUs x 128
        config.optimizer.learning_rate = 1e-5
        config.grad.clip_norm = 10.0
        config.sampling.guidance_scale = 0.0
        config.sampling.scheduler = common.scheduler_config(
            "UnCLIPScheduler", variance_type="fixed_small_log", clip_sample=True, clip_sample_range=10.0,
            **{k: v for k, v in COSINE_X0.items() if k != "beta_schedule"})
    if arg.demo:
        config.batch_size = 64
        config.total_steps = 200
        # The demo's prior predicts the target embedding better unguided: cosine 0.9905 at w = 1, 0.9840 at w = 2
        # (96 test pairs, one trained prior); stage 2's SSIM was the same with either (0.6187).
        config.sampling.guidance_scale = 1.0
        config.checkpoint_every_steps = 200
        config.model.prior.update(dict(weights="", subfolder="", keep_fresh=(), drop_pretrained=(),
                                       num_layers=2, num_attention_heads=2, attention_head_dim=16, pose_hidden=64,
                                       embedding_mean=0.0, embedding_std=1.0))
    return config
