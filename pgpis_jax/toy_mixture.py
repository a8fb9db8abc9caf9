"""A 2-D Gaussian mixture whose exact denoiser is known in closed form: a network-free model for checking
that the samplers really sample the data distribution, and the subject of the current demo.

Data: x0 ~ sum_k w_k N(mu_k, s^2 I). At noise level a = alpha_bar_t, x_t | k ~ N(sqrt(a) mu_k, v_t I) with
v_t = a s^2 + 1 - a, so E[x0 | x_t] = sum_k r_k(x_t) (mu_k + sqrt(a) s^2 / v_t (x_t - sqrt(a) mu_k)), with r_k
the posterior responsibilities. That expectation is the ideal network output.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np



@dataclasses.dataclass(frozen=True, eq=False)
class GaussianMixture:
    """means [K, D], weights [K] (summing to 1), one isotropic std for all components."""

    means: np.ndarray
    weights: np.ndarray
    std: float

    @classmethod
    def ring(cls, num_modes: int = 8, radius: float = 3.0, std: float = 0.25) -> "GaussianMixture":
        """num_modes equally weighted modes on a circle."""
        angles = 2 * np.pi * np.arange(num_modes) / num_modes
        means = radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)
        return cls(means.astype(np.float32), np.full(num_modes, 1.0 / num_modes, np.float32), std)

    def sample(self, rng, num: int) -> jax.Array:
        """num exact draws, [num, D]."""
        mode_rng, noise_rng = jax.random.split(rng)
        modes = jax.random.choice(mode_rng, len(self.weights), (num,), p=jnp.asarray(self.weights))
        return jnp.asarray(self.means)[modes] + self.std * jax.random.normal(noise_rng, (num, self.means.shape[1]))

    def posterior_mean(self, x_t: jax.Array, alpha_bar: jax.Array) -> jax.Array:
        """E[x0 | x_t] at noise level alpha_bar (scalar), x_t [N, D]."""
        means = jnp.asarray(self.means)
        signal = jnp.sqrt(alpha_bar)
        variance = alpha_bar * self.std**2 + 1.0 - alpha_bar
        offsets = x_t[:, None, :] - signal * means[None]  # [N, K, D]
        log_resp = jnp.log(jnp.asarray(self.weights)) - 0.5 * jnp.sum(offsets**2, -1) / variance
        resp = jax.nn.softmax(log_resp, axis=-1)
        component_means = means[None] + (signal * self.std**2 / variance) * offsets
        return jnp.einsum("nk,nkd->nd", resp, component_means)

    def nearest_mode(self, x: jax.Array) -> jax.Array:
        """Index of the closest mean for each row of x [N, D]."""
        return jnp.argmin(jnp.sum((x[:, None, :] - jnp.asarray(self.means)[None]) ** 2, -1), axis=-1)


def exact_model_fn(mixture: GaussianMixture, alphas_cumprod: np.ndarray, prediction_type: str):
    """model_fn(x_t, t) returning the ideal network output in `prediction_type` (epsilon, sample or
    v_prediction) for the mixture under the schedule `alphas_cumprod`."""
    table = jnp.asarray(alphas_cumprod, jnp.float32)

    def model_fn(x_t, t):
        alpha_bar = table[t]
        signal, sigma = jnp.sqrt(alpha_bar), jnp.sqrt(1.0 - alpha_bar)
        x0 = mixture.posterior_mean(x_t, alpha_bar)
        eps = (x_t - signal * x0) / sigma
        return {"epsilon": eps, "sample": x0, "v_prediction": signal * eps - sigma * x0}[prediction_type]

    return model_fn


def mixture_statistics(mixture: GaussianMixture, samples: jax.Array) -> dict:
    """How well samples [N, D] match the mixture: the total-variation distance between the mode
    frequencies and the weights, and the mean per-axis std of samples around their nearest mode
    relative to the true std (1 is ideal)."""
    modes = np.asarray(mixture.nearest_mode(samples))
    frequencies = np.bincount(modes, minlength=len(mixture.weights)) / len(modes)
    residuals = np.asarray(samples) - mixture.means[modes]
    return {
        "mode_tv_distance": float(0.5 * np.abs(frequencies - mixture.weights).sum()),
        "std_ratio": float(residuals.std() / mixture.std),
    }
