"""Noise schedules: beta tables and the cumulative products derived from them.

Tables are NumPy float32, computed the way diffusers' PyTorch schedulers compute them (float32 betas and
alphas; the cumulative product accumulated in float64 and rounded to float32, as torch.cumprod does on
CPU), so that they equal diffusers' tables. They are host-side constants; samplers and losses turn the slices they need into jnp arrays.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import numpy as np

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """Betas of the Glide/iDDPM cosine schedule, alpha_bar(t) = cos^2((t + 0.008) / 1.008 * pi / 2).

    beta_i = min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta), evaluated in float64.
    """

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    steps = num_train_timesteps
    return np.array(
        [min(1.0 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), max_beta) for i in range(steps)],
        dtype=np.float32,
    )


def beta_schedule(
    name: str,
    num_train_timesteps: int,
    beta_start: float = 0.0001,
    beta_end: float = 0.02,
) -> np.ndarray:
    """Betas (float32, shape [num_train_timesteps]) of a named schedule.

    `linear`: linspace(beta_start, beta_end); `scaled_linear`: linspace(sqrt(beta_start), sqrt(beta_end))^2
    (Stable Diffusion); `squaredcos_cap_v2`: the cosine schedule (beta_start/beta_end unused).
    """
    if name == "linear":
        return np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float32)
    if name == "scaled_linear":
        root = np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=np.float32)
        return root * root
    if name == "squaredcos_cap_v2":
        return cosine_betas(num_train_timesteps)
    raise ValueError(f"beta_schedule={name!r} is not supported; expected one of {BETA_SCHEDULES}")


def cumulative_product(values: np.ndarray) -> np.ndarray:
    """Cumulative product accumulated in float64, rounded to float32 (torch.cumprod's result on CPU)."""
    return np.cumprod(np.asarray(values, np.float32).astype(np.float64)).astype(np.float32)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Rescales betas so that the last timestep has zero SNR (Lin et al. 2023, Algorithm 1)."""
    sqrt_abar = np.sqrt(cumulative_product(1.0 - betas))
    first, last = sqrt_abar[0], sqrt_abar[-1]
    sqrt_abar = (sqrt_abar - last) * (first / (first - last))
    abar = sqrt_abar * sqrt_abar
    alphas = np.concatenate([abar[:1], abar[1:] / abar[:-1]])
    return (1.0 - alphas).astype(np.float32)


@dataclasses.dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """A discrete-time variance-preserving schedule.

    betas, alphas (= 1 - betas) and alphas_cumprod (alpha_bar_t) are float32 arrays of shape [T].
    """

    betas: np.ndarray
    alphas: np.ndarray
    alphas_cumprod: np.ndarray

    @property
    def num_train_timesteps(self) -> int:
        return int(self.betas.shape[0])

    def __repr__(self) -> str:
        return (f"NoiseSchedule(num_train_timesteps={self.num_train_timesteps}, "
                f"betas=[{self.betas[0]:.6g} .. {self.betas[-1]:.6g}])")

    @classmethod
    def from_betas(cls, betas: np.ndarray) -> "NoiseSchedule":
        betas = np.asarray(betas, dtype=np.float32)
        if betas.ndim != 1 or not np.all((betas > 0) & (betas <= 1)):
            raise ValueError(f"betas must be a 1-D array with values in (0, 1], got shape {betas.shape}")
        alphas = (1.0 - betas).astype(np.float32)
        return cls(betas=betas, alphas=alphas, alphas_cumprod=cumulative_product(alphas))

    @classmethod
    def create(
        cls,
        beta_schedule_name: str = "linear",
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        trained_betas: Optional[Sequence[float]] = None,
        rescale_betas_zero_snr: bool = False,
    ) -> "NoiseSchedule":
        """The schedule diffusers builds from these scheduler-config fields."""
        if trained_betas is not None:
            betas = np.asarray(trained_betas, dtype=np.float32)
        else:
            betas = beta_schedule(beta_schedule_name, num_train_timesteps, beta_start, beta_end)
        if rescale_betas_zero_snr:
            betas = rescale_zero_terminal_snr(betas)
        return cls.from_betas(betas)
