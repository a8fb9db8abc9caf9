"""Frozen (or fine-tuned) image encoders in linen, NHWC, with the parameter names of their transformers
PyTorch counterparts: the CLIP vision transformer (clip_vision.py), DINOv2 (dinov2.py) and Swin (swin.py).

Each module class provides `from_config(config_dict, **options)`, `init_params(rng)` and
`__call__(pixel_values [B, H, W, 3], deterministic=True)` returning a dict with transformers' output names;
their PyTorch checkpoints convert in pgpis_jax.weights.encoder_checkpoints. Import the modules directly, e.g.
`from pgpis_jax.models.encoders.clip_vision import CLIPVisionModel`.
"""
