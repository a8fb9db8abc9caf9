"""The shared diffusion objective (pgpis_jax/methods/common/objective.py) against closed forms: noising and targets
as diffusers' add_noise, the cubic timestep sampler's tail, min-SNR weights, and bad settings named."""

import jax
import ml_collections
import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from configs import common
from pgpis_jax.errors import UserError
from pgpis_jax.methods.common.objective import DiffusionObjective


def _config(prediction_type="epsilon", **diffusion):
    schedule = dict(common.SD_SCHEDULE, prediction_type=prediction_type)
    config = ml_collections.ConfigDict()
    config.diffusion = ml_collections.ConfigDict(dict(
        train_scheduler=common.scheduler_config("DDPMScheduler", **schedule), noise_offset=0.0, **diffusion))
    config.sampling = ml_collections.ConfigDict(dict(
        scheduler=common.scheduler_config("DDIMScheduler", **schedule)))
    return config


def test_training_pair_is_diffusers_add_noise_and_velocity():
    """With the same keys (and no offset) the epsilon objective's target is the noise it drew; x_t and the
    v-prediction target must then be diffusers' add_noise and get_velocity of that noise."""
    x0 = np.random.default_rng(0).normal(size=(4, 8, 8, 3)).astype(np.float32)
    keys = jax.random.split(jax.random.key(0), 4)
    t, x_t, noise = DiffusionObjective(_config("epsilon")).training_pair(keys, x0)
    t_v, x_t_v, velocity = DiffusionObjective(_config("v_prediction")).training_pair(keys, x0)
    np.testing.assert_array_equal(np.asarray(t), np.asarray(t_v))
    reference = DDPMScheduler(**common.SD_SCHEDULE, prediction_type="v_prediction")
    tt, x, eps = (torch.from_numpy(np.array(a)) for a in (t, x0, noise))
    expected_x_t = reference.add_noise(x, eps, tt.long()).numpy()
    np.testing.assert_allclose(np.asarray(x_t), expected_x_t, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(x_t_v), expected_x_t, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(velocity), reference.get_velocity(x, eps, tt.long()).numpy(),
                               rtol=1e-4, atol=1e-4)
    assert abs(float(np.std(np.asarray(noise))) - 1.0) < 0.1 and len(set(np.asarray(t).tolist())) > 1


def test_cubic_timestep_sampler_favours_large_t():
    objective = DiffusionObjective(_config(timestep_sampler="cubic"))
    keys = jax.random.split(jax.random.key(1), 4000)
    t, _, _ = objective.training_pair(keys, np.zeros((4000, 1), np.float32), varying_axes=(0,))
    # P(t >= T/2) = P(1 - u^3 >= 1/2) = 0.5 ** (1/3) = 0.794 for the cubic sampler (0.5 for uniform).
    assert abs(float(np.mean(np.asarray(t) >= 500)) - 0.5 ** (1 / 3)) < 0.03


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_min_snr_weights_and_weighted_loss(prediction_type):
    objective = DiffusionObjective(_config(prediction_type, loss_weighting="min_snr", min_snr_gamma=5.0))
    t = np.array([10, 300, 900])
    alpha = np.asarray(objective.alphas_cumprod, np.float64)[t]
    snr = alpha / (1 - alpha)
    clipped = np.minimum(snr, 5.0)
    expected = {"epsilon": clipped / snr, "sample": clipped, "v_prediction": clipped / (snr + 1)}[prediction_type]
    np.testing.assert_allclose(np.asarray(objective.weights(t)), expected, rtol=1e-5)
    prediction = np.ones((3, 2, 2, 1), np.float32)
    target = np.zeros_like(prediction)
    target[1] = 3.0                                     # squared errors per example: 1, 4, 1
    extra = np.array([0.5, 0.0, 1.0], np.float32)
    loss = float(objective.loss(prediction, target, t, extra=extra))
    np.testing.assert_allclose(loss, np.mean(np.array([1.0, 4.0, 1.0]) * expected + extra), rtol=1e-5)
    assert float(DiffusionObjective(_config(prediction_type)).loss(prediction, target, t)) == pytest.approx(2.0)


def test_unknown_sampler_or_weighting_names_the_key():
    with pytest.raises(UserError, match="config.diffusion.timestep_sampler='logit'"):
        DiffusionObjective(_config(timestep_sampler="logit"))
    with pytest.raises(UserError, match="config.diffusion.loss_weighting='p2'"):
        DiffusionObjective(_config(loss_weighting="p2"))
