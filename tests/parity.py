"""What the PyTorch-parity tests share: torch's NCHW outputs in our NHWC layout, NumPy/JAX inputs in torch's
layout, the closeness check that prints the error it asserts on, and fast-compiling jits for tiny networks and
their inits."""

import jax
import numpy as np
import torch

from pgpis_jax.trainer.batched_threefry import with_batched_threefry

TOLERANCE = 1e-4
# jax.jit(..., compiler_options=FAST_COMPILE): XLA's CPU backend optimisations cost more compile time than they save
# on the tests' tiny models.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def jitted(fn):
    """fn under jax.jit with FAST_COMPILE: a tiny network's forward compiles once (about 2.5 s for the PCDMs demo's
    UNet) instead of op by op when run eagerly (about 12 s)."""
    return jax.jit(fn, compiler_options=FAST_COMPILE)


def jitted_init(init_params):
    """A network's init_params (rng -> parameters) under `jitted` with its Threefry hashes merged, as the trainer
    compiles it (trainer.batched_threefry: the same parameters, about half the compile)."""
    return jitted(with_batched_threefry(init_params))


def nhwc(tensor: torch.Tensor) -> np.ndarray:
    """A torch [B, C, H, W] tensor as a NumPy [B, H, W, C] array."""
    return tensor.detach().numpy().transpose(0, 2, 3, 1)


def nchw(array) -> torch.Tensor:
    """A NumPy or JAX [B, H, W, C] array as a torch [B, C, H, W] tensor."""
    return torch.from_numpy(np.ascontiguousarray(np.asarray(array).transpose(0, 3, 1, 2)))


def check_close(actual, expected, label: str, tolerance: float = TOLERANCE) -> None:
    """Asserts equal shapes and a max abs error <= tolerance; prints the error and the output scale."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, f"{label}: shape {actual.shape} != {expected.shape}"
    error = float(np.abs(actual - expected).max())
    print(f"{label}: max abs error {error:.2e} (output scale {np.abs(expected).max():.2f})")
    assert error <= tolerance, f"{label}: max abs error {error}"
