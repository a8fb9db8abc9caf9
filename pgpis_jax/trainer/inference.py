"""Parameters of a trained run for sampling and evaluation: one checkpoint of a workdir (the newest by
default), read-only. Only what sampling uses is restored - the EMA (or the trained parameters) and the run's
frozen_params - never the optimizer state, with the same config, shape and checksum checks as resuming."""

from __future__ import annotations

from typing import Any, Optional, Tuple

from pgpis_jax.errors import UserError
from pgpis_jax.trainer import checkpoints as ckpt_lib
from pgpis_jax.trainer import mesh as mesh_lib
from pgpis_jax.trainer import metrics as metrics_lib
from pgpis_jax.trainer.loop import setup

WHICH = ("ema", "raw")


def load_params(method, config, workdir: str, which: str = "ema", step: Optional[int] = None) -> Tuple[Any, int]:
    """(the full parameter tree for sampling, its checkpoint step).

    which: "ema" - the EMA of the trainable parameters where the run keeps one, else the trained ones;
    "raw" - the trained parameters. step: a checkpoint step of the workdir (None: the newest). Creates,
    cleans up and writes nothing in `workdir`. UserError if it has no checkpoint or not `step`.
    """
    if which not in WHICH:
        raise UserError(f"which={which!r}: expected one of {', '.join(WHICH)}")
    metrics_lib.quiet_library_logs()
    mesh_lib.maybe_initialize_distributed(config)
    s = setup(method, config, mesh_lib.make_mesh(config))
    checkpoints = ckpt_lib.Checkpoints(workdir, config, s, read_only=True)
    try:
        steps = checkpoints.all_steps()
        if not steps:
            raise UserError(f"no checkpoint in {checkpoints.directory}; train first (python train.py --config=... "
                            f"--workdir={workdir})")
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise UserError(f"no checkpoint of step {step} in {checkpoints.directory}; available steps: "
                            f"{', '.join(map(str, steps))}")
        item = "ema" if which == "ema" and "ema" in checkpoints.abstract_items else "params"
        return checkpoints.restore_for_sampling(step, item), step
    finally:
        checkpoints.close()
