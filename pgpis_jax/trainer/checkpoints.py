"""The checkpoints of a run directory with orbax: save, keep, resume, load for sampling, and refuse what does
not fit.

    <workdir>/checkpoints/<step>/   one orbax step (CheckpointManager), items:
        params      the TRAINABLE parameters (config.param_groups; StandardSave)
        ema         their EMA (only when config.ema.decay > 0)
        opt_state   the optimizer state (frozen slots are empty optax MaskedNodes)
        progress    {step, rng}: the step counter and the training key data
        data        every process's input-pipeline position (JSON)
        config      the resolved config (JSON)
        meta        format, step, process count, [dtype, shape] and a checksum of every array of the four
                    array items above (JSON)
    <workdir>/frozen_params/        the frozen (non-trainable) parameters, once per run, written at the first
        arrays/                     checkpoint save of a fresh run (StandardCheckpointer directory)
        checksums.json              format, [dtype, shape] and checksum of every frozen array
    <workdir>/<name>                the JSON files of Method.run_files(), written at the start of a fresh run
                                    (and checked against the method when resuming)

Array items are restored straight into the shardings of the current mesh, which may differ from the one that
saved them. Resuming restores the newest checkpoint and frozen_params; sampling (inference.load_params)
restores only `ema` (or `params`) and frozen_params, read-only. Nothing is ever silently re-initialised: a
checkpoint whose config differs in a key that matters, whose arrays do not have the shapes the config gives,
or that was written by an older format, is an error naming the keys / arrays / step directory; a missing or
corrupted frozen_params is an error naming it; an unreadable or corrupted newest checkpoint (orbax error, or
an array whose checksum does not match) is an error, unless config.checkpoint.fallback_to_older is set: then
resuming moves it to <workdir>/corrupt_checkpoints/ and uses the next older intact one, and the log says so.
A full disk while saving is reported by `out_of_space_message` (the newest complete step, the size of one step);
`close(remove_incomplete=True)` removes what a failed save left. `check_workdir` refuses a workdir that is a file or
not writable before anything is written.
"""

from __future__ import annotations

import errno
import functools
import json
import logging as pylogging
import math
import os
import re
import signal
import sys
import threading
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from pgpis_jax.config_checks import check_writable_directory
from pgpis_jax.errors import UserError
from pgpis_jax.trainer import replica_writes, tree


# 1: one `state` item with all parameters. 2: trainable `params`, `ema`, `opt_state`, `progress`; frozen
# parameters once per run in <workdir>/frozen_params.
FORMAT = 2
ARRAY_ITEMS = ("params", "ema", "opt_state", "progress")
FROZEN_DIR = "frozen_params"
FROZEN_ARRAYS = "arrays"
FROZEN_RECORD = "checksums.json"
# Where a run's data lives: it may move between runs; what it is is checked instead (the dataset's identity in the
# method's run files, the features' settings and fingerprint).
LOCATION_KEYS = ("data.data_dir", "data.features_dir")
# Config keys that may change between runs in one workdir: they do not change what a checkpoint means
# (run length, logging, checkpointing, the mesh - restoring reshards -, how the step is computed on a device -
# rematerialisation, the attention kernel -, inference-only `sampling` and where the data lives).
RESUMABLE_KEYS = ("total_steps", "log_every_steps", "checkpoint_every_steps", "checkpoint", "logging", "debug",
                  "distributed", "mesh", "sampling", "remat", "model.attention_implementation",
                  "grad.max_per_device_batch") + LOCATION_KEYS
# Config keys a command that only reads a run (sample, eval) may also set differently: how it evaluates and its
# batch size do not change what the trained networks are.
INFERENCE_KEYS = RESUMABLE_KEYS + ("eval", "batch_size")


# ---------------------------------------------------------------------------------------------------------
# Configs

def config_dict(config) -> Dict[str, Any]:
    """The resolved config as plain JSON data."""
    return json.loads(config.to_json_best_effort(sort_keys=True))


def differing_keys(a: Any, b: Any, prefix: str = "") -> List[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [k for key in sorted(set(a) | set(b)) for k in differing_keys(a.get(key), b.get(key), f"{prefix}{key}.")]
    return [] if a == b else [prefix.rstrip(".")]


def key_in(key: str, groups) -> bool:
    """True if the dotted config key is one of `groups` or inside one of them."""
    return any(key == g or key.startswith(g + ".") for g in groups)


def _lookup(data: Any, key: str) -> Any:
    for part in key.split("."):
        data = data.get(part) if isinstance(data, dict) else None
    return data


def describe_differences(saved: Mapping, current: Mapping, keys: List[str], limit: int = 8) -> str:
    shown = [f"{k} ({json.dumps(_lookup(saved, k))} -> {json.dumps(_lookup(current, k))})" for k in keys[:limit]]
    return ", ".join(shown) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def check_workdir(workdir: str) -> None:
    """UserError unless a training run can write in `workdir` (see config_checks.check_writable_directory) and
    in its checkpoints/. Creates nothing."""
    check_writable_directory(workdir, "--workdir")
    checkpoints = os.path.join(str(workdir), "checkpoints")
    if "://" not in str(workdir) and os.path.isdir(checkpoints) and not os.access(checkpoints, os.W_OK | os.X_OK):
        raise UserError(f"--workdir={workdir}: {checkpoints} is not writable (a read-only file system or no "
                        "permission); give a writable --workdir")


def committed_steps(workdir: str) -> List[int]:
    """The steps of <workdir>/checkpoints that were committed (orbax renames a step into place when it is
    complete), read from the directory listing."""
    directory = epath.Path(workdir) / "checkpoints"
    if not directory.is_dir():
        return []
    return sorted(int(child.name) for child in directory.iterdir() if child.name.isdigit())


def holds_no_checkpoint(workdir: str) -> bool:
    """True if `workdir` has neither a committed checkpoint nor one moved aside as corrupt: a run there stopped
    before its first checkpoint, and what it recorded (config.json, run files) may be replaced."""
    return not committed_steps(workdir) and not (epath.Path(workdir) / "corrupt_checkpoints").exists()


def check_recorded_config(config, workdir: str) -> bool:
    """Compares the config with <workdir>/config.json; True if the file must be (re)written.

    A difference in a key outside RESUMABLE_KEYS is an error naming the keys (a workdir belongs to one
    run); differences in resumable keys (e.g. total_steps to train longer, the mesh for another slice) are
    logged. A workdir without any checkpoint holds nothing to resume: its config.json (left by a run that
    stopped before its first checkpoint) is replaced, with a warning.
    """
    current = config_dict(config)
    path = epath.Path(workdir) / "config.json"
    if not path.exists():
        return True
    previous = json.loads(path.read_text())
    keys = differing_keys(previous, current)
    fixed = [k for k in keys if not key_in(k, RESUMABLE_KEYS)]
    if fixed and holds_no_checkpoint(workdir):
        logging.warning("%s holds another config (%s) but %s/checkpoints has no checkpoint: replacing it", path,
                        describe_differences(previous, current, fixed), workdir)
        return True
    if fixed:
        raise UserError(f"{path} holds a different config in keys that cannot change within a run: "
                        f"{describe_differences(previous, current, fixed)}; use another --workdir or the same config")
    if keys:
        logging.warning("config changed since the last run in this workdir: %s",
                        describe_differences(previous, current, keys))
    return bool(keys)


def write_config(config, workdir: str) -> None:
    """<workdir>/config.json (process 0), once the run's state is known to fit the config."""
    write_json_atomically(epath.Path(workdir) / "config.json", config_dict(config))


def write_json_atomically(path: epath.Path, value: Any) -> None:
    """`value` as JSON in `path` (process 0): written under a temporary name, then renamed over `path`."""
    if jax.process_index() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.parent / f"{path.name}.tmp"
        temporary.write_text(json.dumps(value, indent=2, sort_keys=True))
        temporary.replace(path)


def check_run_files(files: Mapping[str, Any], workdir: str) -> Dict[str, Any]:
    """The files of Method.run_files() ({file name: JSON-able value}) that <workdir> does not hold yet (all
    of them at the start of a fresh run), for write_run_files once the run's state fits the config.

    A file recorded by an earlier run of this workdir that holds other content is an error naming the file
    and the differing top-level keys (a workdir belongs to one run), unless the workdir has no checkpoint yet
    (then it is replaced).
    """
    missing = {}
    replaceable = holds_no_checkpoint(workdir)
    for name, value in files.items():
        if not name or os.path.basename(name) != name:
            raise ValueError(f"Method.run_files(): {name!r} is not a plain file name")
        path = epath.Path(workdir) / name
        value = json.loads(json.dumps(value))
        if not path.exists() or replaceable:
            missing[name] = value
            continue
        try:
            recorded = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise UserError(f"{path} cannot be read as JSON ({_first_line(error)}); it records what this run's "
                            "method gave when it started: restore it or use another --workdir") from None
        if recorded != value:
            keys = sorted(k for k in set(recorded) | set(value) if recorded.get(k) != value.get(k)) \
                if isinstance(recorded, dict) and isinstance(value, dict) else []
            what = f"in top-level keys {', '.join(keys)}" if keys else "(the whole value)"
            details = describe_differences(recorded, value, differing_keys(recorded, value), limit=4) \
                if keys else ""
            raise UserError(f"{path} records different content than this run's method gives {what}; a workdir "
                            "belongs to one run: use another --workdir or the settings (and data) it was trained "
                            f"with{'; recorded -> now: ' + details if details else ''}")
    return missing


def write_run_files(files: Mapping[str, Any], workdir: str) -> None:
    """Writes the files check_run_files returned (process 0, each under a temporary name, then renamed)."""
    for name, value in files.items():
        write_json_atomically(epath.Path(workdir) / name, value)


# ---------------------------------------------------------------------------------------------------------
# Items of a checkpoint

def split_state(state: Mapping[str, Any], opt) -> Tuple[Dict[str, Any], Dict]:
    """(the array items of a checkpoint step {"params": trainable parameters, "ema" (only when the state has
    an EMA), "opt_state", "progress": {"step", "rng"}}, the frozen parameters) of a train state (arrays or
    jax.ShapeDtypeStructs); `opt` (optimizer.Optimizer) decides what is trainable."""
    trainable, frozen = opt.split(state["params"])
    items = {"params": trainable, "opt_state": state["opt_state"],
             "progress": {"step": state["step"], "rng": state["rng"]}}
    if state["ema"]:
        items["ema"] = state["ema"]
    return items, frozen


def join_state(items: Mapping[str, Any], frozen: Mapping) -> Dict[str, Any]:
    """The train state of split_state's (items, frozen)."""
    return {"step": items["progress"]["step"], "params": tree.merge(items["params"], frozen),
            "opt_state": items["opt_state"], "ema": items.get("ema", {}), "rng": items["progress"]["rng"]}


def _nbytes(arrays: Any) -> int:
    return sum(math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(arrays))


def checkpoint_bytes(s: Any) -> Tuple[Dict[str, int], int]:
    """({item: bytes of its arrays} of one checkpoint step, bytes of the frozen parameters) of a run's
    trainer.loop.Setup `s`, from its abstract state alone (shapes x item sizes): the array data orbax writes
    uncompressed, without its metadata files or the small JSON items (data, config, meta)."""
    items, frozen = split_state(s.abstract_state, s.opt)
    return {name: _nbytes(item) for name, item in items.items()}, _nbytes(frozen)


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


HOST_CHUNK = 1 << 22   # elements per NumPy pass of `_host_leaf_checksum` (bounds its scratch to 32 MiB)


def _host_leaf_checksum(x: np.ndarray) -> np.ndarray:
    """`_leaf_checksum` in NumPy: uint32 [sum of the bit patterns, sum of pattern * (2 position + 1)], wrapping."""
    x = np.asarray(x)
    flat = x.reshape(-1)
    words = flat.astype(np.uint32) if x.dtype == np.bool_ else flat.view(f"uint{8 * x.dtype.itemsize}")
    total = weighted = 0
    for start in range(0, words.size, HOST_CHUNK):
        chunk = words[start:start + HOST_CHUNK].astype(np.uint32)
        weights = np.arange(start, start + chunk.size, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
        total = (total + int(np.sum(chunk, dtype=np.uint32))) % 2**32
        weighted = (weighted + int(np.sum(chunk * weights, dtype=np.uint32))) % 2**32
    return np.array([total, weighted], np.uint32)


def _in_host_memory(leaf) -> bool:
    """A NumPy array, or a jax.Array whose every shard is on this process's CPU devices."""
    if not isinstance(leaf, jax.Array):
        return True
    return leaf.is_fully_addressable and all(d.platform == "cpu" for d in leaf.sharding.device_set)


def checksums(state: Any) -> Dict[str, List[int]]:
    """{key path: [sum of the bit patterns, position-weighted sum]} (uint32, wrapping) for every array. Arrays in
    this process's CPU memory are summed by NumPy (no compile: a jitted checksum of a few hundred arrays takes
    10-20 s to compile on CPU); otherwise on the devices, returned replicated (so every process can read them)."""
    if all(_in_host_memory(leaf) for leaf in jax.tree.leaves(state)):
        values = jax.tree.map(_host_leaf_checksum, state)
    else:
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
    """When orbax fails to read or write a checkpoint, the tensorstore reads and writes still in flight complete
    into the event loop orbax already closed: each prints an "Event loop is closed" traceback (or, at interpreter
    exit, an ImportError) and asyncio logs "Future exception was never retrieved". The failure itself is reported
    once, by us; these echoes are dropped. Other unraisable exceptions and asyncio messages pass."""
    previous = sys.unraisablehook
    if getattr(previous, "_pgpis_filter", False):
        return

    def hook(args):
        if isinstance(args.exc_value, RuntimeError) and str(args.exc_value) == "Event loop is closed":
            return
        if isinstance(args.exc_value, ImportError) and "Python is likely shutting down" in str(args.exc_value):
            return   # orbax's write coroutines of a failed save, finalised at interpreter exit
        previous(args)

    hook._pgpis_filter = True
    sys.unraisablehook = hook
    pylogging.getLogger("asyncio").addFilter(_NeverRetrievedFilter())


def _let_failed_reads_settle() -> None:
    time.sleep(0.5)  # the echoes of a failed read land now, under the filters, not at interpreter exit


class Checkpoints:
    """orbax CheckpointManager over <workdir>/checkpoints and the run's frozen_params, with the checks
    described above. `s` (loop.Setup) gives the state's shapes, shardings and trainable mask. A read-only
    instance (for sampling) creates, cleans up and writes nothing."""

    def __init__(self, workdir: str, config, s: Any, read_only: bool = False):
        # orbax needs absolute paths; a relative local workdir is taken from the current directory.
        self.workdir = epath.Path(str(workdir) if "://" in str(workdir) else os.path.abspath(workdir))
        self.directory = self.workdir / "checkpoints"
        self.frozen_directory = self.workdir / FROZEN_DIR
        self.config = config
        self.read_only = read_only
        self.abstract_items, self.abstract_frozen = split_state(s.abstract_state, s.opt)
        self._opt = s.opt
        self._frozen_on_disk = False      # frozen_params written or restored by this instance
        self.last_saved_step: Optional[int] = None
        settings = config.checkpoint
        if settings.keep < 1:
            raise UserError(f"config.checkpoint.keep must be >= 1, got {settings.keep}")
        replica_writes.configure()
        handlers = {name: ocp.StandardCheckpointHandler() for name in ARRAY_ITEMS}
        handlers.update({name: ocp.JsonCheckpointHandler() for name in ("data", "config", "meta")})
        if read_only:
            options = ocp.CheckpointManagerOptions(read_only=True, create=False, cleanup_tmp_directories=False,
                                                   save_root_metadata=False, save_interval_steps=0)
        else:
            options = ocp.CheckpointManagerOptions(
                max_to_keep=int(settings.keep), create=True, cleanup_tmp_directories=True,
                enable_async_checkpointing=bool(settings.async_save))
        self.manager = None if read_only and not self.directory.exists() else \
            ocp.CheckpointManager(self.directory, item_handlers=handlers, options=options)
        _ignore_closed_loop_callbacks()

    # -- saving ------------------------------------------------------------------------------------------
    def save(self, step: int, state: Any, data_state: Any) -> bool:
        """Starts an (asynchronous) save of `state` at `step`; False if a checkpoint of that step exists.
        The first save of a fresh run first writes frozen_params (synchronously)."""
        if step == self.last_saved_step or step in self.manager.all_steps():
            return False
        items, frozen = split_state(state, self._opt)
        if not self._frozen_on_disk:
            self._write_frozen(frozen)
        meta = {"format": FORMAT, "step": int(step), "process_count": jax.process_count(),
                "checksums": checksums(items), "arrays": array_specs(items), "time": time.time()}
        data = {"process_count": jax.process_count(), "processes": gather_json(data_state)}
        self.manager.save(step, force=True, args=ocp.args.Composite(
            **{name: ocp.args.StandardSave(item) for name, item in items.items()},
            data=ocp.args.JsonSave(data), config=ocp.args.JsonSave(config_dict(self.config)),
            meta=ocp.args.JsonSave(meta)))
        self.last_saved_step = step
        return True

    def _write_frozen(self, frozen: Mapping) -> None:
        """<workdir>/frozen_params (nothing when there are no frozen parameters): written by orbax (all
        processes) and its checksums (process 0) under frozen_params.tmp, then renamed into place, so that
        frozen_params is complete or absent. One left by a fresh run that stopped before its first
        checkpoint is replaced."""
        self._frozen_on_disk = True
        if not jax.tree.leaves(frozen):
            return
        temporary = self.workdir / f"{FROZEN_DIR}.tmp"
        record = {"format": FORMAT, "arrays": array_specs(frozen), "checksums": checksums(frozen)}
        if jax.process_index() == 0:
            if temporary.exists():
                temporary.rmtree()
            temporary.mkdir(parents=True)
        _sync("pgpis_frozen_params_tmp")
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(temporary / FROZEN_ARRAYS, frozen)
            checkpointer.wait_until_finished()
        if jax.process_index() == 0:
            (temporary / FROZEN_RECORD).write_text(json.dumps(record))
            if self.frozen_directory.exists():
                self.frozen_directory.rmtree()
            temporary.rename(self.frozen_directory)
        _sync("pgpis_frozen_params_written")
        logging.info("wrote the frozen parameters to %s", self.frozen_directory)

    def wait(self) -> None:
        if self.manager is not None:
            self.manager.wait_until_finished()

    def close(self, remove_incomplete: bool = False) -> None:
        """Waits for an in-flight save and closes the manager (once). remove_incomplete: after a failure, also
        removes what a failed save left (orbax's temporary step directories, frozen_params.tmp; process 0);
        the committed steps stay as they are."""
        manager, self.manager = self.manager, None
        try:
            if manager is not None:
                manager.wait_until_finished()
                manager.close()
        finally:
            if remove_incomplete and not self.read_only and jax.process_index() == 0:
                _let_failed_reads_settle()
                for path in self.incomplete():
                    path.rmtree() if path.is_dir() else path.unlink()

    def incomplete(self) -> List[epath.Path]:
        """What failed or interrupted saves left: orbax's temporary step directories and frozen_params.tmp."""
        found = [child for child in self.directory.iterdir() if TMP_MARK in child.name] \
            if self.directory.is_dir() else []
        frozen = self.workdir / f"{FROZEN_DIR}.tmp"
        return found + ([frozen] if frozen.exists() else [])

    def out_of_space_message(self, error: BaseException, s: Any) -> str:
        """One line after a full disk stopped the run (`error`): where, what is left, how much to free."""
        items, frozen = checkpoint_bytes(s)
        step_bytes = sum(items.values())
        steps = committed_steps(str(self.workdir))
        kept = (f"the newest complete checkpoint is step {steps[-1]} in {self.directory}" if steps else
                "no checkpoint had been written, so nothing of this run was kept")
        return (f"no space left on the disk of {self.workdir} ({_describe_no_space(error)}); {kept}, "
                f"and what the failed save had written was removed. One checkpoint step takes {_size(step_bytes)} "
                f"(config.checkpoint.keep={self.config.checkpoint.keep} are kept"
                + (f", and {_size(frozen)} of frozen parameters once per run" if frozen else "")
                + "): free at least that much there, then rerun the same command to resume")

    def latest_step(self) -> Optional[int]:
        return None if self.manager is None else self.manager.latest_step()

    def all_steps(self) -> List[int]:
        if self.manager is None:
            return committed_steps(str(self.workdir)) if not self.read_only else []
        return sorted(self.manager.all_steps())

    # -- restoring ---------------------------------------------------------------------------------------
    def restore(self) -> Optional[Tuple[Any, Any, int]]:
        """(state, this process's data position, step) from the newest usable checkpoint and frozen_params,
        or None if there is no checkpoint."""
        steps = sorted(self.all_steps(), reverse=True)
        if not steps:
            return None
        _ignore_closed_loop_callbacks()
        for index, step in enumerate(steps):
            try:
                items, data = self._restore_step(step, ARRAY_ITEMS, check_data=True)
                return join_state(items, self._restore_frozen()), data, step
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

    def restore_for_sampling(self, step: int, which: str) -> Dict[str, Any]:
        """The full parameter tree of checkpoint `step` (one of all_steps()): the `which` item ("ema" or
        "params") with the frozen parameters. Reads nothing else of the step's arrays; never moves or writes
        anything (a corrupt item is an error naming the step)."""
        _ignore_closed_loop_callbacks()
        try:
            items, _ = self._restore_step(step, (which,), check_data=False)
        except CorruptCheckpoint as error:
            others = [s for s in self.all_steps() if s != step]
            raise UserError(f"checkpoint {self.directory / str(step)} cannot be restored: {error}; other steps: "
                            f"{', '.join(map(str, others)) if others else 'none'}") from None
        return tree.merge(items[which], self._restore_frozen())

    def _move_aside(self, step: int) -> epath.Path:
        target = self.workdir / "corrupt_checkpoints" / f"{step}-{int(time.time())}"
        if jax.process_index() == 0:
            target.parent.mkdir(parents=True, exist_ok=True)
            (self.directory / str(step)).rename(target)
        _sync("pgpis_move_corrupt_checkpoint")
        self.manager.reload()
        return target

    def _restore_step(self, step: int, names: Sequence[str], check_data: bool) -> Tuple[Dict[str, Any], Any]:
        """({name: restored item} for the array items `names` the step holds, this process's data position
        or None), after the format, config and shape checks; CorruptCheckpoint if it cannot be read back as
        it was written."""
        where = self.directory / str(step)
        try:
            small = self.manager.restore(step, args=ocp.args.Composite(
                data=ocp.args.JsonRestore(), config=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
            data, saved_config, meta = small["data"], small["config"], small["meta"]
            if not isinstance(meta, dict) or not isinstance(saved_config, dict):
                raise ValueError("its meta or config item is incomplete")
        except Exception as error:  # noqa: BLE001 - any failure to read is reported as corruption
            _let_failed_reads_settle()
            raise CorruptCheckpoint(_first_line(error)) from None
        written = meta.get("format", 1)
        if written != FORMAT:
            age = "an older" if isinstance(written, int) and written < FORMAT else "another"
            raise UserError(f"checkpoint {where} was written by {age} version of pgpis_jax (checkpoint format "
                            f"{written}; this version reads format {FORMAT}: trainable parameters, EMA and optimizer "
                            f"state as separate items, frozen parameters once in {self.frozen_directory}). Use the "
                            "version that wrote it, or train a new run in another --workdir")
        if not {"checksums", "arrays"} <= set(meta):
            raise CorruptCheckpoint("its meta item is incomplete")
        self._check_config(step, saved_config)
        names = [name for name in names if name in self.abstract_items]
        wanted = {name: self.abstract_items[name] for name in names}
        recorded = {k: v for k, v in meta["arrays"].items() if k.split(".")[0] in names}
        self._check_shapes(f"checkpoint step {step} in {self.directory}", recorded, array_specs(wanted))
        position = None
        if check_data:
            position = _data_position(data, step)
        try:
            items = self.manager.restore(step, args=ocp.args.Composite(
                **{name: ocp.args.StandardRestore(item) for name, item in wanted.items()}))
            items = {name: items[name] for name in wanted}
        except Exception as error:  # noqa: BLE001
            _let_failed_reads_settle()
            raise CorruptCheckpoint(_first_line(error)) from None
        expected = {k: v for k, v in meta["checksums"].items() if any(k.startswith(f"['{n}']") for n in names)}
        bad = _mismatches(expected, checksums(items))
        if bad:
            raise CorruptCheckpoint(f"arrays {bad} do not match the checksums saved with them")
        logging.info("restored %s of checkpoint step %d from %s", ", ".join(names), step, self.directory)
        return items, position

    def _restore_frozen(self) -> Dict:
        """The frozen parameters from <workdir>/frozen_params ({} when the run has none), checked against the
        shapes this config gives and the checksums recorded with them; any failure is a UserError."""
        self._frozen_on_disk = True
        if not jax.tree.leaves(self.abstract_frozen):
            return {}
        record_path = self.frozen_directory / FROZEN_RECORD
        advice = (f"the checkpoints in {self.directory} hold only the trainable parameters and the frozen ones are "
                  "stored once per run there. Not re-initialising them: restore the directory from a copy, or "
                  "train a new run in another --workdir")
        if not self.frozen_directory.exists():
            raise UserError(f"{self.frozen_directory} is missing: {advice}")
        try:
            record = json.loads(record_path.read_text())
            recorded_arrays, expected = record["arrays"], record["checksums"]
        except Exception as error:  # noqa: BLE001 - a missing, unreadable or incomplete record
            raise UserError(f"frozen parameters {self.frozen_directory} are corrupt: {record_path} cannot be read "
                            f"({_first_line(error)}); {advice}") from None
        self._check_shapes(f"frozen parameters {self.frozen_directory}", recorded_arrays,
                           array_specs(self.abstract_frozen))
        try:
            with ocp.StandardCheckpointer() as checkpointer:
                frozen = checkpointer.restore(self.frozen_directory / FROZEN_ARRAYS, self.abstract_frozen)
        except Exception as error:  # noqa: BLE001
            _let_failed_reads_settle()
            raise UserError(f"frozen parameters {self.frozen_directory} are corrupt: {_first_line(error)}; "
                            f"{advice}") from None
        bad = _mismatches(expected, checksums(frozen))
        if bad:
            raise UserError(f"frozen parameters {self.frozen_directory} are corrupt: arrays {bad} do not match the "
                            f"checksums in {record_path}; {advice}")
        logging.info("restored the frozen parameters from %s", self.frozen_directory)
        return frozen

    def _check_config(self, step: int, saved: Mapping) -> None:
        current = config_dict(self.config)
        allowed = INFERENCE_KEYS if self.read_only else RESUMABLE_KEYS
        keys = [k for k in differing_keys(saved, current) if not key_in(k, allowed)]
        if keys:
            when = "for sampling or evaluation" if self.read_only else "when resuming"
            raise UserError(f"checkpoint step {step} in {self.directory} was written with a different config: "
                            f"{describe_differences(saved, current, keys)}. These keys cannot change {when}; use "
                            "another --workdir or the checkpoint's config")

    @staticmethod
    def _check_shapes(what: str, saved: Mapping[str, Any], wanted: Mapping[str, Any]) -> None:
        """The arrays recorded at save time against those this config builds (no array data is read)."""
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
            raise UserError(f"{what} does not match the state this config builds: {'; '.join(problems[:8])}{more}")


def _data_position(data: Mapping[str, Any], step: int) -> Any:
    """This process's input position from a checkpoint's `data` item. Positions that are the same on every process
    (a global stream: the input pipeline, offline features) resume on any number of processes; per-process ones only
    on as many processes as wrote them."""
    positions = data["processes"]
    if all(position == positions[0] for position in positions):
        return positions[0]
    if len(positions) != jax.process_count():
        raise UserError(f"checkpoint step {step} was written by {len(positions)} processes with different input "
                        f"positions; this run has {jax.process_count()}: they cannot be mapped (resume with the same "
                        "number of hosts)")
    return positions[jax.process_index()]


# orbax writes a step under "<step>.orbax-checkpoint-tmp" (and its items likewise) and renames it when complete.
TMP_MARK = ".orbax-checkpoint-tmp"
_NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_NO_SPACE_TEXTS = ("No space left on device", "Disk quota exceeded", "File too large", "os_error_code='28'")


def _out_of_space_cause(error: BaseException) -> Optional[BaseException]:
    """The exception in `error`'s chain (itself, its cause or context) that says the disk is full, or None."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _NO_SPACE_ERRNOS:
            return error
        if any(text in str(error) for text in _NO_SPACE_TEXTS):
            return error
        error = error.__cause__ or error.__context__
    return None


def _describe_no_space(error: BaseException) -> str:
    """"<file>: <reason>" of a full-disk error: an OSError's, or the file and reason in a TensorStore message."""
    cause = _out_of_space_cause(error)
    if isinstance(cause, OSError) and cause.errno in _NO_SPACE_ERRNOS:
        return f"{cause.filename or 'a file'}: {cause.strerror}"
    text = str(cause)
    files = re.findall(r'local file "([^"]+)"', text)
    reason = next((t for t in _NO_SPACE_TEXTS[:3] if t in text), "No space left on device")
    return f"{files[-1] if files else 'a file'}: {reason}"


def out_of_space(error: BaseException) -> bool:
    """True if `error` (or what caused it) is a full disk or quota, e.g. while orbax writes a checkpoint."""
    return _out_of_space_cause(error) is not None


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _mismatches(expected: Mapping[str, Any], actual: Mapping[str, Any]) -> str:
    """The array names whose checksums differ (at most five, then "..."), or ""."""
    bad = sorted(k for k in set(expected) | set(actual) if expected.get(k) != actual.get(k))
    return f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}"


def array_specs(arrays: Any) -> Dict[str, List]:
    """{"params.dense.kernel": [dtype name, shape], ...} for every array of a (possibly abstract) tree."""
    return {".".join(path): [np.dtype(leaf.dtype).name, list(leaf.shape)]
            for path, leaf in tree.flatten_with_paths(arrays)}


def _spec_str(spec) -> str:
    return f"{spec[0]}{list(spec[1])}"


def _first_line(error: BaseException, limit: int = 240) -> str:
    text = str(error).strip().splitlines()
    line = f"{type(error).__name__}: {text[0] if text else ''}"
    return line if len(line) <= limit else line[:limit - 3] + "..."

