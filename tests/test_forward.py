"""Forward noising, training targets, parameterisation conversions and training-time samplers."""

import itertools

import jax
import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from pgpis_jax.diffusion import forward

PREDICTIONS = forward.PREDICTION_TYPES
SCHEDULER = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
ABAR = SCHEDULER.alphas_cumprod.numpy()
T_VEC = np.array([0, 1, 250, 500, 998, 999])
SHAPES = [(len(T_VEC), 5, 4, 3), (len(T_VEC), 1, 16), (len(T_VEC), 7)]


def _pair(shape, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(shape), rng.standard_normal(shape)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_add_noise_and_velocity_match_diffusers(shape):
    x0, eps = (a.astype(np.float32) for a in _pair(shape))
    t = torch.from_numpy(T_VEC)
    expected_xt = SCHEDULER.add_noise(torch.from_numpy(x0), torch.from_numpy(eps), t).numpy()
    expected_v = SCHEDULER.get_velocity(torch.from_numpy(x0), torch.from_numpy(eps), t).numpy()
    np.testing.assert_allclose(forward.add_noise(ABAR, x0, eps, T_VEC), expected_xt, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(forward.velocity(ABAR, x0, eps, T_VEC), expected_v, rtol=1e-6, atol=1e-6)


def _closed_forms(shape):
    """x0, eps, x_t and the target of every prediction type, in float64."""
    x0, eps = _pair(shape, seed=1)
    a = ABAR.astype(np.float64)[T_VEC].reshape((-1,) + (1,) * (len(shape) - 1))
    x_t = np.sqrt(a) * x0 + np.sqrt(1 - a) * eps
    targets = {"epsilon": eps, "sample": x0, "v_prediction": np.sqrt(a) * eps - np.sqrt(1 - a) * x0}
    return x_t, targets


@pytest.mark.parametrize("shape", SHAPES[:2], ids=str)
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_targets_and_recovery_closed_form(prediction_type, shape):
    x_t, targets = _closed_forms(shape)
    x0, eps = targets["sample"], targets["epsilon"]
    f32 = {k: v.astype(np.float32) for k, v in targets.items()}
    target = forward.training_target(prediction_type, ABAR, f32["sample"], f32["epsilon"], T_VEC)
    np.testing.assert_allclose(target, targets[prediction_type], atol=1e-5)
    x_t32, out = x_t.astype(np.float32), f32[prediction_type]
    np.testing.assert_allclose(forward.predict_x0(prediction_type, ABAR, out, x_t32, T_VEC), x0, atol=1e-5)
    np.testing.assert_allclose(forward.predict_epsilon(prediction_type, ABAR, out, x_t32, T_VEC), eps, atol=1e-5)


@pytest.mark.parametrize("from_type, to_type", list(itertools.product(PREDICTIONS, PREDICTIONS)))
def test_convert_prediction_closed_form(from_type, to_type):
    x_t, targets = _closed_forms(SHAPES[0])
    converted = forward.convert_prediction(from_type, to_type, ABAR, targets[from_type].astype(np.float32),
                                           x_t.astype(np.float32), T_VEC)
    np.testing.assert_allclose(converted, targets[to_type], atol=1e-5)


def test_bad_prediction_type_raises():
    x = np.zeros((2, 3), np.float32)
    t = np.array([0, 1])
    calls = [
        lambda: forward.training_target("x_start", ABAR, x, x, t),
        lambda: forward.predict_x0("x_start", ABAR, x, x, t),
        lambda: forward.predict_epsilon("x_start", ABAR, x, x, t),
        lambda: forward.convert_prediction("x_start", "epsilon", ABAR, x, x, t),
        lambda: forward.convert_prediction("epsilon", "x_start", ABAR, x, x, t),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="x_start"):
            call()


def test_offset_noise_structure():
    rng = jax.random.PRNGKey(3)
    shape = (4, 5, 6, 3)
    diff = np.asarray(forward.offset_noise(rng, shape, 10.0)) - np.asarray(forward.offset_noise(rng, shape, 0.0))
    np.testing.assert_allclose(diff, np.broadcast_to(diff[:, :1, :1, :], shape), atol=1e-4)  # constant over H, W
    per_sample_channel = diff[:, 0, 0, :]
    assert np.ptp(per_sample_channel, axis=0).min() > 1.0  # varies over the batch
    assert np.ptp(per_sample_channel, axis=1).min() > 1.0  # and over channels

    shape = (6, 1, 8)
    diff = (np.asarray(forward.offset_noise(rng, shape, 10.0, varying_axes=(0,)))
            - np.asarray(forward.offset_noise(rng, shape, 0.0, varying_axes=(0,))))
    np.testing.assert_allclose(diff, np.broadcast_to(diff[:, :, :1], shape), atol=1e-4)  # one scalar per sample
    assert np.ptp(diff[:, 0, 0]) > 1.0


def test_offset_noise_statistics():
    offset = 1.0
    x = np.asarray(forward.offset_noise(jax.random.PRNGKey(4), (20000, 2, 2, 3), offset), np.float64)
    np.testing.assert_allclose(x.std(axis=(0, 1, 2)), np.sqrt(1 + offset**2), rtol=0.03)
    np.testing.assert_allclose(x.mean(axis=(0, 1, 2)), 0.0, atol=0.05)
    # Two pixels of one sample and channel share the offset (covariance offset^2); channels do not.
    np.testing.assert_allclose((x[:, 0, 0] * x[:, 1, 1]).mean(axis=0), offset**2, atol=0.1)
    np.testing.assert_allclose((x[:, 0, 0, 0] * x[:, 0, 0, 1]).mean(), 0.0, atol=0.1)


def test_cubic_timesteps_from_uniform_hand_values():
    u = np.array([0.0, 0.25, 0.5, 0.75, 0.9, 0.9999999], np.float32)
    expected = [999, 984, 875, 578, 271, 0]  # floor((1 - u^3) * 1000), clipped to 999
    np.testing.assert_array_equal(forward.cubic_timesteps_from_uniform(u, 1000), expected)


def test_cubic_timesteps_from_uniform_random():
    u = np.random.default_rng(5).uniform(size=5000).astype(np.float32)
    reference = np.floor((1 - u.astype(np.float64) ** 3) * 1000)
    t = np.asarray(forward.cubic_timesteps_from_uniform(u, 1000))
    assert t.min() >= 0 and t.max() <= 999
    clear = np.abs(reference - np.round(reference)) > 1e-3  # away from float32 ties at integers
    np.testing.assert_array_equal(t[clear], np.clip(reference[clear], 0, 999))


@pytest.mark.parametrize("sampler", [forward.cubic_timesteps,
                                     lambda *a: forward.sample_timesteps("cubic", *a)], ids=["direct", "by_name"])
def test_cubic_timesteps_distribution(sampler):
    t = np.asarray(sampler(jax.random.PRNGKey(6), 20000, 1000))
    assert t.shape == (20000,) and t.min() >= 0 and t.max() <= 999
    assert abs(np.mean(t >= 500) - 0.5 ** (1 / 3)) < 0.02  # P(1 - u^3 >= 0.5) = P(u <= 0.5^(1/3))
    assert abs(np.mean(t < 100) - (1 - 0.9 ** (1 / 3))) < 0.01  # P(1 - u^3 < 0.1) = 1 - 0.9^(1/3) ~ 0.035


@pytest.mark.parametrize("sampler", [forward.uniform_timesteps,
                                     lambda *a: forward.sample_timesteps("uniform", *a)], ids=["direct", "by_name"])
def test_uniform_timesteps_distribution(sampler):
    t = np.asarray(sampler(jax.random.PRNGKey(7), 20000, 1000))
    assert t.shape == (20000,) and t.min() >= 0 and t.max() <= 999
    assert abs(t.mean() - 999 / 2) < 10
    assert abs(np.mean(t >= 500) - 0.5) < 0.02
    small = np.asarray(sampler(jax.random.PRNGKey(8), 2000, 10))
    assert set(small.tolist()) == set(range(10))  # every value in [0, T) occurs, none outside


def test_unknown_timestep_sampler_raises():
    with pytest.raises(ValueError, match="nope"):
        forward.sample_timesteps("nope", jax.random.PRNGKey(0), 4, 1000)
