"""Runs diffusers' PyTorch schedulers as the reference for the JAX samplers.

The deterministic test model is the same closed-form function in NumPy-compatible JAX and in torch, so
both loops see the same network; stochastic steps get the same noise by patching diffusers' `randn_tensor`
(or passing DDIM's `variance_noise`).
"""

from __future__ import annotations

import contextlib
from typing import Optional

import diffusers
import jax.numpy as jnp
import numpy as np
import torch
from diffusers.schedulers import scheduling_ddpm, scheduling_unclip


DATA_STD = 0.7


def model_output(x, t, lib, channel_axis: int, prediction_type: str, alphas_cumprod: np.ndarray,
                 variance: Optional[str] = None):
    """A deterministic stand-in for a trained network: the exact denoiser of data ~ N(0, DATA_STD^2 I)
    under the schedule `alphas_cumprod`, in the parameterisation `prediction_type`, plus a small
    non-linear term 0.05 sin(3x + t/100) so that trajectories are not linear in x_T.

    With variance="learned_range" a second block of channels in [-1, 1] is appended on channel_axis; with
    variance="learned" a positive one (a variance).
    """
    if lib is jnp:
        abar = jnp.asarray(alphas_cumprod)[t]
        t = jnp.asarray(t, x.dtype)
    else:
        abar = torch.from_numpy(alphas_cumprod)[t]
        t = t.to(x.dtype)
    signal, sigma = abar**0.5, (1.0 - abar) ** 0.5
    denominator = abar * DATA_STD**2 + 1.0 - abar
    eps = sigma * x / denominator
    x0 = signal * DATA_STD**2 * x / denominator
    out = {"epsilon": eps, "sample": x0, "v_prediction": signal * eps - sigma * x0}[prediction_type]
    out = out + 0.05 * lib.sin(3.0 * x + t / 100.0)
    if variance == "learned_range":
        extra = lib.tanh(x + t / 500.0)
    elif variance == "learned":
        extra = 0.002 + 0.001 * lib.tanh(x)
    else:
        return out
    return lib.concatenate([out, extra], axis=channel_axis) if lib is jnp else torch.cat([out, extra], dim=channel_axis)


def to_torch(array: np.ndarray) -> torch.Tensor:
    """NHWC (JAX layout) -> NCHW torch tensor; 2-D arrays [B, D] keep their layout."""
    array = np.asarray(array, np.float32)
    if array.ndim == 4:
        array = array.transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(array))


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """Inverse of `to_torch`."""
    array = tensor.detach().numpy()
    return array.transpose(0, 2, 3, 1) if array.ndim == 4 else array


@contextlib.contextmanager
def _patched_randn(module, noise_source):
    original = module.randn_tensor
    module.randn_tensor = lambda shape, **kwargs: noise_source()
    try:
        yield
    finally:
        module.randn_tensor = original


def run_diffusers(config: dict, x_T: np.ndarray, num_inference_steps: int, step_noise: Optional[np.ndarray] = None,
                  variance: Optional[str] = None, eta: float = 0.0, use_clipped_model_output: bool = False):
    """The diffusers pipeline loop for the scheduler `config`; returns (x_0 in JAX layout, scheduler)."""
    scheduler = getattr(diffusers, config["_class_name"]).from_config(config)
    scheduler.set_timesteps(num_inference_steps)
    timesteps = scheduler.timesteps
    alphas_cumprod = scheduler.alphas_cumprod.numpy()
    x = to_torch(x_T) * scheduler.init_noise_sigma
    step_index = {"i": 0}

    def current_noise():
        return to_torch(step_noise[step_index["i"]])

    module = scheduling_unclip if config["_class_name"] == "UnCLIPScheduler" else scheduling_ddpm
    with _patched_randn(module, current_noise):
        for i, t in enumerate(timesteps):
            step_index["i"] = i
            out = model_output(x, t, torch, 1, scheduler.config.prediction_type, alphas_cumprod, variance)
            kwargs = {}
            if config["_class_name"] == "DDIMScheduler":
                kwargs = {"eta": eta, "use_clipped_model_output": use_clipped_model_output}
                if eta > 0:
                    kwargs["variance_noise"] = current_noise()
            elif config["_class_name"] == "UnCLIPScheduler":
                kwargs = {"prev_timestep": timesteps[i + 1] if i + 1 < len(timesteps) else None}
            x = scheduler.step(out, t, x, **kwargs).prev_sample
    return to_numpy(x), scheduler


def relative_error(actual, expected) -> float:
    """max |actual - expected| / max |expected|."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))
