"""PCDMs stage 2: the inpainting UNet on the [source | target] canvas (Shen et al., ICLR 2024, Sec. 3.3).

Parameters: `unet` (SD 2.1-base, 2C+1 input channels, projection class embedding), `pose_proj` (PoseEncoder,
added after conv_in), `image_proj_model_p` (DINOv2 tokens -> cross-attention width) - trained; `vae`,
`image_encoder` (CLIP ViT-H/14), `dinov2` - frozen.

Training step, per example (pcdm_inpaint batches, see pgpis_jax/input_pipeline.py, or the same quantities read
from offline features, see pgpis_jax/methods/common/features.py):
  x0 = latent of the canvas [source | target]; masked = latent of [source | black] (posterior samples)
  t ~ U{0..999}; noise = N(0, 1) + 0.1 N(0, 1) per channel; x_t = add_noise(x0, noise, t)
  with p = 0.1 each: DINOv2 input pixels zeroed, CLIP input pixels of the target zeroed
  g = CLIP image_embeds(target) [E]; context = [image_proj(DINOv2(source)) ; g] [N+1, E]
  eps_hat = unet([x_t, marker, masked], t, context, class_labels=g, conv_in_residual=pose_proj(pose canvas))
  loss = mean (eps_hat - noise)^2 over the whole canvas (both halves, as the original)

Sampling: the same inputs with g = the stage-1 prediction (or the true embedding), classifier-free guidance
with all context tokens and the class label zeroed (the original's unconditional branch), then the decoded
right half.
"""

from __future__ import annotations

import functools
from typing import Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from pgpis_jax.errors import UserError
from pgpis_jax.methods.common import features, latents
from pgpis_jax.methods.common.stage import dropped, first_test_examples, per_example_keys
from pgpis_jax.methods.pcdm import formats, guided, pipeline
from pgpis_jax.methods.pcdm.latent_stage import SOURCE_TOKENS, TARGET_EMBEDDING, LatentStage
from pgpis_jax.models.pcdm import PoseEncoder, join_canvas, pack_inpaint_input, split_canvas

TRAINABLE = ("unet", "pose_proj", "image_proj_model_p")


class PCDMInpaint(LatentStage):
    ENCODED = (TARGET_EMBEDDING, SOURCE_TOKENS)
    FROZEN = ("image_encoder", "dinov2", "vae")
    INPUTS = ("image", "pose", "source_dino", "target_clip")
    DROPPABLE = {"source_dino": ("source_tokens",), "target_clip": ("target_embedding",)}
    LAYOUTS = ("pcdm_inpaint",)

    def __init__(self, config, saved_networks=None, needs_data=True):
        super().__init__(config, saved_networks, needs_data)
        unet = self.unet.module
        self.embedding_dim = self.encoders.module("image_encoder").projection_dim
        _check_unet(unet, self.codec.channels, self.embedding_dim)
        self.pose_proj = PoseEncoder(features=unet.block_out_channels[0],
                                     block_out_channels=tuple(config.model.pose_encoder.block_out_channels),
                                     **self.module_kw)

    def init_extra(self, rng):
        return {"pose_proj": self.pose_proj.init_params(rng)}

    def denoise(self, params, x_t, t, condition):
        """The UNet's prediction for noisy canvas latents x_t [B, h, 2w, C]; condition = (masked latent,
        context [B, N+1, E], global embedding [B, E], pose features)."""
        masked_latent, context, global_embedding, pose_features = condition
        return self.unet.module.apply({"params": params["unet"]}, pack_inpaint_input(x_t, masked_latent), t,
                                      context, class_labels=global_embedding,
                                      conv_in_residual=pose_features).astype(jnp.float32)

    def conditions(self, params, tokens, global_embedding, pose):
        """(context [B, N+1, E] = projected DINOv2 tokens [B, N, D] and the global token, pose features)."""
        context = with_global_token(self.project_tokens(params, tokens), global_embedding)
        return context, self.pose_proj.apply({"params": params["pose_proj"]}, pose)

    # ------------------------------------------------------------------------------------------ training

    def extract(self, params, batch):
        """Moments of the canvas and the masked canvas, the target's CLIP embedding, the source's DINOv2
        tokens and the pose canvas as uint8."""
        image = batch["image"]
        return {**self.moments(params, image, "canvas"), **self.moments(params, masked_canvas(image), "masked"),
                **self.encoders.features(params, batch), "pose": latents.signed_to_uint8(batch["pose"])}

    def loss_fn(self, params, batch, rng):
        k = per_example_keys(rng, batch, 5)
        inputs = self.training_inputs(params, batch, {"source_dino": dropped(k[2], self.condition_dropout),
                                                      "target_clip": dropped(k[3], self.condition_dropout)})
        x0 = latents.latents_of(self.codec, inputs, "canvas", k[0])
        masked_latent = latents.latents_of(self.codec, inputs, "masked", k[1])
        g = inputs["target_embedding"]
        context, pose_features = self.conditions(params, inputs["source_tokens"], g,
                                                 latents.uint8_to_signed(inputs["pose"]))
        t, x_t, target = self.objective.training_pair(k[4], x0)
        prediction = self.denoise(params, x_t, t, (masked_latent, context, g, pose_features))
        return self.objective.loss(prediction, target, t), {}

    # ------------------------------------------------------------------------------------------ sampling

    def generate(self, params, source_image, pose, source_dino, global_embedding, rng,
                 num_inference_steps: int, guidance_scale: float, guidance_rescale: float = 0.0):
        """Generated targets [B, S, S, 3] in [-1, 1] (clipped) for source images [B, S, S, 3] in [-1, 1], pose
        canvases [B, S, 2S, 3], CLIP-normalised source_dino [B, 224, 224, 3] and global embeddings [B, E].

        Guidance as the original pipeline: the unconditional branch has every context token and the class
        label zeroed (pose, marker and masked latent unchanged); CFG only when guidance_scale > 1."""
        vae_key, noise_key, step_key = jax.random.split(rng, 3)
        batch = source_image.shape[0]
        canvas = join_canvas(source_image, source_image)
        masked_latent = self.latents(params, masked_canvas(canvas), jax.random.split(vae_key, batch))
        projected = self.source_tokens(params, source_dino)
        pose_features = self.pose_proj.apply({"params": params["pose_proj"]}, pose)
        x_T = jax.random.normal(noise_key, masked_latent.shape, jnp.float32)
        x0 = self.sample_latents(params, masked_latent, projected, global_embedding, pose_features, x_T, step_key,
                                 num_inference_steps, guidance_scale, guidance_rescale)
        _, target = split_canvas(self.codec.decode(params.get("vae"), x0))
        return jnp.clip(target, -1.0, 1.0)

    def sample_latents(self, params, masked_latent, projected_tokens, global_embedding, pose_features, x_T, rng,
                       num_inference_steps: int, guidance_scale: float, guidance_rescale: float = 0.0):
        """The denoising loop of `generate` from encoded conditions: canvas latents [B, h, 2w, C] from x_T (that
        shape), the masked canvas's latent (that shape), projected DINOv2 tokens [B, N, E], global embeddings
        [B, E] and pose features [B, h, 2w, F]."""
        context = with_global_token(projected_tokens, global_embedding)
        cond = (masked_latent, context, global_embedding.astype(jnp.float32), pose_features)
        uncond = (masked_latent, jnp.zeros_like(context), jnp.zeros_like(cond[2]), pose_features)
        return guided.sample(self.objective.sampler, functools.partial(self.denoise, params), cond, uncond, x_T, rng,
                             num_inference_steps, guidance_scale, guidance_rescale)

    def preview_batch(self, num: int) -> Optional[Dict[str, np.ndarray]]:
        batch = first_test_examples(self.config, num)
        return {k: batch[k] for k in ("image", "pose", "source_dino", "target_clip")}

    def sample_fn(self, params, batch, rng):
        """Rows source | target pose | generated (true target embedding) | ground truth, in [0, 1]."""
        source, target = split_canvas(batch["image"])
        _, target_pose = split_canvas(batch["pose"])
        g = self.encoders.encode(params, "target_embedding", batch["target_clip"])
        s = self.config.sampling
        generated = self.generate(params, source, batch["pose"], batch["source_dino"], g, rng,
                                  s.num_inference_steps, s.guidance_scale)
        row = jnp.concatenate([source, target_pose, generated, target], axis=2)
        return jnp.clip((row + 1.0) / 2.0, 0.0, 1.0)


def with_global_token(projected_tokens, global_embedding):
    """The cross-attention context [B, N+1, E]: projected tokens [B, N, E], then the global embedding [B, E]."""
    return jnp.concatenate([projected_tokens, global_embedding[:, None].astype(projected_tokens.dtype)], axis=1)


def masked_canvas(canvas):
    """[source | black]: the canvas [B, H, 2W, 3] in [-1, 1] with its right half set to -1."""
    source, target = split_canvas(canvas)
    return join_canvas(source, -jnp.ones_like(target))


def _check_unet(unet, latent_channels: int, embedding_dim: int) -> None:
    expected = 2 * latent_channels + 1
    problems = []
    if unet.in_channels != expected:
        problems.append(f"in_channels={unet.in_channels} (expected 2 x {latent_channels} latent channels + 1 "
                        f"marker = {expected})")
    if unet.class_embed_type != "projection" or unet.projection_class_embeddings_input_dim != embedding_dim:
        problems.append(f"class_embed_type={unet.class_embed_type!r}, projection_class_embeddings_input_dim="
                        f"{unet.projection_class_embeddings_input_dim} (expected 'projection', {embedding_dim}: "
                        f"the image encoder's projection_dim)")
    if unet.cross_attention_dim != embedding_dim:
        problems.append(f"cross_attention_dim={unet.cross_attention_dim} (expected {embedding_dim}: the global "
                        f"embedding is a context token)")
    if problems:
        raise UserError("config.model.unet does not fit stage 2: " + "; ".join(problems))


FORMATS = formats.formats("inpaint")


def build(config, saved_networks=None, needs_data=True) -> PCDMInpaint:
    return PCDMInpaint(config, saved_networks, needs_data)


def extract_features(config, workdir: str, split: str = "train", batch_size=None, dtype: str = "float32"):
    """extract_features.py: the frozen networks' outputs over `split` into workdir (methods/common/features.py)."""
    return features.extract_split(build, config, workdir, split, batch_size, dtype)


def generate_test_set(workdir: str, output_dir: str, config=None):
    """(generated folder, reference folder) of this run's test set, written into output_dir (the Colab notebook)."""
    return pipeline.generate_test_set(workdir, output_dir, config)[:2]


# sample.py and eval.py: PCDMs samples and evaluates through its stage-2 run (pipeline.py).
sample = pipeline.sample_command
eval = pipeline.evaluate_command  # noqa: A001 - the entry points call method.eval
