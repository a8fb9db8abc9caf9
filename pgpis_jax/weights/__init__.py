"""PyTorch <-> Flax weights: mechanical renaming and transposition of state dicts, strict checks against
the module's `jax.eval_shape` tree, loaders and exporters for diffusers / transformers directories."""
