"""PCDMs stage 1: the prior transformer, predicting the target's CLIP image embedding from the source's
embedding and both poses' keypoint coordinates (Shen et al., ICLR 2024, Sec. 3.2).

Parameters: `prior` (PriorTransformer; Kandinsky 2.2's blocks, time embedding, query and output norm as the
warm start) - trained; `image_encoder` (CLIP ViT-H/14) - frozen.

Training step, per example (pcdm_prior batches): x0 = (CLIP(target) - mean) / std with PCDMs' scalar
statistics; t ~ U{0..999}; noise N(0, 1) + 0.1 N(0, 1) (one scalar per example); with p = 0.1 each the
source CLIP input pixels, the source pose coordinates and the target pose coordinates are zeroed;
loss = mean (prior(x_t, t, CLIP(source), source pose, target pose) - x0)^2.

Sampling: the configured sampler over the x0 prediction, de-normalised, with classifier-free guidance when
config.sampling.guidance_scale > 1 (the paper's w = 2 on every stage, Eq. 4 and Appendix B): the unconditional
branch is built as training drops conditions - the CLIP embedding of an all-zero source input and zeroed pose
coordinates - and x0 = u + w (c - u). (The released test script runs scale 0; its guided path crashes and would
use a zero embedding instead, ../shared/reference/pcdms.md.)
"""

from __future__ import annotations

import functools
from typing import Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from pgpis_jax.methods.common import features
from pgpis_jax.methods.common.encoders import EncoderUse, FrozenEncoders
from pgpis_jax.methods.common.networks import load_pretrained
from pgpis_jax.methods.common.objective import DiffusionObjective
from pgpis_jax.methods.common.stage import Stage, dropped, per_example_keys
from pgpis_jax.methods.pcdm import formats, guided
from pgpis_jax.models.pcdm import PriorTransformer
from pgpis_jax.trainer.precision import Policy

TRAINABLE = ("prior",)


def _clip_embedding(feature: str, pixels: str) -> EncoderUse:
    return EncoderUse(feature, network="image_encoder", input=pixels, output="image_embeds", dtype="float32")


class PCDMPrior(Stage):
    ENCODED = (_clip_embedding("source_embedding", "source_clip"), _clip_embedding("target_embedding", "target_clip"))
    FROZEN = ("image_encoder",)
    INPUTS = ("source_clip", "target_clip", "source_pose_coords", "target_pose_coords")
    DROPPABLE = {"source_clip": ("source_embedding",), "source_pose_coords": ("source_pose_coords",),
                 "target_pose_coords": ("target_pose_coords",)}
    LAYOUTS = ("pcdm_prior",)

    def __init__(self, config, saved_networks=None, needs_data=True):
        super().__init__(config, saved_networks, needs_data)
        policy = Policy.from_config(config)
        m = config.model
        self.encoders = FrozenEncoders(config, self.ENCODED, self.builder, policy)
        self.pretrained = self.builder.directory_only(m.prior, "config.model.prior", "diffusers") \
            if m.prior.weights else None
        self.check_inputs()
        self.embedding_dim = self.encoders.module("image_encoder").projection_dim
        self.prior = PriorTransformer(
            embedding_dim=self.embedding_dim, num_layers=m.prior.num_layers,
            num_attention_heads=m.prior.num_attention_heads, attention_head_dim=m.prior.attention_head_dim,
            pose_hidden=m.prior.pose_hidden, attention_implementation=m.attention_implementation,
            remat=config.remat != "none", dtype=policy.compute_dtype, param_dtype=policy.param_dtype)
        self.embedding_mean = float(m.prior.embedding_mean)
        self.embedding_std = float(m.prior.embedding_std)
        self.objective = DiffusionObjective(config)
        self.condition_dropout = float(config.diffusion.condition_dropout)

    def init(self, rng):
        prior_key, encoder_key = jax.random.split(rng)
        return {"prior": self.prior.init_params(prior_key), **self.encoders.init(encoder_key)}

    def warm_start(self, params):
        params = dict(params, **self.encoders.warm_start(params))
        if self.pretrained is not None and self.pretrained.directory is not None:
            params["prior"] = load_pretrained(self.pretrained, params["prior"])
        self.check_frozen(params)
        return params

    def normalize(self, embedding):
        return (embedding - self.embedding_mean) / self.embedding_std

    def denormalize(self, x):
        return x * self.embedding_std + self.embedding_mean

    def predict(self, params, x_t, t, condition):
        """The prior's x0 prediction for x_t [B, E]; condition = (source embedding [B, E], source and target pose
        coordinates [B, 36])."""
        source_embedding, source_pose, target_pose = condition
        return self.prior.apply({"params": params["prior"]}, x_t, t, source_embedding, source_pose, target_pose)

    def extract(self, params, batch):
        """Both CLIP embeddings and both poses' coordinates."""
        return {**self.encoders.features(params, batch), "source_pose_coords": batch["source_pose_coords"],
                "target_pose_coords": batch["target_pose_coords"]}

    def loss_fn(self, params, batch, rng):
        k = per_example_keys(rng, batch, 4)
        inputs = self.training_inputs(params, batch, {
            key: dropped(key_rng, self.condition_dropout)
            for key, key_rng in zip(("source_clip", "source_pose_coords", "target_pose_coords"), k[:3])})
        x0 = self.normalize(inputs["target_embedding"])
        t, x_t, target = self.objective.training_pair(k[3], x0, varying_axes=(0,))
        prediction = self.predict(params, x_t, t, (inputs["source_embedding"], inputs["source_pose_coords"],
                                                   inputs["target_pose_coords"]))
        return self.objective.loss(prediction, target, t), {}

    def generate(self, params, source_clip, source_pose, target_pose, rng, num_inference_steps: int,
                 guidance_scale: float = 1.0):
        """Predicted target embeddings [B, E] (de-normalised) from CLIP-normalised source pixels
        [B, 224, 224, 3] and pose coordinates [B, 36]; guided when guidance_scale > 1 (module docstring)."""
        noise_key, step_key = jax.random.split(rng)
        source_embedding = self.encoders.encode(params, "source_embedding", source_clip)
        null_embedding = self.encoders.encode(params, "source_embedding", jnp.zeros_like(source_clip)) \
            if guidance_scale > 1.0 else None
        x_T = jax.random.normal(noise_key, source_embedding.shape, jnp.float32)
        return self.sample_embedding(params, source_embedding, null_embedding, source_pose, target_pose, x_T,
                                     step_key, num_inference_steps, guidance_scale)

    def sample_embedding(self, params, source_embedding, null_embedding, source_pose, target_pose, x_T, rng,
                         num_inference_steps: int, guidance_scale: float):
        """The denoising loop of `generate` from encoded conditions: de-normalised target embeddings [B, E] from
        x_T [B, E], the source's CLIP embedding [B, E], the embedding of an all-zero source input [B, E] (the
        unconditional branch with zeroed pose coordinates; None when unguided) and pose coordinates [B, 36]."""
        uncond = None if null_embedding is None else \
            (null_embedding, jnp.zeros_like(source_pose), jnp.zeros_like(target_pose))
        x0 = guided.sample(self.objective.sampler, functools.partial(self.predict, params),
                           (source_embedding, source_pose, target_pose), uncond, x_T, rng, num_inference_steps,
                           guidance_scale)
        return self.denormalize(x0)

    def preview_batch(self, num: int) -> Optional[Dict[str, np.ndarray]]:
        return None


def cosine_similarity(a, b):
    """[B] cosine similarity of embeddings a, b [B, E] (the original's stage-1 number: predicted vs true
    target embedding)."""
    return jnp.sum(a * b, -1) / (jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1))


FORMATS = formats.formats("prior")


def build(config, saved_networks=None, needs_data=True) -> PCDMPrior:
    return PCDMPrior(config, saved_networks, needs_data)


def extract_features(config, workdir: str, split: str = "train", batch_size=None, dtype: str = "float32"):
    """extract_features.py: the frozen networks' outputs over `split` into workdir (methods/common/features.py)."""
    return features.extract_split(build, config, workdir, split, batch_size, dtype)
