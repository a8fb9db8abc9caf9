"""PCDMs stage 3: the refining UNet, image-to-image on the stage-2 result (Shen et al., ICLR 2024, Sec. 3.4).

Parameters: `unet` (SD 2.1-base with 2C input channels), `image_proj_model_p` - trained; `vae`, `dinov2` -
frozen.

Training step, per example (pcdm_refine batches; `coarse_dir` holds stage-2 results for the training pairs,
made as the original does with the true target embedding: sample.py --ablation=true --split=train; or the same
quantities read from offline features):
  x0 = latent of the target; coarse = latent of the stage-2 result; t, noise (+ 0.1 offset), x_t as stage 2
  with p = 0.1 the coarse image's pixels are zeroed (the original's `s_img_drop_rate`); DINOv2 is never dropped
  loss = mean (unet([x_t, coarse], t, image_proj(DINOv2(source))) - noise)^2

Sampling: guidance with zero context tokens and a zero coarse latent as the unconditional branch (the
original's), CFG only when scale > 1.
"""

from __future__ import annotations

import functools
from typing import Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from pgpis_jax.errors import UserError
from pgpis_jax.methods.common import features, latents
from pgpis_jax.methods.common.stage import dropped, per_example_keys
from pgpis_jax.methods.pcdm import formats, guided
from pgpis_jax.methods.pcdm.latent_stage import LatentStage
from pgpis_jax.models.pcdm import pack_refine_input

TRAINABLE = ("unet", "image_proj_model_p")


class PCDMRefine(LatentStage):
    FROZEN = ("dinov2", "vae")
    INPUTS = ("target_image", "coarse_image", "source_dino")
    DROPPABLE = {"coarse_image": ("coarse_mean", "coarse_logvar")}
    LAYOUTS = ("pcdm_refine",)

    def __init__(self, config, saved_networks=None, needs_data=True):
        super().__init__(config, saved_networks, needs_data)
        unet = self.unet.module
        if unet.in_channels != 2 * self.codec.channels or unet.class_embed_type is not None:
            raise UserError(f"config.model.unet does not fit stage 3: in_channels={unet.in_channels} (expected 2 x "
                            f"{self.codec.channels} latent channels), class_embed_type={unet.class_embed_type!r} "
                            f"(expected None)")

    def denoise(self, params, x_t, t, condition):
        """condition = (coarse latent [B, h, w, C], projected source tokens [B, N, E])."""
        coarse_latent, context = condition
        return self.unet.module.apply({"params": params["unet"]}, pack_refine_input(x_t, coarse_latent), t,
                                      context).astype(jnp.float32)

    def extract(self, params, batch):
        """Moments of the target and of the stage-2 result, and the source's DINOv2 tokens."""
        return {**self.moments(params, batch["target_image"], "target"),
                **self.moments(params, batch["coarse_image"], "coarse"), **self.encoders.features(params, batch)}

    def loss_fn(self, params, batch, rng):
        k = per_example_keys(rng, batch, 4)
        inputs = self.training_inputs(params, batch, {"coarse_image": dropped(k[0], self.condition_dropout)})
        x0 = latents.latents_of(self.codec, inputs, "target", k[1])
        coarse_latent = latents.latents_of(self.codec, inputs, "coarse", k[2])
        t, x_t, target = self.objective.training_pair(k[3], x0)
        prediction = self.denoise(params, x_t, t,
                                  (coarse_latent, self.project_tokens(params, inputs["source_tokens"])))
        return self.objective.loss(prediction, target, t), {}

    def generate(self, params, coarse_image, source_dino, rng, num_inference_steps: int, guidance_scale: float,
                 guidance_rescale: float = 0.0):
        """Refined images [B, S, S, 3] in [-1, 1] (clipped) from stage-2 results [B, S, S, 3] in [-1, 1] and
        CLIP-normalised source_dino [B, 224, 224, 3]. The unconditional branch has zero tokens and a zero coarse
        latent (the original's); CFG only when guidance_scale > 1."""
        vae_key, noise_key, step_key = jax.random.split(rng, 3)
        coarse_latent = self.latents(params, coarse_image, jax.random.split(vae_key, coarse_image.shape[0]))
        x_T = jax.random.normal(noise_key, coarse_latent.shape, jnp.float32)
        x0 = self.sample_latents(params, coarse_latent, self.source_tokens(params, source_dino), x_T, step_key,
                                 num_inference_steps, guidance_scale, guidance_rescale)
        return jnp.clip(self.codec.decode(params.get("vae"), x0), -1.0, 1.0)

    def sample_latents(self, params, coarse_latent, projected_tokens, x_T, rng, num_inference_steps: int,
                       guidance_scale: float, guidance_rescale: float = 0.0):
        """The denoising loop of `generate` from encoded conditions: latents [B, h, w, C] from x_T (that shape),
        the coarse image's latent (that shape) and projected DINOv2 tokens [B, N, E]."""
        cond = (coarse_latent, projected_tokens)
        return guided.sample(self.objective.sampler, functools.partial(self.denoise, params), cond,
                             jax.tree.map(jnp.zeros_like, cond), x_T, rng, num_inference_steps, guidance_scale,
                             guidance_rescale)

    def preview_batch(self, num: int) -> Optional[Dict[str, np.ndarray]]:
        return None


FORMATS = formats.formats("refine")


def build(config, saved_networks=None, needs_data=True) -> PCDMRefine:
    return PCDMRefine(config, saved_networks, needs_data)


def extract_features(config, workdir: str, split: str = "train", batch_size=None, dtype: str = "float32"):
    """extract_features.py: the frozen networks' outputs over `split` into workdir (methods/common/features.py)."""
    return features.extract_split(build, config, workdir, split, batch_size, dtype)
