"""Build a sampler from a diffusers `scheduler_config.json`.

Supported classes: DDPMScheduler, DDIMScheduler, UniPCMultistepScheduler, UnCLIPScheduler. Every key of
the config is either read, checked to hold the only value we support (e.g. `thresholding: false`), or
known to have no effect; anything else is an error naming it. As with diffusers' `X.from_config(other)`,
passing `class_name` loads a config written for another class (PCDMs builds UniPC from SD-2.1's PNDM
config); the other class's own keys are then skipped and logged.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, Mapping, Optional, Tuple, Type, Union

from absl import logging

from pgpis_jax.diffusion.samplers.ancestral import DDPMSampler, UnCLIPSampler
from pgpis_jax.diffusion.samplers.base import Sampler
from pgpis_jax.diffusion.samplers.ddim import DDIMSampler
from pgpis_jax.diffusion.samplers.unipc import UniPCSampler
from pgpis_jax.diffusion.schedules import NoiseSchedule

CONFIG_NAME = "scheduler_config.json"
SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                 "rescale_betas_zero_snr")
_NO_THRESHOLDING = {"thresholding": False}
_THRESHOLDING_KEYS = ("dynamic_thresholding_ratio", "sample_max_value")


@dataclasses.dataclass(frozen=True)
class _ClassSpec:
    """How one diffusers scheduler class maps onto a sampler."""

    sampler: Type[Sampler]
    schedule_keys: Tuple[str, ...]
    fields: Tuple[str, ...]
    required: Mapping[str, Any]
    inert: Tuple[str, ...]
    schedule_defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def known_keys(self):
        return set(self.schedule_keys) | set(self.fields) | set(self.required) | set(self.inert)


_SPECS: Dict[str, _ClassSpec] = {
    "DDPMScheduler": _ClassSpec(
        DDPMSampler, SCHEDULE_KEYS,
        ("prediction_type", "variance_type", "clip_sample", "clip_sample_range", "timestep_spacing",
         "steps_offset"),
        _NO_THRESHOLDING, _THRESHOLDING_KEYS),
    "DDIMScheduler": _ClassSpec(
        DDIMSampler, SCHEDULE_KEYS,
        ("prediction_type", "clip_sample", "clip_sample_range", "set_alpha_to_one", "timestep_spacing",
         "steps_offset"),
        _NO_THRESHOLDING, _THRESHOLDING_KEYS),
    "UniPCMultistepScheduler": _ClassSpec(
        UniPCSampler, SCHEDULE_KEYS,
        ("prediction_type", "solver_order", "solver_type", "predict_x0", "lower_order_final",
         "disable_corrector", "timestep_spacing", "steps_offset", "final_sigmas_type"),
        {**_NO_THRESHOLDING, "solver_p": None, "use_karras_sigmas": False, "use_exponential_sigmas": False,
         "use_beta_sigmas": False, "use_flow_sigmas": False, "use_dynamic_shifting": False, "sigma_min": None,
         "sigma_max": None, "shift_terminal": None},
        _THRESHOLDING_KEYS + ("flow_shift", "time_shift_type")),
    "UnCLIPScheduler": _ClassSpec(
        UnCLIPSampler, ("num_train_timesteps", "beta_schedule"),
        ("prediction_type", "variance_type", "clip_sample", "clip_sample_range"),
        {"beta_schedule": "squaredcos_cap_v2"}, (), {"beta_schedule": "squaredcos_cap_v2"}),
}
SUPPORTED_CLASSES = tuple(_SPECS)


def read_scheduler_config(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """Reads a scheduler config from a JSON file, a folder holding `scheduler_config.json`, or a diffusers
    model folder holding `scheduler/scheduler_config.json`."""
    path = os.fspath(path)
    candidates = [path] if not os.path.isdir(path) else [
        os.path.join(path, CONFIG_NAME), os.path.join(path, "scheduler", CONFIG_NAME)]
    for candidate in candidates:
        if os.path.isfile(candidate):
            with open(candidate) as f:
                try:
                    config = json.load(f)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{candidate}: not valid JSON ({e})") from None
            if not isinstance(config, dict):
                raise ValueError(f"{candidate}: expected a JSON object, got {type(config).__name__}")
            return config
    raise FileNotFoundError(f"no scheduler config found: looked for {', '.join(candidates)}")


def from_diffusers_config(config: Union[Mapping[str, Any], str, os.PathLike], class_name: Optional[str] = None,
                          **sampler_options) -> Sampler:
    """The sampler equivalent to the diffusers scheduler described by `config`.

    config: a parsed scheduler config (a dict with `_class_name`), or a path as `read_scheduler_config`
      takes it.
    class_name: build this class from the config instead of its own `_class_name` (diffusers'
      `from_config`), e.g. "UniPCMultistepScheduler" from a PNDMScheduler config.
    sampler_options: arguments diffusers passes at sampling time rather than in the config, such as
      `eta` and `use_clipped_model_output` for DDIM.
    """
    if not isinstance(config, Mapping):
        config = read_scheduler_config(config)
    own_class = config.get("_class_name")
    target = class_name or own_class
    if target is None:
        raise ValueError("scheduler config has no '_class_name'; pass class_name=...")
    if target not in _SPECS:
        raise ValueError(f"scheduler class {target!r} is not supported; supported: {', '.join(SUPPORTED_CLASSES)}")
    spec = _SPECS[target]
    options = {k: v for k, v in config.items() if not k.startswith("_")}
    unknown = sorted(set(options) - spec.known_keys)
    if unknown and target == own_class:
        raise ValueError(f"{target} config keys not supported: {', '.join(unknown)}")
    if unknown:
        logging.info("building %s from a %s config: skipping keys %s", target, own_class, unknown)
    for key, value in spec.required.items():
        if key in options and options[key] != value:
            raise ValueError(f"{target} option {key}={options[key]!r} is not supported (only {value!r})")
    schedule_options = {**spec.schedule_defaults, **{k: options[k] for k in spec.schedule_keys if k in options}}
    if "beta_schedule" in schedule_options:
        schedule_options["beta_schedule_name"] = schedule_options.pop("beta_schedule")
    fields = {k: options[k] for k in spec.fields if k in options}
    if "disable_corrector" in fields:
        fields["disable_corrector"] = tuple(fields["disable_corrector"])
    return spec.sampler(schedule=NoiseSchedule.create(**schedule_options), **fields, **sampler_options)
