"""Whole sampling trajectories of the JAX samplers against diffusers' PyTorch schedulers.

Each case builds both from the same scheduler config (ours through `from_diffusers_config`), runs 20 or 50
steps of the same deterministic model from the same x_T, with the same per-step noise where the sampler is
stochastic, and requires a relative error of at most 1e-5 (fp32).
"""

import functools

import jax
import numpy as np
import pytest

import jax.numpy as jnp
from pgpis_jax.diffusion import from_diffusers_config
from tests.diffusers_reference import model_output, relative_error, run_diffusers

SD_SCHEDULE = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
               "num_train_timesteps": 1000}
SPACINGS = ("linspace", "leading", "trailing")
PREDICTIONS = ("epsilon", "sample", "v_prediction")
STEPS = (20, 50)
TOLERANCE = 1e-5


def _case(class_name, steps, shape=(2, 4, 4, 3), variance=None, options=None, **config):
    return pytest.param(
        {"_class_name": class_name, **config}, steps, shape, variance, options or {},
        id="-".join([class_name.replace("Scheduler", "").replace("Multistep", ""), str(steps)]
                    + [f"{k}={v}" for k, v in sorted(config.items()) if k not in SD_SCHEDULE]
                    + [f"{k}={v}" for k, v in sorted((options or {}).items())]))


def _cases():
    for steps in STEPS:
        for spacing in SPACINGS:
            for prediction in PREDICTIONS:
                common = dict(SD_SCHEDULE, timestep_spacing=spacing, prediction_type=prediction, clip_sample=False)
                yield _case("DDPMScheduler", steps, **common)
                yield _case("DDIMScheduler", steps, **common)
                yield _case("UniPCMultistepScheduler", steps, **{k: v for k, v in common.items()
                                                                  if k != "clip_sample"})
        for variance in ("fixed_small_log", "fixed_large", "learned", "learned_range"):
            yield _case("DDPMScheduler", steps, variance=variance if variance.startswith("learned") else None,
                        variance_type=variance, **SD_SCHEDULE)
        yield _case("DDPMScheduler", steps, beta_schedule="squaredcos_cap_v2", prediction_type="sample",
                    clip_sample=True, clip_sample_range=2.0)
        yield _case("DDPMScheduler", steps, beta_schedule="linear", steps_offset=1)
        yield _case("DDIMScheduler", steps, options={"eta": 0.5}, **SD_SCHEDULE)
        yield _case("DDIMScheduler", steps, options={"eta": 1.0, "use_clipped_model_output": True},
                    clip_sample=True, **SD_SCHEDULE)
        yield _case("DDIMScheduler", steps, set_alpha_to_one=False, steps_offset=1, clip_sample=False, **SD_SCHEDULE)
        yield _case("DDIMScheduler", steps, rescale_betas_zero_snr=True, timestep_spacing="trailing",
                    prediction_type="v_prediction", clip_sample=False, **SD_SCHEDULE)
        yield _case("DDIMScheduler", steps, beta_schedule="squaredcos_cap_v2", clip_sample=True)
        for order in (1, 2, 3):
            for solver_type in ("bh1", "bh2"):
                for predict_x0 in (True, False):
                    yield _case("UniPCMultistepScheduler", steps, solver_order=order, solver_type=solver_type,
                                predict_x0=predict_x0, final_sigmas_type="sigma_min", **SD_SCHEDULE)
        yield _case("UniPCMultistepScheduler", steps, solver_order=3, **SD_SCHEDULE)
        yield _case("UniPCMultistepScheduler", steps, solver_order=3, lower_order_final=False,
                    final_sigmas_type="sigma_min", **SD_SCHEDULE)
        yield _case("UniPCMultistepScheduler", steps, disable_corrector=[0, 3], timestep_spacing="leading",
                    steps_offset=1, **SD_SCHEDULE)
        yield _case("UniPCMultistepScheduler", steps, rescale_betas_zero_snr=True, timestep_spacing="trailing",
                    prediction_type="v_prediction", **SD_SCHEDULE)
        for prediction in ("epsilon", "sample"):
            for variance in ("fixed_small_log", "learned_range"):
                yield _case("UnCLIPScheduler", steps, shape=(2, 16),
                            variance=variance if variance == "learned_range" else None,
                            prediction_type=prediction, variance_type=variance, clip_sample_range=10.0)
        yield _case("UnCLIPScheduler", steps, shape=(2, 16), clip_sample=False)


def _jax_model(sampler, variance=None):
    """The reference test model in JAX for this sampler's schedule and parameterisation."""
    return functools.partial(model_output, lib=jnp, channel_axis=-1, prediction_type=sampler.prediction_type,
                             alphas_cumprod=sampler.schedule.alphas_cumprod, variance=variance)


@pytest.mark.parametrize("config,steps,shape,variance,options", list(_cases()))
def test_trajectory_matches_diffusers(config, steps, shape, variance, options):
    rng = np.random.default_rng(0)
    x_T = rng.standard_normal(shape).astype(np.float32)
    step_noise = rng.standard_normal((steps,) + shape).astype(np.float32)
    expected, _ = run_diffusers(config, x_T, steps, step_noise, variance, **options)

    sampler = from_diffusers_config(config, **options)
    model_fn = _jax_model(sampler, variance)
    run = jax.jit(lambda x, noise: sampler.sample(model_fn, x, num_inference_steps=steps,
                                                  step_noise=noise if sampler.is_stochastic() else None))
    actual = run(x_T, step_noise)
    assert np.all(np.isfinite(expected))
    assert relative_error(actual, expected) <= TOLERANCE


@pytest.mark.parametrize("options", [{"solver_type": "bh1"}, {"predict_x0": False},
                                     {"predict_x0": False, "solver_type": "bh1"}])
def test_unipc_last_step_to_sigma_zero_is_the_finite_limit(options):
    """diffusers returns NaN on this last step (inf * 0); we return the limit of its own formula:
    x0 mode -> the data prediction m; eps mode -> (x - sigma_s eps) / alpha_s from the corrected x."""
    config = {"_class_name": "UniPCMultistepScheduler", **SD_SCHEDULE, **options}
    shape, steps = (2, 4, 4, 3), 20
    x_T = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    reference, scheduler = run_diffusers(config, x_T, steps)
    assert np.all(np.isnan(reference))
    corrected = np.asarray(scheduler.last_sample.numpy()).transpose(0, 2, 3, 1)
    converted = np.asarray(scheduler.model_outputs[-1].numpy()).transpose(0, 2, 3, 1)
    if options.get("predict_x0", True):
        expected = converted
    else:
        sigma = float(scheduler.sigmas[steps - 1])
        alpha_s = 1.0 / np.sqrt(sigma**2 + 1.0)
        expected = (corrected - sigma * alpha_s * converted) / alpha_s

    sampler = from_diffusers_config(config)
    model_fn = _jax_model(sampler)
    actual = jax.jit(lambda x: sampler.sample(model_fn, x, num_inference_steps=steps))(x_T)
    assert relative_error(actual, expected) <= TOLERANCE


def test_unipc_high_order_step_onto_sigma_zero_is_an_error():
    sampler = from_diffusers_config({"_class_name": "UniPCMultistepScheduler", "solver_order": 3,
                                     "lower_order_final": False})
    with pytest.raises(ValueError, match="lower_order_final"):
        sampler.plan(20)


def test_stochastic_sampler_uses_rng_noise_and_needs_a_key():
    sampler = from_diffusers_config({"_class_name": "DDPMScheduler", **SD_SCHEDULE})
    model_fn = _jax_model(sampler)
    x_T = jnp.ones((1, 2, 2, 3))
    with pytest.raises(ValueError, match="rng or step_noise"):
        sampler.sample(model_fn, x_T, num_inference_steps=5)
    first = sampler.sample(model_fn, x_T, jax.random.key(0), 5)
    again = sampler.sample(model_fn, x_T, jax.random.key(0), 5)
    other = sampler.sample(model_fn, x_T, jax.random.key(1), 5)
    np.testing.assert_array_equal(first, again)
    assert np.max(np.abs(np.asarray(first) - np.asarray(other))) > 1e-3
    with pytest.raises(ValueError, match="step_noise has shape"):
        sampler.sample(model_fn, x_T, num_inference_steps=5, step_noise=jnp.zeros((4, 1, 2, 2, 3)))
