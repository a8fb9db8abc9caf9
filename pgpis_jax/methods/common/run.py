"""A trained run directory opened read-only for inference (sample.py, eval.py): its saved config, the configs of its
networks and its checkpoints. Nothing here writes into the run.

    <workdir>/config.json       the resolved training config (the trainer writes it)
    <workdir>/networks.json     the configs the stage's networks were built from (Stage.run_files)
    <workdir>/checkpoints/      trainable parameters, EMA and optimizer state per step
    <workdir>/frozen_params/    the frozen pretrained networks, stored once per run

A stage is rebuilt from config.json and networks.json alone: neither the pretrained directories nor the
training data are needed. Only inference settings (trainer.checkpoints.INFERENCE_KEYS) may differ from the saved
config.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional, Sequence

import ml_collections

from pgpis_jax import run_config
from pgpis_jax.errors import UserError
from pgpis_jax.methods.common.stage import NETWORKS_FILE
from pgpis_jax.trainer.checkpoints import INFERENCE_KEYS, differing_keys, key_in

CONFIG_FILE = "config.json"


@dataclasses.dataclass
class Trained:
    """A stage rebuilt from a run: its config, method (a Stage), parameters for sampling, their checkpoint step and
    which they are ("ema" or "raw": the trained parameters, also where "ema" was asked for and the run kept none)."""

    workdir: str
    config: Any
    method: Any
    params: Any
    step: int
    which: str = "ema"


def _read_json(path: str, what: str):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path} not found: {what}") from None
    except (OSError, ValueError) as error:
        raise UserError(f"{path}: cannot read ({error})") from None


def saved_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a run saved; UserError if `workdir` is not a trained run."""
    path = os.path.join(workdir, CONFIG_FILE)
    return ml_collections.ConfigDict(_read_json(path, f"{workdir} is not a trained run directory"))


def recorded_networks(workdir: str) -> dict:
    """{config path: network config} a run recorded in networks.json; UserError if it has none."""
    return _read_json(os.path.join(workdir, NETWORKS_FILE),
                      "the run recorded no network configs (trained by an older version: train it again)")


def inference_config(workdir: str, config: Optional[ml_collections.ConfigDict] = None) -> ml_collections.ConfigDict:
    """The run's saved config (launched as one process: run_config.without_launch_settings), or `config` when it
    differs from the saved one in inference settings only (else a UserError naming the keys)."""
    saved = saved_config(workdir)
    if config is None:
        return run_config.without_launch_settings(saved)
    given = json.loads(config.to_json_best_effort())
    fixed = [k for k in differing_keys(saved.to_dict(), given) if not key_in(k, INFERENCE_KEYS)]
    if fixed:
        raise UserError(f"--config differs from the run's {os.path.join(workdir, CONFIG_FILE)} in "
                        f"{', '.join(fixed[:8])}{' and more' if len(fixed) > 8 else ''}; only inference settings "
                        f"({', '.join(INFERENCE_KEYS)}) may change: leave out --config to use the run's own")
    return config


def load_trained(workdir: str, methods: Sequence[str], config=None, which: str = "ema",
                 step: Optional[int] = None) -> Trained:
    """The stage trained in `workdir` (its method one of `methods`) with its parameters for sampling from checkpoint
    `step` (None: the newest): the EMA ("ema", when the run kept one) or the raw trainable parameters ("raw"), and
    the frozen ones."""
    from pgpis_jax import methods as registry
    from pgpis_jax.trainer import ema, inference

    config = inference_config(workdir, config)
    if config.method not in methods:
        raise UserError(f"{workdir} holds a {config.method!r} run; expected {' or '.join(map(repr, methods))}")
    method = registry.get_method(config.method).build(config, saved_networks=recorded_networks(workdir))
    params, step = inference.load_params(method, config, workdir, which=which, step=step)
    used = "ema" if which == "ema" and ema.enabled(config) else "raw"
    return Trained(workdir, config, method, params, step, used)
