"""Samplers driven by the exact denoiser of a Gaussian mixture must reproduce that mixture: an
end-to-end check of the sampling maths that does not depend on diffusers."""

import jax
import numpy as np
import pytest

from pgpis_jax.diffusion import from_diffusers_config
from pgpis_jax.toy_mixture import GaussianMixture, exact_model_fn, mixture_statistics

ANGLES = np.pi / 2 * np.arange(4)
MIXTURE = GaussianMixture((3.0 * np.stack([np.cos(ANGLES), np.sin(ANGLES)], 1)).astype(np.float32),
                          np.array([0.4, 0.3, 0.2, 0.1], np.float32), 0.5)


def test_posterior_mean_matches_bayes_rule_in_float64():
    x_t = np.random.default_rng(0).standard_normal((64, 2)) * 2.0
    alpha_bar = 0.3
    signal, variance = np.sqrt(alpha_bar), alpha_bar * MIXTURE.std**2 + 1 - alpha_bar
    means = MIXTURE.means.astype(np.float64)
    log_likelihood = -0.5 * ((x_t[:, None] - signal * means[None]) ** 2).sum(-1) / variance
    joint = MIXTURE.weights[None] * np.exp(log_likelihood)
    resp = joint / joint.sum(1, keepdims=True)
    per_mode = means[None] + signal * MIXTURE.std**2 / variance * (x_t[:, None] - signal * means[None])
    expected = (resp[..., None] * per_mode).sum(1)
    actual = MIXTURE.posterior_mean(x_t.astype(np.float32), np.float32(alpha_bar))
    np.testing.assert_allclose(actual, expected, atol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_exact_model_outputs_are_consistent_parameterisations(prediction_type):
    schedule = from_diffusers_config({"_class_name": "DDPMScheduler"}).schedule
    x_t = jax.random.normal(jax.random.key(0), (16, 2))
    t = 400
    a = float(schedule.alphas_cumprod[t])
    x0 = np.asarray(MIXTURE.posterior_mean(x_t, a))
    eps = (np.asarray(x_t) - np.sqrt(a) * x0) / np.sqrt(1 - a)
    expected = {"epsilon": eps, "sample": x0, "v_prediction": np.sqrt(a) * eps - np.sqrt(1 - a) * x0}
    actual = exact_model_fn(MIXTURE, schedule.alphas_cumprod, prediction_type)(x_t, t)
    np.testing.assert_allclose(actual, expected[prediction_type], atol=1e-4)


@pytest.mark.parametrize("config,steps", [
    ({"_class_name": "DDPMScheduler", "clip_sample": False}, 1000),
    ({"_class_name": "DDIMScheduler", "clip_sample": False, "timestep_spacing": "trailing"}, 250),
    ({"_class_name": "UniPCMultistepScheduler", "timestep_spacing": "trailing"}, 50),
    ({"_class_name": "UniPCMultistepScheduler", "timestep_spacing": "trailing", "prediction_type": "v_prediction",
      "solver_order": 3}, 50),
    ({"_class_name": "UnCLIPScheduler", "prediction_type": "sample", "clip_sample": False}, 200),
])
def test_samples_follow_the_mixture(config, steps):
    sampler = from_diffusers_config(config)
    model_fn = exact_model_fn(MIXTURE, sampler.schedule.alphas_cumprod, sampler.prediction_type)
    x_T = jax.random.normal(jax.random.key(0), (4000, 2))
    samples = jax.jit(lambda x: sampler.sample(model_fn, x, jax.random.key(1), steps))(x_T)
    prior = mixture_statistics(MIXTURE, x_T)
    stats = mixture_statistics(MIXTURE, samples)
    assert prior["mode_tv_distance"] > 0.15
    assert stats["mode_tv_distance"] < 0.035
    assert 0.95 < stats["std_ratio"] < 1.05
