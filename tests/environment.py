"""The suite's environment, set in os.environ before JAX starts so that the xdist workers and every train.py /
sample.py subprocess share it: a persistent compilation cache, one directory per user on this machine, so that the
same toy and demo programs compile once per machine, not once per test."""

import getpass
import os
import tempfile

CACHE_DIR = os.path.join(tempfile.gettempdir(), f"pgpis_jax_test_compilation_cache_{getpass.getuser()}")
CACHE_ENV = {"JAX_COMPILATION_CACHE_DIR": CACHE_DIR, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
             "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def apply():
    """Names the cache in os.environ (before jax is imported); a directory the caller already named is kept."""
    for name, value in CACHE_ENV.items():
        os.environ.setdefault(name, value)
