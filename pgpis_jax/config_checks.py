"""The whole config checked before a command writes or compiles anything: sizes and counts that must be positive,
fractions in range, names from a known list, and a batch that splits over the processes, the devices of the batch
axes and the accumulation steps. Only keys the config has are checked, so every method's config goes through the
same table; what a method alone knows (its data layout, its networks) it checks when it is built.

    check(config)      UserError naming every bad key and what was expected, in one line
    problems(config)   the same as a list of strings

and `check_writable_directory` for the directories a command will write (a workdir, an --output_dir).
"""

from __future__ import annotations

import numbers
import os
from typing import Any, Callable, List

from pgpis_jax.errors import UserError

MISSING = object()

# Integers that count or size something.
POSITIVE_INTEGERS = ("batch_size", "total_steps", "log_every_steps", "checkpoint_every_steps", "checkpoint.keep",
                     "grad.accumulation_steps", "logging.num_samples", "sampling.num_inference_steps",
                     "data.num_examples", "data.image_size", "data.pipeline.image_size", "data.pipeline.clip_size")
POSITIVE_NUMBERS = ("optimizer.learning_rate", "optimizer.eps")
NON_NEGATIVE_NUMBERS = ("logging.sample_every_steps", "grad.clip_norm", "optimizer.weight_decay",
                        "lr_schedule.warmup_steps", "sampling.guidance_scale", "diffusion.noise_offset",
                        "debug.nan_at_step", "debug.step_delay_seconds", "grad.max_per_device_batch")
# Numbers in [0, 1].
FRACTIONS = ("sampling.guidance_rescale", "lr_schedule.warmup_start_factor", "optimizer.b1", "optimizer.b2")
SCHEDULER_KEYS = ("sampling.scheduler", "diffusion.train_scheduler")


def lookup(config, key: str) -> Any:
    """config[a][b] for key "a.b", or MISSING."""
    node = config
    for part in key.split("."):
        try:
            if part not in node:
                return MISSING
            node = node[part]
        except TypeError:
            return MISSING
    return node


def _values(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _range_problems(config) -> List[str]:
    found = []
    table = ((POSITIVE_INTEGERS, lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool) and v > 0,
              "a positive integer"),
             (POSITIVE_NUMBERS, lambda v: _is_number(v) and v > 0, "a number > 0"),
             (NON_NEGATIVE_NUMBERS, lambda v: _is_number(v) and v >= 0, "a number >= 0"),
             (FRACTIONS, lambda v: _is_number(v) and 0 <= v <= 1, "a number in [0, 1]"))
    for keys, valid, expected in table:
        for key in keys:
            value = lookup(config, key)
            if value is not MISSING and not all(valid(v) for v in _values(value)):
                each = " each" if isinstance(value, (list, tuple)) else ""
                found.append(f"config.{key}={value!r}: expected {expected}{each}")
    return found


def _named(key: str, value, known) -> List[str]:
    return [] if value in known else [f"config.{key}={value!r}: expected one of {', '.join(map(str, known))}"]


def _enum_problems(config) -> List[str]:
    from pgpis_jax.diffusion import forward
    from pgpis_jax.nn.attention import IMPLEMENTATIONS
    from pgpis_jax.trainer import optimizer

    found = []
    for key, known in (("optimizer.name", optimizer.OPTIMIZERS), ("optimizer.schedule", optimizer.SCHEDULES),
                       ("diffusion.timestep_sampler", tuple(forward.TIMESTEP_SAMPLERS)),
                       ("model.attention_implementation", IMPLEMENTATIONS)):
        value = lookup(config, key)
        if value is not MISSING:
            found += _named(key, value, known)
    return found


def _checked(check: Callable[[], Any]) -> List[str]:
    """The message of the UserError / ValueError `check()` raises, as a list of at most one problem."""
    try:
        check()
    except (UserError, ValueError, TypeError) as error:
        return [str(error)]
    return []


def _component_problems(config) -> List[str]:
    """The checks the trainer's and the evaluation's own modules make, run now."""
    from pgpis_jax import evaluation
    from pgpis_jax.diffusion import from_diffusers_config
    from pgpis_jax.metrics import protocols
    from pgpis_jax.trainer import ema, optimizer, precision

    found = []
    if lookup(config, "precision") is not MISSING:
        found += _checked(lambda: precision.Policy.from_config(config))
    if lookup(config, "remat") is not MISSING:
        found += _checked(lambda: precision.remat_policy(config.remat))
    if lookup(config, "ema.decay") is not MISSING:
        found += _checked(lambda: ema.enabled(config))
    if lookup(config, "optimizer.schedule") in optimizer.SCHEDULES and lookup(config, "lr_schedule") is not MISSING:
        found += _checked(lambda: optimizer.learning_rate_schedule(config))
    for key in SCHEDULER_KEYS:
        scheduler = lookup(config, key)
        if scheduler is not MISSING:
            found += [f"config.{key}: {p}" for p in _checked(lambda: from_diffusers_config(scheduler.to_dict()))]
    if lookup(config, "eval.metrics") is not MISSING:
        found += [f"config.eval.metrics: {p}" for p in _checked(lambda: evaluation.parse_metrics(config.eval.metrics))]
    if lookup(config, "eval.protocol") is not MISSING:
        found += [f"config.eval.protocol: {p}" for p in _checked(lambda: protocols.get_protocol(config.eval.protocol))]
    return found


def _batch_problems(config) -> List[str]:
    """batch_size over the processes, the batch-axis devices and the accumulation steps (the mesh is built from
    config.mesh over this machine's devices; `problems` has initialised jax.distributed where the config asks)."""
    if lookup(config, "mesh") is MISSING or lookup(config, "batch_size") is MISSING:
        return []
    batch = config.batch_size
    if not isinstance(batch, numbers.Integral) or batch < 1:
        return []   # reported by _range_problems
    import jax

    from pgpis_jax.trainer import mesh as mesh_lib
    from pgpis_jax.trainer import step

    processes = jax.process_count()
    if batch % processes:
        return [f"config.batch_size={batch}: expected a multiple of the {processes} processes"]
    try:
        mesh = mesh_lib.make_mesh(config)
    except UserError as error:
        return [str(error)]
    accumulation = lookup(config, "grad.accumulation_steps")
    if accumulation is MISSING or not isinstance(accumulation, numbers.Integral) or accumulation < 1:
        return []
    return _checked(lambda: step.check_batch_split(config, mesh))


def problems(config) -> List[str]:
    """Every problem of `config` found by the checks in the module docstring. Initialises jax.distributed first
    where the config asks, since some checks start the JAX backend (which must come after it)."""
    if lookup(config, "distributed") is not MISSING:
        from pgpis_jax.trainer import mesh as mesh_lib

        mesh_lib.maybe_initialize_distributed(config)
    return _range_problems(config) + _enum_problems(config) + _component_problems(config) + _batch_problems(config)


def check(config) -> None:
    """UserError listing every problem of `config` (one line, "; "-separated); nothing when there is none."""
    found = problems(config)
    if found:
        raise UserError("; ".join(dict.fromkeys(found)))


def check_writable_directory(path: str, flag: str) -> None:
    """UserError (naming `flag`, e.g. "--output_dir") unless the local `path` is a directory or can be created as
    one, and is writable; remote paths (gs://...) are not checked. Creates nothing."""
    if "://" in str(path):
        return
    full = os.path.abspath(path)
    if os.path.exists(full) and not os.path.isdir(full):
        raise UserError(f"{flag}={path} is a file, not a directory: give a directory (it is created if missing)")
    existing = full
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(f"{flag}={path} cannot be created: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{flag}={path}: {existing} is not writable (a read-only file system or no permission); "
                        f"give a writable {flag}")
