"""A released original checkpoint made into a run directory, so that sample.py, eval.py and export.py use it as any
trained run (and train.py can fine-tune from it).

The stage is built from the config as for training, without its dataset: the frozen networks come from their
pretrained weights, the networks the file holds replace the fresh ones, and the run is written as the trainer writes
one - config.json, the method's run files, frozen_params/ and checkpoint step 0 (the EMA equal to the parameters,
a fresh optimizer state, no data read yet) plus `imported.json` naming the source - under a temporary name, then
renamed to the new workdir. An existing workdir is never touched; a failed import leaves nothing behind.
"""

from __future__ import annotations

import datetime
import json
import os

import jax
import numpy as np

from pgpis_jax.errors import UserError
from pgpis_jax.methods.common.exporting import check_new_output, format_of, write_directory
from pgpis_jax.trainer import checkpoints as ckpt_lib
from pgpis_jax.trainer import loop
from pgpis_jax.trainer import mesh as mesh_lib
from pgpis_jax.trainer import metrics as metrics_lib

IMPORT_RECORD = "imported.json"


def _in_stage_dtypes(imported, abstract, source: str):
    """The top-level networks of `imported` in the dtypes of the stage's parameters `abstract`; a network the stage
    does not have is an error naming the file."""
    unknown = sorted(set(imported) - set(abstract))
    if unknown:
        raise UserError(f"{source}: holds networks {', '.join(unknown)} that this stage does not have")
    return {name: jax.tree.map(lambda value, spec: np.asarray(value, spec.dtype), tree, abstract[name])
            for name, tree in imported.items()}


def import_original(config, workdir: str, source: str, format_name: str = "original") -> str:
    """Writes a new run directory `workdir` for `config` from the checkpoint `source` in the method's format
    `format_name`; returns the workdir."""
    from pgpis_jax import methods

    workdir = check_new_output(workdir, "--workdir")
    fmt = format_of(config.method, format_name)
    if fmt.read is None:
        raise UserError(f"format {format_name!r} of method {config.method!r} cannot be imported")
    if not os.path.exists(source):
        raise UserError(f"--import_original={source} does not exist")
    metrics_lib.quiet_library_logs()
    method = methods.get_method(config.method).build(config, needs_data=False)
    s = loop.setup(method, config, mesh_lib.make_mesh(config))
    imported = _in_stage_dtypes(fmt.read(source, s.abstract_params, method), s.abstract_params, source)
    params = loop.initial_params(s, method, config, provided=imported)
    rng_data = jax.random.key_data(jax.random.split(jax.random.key(config.seed))[1])
    state = jax.jit(s.init_rest, out_shardings=s.state_shardings)(params, rng_data)

    def fill(directory):
        ckpt_lib.write_config(config, directory)
        ckpt_lib.write_run_files(method.run_files(), directory)
        record = {"source": os.path.abspath(source), "format": format_name, "networks": sorted(imported),
                  "imported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        with open(os.path.join(directory, IMPORT_RECORD), "w") as f:
            json.dump(record, f, indent=2)
        checkpoints = ckpt_lib.Checkpoints(directory, config, s)
        try:
            checkpoints.save(0, state, {"batches_consumed": 0})
        finally:
            checkpoints.close()

    write_directory(workdir, fill)
    return workdir
