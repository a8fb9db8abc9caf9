"""The suite's environment, set in os.environ before JAX starts so that the xdist workers and every train.py /
sample.py subprocess share it:

- a persistent compilation cache, one directory per user on this machine, so that the same toy and demo programs
  compile once per machine, not once per test;
- XLA's CPU backend at optimization level 2 instead of its default 3: about a fifth less compile CPU (the demo's
  stage-2 `train.py`, 6 steps: 42 against 53 CPU s) for steps about 7 % slower. Last bits of float results may
  differ from level 3 (after those 6 steps, parameters within 2.5e-5), so comparisons between runs hold because
  every process of the suite uses the same level. Benchmarks and users keep the default.
"""

import getpass
import os
import tempfile

CACHE_DIR = os.path.join(tempfile.gettempdir(), f"pgpis_jax_test_compilation_cache_{getpass.getuser()}")
CACHE_ENV = {"JAX_COMPILATION_CACHE_DIR": CACHE_DIR, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
             "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
OPTIMIZATION_LEVEL_FLAG = "--xla_backend_optimization_level=2"


def xla_flags(*flags: str) -> str:
    """XLA_FLAGS for a subprocess: this environment's flags followed by `flags`."""
    return " ".join(filter(None, [os.environ.get("XLA_FLAGS", ""), *flags]))


def apply():
    """Names the cache in os.environ (before jax is imported; a directory the caller already named is kept) and adds
    the optimization level to XLA_FLAGS unless the caller set one."""
    for name, value in CACHE_ENV.items():
        os.environ.setdefault(name, value)
    if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = xla_flags(OPTIMIZATION_LEVEL_FLAG)
