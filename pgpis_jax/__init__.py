"""pgpis-jax: diffusion methods for pose-guided person image synthesis in JAX/Flax."""

__version__ = "0.1.0"
