"""Pieces every config shares. Configs are data: they import nothing from pgpis_jax."""

import ml_collections


def parse_arg(arg, **defaults):
    """big_vision-style config arguments: "demo" or "res=512,demo" -> ConfigDict.

    Each comma-separated item is `key=value` or a bare `key` (True); keys must be among `defaults`, and
    values are converted to the type of their default.
    """
    parsed = ml_collections.ConfigDict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, has_value, value = item.partition("=")
        if key not in defaults:
            raise ValueError(f"unknown config argument {key!r}; known: {', '.join(sorted(defaults))}")
        default = defaults[key]
        if not has_value:
            parsed[key] = True
        elif isinstance(default, bool):
            parsed[key] = value.lower() in ("1", "true", "yes")
        else:
            parsed[key] = type(default)(value)
    return parsed


def base_config(method):
    """Fields the trainer and entry points read for every method."""
    config = ml_collections.ConfigDict()
    config.method = method
    config.seed = 42
    config.total_steps = 100_000
    config.log_every_steps = 100
    config.checkpoint_every_steps = 5_000
    return config


def scheduler_config(class_name, **fields):
    """A diffusers-style scheduler config (the content of a scheduler_config.json)."""
    return ml_collections.ConfigDict({"_class_name": class_name, **fields})


# Stable Diffusion 1.x / 2.x noise schedule as their scheduler configs give it.
SD_SCHEDULE = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
               "beta_end": 0.012}
