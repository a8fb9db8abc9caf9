"""What PCDMs stages 2 and 3 share: an SD UNet over autoencoder latents whose cross-attention context is the
source's DINOv2 tokens through a trainable projector (`image_proj_model_p`), frozen encoders and VAE, the
warm start and the diffusion objective. Subclasses add their own networks (`init_extra`), features, loss and
sampler."""

from __future__ import annotations

from typing import Any, Dict, Tuple

import jax

from pgpis_jax.methods.common import latents
from pgpis_jax.methods.common.encoders import EncoderUse, FrozenEncoders
from pgpis_jax.methods.common.networks import load_pretrained
from pgpis_jax.methods.common.objective import DiffusionObjective
from pgpis_jax.methods.common.stage import Stage
from pgpis_jax.models.pcdm import ImageProjector
from pgpis_jax.trainer.precision import Policy

SOURCE_TOKENS = EncoderUse("source_tokens", network="dinov2", input="source_dino", output="last_hidden_state")
TARGET_EMBEDDING = EncoderUse("target_embedding", network="image_encoder", input="target_clip",
                              output="image_embeds", dtype="float32")


class LatentStage(Stage):
    ENCODED: Tuple[EncoderUse, ...] = (SOURCE_TOKENS,)

    def __init__(self, config, saved_networks=None, needs_data=True):
        super().__init__(config, saved_networks, needs_data)
        policy = Policy.from_config(config)
        m = config.model
        self.module_kw = dict(dtype=policy.compute_dtype, param_dtype=policy.param_dtype)
        self.unet = self.builder.network(m.unet, "config.model.unet", "diffusers", remat=config.remat != "none",
                                         attention_implementation=m.attention_implementation, **self.module_kw)
        self.codec, self.vae = self.builder.codec(m.vae, "config.model.vae", policy.compute_dtype)
        self.encoders = FrozenEncoders(config, self.ENCODED, self.builder, policy)
        self.check_inputs()
        self.token_dim = self.encoders.module("dinov2").hidden_size
        self.image_proj = ImageProjector(hidden=m.image_proj.hidden, features=self.unet.module.cross_attention_dim,
                                         **self.module_kw)
        self.objective = DiffusionObjective(config)
        self.condition_dropout = float(config.diffusion.condition_dropout)

    def init_extra(self, rng) -> Dict[str, Any]:
        """Fresh parameters of the subclass's own networks, by parameter-tree name."""
        return {}

    def init(self, rng):
        keys = jax.random.split(rng, 5)
        params = {"unet": self.unet.module.init_params(keys[0]),
                  "image_proj_model_p": self.image_proj.init_params(keys[1], self.token_dim),
                  **self.encoders.init(keys[2]), **self.init_extra(keys[3])}
        vae = self.codec.init_params(keys[4])
        return {**params, "vae": vae} if vae else params

    def warm_start(self, params):
        params = dict(params, unet=load_pretrained(self.unet, params["unet"]), **self.encoders.warm_start(params))
        if self.vae is not None:
            params["vae"] = load_pretrained(self.vae, params["vae"])
        self.check_frozen(params)
        return params

    def moments(self, params, images, name: str):
        """{name_mean, name_logvar}: VAE posterior moments of images [B, H, W, 3] in [-1, 1] (features)."""
        return latents.moments(self.codec, params.get("vae"), images, name)

    def latents(self, params, images, keys):
        """Scaled posterior samples of images [B, H, W, 3] in [-1, 1], one key per example."""
        return latents.encode_latents(self.codec, params.get("vae"), images, keys)

    def source_tokens(self, params, source_dino):
        """Projected DINOv2 tokens [B, N, cross_attention_dim] of CLIP-normalised source pixels."""
        return self.project_tokens(params, self.encoders.encode(params, "source_tokens", source_dino))

    def project_tokens(self, params, tokens):
        """DINOv2 tokens [B, N, D] through the trainable projector -> [B, N, cross_attention_dim]."""
        return self.image_proj.apply({"params": params["image_proj_model_p"]}, tokens)
