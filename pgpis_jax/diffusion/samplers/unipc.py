"""diffusers' `UniPCMultistepScheduler` (Zhao et al. 2023): the UniP predictor and UniC corrector, B(h)
variants bh1 / bh2, orders 1-3, in data (x0) or noise prediction mode. PCDMs stages 2-3 sample with it.

Every UniPC update is linear in the current sample, the previous sample and the stored (converted) model
outputs, with coefficients that depend only on the timesteps. The plan computes those coefficients on
the host in float64 from diffusers' float32 sigma table; the scan only forms the linear combinations.

Where diffusers produces NaN (the last step to sigma = 0 with solver_type bh1 or predict_x0=False, an
inf * 0 in its arithmetic) we use the closed-form limit of the same expression, which is finite. A higher
than first-order step onto sigma = 0 is undefined (diffusers fails there too) and is an error.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from pgpis_jax.diffusion import spacing
from pgpis_jax.diffusion.forward import epsilon_from_prediction, x0_from_prediction
from pgpis_jax.diffusion.samplers.base import ModelFn, Plan, Sampler, check_choice

SOLVER_TYPES = ("bh1", "bh2")
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")


@dataclasses.dataclass(frozen=True)
class _LogSnrGrid:
    """alpha_t, sigma_t and lambda_t = log(alpha_t / sigma_t) at the sigma grid points (float64)."""

    alpha: np.ndarray
    sigma: np.ndarray
    lam: np.ndarray

    @classmethod
    def from_sigmas(cls, sigmas: np.ndarray) -> "_LogSnrGrid":
        sigmas = sigmas.astype(np.float64)
        alpha = 1.0 / np.sqrt(sigmas**2 + 1.0)
        sigma = sigmas * alpha
        with np.errstate(divide="ignore"):
            lam = np.log(alpha) - np.log(sigma)
        return cls(alpha, sigma, lam)


def _update_coefficients(grid: _LogSnrGrid, target: int, base: int, order: int, predict_x0: bool,
                         solver_type: str, corrector: bool) -> Tuple[float, np.ndarray, float]:
    """Coefficients of one UniP (or UniC) update from grid point `base` to `target`.

    The update is  coef_x * x + sum_k coef_m[k] * m_k (+ coef_new * m_target for the corrector), where m_0
    is the converted model output at `base` and m_k the one at `base - k`, k < order.
    """
    alpha, sigma, lam = grid.alpha, grid.sigma, grid.lam
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        h = lam[target] - lam[base]
        rks = np.array([(lam[base - k] - lam[base]) / h for k in range(1, order)] + [1.0])
        hh = -h if predict_x0 else h
        b_h = hh if solver_type == "bh1" else np.expm1(hh)
        h_phi_k = np.expm1(hh) / hh - 1.0
        factorial = 1
        rows, rhs = [], []
        for i in range(1, order + 1):
            rows.append(rks ** (i - 1))
            rhs.append(h_phi_k * factorial / b_h)
            factorial *= i + 1
            h_phi_k = h_phi_k / hh - 1.0 / factorial
        matrix, rhs = np.stack(rows), np.array(rhs)
        if predict_x0:
            coef_x = sigma[target] / sigma[base]
            lead = alpha[target]
            lead_phi_1 = sigma[target] * alpha[base] / sigma[base] - alpha[target]  # alpha_t * expm1(-h)
        else:
            coef_x = alpha[target] / alpha[base]
            lead = sigma[target]
            lead_phi_1 = alpha[target] * sigma[base] / alpha[base] - sigma[target]  # sigma_t * expm1(h)
        if corrector:
            rhos = np.array([0.5]) if order == 1 else np.linalg.solve(matrix, rhs)
        elif order == 1:
            rhos = np.zeros(0)
        else:
            rhos = np.array([0.5]) if order == 2 else np.linalg.solve(matrix[:-1, :-1], rhs[:-1])
        history_rhos = rhos[: order - 1]
        coef_m = np.zeros(order)
        coef_m[1:] = -lead * b_h * history_rhos / rks[:-1]
        coef_m[0] = -lead_phi_1 - coef_m[1:].sum()
        coef_new = 0.0
        if corrector:
            coef_new = -lead * b_h * rhos[-1]
            coef_m[0] -= coef_new
    return float(coef_x), coef_m, float(coef_new)


@dataclasses.dataclass(frozen=True, eq=False)
class UniPCSampler(Sampler):
    """UniPC multistep sampling as diffusers' `UniPCMultistepScheduler` runs it (default, VP sigmas).

    solver_order: 1-3; solver_type: bh1 / bh2; predict_x0: work on data predictions (else noise);
    lower_order_final: lower the order in the last steps; disable_corrector: step indices whose following
    corrector is skipped; final_sigmas_type: `zero` (end at sigma 0) or `sigma_min`.
    """

    solver_order: int = 2
    solver_type: str = "bh2"
    predict_x0: bool = True
    lower_order_final: bool = True
    disable_corrector: Sequence[int] = ()
    timestep_spacing: str = "linspace"
    steps_offset: int = 0
    final_sigmas_type: str = "zero"

    def __post_init__(self):
        super().__post_init__()
        check_choice("UniPCSampler", "solver_order", self.solver_order, (1, 2, 3))
        check_choice("UniPCSampler", "solver_type", self.solver_type, SOLVER_TYPES)
        check_choice("UniPCSampler", "final_sigmas_type", self.final_sigmas_type, FINAL_SIGMAS_TYPES)
        check_choice("UniPCSampler", "timestep_spacing", self.timestep_spacing, spacing.TIMESTEP_SPACINGS)

    def is_stochastic(self) -> bool:
        return False

    def timesteps(self, num_inference_steps: int) -> np.ndarray:
        return spacing.unipc_timesteps(self.timestep_spacing, self.num_train_timesteps, num_inference_steps,
                                       self.steps_offset)

    def sigmas(self, num_inference_steps: int) -> np.ndarray:
        """float32 sigma = sqrt((1 - alpha_bar) / alpha_bar) at each timestep, then the final sigma."""
        alphas_cumprod = self.schedule.alphas_cumprod
        if alphas_cumprod[-1] == 0:  # zero terminal SNR: diffusers moves it to 2^-24 so that sigma stays finite
            alphas_cumprod = np.append(alphas_cumprod[:-1], np.float32(2.0**-24))
        table = ((1.0 - alphas_cumprod) / alphas_cumprod) ** 0.5
        last = table[0] if self.final_sigmas_type == "sigma_min" else 0.0
        return np.append(table[self.timesteps(num_inference_steps)], last).astype(np.float32)

    def orders(self, num_inference_steps: int) -> np.ndarray:
        """The predictor order of each step: warm-up from 1, and lowered at the end with lower_order_final."""
        steps = np.arange(num_inference_steps)
        orders = np.full(num_inference_steps, self.solver_order)
        if self.lower_order_final:
            orders = np.minimum(orders, num_inference_steps - steps)
        return np.minimum(orders, steps + 1)

    def plan(self, num_inference_steps: int) -> Plan:
        timesteps = self.timesteps(num_inference_steps)
        num_steps = len(timesteps)
        grid = _LogSnrGrid.from_sigmas(self.sigmas(num_inference_steps))
        orders = self.orders(num_steps)
        width = self.solver_order
        plan = {
            "timestep": timesteps.astype(np.int32),
            "signal": grid.alpha[:num_steps],
            "sigma": grid.sigma[:num_steps],
            "predictor_x": np.zeros(num_steps),
            "predictor_history": np.zeros((num_steps, width)),
            "use_corrector": np.zeros(num_steps, bool),
            "corrector_last": np.zeros(num_steps),
            "corrector_history": np.zeros((num_steps, width)),
            "corrector_new": np.zeros(num_steps),
        }
        for i in range(num_steps):
            if i > 0 and (i - 1) not in self.disable_corrector:
                coef_x, coef_m, coef_new = _update_coefficients(
                    grid, i, i - 1, int(orders[i - 1]), self.predict_x0, self.solver_type, corrector=True)
                plan["use_corrector"][i] = True
                plan["corrector_last"][i] = coef_x
                plan["corrector_history"][i, : len(coef_m)] = coef_m
                plan["corrector_new"][i] = coef_new
            if grid.sigma[i + 1] == 0 and orders[i] > 1:
                raise ValueError(
                    f"UniPC step {i} onto sigma 0 with order {orders[i]} is undefined (diffusers fails there "
                    "too): set lower_order_final=True or final_sigmas_type='sigma_min'")
            coef_x, coef_m, _ = _update_coefficients(
                grid, i + 1, i, int(orders[i]), self.predict_x0, self.solver_type, corrector=False)
            plan["predictor_x"][i] = coef_x
            plan["predictor_history"][i, : len(coef_m)] = coef_m
        for name, values in plan.items():
            if values.dtype == np.float64:
                if not np.all(np.isfinite(values)):
                    raise ValueError(f"UniPC coefficients {name!r} are not finite for these settings")
                plan[name] = values.astype(np.float32)
        return plan

    def init_state(self, x):
        history = jnp.zeros((self.solver_order,) + x.shape, x.dtype)
        return x, jnp.zeros_like(x), history

    def final_sample(self, state):
        return state[0]

    def step(self, model_fn: ModelFn, state, c: Dict[str, jax.Array], noise: Optional[jax.Array]):
        x, last_sample, history = state
        output = model_fn(x, c["timestep"]).astype(jnp.float32)
        convert = x0_from_prediction if self.predict_x0 else epsilon_from_prediction
        converted = convert(self.prediction_type, output, x, c["signal"], c["sigma"])
        corrected = (c["corrector_last"] * last_sample + jnp.tensordot(c["corrector_history"], history, axes=1)
                     + c["corrector_new"] * converted)
        x = jnp.where(c["use_corrector"], corrected, x)
        history = jnp.concatenate([converted[None], history[:-1]], axis=0)
        x_next = c["predictor_x"] * x + jnp.tensordot(c["predictor_history"], history, axes=1)
        return x_next, x, history
