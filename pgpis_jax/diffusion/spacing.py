"""Inference timesteps: which training timesteps a sampler visits, as diffusers' `set_timesteps` picks them.

Every function returns a descending int64 NumPy array. Spacings (Lin et al. 2023, Table 2):
  linspace: round(linspace(0, T-1, n));  leading: arange(n) * (T // n) + steps_offset;
  trailing: round(arange(T, 0, -T/n)) - 1.
"""

from __future__ import annotations

import numpy as np

TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")


def _check_steps(num_inference_steps: int, num_train_timesteps: int, minimum: int = 1) -> None:
    if not minimum <= num_inference_steps <= num_train_timesteps:
        raise ValueError(
            f"num_inference_steps={num_inference_steps} must lie in [{minimum}, {num_train_timesteps}] "
            f"(num_train_timesteps={num_train_timesteps})"
        )


def _spaced(spacing: str, num_train_timesteps: int, num_points: int, steps_offset: int) -> np.ndarray:
    """`num_points` descending timesteps with the given spacing."""
    if spacing == "linspace":
        return np.linspace(0, num_train_timesteps - 1, num_points).round()[::-1].astype(np.int64)
    if spacing == "leading":
        ratio = num_train_timesteps // num_points
        return (np.arange(0, num_points) * ratio).round()[::-1].astype(np.int64) + steps_offset
    if spacing == "trailing":
        ratio = num_train_timesteps / num_points
        return np.round(np.arange(num_train_timesteps, 0, -ratio)).astype(np.int64) - 1
    raise ValueError(f"timestep_spacing={spacing!r} is not supported; expected one of {TIMESTEP_SPACINGS}")


def ddpm_timesteps(spacing: str, num_train_timesteps: int, num_inference_steps: int, steps_offset: int = 0):
    """Timesteps of `DDPMScheduler` and `DDIMScheduler`."""
    _check_steps(num_inference_steps, num_train_timesteps)
    return _spaced(spacing, num_train_timesteps, num_inference_steps, steps_offset)


def unipc_timesteps(spacing: str, num_train_timesteps: int, num_inference_steps: int, steps_offset: int = 0):
    """Timesteps of `UniPCMultistepScheduler`: linspace and leading place n + 1 points and drop the last
    (t = 0 is never visited); trailing is as for DDPM."""
    _check_steps(num_inference_steps, num_train_timesteps)
    if spacing == "linspace":
        return _spaced("linspace", num_train_timesteps, num_inference_steps + 1, 0)[:-1]
    if spacing == "leading":
        ratio = num_train_timesteps // (num_inference_steps + 1)
        points = (np.arange(0, num_inference_steps + 1) * ratio).round()[::-1][:-1]
        return points.astype(np.int64) + steps_offset
    return _spaced(spacing, num_train_timesteps, num_inference_steps, steps_offset)


def unclip_timesteps(num_train_timesteps: int, num_inference_steps: int):
    """Timesteps of `UnCLIPScheduler`: round(i * (T-1) / (n-1)) for i < n, descending; 999 ... 0 for T=1000."""
    _check_steps(num_inference_steps, num_train_timesteps, minimum=2)
    ratio = (num_train_timesteps - 1) / (num_inference_steps - 1)
    return (np.arange(0, num_inference_steps) * ratio).round()[::-1].astype(np.int64)
