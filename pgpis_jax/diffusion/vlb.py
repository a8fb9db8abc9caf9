"""The variational-bound term L_vlb of a model with a learned-range variance (Nichol & Dhariwal 2021, "improved
DDPM"), as PIDM trains it and RePoseDM adds it to L_simple (Eq. 4).

The model outputs [epsilon | v] on the channel axis; v in [-1, 1] interpolates the log variance between the
posterior's (beta~_t, log clipped at t = 0 to beta~_1) and beta_t:
    log sigma^2 = frac log beta_t + (1 - frac) log beta~_t,   frac = (v + 1) / 2.
With the mean frozen (stop-gradient on epsilon, so L_vlb trains only the variance, as improved DDPM's hybrid
loss), x0_hat = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t) (not clipped), mu = c1 x0_hat + c2 x_t, and per example
    t > 0:  mean over dimensions of KL(N(mu~_t, beta~_t) || N(mu, sigma^2)) / ln 2      (bits per dimension)
    t = 0:  mean of -log P(x_0 | mu, sigma) / ln 2, the Gaussian discretised into 256 bins of width 2 / 255 over
            [-1, 1] (edge bins open, at x < -0.999 and x > 0.999), Phi by its tanh approximation, logs of
            probabilities clamped at 1e-12.
PIDM adds it with weight 1 to the per-example mean squared error (loss type MSE: L = L_mse + L_vlb), which is
improved DDPM's L_simple + 0.001 L_vlb with L_vlb summed over T = 1000 steps.

Tables are computed in float64 from the betas and gathered as float32, as improved DDPM does.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

LOG_CLAMP = 1e-12
BIN_HALF_WIDTH = 1.0 / 255.0
EDGE = 0.999


@dataclasses.dataclass(frozen=True, eq=False)
class PosteriorTables:
    """Float64 tables [T] of a beta schedule: betas, alphas_cumprod, alphas_cumprod_prev (1 before t = 0), the
    posterior variance beta~_t = beta_t (1 - a_{t-1}) / (1 - a_t), its log clipped (index 0 takes beta~_1), and
    the posterior mean coefficients of x0 and x_t."""

    betas: np.ndarray
    alphas_cumprod: np.ndarray
    alphas_cumprod_prev: np.ndarray
    posterior_variance: np.ndarray
    posterior_log_variance_clipped: np.ndarray
    posterior_mean_coef_x0: np.ndarray
    posterior_mean_coef_xt: np.ndarray

    @classmethod
    def from_betas(cls, betas) -> "PosteriorTables":
        betas = np.asarray(betas, np.float64)
        if betas.ndim != 1 or len(betas) < 2 or not np.all((betas > 0) & (betas < 1)):
            raise ValueError(f"betas must be 1-D with at least 2 values in (0, 1), got shape {betas.shape}")
        alphas = 1.0 - betas
        alphas_cumprod = np.cumprod(alphas)
        previous = np.append(1.0, alphas_cumprod[:-1])
        variance = betas * (1.0 - previous) / (1.0 - alphas_cumprod)
        return cls(betas=betas, alphas_cumprod=alphas_cumprod, alphas_cumprod_prev=previous,
                   posterior_variance=variance,
                   posterior_log_variance_clipped=np.log(np.append(variance[1], variance[1:])),
                   posterior_mean_coef_x0=betas * np.sqrt(previous) / (1.0 - alphas_cumprod),
                   posterior_mean_coef_xt=(1.0 - previous) * np.sqrt(alphas) / (1.0 - alphas_cumprod))

    @property
    def num_timesteps(self) -> int:
        return int(self.betas.shape[0])

    def at(self, name: str, t, ndim: int):
        """Table `name` at integer timesteps t [B] as float32 [B, 1, ..., 1] (ndim axes in all)."""
        values = jnp.asarray(getattr(self, name), jnp.float32)[t]
        return values.reshape(values.shape + (1,) * (ndim - 1))

    def posterior_mean(self, x0, x_t, t):
        """mu~_t(x_t, x0) = c1 x0 + c2 x_t, float32."""
        return self.at("posterior_mean_coef_x0", t, x_t.ndim) * x0 + self.at("posterior_mean_coef_xt", t, x_t.ndim) * x_t

    def learned_range_log_variance(self, variance_values, t):
        """log sigma^2 from the model's variance channels v in [-1, 1] (frac = (v + 1) / 2), float32."""
        frac = (variance_values.astype(jnp.float32) + 1.0) / 2.0
        ndim = variance_values.ndim
        return frac * jnp.log(self.at("betas", t, ndim)) + (1.0 - frac) * self.at("posterior_log_variance_clipped",
                                                                                     t, ndim)


def normal_kl(mean1, log_variance1, mean2, log_variance2):
    """KL(N(mean1, exp(log_variance1)) || N(mean2, exp(log_variance2))), elementwise, in nats."""
    return 0.5 * (-1.0 + log_variance2 - log_variance1 + jnp.exp(log_variance1 - log_variance2)
                  + jnp.square(mean1 - mean2) * jnp.exp(-log_variance2))


def approx_standard_normal_cdf(x):
    """Phi(x) ~ 0.5 (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))."""
    return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log P(x) elementwise for x in [-1, 1] on 256 levels under N(means, exp(log_scales)^2) discretised into bins
    of half-width 1 / 255, the first and last bins open (see the module docstring), in nats."""
    centered = x - means
    inv_stdv = jnp.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + BIN_HALF_WIDTH))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - BIN_HALF_WIDTH))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, LOG_CLAMP))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, LOG_CLAMP))
    log_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, LOG_CLAMP))
    return jnp.where(x < -EDGE, log_cdf_plus, jnp.where(x > EDGE, log_one_minus_cdf_min, log_delta))


def _per_example_mean(x):
    return jnp.mean(x.reshape(x.shape[0], -1), axis=1)


def vlb_terms(tables: PosteriorTables, epsilon, variance_values, x0, x_t, t, freeze_mean: bool = True):
    """L_vlb per example [B] in bits per dimension (see the module docstring). epsilon, variance_values: the model's
    two output halves [B, ...]; x0 the clean sample in [-1, 1]; x_t the noisy one; t int [B]. freeze_mean: stop
    the gradient through epsilon (improved DDPM's hybrid loss), so only the variance learns from this term."""
    if not (epsilon.shape == variance_values.shape == x0.shape == x_t.shape):
        raise ValueError(f"vlb_terms needs epsilon, variance_values, x0 and x_t of one shape, got {epsilon.shape}, "
                         f"{variance_values.shape}, {x0.shape}, {x_t.shape}")
    x0, x_t = x0.astype(jnp.float32), x_t.astype(jnp.float32)
    epsilon = epsilon.astype(jnp.float32)
    if freeze_mean:
        epsilon = jax.lax.stop_gradient(epsilon)
    ndim = x_t.ndim
    alpha_bar = tables.at("alphas_cumprod", t, ndim)
    x0_hat = (x_t - jnp.sqrt(1.0 - alpha_bar) * epsilon) / jnp.sqrt(alpha_bar)
    model_mean = tables.posterior_mean(x0_hat, x_t, t)
    model_log_variance = tables.learned_range_log_variance(variance_values, t)
    true_mean = tables.posterior_mean(x0, x_t, t)
    true_log_variance = tables.at("posterior_log_variance_clipped", t, ndim)
    kl = _per_example_mean(normal_kl(true_mean, true_log_variance, model_mean, model_log_variance)) / math.log(2.0)
    nll = -_per_example_mean(discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_variance))
    return jnp.where(t == 0, nll / math.log(2.0), kl)
