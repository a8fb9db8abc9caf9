"""The networks of FPDM (Fusion embedding for PGPIS with a Diffusion Model) that are not the pretrained encoders,
the VAE or the SD UNet body; parameter names mirror the original PyTorch modules (see
pgpis_jax/weights/fpdm_checkpoint.py for the checkpoint layouts).

Stage 1 (`FusionModel` of the original): the fine-tuned CLIP ViT-L/14 (pgpis_jax.models.encoders.clip_vision,
params `img_encoder`; the original's `pose_encoder` is the same module) embeds the source image and the target
pose image; `Combiner` (params `combiner`) fuses the two 768-d `image_embeds` into the unit-norm fusion
embedding, trained with pgpis_jax.models.fpdm_loss.

Stage 2 (`SDModel` of the original) conditions the SD 2.1 (768-v) UNet three ways:
  fusion embedding [B, 768] -> the UNet's own class embedding, class_embed_type "mlp"
      (pgpis_jax.nn.embeddings.MLPClassEmbedding, `unet/class_embedding`: Linear 768 -> 768, GELU, dropout,
      Linear 768 -> 1280, dropout; p = 0.2), added to the time embedding: build the UNet from the SD 2.1 config
      with `UNET_CLASS_EMBEDDING`;
  DINOv2-L tokens [B, 1297, 1024] -> `source_token_projector()` (params `srcimage_proj_model`) -> the UNet's
      encoder_hidden_states [B, 1297, 1024];
  target pose image [B, H, W, 3] in [0, 1] -> `pose_encoder()` (params `pose_t_proj`) -> [B, H/8, W/8, 320],
      the UNet's `conv_in_residual` (added right after conv_in; the sum is also the first skip).
The projector and the pose encoder have the layouts of PCDMs' (pgpis_jax.models.pcdm.ImageProjector and
PoseEncoder), so those classes serve both methods.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from pgpis_jax.models.pcdm import ImageProjector, PoseEncoder
from pgpis_jax.nn.initializers import torch_dense

FUSION_DIM = 768  # the fusion embedding: CLIP ViT-L/14 projection_dim (config combiner_hidden_dim)
SOURCE_TOKEN_DIM = 1024  # DINOv2-L hidden size (config patch_proj_in_dim)
CONTEXT_DIM = 1024  # SD 2.1's cross_attention_dim
PROJECTOR_HIDDEN = 768
CONDITION_DROPOUT = 0.2  # proj_drop_rate of the projector; the class MLP's hard-coded rate is the same
COMBINER_DROPOUT = 0.5
POSE_FEATURES = 320  # SD 2.1's block_out_channels[0]
POSE_ENCODER_CHANNELS = (16, 32, 96, 256)
# The keys the original sets on top of SD 2.1's UNet config (from_pretrained(..., class_embed_type="mlp",
# projection_class_embeddings_input_dim=768)); the other pretrained keys stay as they are.
UNET_CLASS_EMBEDDING = {"class_embed_type": "mlp", "projection_class_embeddings_input_dim": FUSION_DIM}


class Combiner(nn.Module):
    """Stage 1's image-pose fusion (the original's `Combiner`, after CLIP4Cir), all linears with bias:

      p   = dropout(relu(kpt_projection_layer(pose)))          feature_dim -> projection_dim
      s   = dropout(relu(image_projection_layer(image)))       feature_dim -> projection_dim
      r   = concat([p, s])                                      pose part first
      h   = dropout(relu(combiner_layer(r)))                    2 projection_dim -> hidden_dim
      lam = sigmoid(dynamic_scalar_3(dropout(relu(dynamic_scalar_0(r)))))   -> [B, 1]
      out = output_layer(h) + lam * pose + (1 - lam) * image    hidden_dim -> feature_dim
      fusion = out / max(||out||, 1e-12)                         (F.normalize, in float32)

    image_features, kpt_features [B, feature_dim] (CLIP image_embeds, not normalised) -> fusion [B, feature_dim]
    float32 of unit norm. The four dropouts (rate `dropout`) act unless deterministic; note the original keeps
    them active in stage-2 training too (Lightning puts the frozen fusion model in train mode).
    """

    feature_dim: int = FUSION_DIM
    projection_dim: int = 768
    hidden_dim: int = 768
    dropout: float = COMBINER_DROPOUT
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, image_features, kpt_features, deterministic: bool = True):
        for name, value in (("image_features", image_features), ("kpt_features", kpt_features)):
            if value.ndim != 2 or value.shape[-1] != self.feature_dim:
                raise ValueError(f"Combiner {name} must be [B, {self.feature_dim}], got shape {value.shape}")
        if image_features.shape != kpt_features.shape:
            raise ValueError(f"Combiner image_features {image_features.shape} and kpt_features "
                             f"{kpt_features.shape} differ in batch size")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        image = image_features.astype(self.dtype)
        pose = kpt_features.astype(self.dtype)

        def dense_relu_dropout(x, features, name):
            h = nn.relu(torch_dense(features, x.shape[-1], name, **kw)(x))
            return nn.Dropout(self.dropout)(h, deterministic=deterministic)

        raw = jnp.concatenate([dense_relu_dropout(pose, self.projection_dim, "kpt_projection_layer"),
                               dense_relu_dropout(image, self.projection_dim, "image_projection_layer")], axis=-1)
        combined = dense_relu_dropout(raw, self.hidden_dim, "combiner_layer")
        gate = dense_relu_dropout(raw, self.hidden_dim, "dynamic_scalar_0")
        gate = nn.sigmoid(torch_dense(1, self.hidden_dim, "dynamic_scalar_3", **kw)(gate))
        out = torch_dense(self.feature_dim, self.hidden_dim, "output_layer", **kw)(combined)
        out = (out + gate * pose + (1 - gate) * image).astype(jnp.float32)
        norm = jnp.sqrt(jnp.sum(jnp.square(out), axis=-1, keepdims=True))
        return out / jnp.maximum(norm, 1e-12)

    def init_params(self, rng):
        """Fresh parameters (torch's default Linear init), from dummy [1, feature_dim] inputs."""
        x = jnp.zeros((1, self.feature_dim), self.dtype)
        return self.init(rng, x, x)["params"]


def source_token_projector(dtype=jnp.float32, param_dtype=jnp.float32) -> ImageProjector:
    """Stage 2's `srcimage_proj_model` (the original's SrcImage_ProjModel): per DINOv2-L token, Linear 1024 ->
    768, exact GELU, dropout 0.2, LayerNorm (eps 1e-5), Linear 768 -> 1024, dropout 0.2. Initialise with
    `init_params(rng, SOURCE_TOKEN_DIM)`."""
    return ImageProjector(hidden=PROJECTOR_HIDDEN, features=CONTEXT_DIM, dropout=CONDITION_DROPOUT, dtype=dtype,
                          param_dtype=param_dtype)


def pose_encoder(dtype=jnp.float32, param_dtype=jnp.float32) -> PoseEncoder:
    """Stage 2's `pose_t_proj` (diffusers' ControlNetConditioningEmbedding(320, 3, (16, 32, 96, 256))): the
    target pose image [B, H, W, 3] in [0, 1] -> [B, ceil(H/8), ceil(W/8), 320]; conv_out starts at zero."""
    return PoseEncoder(features=POSE_FEATURES, block_out_channels=POSE_ENCODER_CHANNELS, dtype=dtype,
                       param_dtype=param_dtype)
