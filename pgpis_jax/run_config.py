"""A config file for `--config` that loads a trained run's saved config: `--config=<this file>:<run directory>`.

sample.py and eval.py use it when --config is not given, so `--config.sampling.guidance_scale=2.0` style
overrides apply to the run's own config. It imports nothing from pgpis_jax, like the files in configs/.
"""

import json
import os

import ml_collections


def get_config(workdir):
    with open(os.path.join(workdir, "config.json")) as f:
        return ml_collections.ConfigDict(json.load(f))
