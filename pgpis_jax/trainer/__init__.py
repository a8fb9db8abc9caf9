"""The shared, method-agnostic trainer: mesh and sharding rules, optax, EMA, precision, orbax checkpoints,
metric writers, and the jitted donated train step. `train(method, config, workdir)` runs it; a method supplies
what pgpis_jax.methods.base.Method describes.

Modules (one idea each): tree (parameter paths), mesh, optimizer, ema, precision, step (state and update),
data (global batches, input position), checkpoints, metrics, loop.
"""

from pgpis_jax.trainer.loop import PREEMPTED_EXIT_CODE, Setup, init_state, initial_params, setup, train

__all__ = ["PREEMPTED_EXIT_CODE", "Setup", "init_state", "initial_params", "setup", "train"]
