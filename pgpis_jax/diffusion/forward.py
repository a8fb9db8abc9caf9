"""The forward (noising) process and what a network is trained to predict.

All functions are pure JAX and jittable. `alphas_cumprod` is the schedule's alpha_bar table (shape [T]);
`t` holds integer timesteps, one per batch element (shape [B]). Scheduler arithmetic runs in float32.

Parameterisations (x_t = sqrt(a) x0 + sqrt(1 - a) eps, a = alpha_bar_t):
  epsilon: eps;  sample: x0;  v_prediction: v = sqrt(a) eps - sqrt(1 - a) x0.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


def _check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type={prediction_type!r} is not supported; expected one of {PREDICTION_TYPES}")


def _signal_and_noise_scales(alphas_cumprod, t, ndim: int):
    """sqrt(alpha_bar_t) and sqrt(1 - alpha_bar_t), shaped [B, 1, ..., 1] to broadcast over ndim dims."""
    abar = jnp.asarray(alphas_cumprod, jnp.float32)[jnp.asarray(t)]
    abar = abar.reshape(abar.shape + (1,) * (ndim - abar.ndim))
    return jnp.sqrt(abar), jnp.sqrt(1.0 - abar)


def add_noise(alphas_cumprod, x0, noise, t):
    """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise (diffusers `add_noise`)."""
    signal, sigma = _signal_and_noise_scales(alphas_cumprod, t, x0.ndim)
    return signal * x0 + sigma * noise


def velocity(alphas_cumprod, x0, noise, t):
    """v = sqrt(alpha_bar_t) noise - sqrt(1 - alpha_bar_t) x0 (diffusers `get_velocity`)."""
    signal, sigma = _signal_and_noise_scales(alphas_cumprod, t, x0.ndim)
    return signal * noise - sigma * x0


def training_target(prediction_type: str, alphas_cumprod, x0, noise, t):
    """What a network of `prediction_type` regresses onto for the pair (x0, noise) at timesteps t."""
    _check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return x0
    return velocity(alphas_cumprod, x0, noise, t)


def x0_from_prediction(prediction_type: str, model_output, x_t, signal, sigma):
    """The clean sample implied by `model_output` at x_t, given signal = sqrt(alpha_bar_t) and
    sigma = sqrt(1 - alpha_bar_t) already broadcastable against x_t."""
    _check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return (x_t - sigma * model_output) / signal
    if prediction_type == "sample":
        return model_output
    return signal * x_t - sigma * model_output


def epsilon_from_prediction(prediction_type: str, model_output, x_t, signal, sigma):
    """The noise implied by `model_output` at x_t, scales as in `x0_from_prediction`."""
    _check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "sample":
        return (x_t - signal * model_output) / sigma
    return signal * model_output + sigma * x_t


def predict_x0(prediction_type: str, alphas_cumprod, model_output, x_t, t):
    """The clean sample implied by `model_output` at (x_t, t)."""
    signal, sigma = _signal_and_noise_scales(alphas_cumprod, t, x_t.ndim)
    return x0_from_prediction(prediction_type, model_output, x_t, signal, sigma)


def predict_epsilon(prediction_type: str, alphas_cumprod, model_output, x_t, t):
    """The noise implied by `model_output` at (x_t, t)."""
    signal, sigma = _signal_and_noise_scales(alphas_cumprod, t, x_t.ndim)
    return epsilon_from_prediction(prediction_type, model_output, x_t, signal, sigma)


def convert_prediction(from_type: str, to_type: str, alphas_cumprod, model_output, x_t, t):
    """Re-expresses a prediction of `from_type` as one of `to_type` (e.g. an eps output as v)."""
    x0 = predict_x0(from_type, alphas_cumprod, model_output, x_t, t)
    eps = predict_epsilon(from_type, alphas_cumprod, model_output, x_t, t)
    _check_prediction_type(to_type)
    if to_type == "epsilon":
        return eps
    if to_type == "sample":
        return x0
    signal, sigma = _signal_and_noise_scales(alphas_cumprod, t, x_t.ndim)
    return signal * eps - sigma * x0


def offset_noise(rng, shape: Sequence[int], noise_offset: float, varying_axes: Sequence[int] = (0, -1)):
    """Standard normal noise plus `noise_offset` times a normal draw that is constant along every axis not
    in `varying_axes`.

    For NHWC latents the default (batch, channel) gives diffusers' offset noise: one offset per sample and
    channel, shared over H and W. PCDMs' prior, with embeddings of shape [B, 1, D], uses varying_axes=(0,):
    one scalar per sample.
    """
    shape = tuple(shape)
    axes = {a % len(shape) for a in varying_axes}
    base_rng, offset_rng = jax.random.split(rng)
    noise = jax.random.normal(base_rng, shape, jnp.float32)
    offset_shape = tuple(n if i in axes else 1 for i, n in enumerate(shape))
    return noise + noise_offset * jax.random.normal(offset_rng, offset_shape, jnp.float32)


def uniform_timesteps(rng, batch_size: int, num_train_timesteps: int):
    """t ~ Uniform{0, ..., T-1}, int32 of shape [batch_size]."""
    return jax.random.randint(rng, (batch_size,), 0, num_train_timesteps, dtype=jnp.int32)


def cubic_timesteps(rng, batch_size: int, num_train_timesteps: int):
    """CFLD's cubic sampler t = floor((1 - u^3) T), u ~ U[0, 1), clipped to [0, T-1]; favours large t
    (P(t >= T/2) = 0.5^(1/3) ~ 0.79)."""
    u = jax.random.uniform(rng, (batch_size,), jnp.float32)
    return cubic_timesteps_from_uniform(u, num_train_timesteps)


def cubic_timesteps_from_uniform(u, num_train_timesteps: int):
    """The cubic map applied to given uniforms u in [0, 1)."""
    t = jnp.floor((1.0 - u**3) * num_train_timesteps).astype(jnp.int32)
    return jnp.clip(t, 0, num_train_timesteps - 1)


TIMESTEP_SAMPLERS = {"uniform": uniform_timesteps, "cubic": cubic_timesteps}


def sample_timesteps(kind: str, rng, batch_size: int, num_train_timesteps: int):
    """Draws training timesteps with the sampler named `kind` (`uniform` or `cubic`)."""
    if kind not in TIMESTEP_SAMPLERS:
        raise ValueError(f"timestep sampler {kind!r} is not supported; expected one of {sorted(TIMESTEP_SAMPLERS)}")
    return TIMESTEP_SAMPLERS[kind](rng, batch_size, num_train_timesteps)
