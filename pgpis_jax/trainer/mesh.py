"""The device mesh and where every array of the training state lives.

One `jax.sharding.Mesh` with the named axes ("data", "fsdp") from `config.mesh`; parameter shardings
from the regex rules in `config.mesh.rules`; batches split over `config.mesh.batch_axes`. Everything is
`NamedSharding`, consumed by `jax.jit(..., in_shardings, out_shardings)`; no pmap.
"""

from __future__ import annotations

import ast
import math
from typing import Any, Dict, Mapping, Optional, Sequence

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from pgpis_jax.errors import UserError
from pgpis_jax.trainer import tree

AXES = ("data", "fsdp")


def maybe_initialize_distributed(config) -> None:
    """`jax.distributed.initialize()` when config.distributed.initialize is set (before any other JAX call).

    On TPU VMs and SLURM / Open MPI clusters JAX detects the coordinator, process count and id; the config
    fields (or JAX_COORDINATOR_ADDRESS etc.) give them explicitly elsewhere.
    """
    settings = config.distributed
    if not settings.initialize:
        return
    kwargs = {}
    if settings.coordinator_address:
        kwargs["coordinator_address"] = settings.coordinator_address
    if settings.num_processes > 0:
        kwargs["num_processes"] = settings.num_processes
    if settings.process_id >= 0:
        kwargs["process_id"] = settings.process_id
    if jax.distributed.is_initialized():
        return
    jax.distributed.initialize(**kwargs)
    logging.info("jax.distributed initialized: process %d of %d, %d local / %d global devices",
                 jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())


def mesh_shape(config, num_devices: int) -> Dict[str, int]:
    """{"data": d, "fsdp": f} with -1 filled so that d * f == num_devices; UserError if impossible."""
    sizes = {axis: int(config.mesh[axis]) for axis in AXES}
    unknown = [a for a, n in sizes.items() if n == -1]
    if len(unknown) > 1:
        raise UserError(f"config.mesh: at most one axis may be -1, got {sizes}")
    if any(n == 0 or n < -1 for n in sizes.values()):
        raise UserError(f"config.mesh: axis sizes must be positive or -1, got {sizes}")
    known = math.prod(n for n in sizes.values() if n != -1)
    if unknown:
        if num_devices % known:
            raise UserError(f"config.mesh {sizes}: {num_devices} devices are not divisible by {known}")
        sizes[unknown[0]] = num_devices // known
    if math.prod(sizes.values()) != num_devices:
        raise UserError(f"config.mesh {sizes} needs {math.prod(sizes.values())} devices; "
                        f"there are {num_devices} (use -1 for one axis to fill)")
    return sizes


def make_mesh(config, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """The ("data", "fsdp") mesh over `devices` (default: all devices of all processes)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_shape(config, len(devices))
    shape = tuple(sizes[a] for a in AXES)
    axis_types = (jax.sharding.AxisType.Auto,) * len(AXES)
    try:
        return jax.make_mesh(shape, AXES, axis_types=axis_types, devices=devices)
    except Exception:  # topology-aware assignment can refuse some shapes; fall back to the given order
        return Mesh(np.asarray(devices).reshape(shape), AXES, axis_types=axis_types)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_spec(config, ndim: int) -> P:
    axes = tuple(config.mesh.batch_axes)
    return P(axes if len(axes) > 1 else axes[0], *([None] * (ndim - 1)))


def batch_sharding(mesh: Mesh, config, ndim: int) -> NamedSharding:
    """Leading (batch) dimension split over config.mesh.batch_axes, the rest replicated."""
    return NamedSharding(mesh, batch_spec(config, ndim))


def batch_devices(mesh: Mesh, config) -> int:
    """How many ways a batch is split."""
    return math.prod(mesh.shape[a] for a in config.mesh.batch_axes)


# ---------------------------------------------------------------------------------------------------------
# Parameter sharding rules

def _parse_rule(spec: str, pattern: str):
    if spec in ("replicated", "fsdp"):
        return spec
    try:
        value = ast.literal_eval(spec)
    except (ValueError, SyntaxError):
        value = None
    if not isinstance(value, tuple):
        raise UserError(f"config.mesh.rules: spec {spec!r} for {pattern!r} must be 'replicated', 'fsdp' or a "
                        "PartitionSpec tuple such as \"(None, 'fsdp')\"")
    for entry in value:
        names = entry if isinstance(entry, tuple) else (entry,)
        for name in names:
            if name is not None and name not in AXES:
                raise UserError(f"config.mesh.rules: spec {spec!r} for {pattern!r} names axis {name!r}; "
                                f"axes are {AXES}")
    return value


def _fsdp_spec(shape, mesh: Mesh, min_size: int) -> P:
    """big_vision-style FSDP: the largest dimension divisible by the fsdp axis size (else replicated)."""
    n = mesh.shape["fsdp"]
    if n == 1 or math.prod(shape) < min_size:
        return P()
    for dim in sorted(range(len(shape)), key=lambda d: (-shape[d], d)):
        if shape[dim] % n == 0:
            return P(*[("fsdp" if d == dim else None) for d in range(len(shape))])
    return P()


def param_specs(abstract_params: Mapping, mesh: Mesh, config) -> Dict:
    """A PartitionSpec for every parameter, from the first rule of config.mesh.rules matching its path."""
    rules = [(pattern, _parse_rule(spec, pattern)) for pattern, spec in config.mesh.rules]
    compiled = tree.compile_patterns([p for p, _ in rules], "config.mesh.rules")
    specs = {}
    for path, leaf in tree.flatten(abstract_params).items():
        name = tree.path_str(path)
        rule = next((r for c, (_, r) in zip(compiled, rules) if c.fullmatch(name)), None)
        if rule is None:
            raise UserError(f"no rule in config.mesh.rules matches parameter {name!r}; add a catch-all "
                            "('.*', 'replicated') or ('.*', 'fsdp') at the end")
        if rule == "replicated":
            spec = P()
        elif rule == "fsdp":
            spec = _fsdp_spec(leaf.shape, mesh, config.mesh.fsdp_min_size)
        else:
            if len(rule) != len(leaf.shape):
                raise UserError(f"config.mesh.rules: spec {rule} has {len(rule)} entries but parameter {name!r} "
                                f"has shape {tuple(leaf.shape)}")
            for dim, entry in zip(leaf.shape, rule):
                names = entry if isinstance(entry, tuple) else (entry,)
                ways = math.prod(mesh.shape[a] for a in names if a is not None)
                if dim % ways:
                    raise UserError(f"config.mesh.rules: parameter {name!r} of shape {tuple(leaf.shape)} cannot be "
                                    f"split {ways} ways by spec {rule}")
            spec = P(*rule)
        specs[path] = spec
    return tree.unflatten(specs)


def param_shardings(abstract_params: Mapping, mesh: Mesh, config) -> Dict:
    specs = param_specs(abstract_params, mesh, config)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def state_shardings(abstract_state: Any, abstract_params: Mapping, params_shardings: Mapping, mesh: Mesh) -> Any:
    """Shardings for a whole training state: a leaf whose key path ends with a parameter's path and whose
    shape is that parameter's (params, EMA, Adam moments) is sharded like it; everything else (step
    counters, RNG) is replicated."""
    shardings = tree.flatten(params_shardings)
    shapes = {path: tuple(leaf.shape) for path, leaf in tree.flatten(abstract_params).items()}
    longest = max((len(p) for p in shardings), default=0)

    def choose(key_path, leaf):
        parts = tree.key_path_parts(key_path)
        shape = tuple(getattr(leaf, "shape", ()))
        for n in range(min(longest, len(parts)), 0, -1):
            suffix = parts[-n:]
            if suffix in shardings and shapes[suffix] == shape:
                return shardings[suffix]
        return replicated(mesh)

    return jax.tree_util.tree_map_with_path(choose, abstract_state)


def describe(mesh: Mesh) -> str:
    return ", ".join(f"{a}={mesh.shape[a]}" for a in mesh.axis_names) + f" ({mesh.devices.size} devices)"
