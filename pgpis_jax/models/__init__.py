"""Networks built from pgpis_jax.nn: the Stable Diffusion UNet (unet.py), the VAE (vae.py), encoders and each
method's own networks."""

from pgpis_jax.models.unet import UNet2DConditionModel, widen_conv_in

__all__ = ["UNet2DConditionModel", "widen_conv_in"]
