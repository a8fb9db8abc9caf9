"""Several JAX processes of one entry point on this machine, as a multi-host run: a free coordinator port, fake CPU
devices per process (XLA_FLAGS), CPU collectives across processes (gloo), and their exit codes and outputs."""

from __future__ import annotations

import dataclasses
import socket
import subprocess
import sys
import tempfile
import time
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
    more than one, each gets the distributed flags of its process id and a shared coordinator. Their output goes to
    temporary files (`output_files` on each process), not pipes: a full pipe of one process would block it inside a
    collective that the others wait in."""
    port = free_port()
    command = [sys.executable, *script.split()]
    started = []
    for process_id in range(processes):
        distributed = [] if processes == 1 else [
            "--config.distributed.initialize=True", f"--config.distributed.coordinator_address=127.0.0.1:{port}",
            f"--config.distributed.num_processes={processes}", f"--config.distributed.process_id={process_id}"]
        output_files = (tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+"))
        process = subprocess.Popen([*command, *args, *distributed], cwd=ROOT, env=_env(devices_per_process),
                                   stdout=output_files[0], stderr=output_files[1], text=True)
        process.output_files = output_files
        started.append(process)
    return started


def _read(file) -> str:
    file.seek(0)
    text = file.read()
    file.close()
    return text


def wait(started: Sequence[subprocess.Popen], timeout: float = TIMEOUT) -> List[Finished]:
    """Waits for every process (killing all of them if any is still running `timeout` seconds from now)."""
    deadline = time.monotonic() + timeout
    try:
        for process in started:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        for process in started:
            process.kill()
        raise
    return [Finished(process.returncode, *(_read(file) for file in process.output_files)) for process in started]


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
