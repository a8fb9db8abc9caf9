"""Parameters of a trained run for sampling and evaluation: the newest checkpoint of a workdir, restored
with the same checks as resuming, with the EMA in place of the trainable parameters when there is one."""

from __future__ import annotations

from typing import Any, Tuple

from pgpis_jax.errors import UserError
from pgpis_jax.trainer import checkpoints as ckpt_lib
from pgpis_jax.trainer import ema as ema_lib
from pgpis_jax.trainer import mesh as mesh_lib
from pgpis_jax.trainer.loop import setup


def load_params(method, config, workdir: str) -> Tuple[Any, int]:
    """(parameters for sampling, checkpoint step); UserError if the workdir has no checkpoint."""
    mesh_lib.maybe_initialize_distributed(config)
    s = setup(method, config, mesh_lib.make_mesh(config))
    checkpoints = ckpt_lib.Checkpoints(workdir, config)
    try:
        restored = checkpoints.restore(s.abstract_state)
    finally:
        checkpoints.close()
    if restored is None:
        raise UserError(f"no checkpoint in {checkpoints.directory}; train first (python train.py --config=... "
                        f"--workdir={workdir})")
    state, _, step = restored
    return ema_lib.eval_params(state["params"], state["ema"]), step
