"""PCDMs stage 1: the prior transformer, predicting the target's CLIP image embedding from the source's
embedding and both poses' keypoint coordinates (Shen et al., ICLR 2024, Sec. 3.2).

Parameters: `prior` (PriorTransformer; Kandinsky 2.2's blocks, time embedding, query and output norm as the
warm start) - trained; `image_encoder` (CLIP ViT-H/14) - frozen.

Training step, per example (pcdm_prior batches): x0 = (CLIP(target) - mean) / std with PCDMs' scalar
statistics; t ~ U{0..999}; noise N(0, 1) + 0.1 N(0, 1) (one scalar per example); with p = 0.1 each the
source CLIP input pixels, the source pose coordinates and the target pose coordinates are zeroed;
loss = mean (prior(x_t, t, CLIP(source), source pose, target pose) - x0)^2.

Sampling: the configured sampler over the x0 prediction, no guidance (the released test uses scale 0; its
guided path does not run), de-normalised.
"""

from __future__ import annotations

from typing import Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from pgpis_jax.methods.pcdm import common, features, networks
from pgpis_jax.models.pcdm import PriorTransformer
from pgpis_jax.trainer.precision import Policy

TRAINABLE = ("prior",)


class PCDMPrior(common.Stage):
    FROZEN = ("image_encoder",)
    INPUTS = ("source_clip", "target_clip", "source_pose_coords", "target_pose_coords")
    DROPPABLE = {"source_clip": ("source_embedding",), "source_pose_coords": ("source_pose_coords",),
                 "target_pose_coords": ("target_pose_coords",)}

    def __init__(self, config):
        super().__init__(config)
        policy = Policy.from_config(config)
        m = config.model
        missing = networks.MissingInputs()
        self.encoders = common.Encoders(config, ("image_encoder",), missing, policy)
        self.pretrained = None
        if m.prior.weights:
            self.pretrained = networks.Resolved("config.model.prior", None,
                                                networks.resolve_directory(m.prior, "config.model.prior", missing),
                                                m.prior, "diffusers")
        if self.features is None:
            common.check_dataset(config, missing)
        missing.raise_if_any(config.method)
        self.embedding_dim = self.encoders.module("image_encoder").projection_dim
        self.prior = PriorTransformer(
            embedding_dim=self.embedding_dim, num_layers=m.prior.num_layers,
            num_attention_heads=m.prior.num_attention_heads, attention_head_dim=m.prior.attention_head_dim,
            pose_hidden=m.prior.pose_hidden, attention_implementation=m.attention_implementation,
            remat=config.remat != "none", dtype=policy.compute_dtype, param_dtype=policy.param_dtype)
        self.embedding_mean = float(m.prior.embedding_mean)
        self.embedding_std = float(m.prior.embedding_std)
        self.diffusion = common.Diffusion(config)
        self.condition_dropout = float(config.diffusion.condition_dropout)

    def init(self, rng):
        prior_key, encoder_key = jax.random.split(rng)
        return {"prior": self.prior.init_params(prior_key), **self.encoders.init(encoder_key)}

    def warm_start(self, params):
        params = dict(params, **self.encoders.warm_start(params))
        if self.pretrained is not None:
            params["prior"] = networks.load_pretrained(self.pretrained, params["prior"])
        self.check_frozen(params)
        return params

    def normalize(self, embedding):
        return (embedding - self.embedding_mean) / self.embedding_std

    def denormalize(self, x):
        return x * self.embedding_std + self.embedding_mean

    def predict(self, params, x_t, t, source_embedding, source_pose, target_pose):
        return self.prior.apply({"params": params["prior"]}, x_t, t, source_embedding, source_pose, target_pose)

    def extract(self, params, batch):
        """Both CLIP embeddings and both poses' coordinates."""
        return {"source_embedding": self.encoders.embed(params, batch["source_clip"]),
                "target_embedding": self.encoders.embed(params, batch["target_clip"]),
                "source_pose_coords": batch["source_pose_coords"], "target_pose_coords": batch["target_pose_coords"]}

    def loss_fn(self, params, batch, rng):
        k = common.per_example_keys(rng, batch, 4)
        inputs = self.training_inputs(params, batch, {
            key: common.dropped(key_rng, self.condition_dropout)
            for key, key_rng in zip(("source_clip", "source_pose_coords", "target_pose_coords"), k[:3])})
        x0 = self.normalize(inputs["target_embedding"])
        t, x_t, target = self.diffusion.training_pair(k[3], x0, varying_axes=(0,))
        prediction = self.predict(params, x_t, t, inputs["source_embedding"], inputs["source_pose_coords"],
                                  inputs["target_pose_coords"])
        return common.mean_squared_error(prediction, target), {}

    def generate(self, params, source_embedding, source_pose, target_pose, rng, num_inference_steps: int):
        """Predicted target embeddings [B, E] (de-normalised) from source embeddings [B, E] and pose
        coordinates [B, 36]."""
        noise_key, step_key = jax.random.split(rng)
        x_T = jax.random.normal(noise_key, source_embedding.shape, jnp.float32)

        def model_fn(x, t):
            return self.predict(params, x, t, source_embedding, source_pose, target_pose)

        x0 = self.diffusion.sampler.sample(model_fn, x_T, step_key, num_inference_steps=num_inference_steps)
        return self.denormalize(x0)

    def preview_batch(self, num: int) -> Optional[Dict[str, np.ndarray]]:
        return None


def cosine_similarity(a, b):
    """[B] cosine similarity of embeddings a, b [B, E] (the original's stage-1 number: predicted vs true
    target embedding)."""
    return jnp.sum(a * b, -1) / (jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1))


def build(config) -> PCDMPrior:
    return PCDMPrior(config)


def extract_features(config, workdir: str, split: str = "train", batch_size=None, dtype: str = "float32"):
    """extract_features.py: the frozen networks' outputs over `split` into workdir (methods/pcdm/features.py)."""
    return features.extract_split(build, config, workdir, split, batch_size, dtype)
