"""The suite's environment, set in os.environ before JAX starts so that the xdist workers and every train.py /
sample.py subprocess share it:

- a persistent compilation cache, one directory per user on this machine, so that the same toy and demo programs
  compile once per machine, not once per test;
- XLA's CPU backend at optimization level 0 instead of its default 3 (its LLVM code generation at -O0): the
  suite's programs are tiny, so compiling costs more than running them. The full suite, cold cache, on one machine
  (2026-12-05): 874 s (1,607 CPU s) at level 2, 756, 741, 778, 710 s (1,403, 1,378, 1,429, 1,314 CPU s) at level 0
  (docs/tests.md: the chunked attention's gradient check passes at level 0 since its backward was made about as
  accurate as xla's);
- XLA's older elemental emitters for CPU fusions (`--xla_cpu_use_fusion_emitters=false`) instead of the MLIR
  fusion emitters, which build MLIR for every fusion: an eager op compiles in about 15 % less CPU, a small
  PCDMs `train.py` (3 steps, 4 devices) in about a fifth less, its steps as fast; the full suite, cold cache, on
  one machine: 936, 1,012 s (1,742, 1,907 CPU s) -> 812, 891, 888 s (1,534, 1,685, 1,668 CPU s);
- Eigen's matrix products and convolutions on one thread (`--xla_cpu_multi_thread_eigen=false`) and LLVM code
  generation in one piece (`--xla_cpu_parallel_codegen_split_count=1`): two workers already keep both cores busy,
  so threads within one op or one compile only add hand-offs. The small PCDMs `train.py` (6 steps, 1 device,
  cold, two runs each, 2026-12-05): 13.0, 12.8 CPU s with the flags above only, 12.0, 11.7 adding the first, 11.5,
  11.6 adding the second, 11.1, 11.5 adding both; the full suite, cold cache: 636 s (1,164 CPU s) without, 619 s
  (1,133 CPU s) with both, one run each, within the machine's noise.
Last bits of float results differ from XLA's defaults (the small PCDMs `train.py`, 6 steps on 1 device, cold, with
the level and emitter flags against none: 14.3 against 28.4 CPU s, parameters within 9.7e-6, the same losses to
6 digits), so comparisons between runs hold because every process of the suite uses the same flags. Benchmarks
and users keep the defaults.
"""

import getpass
import os
import tempfile

CACHE_DIR = os.path.join(tempfile.gettempdir(), f"pgpis_jax_test_compilation_cache_{getpass.getuser()}")
CACHE_ENV = {"JAX_COMPILATION_CACHE_DIR": CACHE_DIR, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
             "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
COMPILE_FLAGS = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false",
                 "--xla_cpu_multi_thread_eigen=false", "--xla_cpu_parallel_codegen_split_count=1")


def xla_flags(*flags: str) -> str:
    """XLA_FLAGS for a subprocess: this environment's flags followed by `flags`."""
    return " ".join(filter(None, [os.environ.get("XLA_FLAGS", ""), *flags]))


def apply():
    """Names the cache in os.environ (before jax is imported; a directory the caller already named is kept) and adds
    each of COMPILE_FLAGS to XLA_FLAGS unless the caller set that flag."""
    for name, value in CACHE_ENV.items():
        os.environ.setdefault(name, value)
    present = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = xla_flags(*(flag for flag in COMPILE_FLAGS if flag.split("=")[0] not in present))
