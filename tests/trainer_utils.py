"""Helpers of the trainer tests: toy configs, a few in-process steps, train.py in a subprocess.

Subprocesses run in the suite's environment (tests/environment.py).
"""

import glob
import os
import subprocess
import sys
import time

import jax
import numpy as np

from configs import toy_denoiser as toy_config
from pgpis_jax.methods import toy_denoiser
from pgpis_jax.trainer import loop, mesh as mesh_lib, step as step_lib
from pgpis_jax.trainer.data import HostData
from pgpis_jax.trainer.metrics import read_jsonl
from tests import environment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def toy(**overrides):
    """configs/toy_denoiser.py:demo with dotted overrides, e.g. toy(**{"grad.clip_norm": 1.0})."""
    config = toy_config.get_config("demo")
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return config


def overrides_as_flags(overrides):
    flags = []
    for key, value in overrides.items():
        flags.append(f"--config.{key}={value}")
    return flags


class Stepper:
    """The trainer's own setup / sharded init / jitted donated step on this process's devices."""

    def __init__(self, config, wrap_iterator=lambda iterator: iterator):
        self.config = config
        self.method = toy_denoiser.build(config)
        self.mesh = mesh_lib.make_mesh(config)
        self.setup = loop.setup(self.method, config, self.mesh)
        self.state = loop.init_state(self.setup, self.method, config)
        self.host = HostData(wrap_iterator(self.method.train_iterator(0, 1)), self.mesh, config)
        self._step = None

    def batch(self):
        return self.host.next_host_batch()

    def step(self, host_batch=None):
        host_batch = self.batch() if host_batch is None else host_batch
        if self._step is None:
            train_step = step_lib.with_device_decode(self.setup.train_step, self.host.device_decode)
            self._step = step_lib.jit_train_step(train_step, self.setup.state_shardings,
                                                 self.host.shardings(host_batch), self.mesh)
        self.state, metrics = self._step(self.state, self.host.to_global(host_batch))
        return jax.device_get(metrics)

    def params(self):
        return jax.device_get(self.state["params"])


def max_abs_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def train_cmd(workdir, **overrides):
    return [sys.executable, "train.py", "--config=configs/toy_denoiser.py:demo", f"--workdir={workdir}",
            *overrides_as_flags(overrides)]


def env(**extra):
    """The suite's environment for a subprocess, with `extra` variables; XLA_FLAGS in `extra` are added to the
    suite's own (tests/environment.py)."""
    if "XLA_FLAGS" in extra:
        extra["XLA_FLAGS"] = environment.xla_flags(extra["XLA_FLAGS"])
    return dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", **extra)


def run_train(workdir, timeout=240, **overrides):
    return subprocess.run(train_cmd(workdir, **overrides), cwd=ROOT, capture_output=True, text=True, env=env(),
                          timeout=timeout)


def start_train(workdir, **overrides):
    return subprocess.Popen(train_cmd(workdir, **overrides), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env())


def wait_until(predicate, process, timeout=120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if process.poll() is not None:
            return False
        time.sleep(0.02)
    return False


def logged_steps(workdir):
    path = os.path.join(workdir, "metrics.jsonl")
    return read_jsonl(path) if os.path.exists(path) else {}


def tensorboard_events(path):
    """TensorBoard's own reader (EventAccumulator) loaded with every scalar and image of the event file at `path`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(path), size_guidance={"scalars": 0, "images": 0})
    accumulator.Reload()
    return accumulator


def committed_steps(workdir):
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        return []
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def corrupt_array_files(item_dir):
    """Overwrites the second half of every array data file (orbax's d/ folder) under `item_dir` with random
    bytes, e.g. <workdir>/checkpoints/20/params or <workdir>/frozen_params/arrays."""
    files = [p for p in glob.glob(os.path.join(item_dir, "**", "*"), recursive=True)
             if os.path.isfile(p) and os.sep + "d" + os.sep in p]
    assert files, item_dir
    for path in files:
        size = os.path.getsize(path)
        with open(path, "r+b") as f:
            f.seek(size // 2)
            f.write(os.urandom(max(1, size - size // 2)))
