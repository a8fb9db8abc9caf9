"""What PCDMs stages 2 and 3 share: an SD UNet over autoencoder latents whose cross-attention context is the
source's DINOv2 tokens through a trainable projector (`image_proj_model_p`), frozen encoders and VAE, the
warm start and the data. Subclasses add their own networks (`init_extra`), features, loss and sampler."""

from __future__ import annotations

from typing import Any, Dict, Tuple

import jax

from pgpis_jax.methods.pcdm import common, networks
from pgpis_jax.models.pcdm import ImageProjector
from pgpis_jax.trainer.precision import Policy


class LatentStage(common.Stage):
    ENCODERS: Tuple[str, ...] = ("dinov2",)

    def __init__(self, config):
        super().__init__(config)
        policy = Policy.from_config(config)
        m = config.model
        missing = networks.MissingInputs()
        self.module_kw = dict(dtype=policy.compute_dtype, param_dtype=policy.param_dtype)
        self.unet = networks.resolve_network(m.unet, "config.model.unet", missing, "diffusers",
                                             remat=config.remat != "none",
                                             attention_implementation=m.attention_implementation, **self.module_kw)
        self.codec, self.vae = networks.codec(m.vae, "config.model.vae", missing, policy.compute_dtype)
        self.encoders = common.Encoders(config, self.ENCODERS, missing, policy)
        if self.features is None:
            common.check_dataset(config, missing)
        missing.raise_if_any(config.method)
        self.token_dim = self.encoders.module("dinov2").hidden_size
        self.image_proj = ImageProjector(hidden=m.image_proj.hidden, features=self.unet.module.cross_attention_dim,
                                         **self.module_kw)
        self.diffusion = common.Diffusion(config)
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
        params = dict(params, unet=networks.load_pretrained(self.unet, params["unet"]),
                      **self.encoders.warm_start(params))
        if self.vae is not None:
            params["vae"] = networks.load_pretrained(self.vae, params["vae"])
        self.check_frozen(params)
        return params

    def moments(self, params, images, name: str):
        """{name_mean, name_logvar}: VAE posterior moments of images [B, H, W, 3] in [-1, 1] (features)."""
        return common.moments(self.codec, params.get("vae"), images, name)

    def latents(self, params, images, keys):
        """Scaled posterior samples of images [B, H, W, 3] in [-1, 1], one key per example."""
        return common.encode_latents(self.codec, params.get("vae"), images, keys)

    def source_tokens(self, params, source_dino):
        """Projected DINOv2 tokens [B, N, cross_attention_dim] of CLIP-normalised source pixels."""
        return self.project_tokens(params, self.encoders.tokens(params, source_dino))

    def project_tokens(self, params, tokens):
        """DINOv2 tokens [B, N, D] through the trainable projector -> [B, N, cross_attention_dim]."""
        return self.image_proj.apply({"params": params["image_proj_model_p"]}, tokens)
