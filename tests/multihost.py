"""Several JAX processes of one entry point on this machine, as a multi-host run: a free coordinator port, fake CPU
devices per process (XLA_FLAGS), CPU collectives across processes (gloo), and their exit codes and outputs."""

from __future__ import annotations

import dataclasses
import socket
import subprocess
import sys
from typing import List, Sequence

from tests.environment import CACHE_ENV
from tests.trainer_utils import ROOT, env

TIMEOUT = 600


@dataclasses.dataclass
class Finished:
    """One process: its exit code and output."""

    returncode: int
    stdout: str
    stderr: str


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices_per_process: int):
    """The test environment without the persistent compilation cache (each process compiles its own programs)."""
    variables = env(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}")
    for name in CACHE_ENV:
        variables.pop(name)
    return variables


def start(script: str, args: Sequence[str], processes: int, devices_per_process: int) -> List[subprocess.Popen]:
    """Starts `processes` copies of `script` (a path relative to the repository, or "-m module") with `args`; with
    more than one, each gets the distributed flags of its process id and a shared coordinator."""
    port = free_port()
    command = [sys.executable, *script.split()]
    started = []
    for process_id in range(processes):
        distributed = [] if processes == 1 else [
            "--config.distributed.initialize=True", f"--config.distributed.coordinator_address=127.0.0.1:{port}",
            f"--config.distributed.num_processes={processes}", f"--config.distributed.process_id={process_id}"]
        started.append(subprocess.Popen([*command, *args, *distributed], cwd=ROOT, env=_env(devices_per_process),
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return started


def wait(started: Sequence[subprocess.Popen], timeout: float = TIMEOUT) -> List[Finished]:
    """Waits for every process (killing all of them if one outlives `timeout`)."""
    finished = []
    try:
        for process in started:
            stdout, stderr = process.communicate(timeout=timeout)
            finished.append(Finished(process.returncode, stdout, stderr))
    except subprocess.TimeoutExpired:
        for process in started:
            process.kill()
        raise
    return finished


def run(script: str, args: Sequence[str], processes: int, devices_per_process: int,
        timeout: float = TIMEOUT) -> List[Finished]:
    """Runs the processes to the end; asserts that each exited with 0, showing the failing one's stderr."""
    finished = wait(start(script, args, processes, devices_per_process), timeout)
    assert_all_succeeded(finished)
    return finished


def assert_all_succeeded(finished: Sequence[Finished]) -> None:
    """Every process exited with 0; else the end of the stderr of each one that did not (the first to fail is
    often not the first in order)."""
    failed = [f"process {i} (exit {result.returncode}): {result.stderr[-2000:]}"
              for i, result in enumerate(finished) if result.returncode != 0]
    assert not failed, "\n".join(failed)
