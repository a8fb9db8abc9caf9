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
RETRIES = 3   # reads of the newest checkpoint of a run that is training (and removing older steps) meanwhile


def load_params(method, config, workdir: str, which: str = "ema", step: Optional[int] = None) -> Tuple[Any, int]:
    """(the full parameter tree for sampling, its checkpoint step).

    which: "ema" - the EMA of the trainable parameters where the run keeps one, else the trained ones;
    "raw" - the trained parameters. step: a checkpoint step of the workdir (None: the newest; a run that is still
    training may go on saving meanwhile). Creates, cleans up, locks and writes nothing in `workdir`. UserError if it
    has no checkpoint or not `step`.
    """
    if which not in WHICH:
        raise UserError(f"which={which!r}: expected one of {', '.join(WHICH)}")
    metrics_lib.quiet_library_logs()
    mesh_lib.maybe_initialize_distributed(config)
    s = setup(method, config, mesh_lib.make_mesh(config))
    newest = step is None
    for attempt in range(RETRIES + 1):
        checkpoints = ckpt_lib.Checkpoints(workdir, config, s, read_only=True)
        try:
            steps = checkpoints.all_steps()
            if not steps:
                raise UserError(f"no checkpoint in {checkpoints.directory}; train first (python train.py "
                                f"--config=... --workdir={workdir})")
            if newest:
                step = steps[-1]
            elif step not in steps:
                raise UserError(f"no checkpoint of step {step} in {checkpoints.directory}; available steps: "
                                f"{', '.join(map(str, steps))}")
            item = "ema" if which == "ema" and "ema" in checkpoints.abstract_items else "params"
            return checkpoints.restore_for_sampling(step, item), step
        except UserError:
            # a run still training removes its oldest steps (config.checkpoint.keep): the newest may have gone
            # while it was read; then read the newest again
            if not newest or step is None or attempt == RETRIES or (checkpoints.directory / str(step)).exists():
                raise
            metrics_lib.console(f"checkpoint step {step} was removed by the training run while it was read; "
                                "reading the newest again")
        finally:
            checkpoints.close()
