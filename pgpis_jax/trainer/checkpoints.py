"""Checkpoints in <workdir>/checkpoints with orbax: save, keep, resume, and refuse what does not fit.

A checkpoint (one orbax step directory) holds four items:
  state   params, optimizer state, EMA, step, RNG (StandardSave; restored straight into the shardings
          of the current mesh, which may differ from the one that saved it)
  data    every process's input-pipeline position (JSON)
  config  the resolved config (JSON)
  meta    step, process count and a checksum of every array of `state` (JSON)

Resuming restores the newest checkpoint. Nothing is ever silently re-initialised: a checkpoint whose
config differs in a key that matters, or whose arrays do not have the shapes the config gives, is an error
naming the keys / arrays; an unreadable or corrupted newest checkpoint (orbax error, or an array whose
checksum does not match) is an error, unless config.checkpoint.fallback_to_older is set: then it is moved
to <workdir>/corrupt_checkpoints/ and the next older intact one is used, and the log says so.
"""

from __future__ import annotations

import functools
import json
import logging as pylogging
import os
import signal
import sys
import threading
import time
from typing import Any, Dict, List, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from pgpis_jax.errors import UserError
from pgpis_jax.trainer import tree

FORMAT = 1
# Config keys that may change between runs in one workdir: they do not change what a checkpoint means
# (run length, logging, checkpointing, the mesh - restoring reshards - and inference-only `sampling`).
RESUMABLE_KEYS = ("total_steps", "log_every_steps", "checkpoint_every_steps", "checkpoint", "logging", "debug",
                  "distributed", "mesh", "sampling")


# ---------------------------------------------------------------------------------------------------------
# Configs

def config_dict(config) -> Dict[str, Any]:
    """The resolved config as plain JSON data."""
    return json.loads(config.to_json_best_effort(sort_keys=True))


def differing_keys(a: Any, b: Any, prefix: str = "") -> List[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [k for key in sorted(set(a) | set(b)) for k in differing_keys(a.get(key), b.get(key), f"{prefix}{key}.")]
    return [] if a == b else [prefix.rstrip(".")]


def _resumable(key: str) -> bool:
    return any(key == r or key.startswith(r + ".") for r in RESUMABLE_KEYS)


def _lookup(data: Any, key: str) -> Any:
    for part in key.split("."):
        data = data.get(part) if isinstance(data, dict) else None
    return data


def describe_differences(saved: Mapping, current: Mapping, keys: List[str], limit: int = 8) -> str:
    shown = [f"{k} ({json.dumps(_lookup(saved, k))} -> {json.dumps(_lookup(current, k))})" for k in keys[:limit]]
    return ", ".join(shown) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def check_recorded_config(config, workdir: str) -> bool:
    """Compares the config with <workdir>/config.json; True if the file must be (re)written.

    A difference in a key outside RESUMABLE_KEYS is an error naming the keys (a workdir belongs to one
    run); differences in resumable keys (e.g. total_steps to train longer, the mesh for another slice) are
    logged.
    """
    current = config_dict(config)
    path = epath.Path(workdir) / "config.json"
    if not path.exists():
        return True
    previous = json.loads(path.read_text())
    keys = differing_keys(previous, current)
    fixed = [k for k in keys if not _resumable(k)]
    if fixed:
        raise UserError(f"{path} holds a different config in keys that cannot change within a run: "
                        f"{describe_differences(previous, current, fixed)}; use another --workdir or the same config")
    if keys:
        logging.warning("config changed since the last run in this workdir: %s",
                        describe_differences(previous, current, keys))
    return bool(keys)


def write_config(config, workdir: str) -> None:
    """<workdir>/config.json (process 0), once the run's state is known to fit the config."""
    if jax.process_index() == 0:
        path = epath.Path(workdir) / "config.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(config_dict(config), indent=2, sort_keys=True))


# ---------------------------------------------------------------------------------------------------------
# Checksums

def _leaf_checksum(x):
    x = jnp.asarray(x)
    if x.dtype == jnp.bool_:
        words = x.astype(jnp.uint32)
    else:
        words = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * x.dtype.itemsize}")).astype(jnp.uint32)
    words = words.reshape(-1)
    weights = jax.lax.iota(jnp.uint32, words.size) * jnp.uint32(2) + jnp.uint32(1)
    return jnp.stack([jnp.sum(words, dtype=jnp.uint32), jnp.sum(words * weights, dtype=jnp.uint32)])


@functools.lru_cache(maxsize=8)
def _checksums_fn(mesh):
    return jax.jit(lambda state: jax.tree.map(_leaf_checksum, state), out_shardings=NamedSharding(mesh, P()))


def checksums(state: Any) -> Dict[str, List[int]]:
    """{key path: [sum of the bit patterns, position-weighted sum]} (uint32, wrapping) for every array,
    computed on the devices and returned replicated (so every process can read them)."""
    mesh = next(leaf.sharding.mesh for leaf in jax.tree.leaves(state) if isinstance(leaf.sharding, NamedSharding))
    values = jax.device_get(_checksums_fn(mesh)(state))
    return {jax.tree_util.keystr(kp): [int(v) for v in np.asarray(leaf)]
            for kp, leaf in jax.tree_util.tree_flatten_with_path(values)[0]}


# ---------------------------------------------------------------------------------------------------------
# Data positions of all processes

def gather_json(value: Any) -> List[Any]:
    """[value of process 0, value of process 1, ...] on every process."""
    if jax.process_count() == 1:
        return [value]
    encoded = np.frombuffer(json.dumps(value).encode(), np.uint8)
    lengths = multihost_utils.process_allgather(np.asarray([encoded.size], np.int32)).reshape(-1)
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[:encoded.size] = encoded
    gathered = multihost_utils.process_allgather(padded).reshape(len(lengths), -1)
    return [json.loads(bytes(row[:n]).decode()) for row, n in zip(gathered, lengths)]


# ---------------------------------------------------------------------------------------------------------
# Preemption

class PreemptionWatch:
    """True once this run should stop and save: SIGTERM (single process), or the preemption sync point
    orbax / JAX's distributed runtime reports on multi-host runs."""

    def __init__(self, enabled: bool):
        self._signalled = False
        self._previous = None
        self.enabled = enabled
        if enabled and jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, frame):
        self._signalled = True
        logging.warning("SIGTERM received: saving a checkpoint after the current step, then stopping")

    def reached(self, step: int, manager: ocp.CheckpointManager) -> bool:
        if not self.enabled:
            return False
        if jax.process_count() > 1:
            return bool(manager.reached_preemption(step))
        return self._signalled

    def close(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


# ---------------------------------------------------------------------------------------------------------
# The manager

class CorruptCheckpoint(Exception):
    """A checkpoint that cannot be read back as it was written."""


class _NeverRetrievedFilter(pylogging.Filter):
    def filter(self, record):
        return "exception was never retrieved" not in record.getMessage()


def _ignore_closed_loop_callbacks() -> None:
    """When orbax fails to read a checkpoint, the tensorstore reads still in flight complete into the event
    loop orbax already closed: each prints an "Event loop is closed" traceback and asyncio logs "Future
    exception was never retrieved". The failure itself is reported once, by us; these echoes are dropped.
    Other unraisable exceptions and asyncio messages pass."""
    previous = sys.unraisablehook
    if getattr(previous, "_pgpis_filter", False):
        return

    def hook(args):
        if isinstance(args.exc_value, RuntimeError) and str(args.exc_value) == "Event loop is closed":
            return
        previous(args)

    hook._pgpis_filter = True
    sys.unraisablehook = hook
    pylogging.getLogger("asyncio").addFilter(_NeverRetrievedFilter())


def _let_failed_reads_settle() -> None:
    time.sleep(0.5)  # the echoes of a failed read land now, under the filters, not at interpreter exit


class Checkpoints:
    """orbax CheckpointManager over <workdir>/checkpoints with the checks described above."""

    def __init__(self, workdir: str, config):
        # orbax needs absolute paths; a relative local workdir is taken from the current directory.
        self.workdir = epath.Path(str(workdir) if "://" in str(workdir) else os.path.abspath(workdir))
        self.directory = self.workdir / "checkpoints"
        self.config = config
        settings = config.checkpoint
        if settings.keep < 1:
            raise UserError(f"config.checkpoint.keep must be >= 1, got {settings.keep}")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=int(settings.keep), create=True, cleanup_tmp_directories=True,
            enable_async_checkpointing=bool(settings.async_save))
        handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
                    "config": ocp.JsonCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
        self.manager = ocp.CheckpointManager(self.directory, item_handlers=handlers, options=options)
        self.last_saved_step: Optional[int] = None

    # -- saving ------------------------------------------------------------------------------------------
    def save(self, step: int, state: Any, data_state: Any) -> bool:
        """Starts an (asynchronous) save of `state` at `step`; False if a checkpoint of that step exists."""
        if step == self.last_saved_step or step in self.manager.all_steps():
            return False
        meta = {"format": FORMAT, "step": int(step), "process_count": jax.process_count(),
                "checksums": checksums(state), "arrays": array_specs(state), "time": time.time()}
        data = {"process_count": jax.process_count(), "processes": gather_json(data_state)}
        self.manager.save(step, force=True, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data),
            config=ocp.args.JsonSave(config_dict(self.config)), meta=ocp.args.JsonSave(meta)))
        self.last_saved_step = step
        return True

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def all_steps(self) -> List[int]:
        return sorted(self.manager.all_steps())

    # -- restoring ---------------------------------------------------------------------------------------
    def restore(self, abstract_state: Any) -> Optional[Tuple[Any, Any, int]]:
        """(state, this process's data position, step) from the newest usable checkpoint, or None if there
        is none. `abstract_state` holds jax.ShapeDtypeStructs with the target shardings."""
        steps = sorted(self.manager.all_steps(), reverse=True)
        if not steps:
            return None
        _ignore_closed_loop_callbacks()
        for index, step in enumerate(steps):
            try:
                return self._restore_step(step, abstract_state)
            except CorruptCheckpoint as error:
                where = self.directory / str(step)
                if not self.config.checkpoint.fallback_to_older:
                    older = f"; older checkpoints: steps {', '.join(map(str, steps[index + 1:]))}" \
                        if index + 1 < len(steps) else "; there is no older checkpoint"
                    raise UserError(
                        f"checkpoint {where} cannot be restored: {error}{older}. Not starting from scratch. Rerun "
                        "with --config.checkpoint.fallback_to_older=True to move it aside and resume from the "
                        "newest intact older checkpoint, or remove it yourself") from None
                moved = self._move_aside(step)
                remaining = steps[index + 1:]
                logging.warning("checkpoint %s cannot be restored: %s. config.checkpoint.fallback_to_older is set: "
                                "moved it to %s and %s", where, error, moved,
                                f"trying step {remaining[0]}" if remaining else "no older checkpoint is left")
                if jax.process_index() == 0:
                    print(f"WARNING: checkpoint {where} is unreadable ({error}); moved to {moved}; "
                          + (f"falling back to the older checkpoint at step {remaining[0]} "
                             "(config.checkpoint.fallback_to_older)" if remaining else "no older checkpoint is left"),
                          flush=True)
        raise UserError(f"no intact checkpoint left in {self.directory} (all of steps {steps} were unreadable and "
                        "moved to corrupt_checkpoints/); remove the directory to start from scratch")

    def _move_aside(self, step: int) -> epath.Path:
        target = self.workdir / "corrupt_checkpoints" / f"{step}-{int(time.time())}"
        if jax.process_index() == 0:
            target.parent.mkdir(parents=True, exist_ok=True)
            (self.directory / str(step)).rename(target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("pgpis_move_corrupt_checkpoint")
        self.manager.reload()
        return target

    def _restore_step(self, step: int, abstract_state: Any):
        try:
            small = self.manager.restore(step, args=ocp.args.Composite(
                data=ocp.args.JsonRestore(), config=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
            data, saved_config, meta = small["data"], small["config"], small["meta"]
            if not isinstance(meta, dict) or not {"checksums", "arrays"} <= set(meta) or \
                    not isinstance(saved_config, dict):
                raise ValueError("its meta or config item is incomplete")
        except Exception as error:  # noqa: BLE001 - any failure to read is reported as corruption
            _let_failed_reads_settle()
            raise CorruptCheckpoint(_first_line(error)) from None
        self._check_config(step, saved_config)
        self._check_shapes(step, meta["arrays"], abstract_state)
        if data.get("process_count") != jax.process_count():
            raise UserError(f"checkpoint step {step} was written by {data.get('process_count')} processes; this run "
                            f"has {jax.process_count()}: the input-pipeline positions cannot be mapped (resume with "
                            "the same number of hosts)")
        try:
            state = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state)))["state"]
        except Exception as error:  # noqa: BLE001
            _let_failed_reads_settle()
            raise CorruptCheckpoint(_first_line(error)) from None
        expected = meta["checksums"]
        actual = checksums(state)
        bad = sorted(k for k in set(expected) | set(actual) if expected.get(k) != actual.get(k))
        if bad:
            raise CorruptCheckpoint(f"arrays {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''} do not match the "
                                    "checksums saved with them")
        logging.info("restored checkpoint step %d from %s", step, self.directory)
        return state, data["processes"][jax.process_index()], step

    def _check_config(self, step: int, saved: Mapping) -> None:
        current = config_dict(self.config)
        keys = [k for k in differing_keys(saved, current) if not _resumable(k)]
        if keys:
            raise UserError(f"checkpoint step {step} in {self.directory} was written with a different config: "
                            f"{describe_differences(saved, current, keys)}. These keys cannot change when "
                            "resuming; use another --workdir or the checkpoint's config")

    def _check_shapes(self, step: int, saved: Mapping[str, Any], abstract_state: Any) -> None:
        """The arrays recorded at save time against those this config builds (no array data is read)."""
        wanted = array_specs(abstract_state)
        problems = []
        order = {"params": 0, "ema": 1, "opt_state": 2}   # parameters first: they explain the rest
        for name in sorted(set(saved) | set(wanted), key=lambda n: (order.get(n.split(".")[0], 3), n)):
            if name not in saved:
                problems.append(f"{name} missing from the checkpoint")
            elif name not in wanted:
                problems.append(f"{name} not in this config's state")
            elif saved[name] != wanted[name]:
                problems.append(f"{name} is {_spec_str(saved[name])} in the checkpoint, {_spec_str(wanted[name])} here")
        if problems:
            more = f" and {len(problems) - 8} more" if len(problems) > 8 else ""
            raise UserError(f"checkpoint step {step} in {self.directory} does not match the state this config "
                            f"builds: {'; '.join(problems[:8])}{more}")


def array_specs(state: Any) -> Dict[str, List]:
    """{"params.dense.kernel": [dtype name, shape], ...} for every array of a (possibly abstract) state."""
    return {".".join(path): [np.dtype(leaf.dtype).name, list(leaf.shape)]
            for path, leaf in tree.flatten_with_paths(state)}


def _spec_str(spec) -> str:
    return f"{spec[0]}{list(spec[1])}"


def _first_line(error: BaseException, limit: int = 240) -> str:
    text = str(error).strip().splitlines()
    line = f"{type(error).__name__}: {text[0] if text else ''}"
    return line if len(line) <= limit else line[:limit - 3] + "..."

