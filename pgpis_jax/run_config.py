"""A config file for `--config` that loads a trained run's saved config: `--config=<this file>:<run directory>`.

sample.py and eval.py use it when --config is not given, so `--config.sampling.guidance_scale=2.0` style
overrides apply to the run's own config. How the run's training was launched (`distributed.*`: the coordinator,
process count and id of a multi-host run) is not carried over: a command that reads the run is launched by its own
`--config.distributed.*` flags. It imports nothing from pgpis_jax, like the files in configs/.
"""

import json
import os

import ml_collections

# configs/common.py's `distributed` defaults: a single process that initialises nothing.
SINGLE_PROCESS = dict(initialize=False, coordinator_address="", num_processes=0, process_id=-1)


def without_launch_settings(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config` (a run's saved config) with the single-process `distributed` settings in place of the run's."""
    config = ml_collections.ConfigDict(config.to_dict())
    if "distributed" in config:
        config.distributed = ml_collections.ConfigDict(SINGLE_PROCESS)
    return config


def get_config(workdir):
    with open(os.path.join(workdir, "config.json")) as f:
        return without_launch_settings(ml_collections.ConfigDict(json.load(f)))
