"""Whole sampling trajectories of the JAX samplers against diffusers' PyTorch schedulers.

Each case builds both from the same scheduler config (ours through `from_diffusers_config`), runs 20 or 50
steps of the same deterministic model from the same x_T, with the same per-step noise where the sampler is
stochastic, and requires a relative error of at most 1e-5 (fp32).
"""

import functools
import json
import re

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


def test_unipc_built_from_the_sd21_pndm_config_as_diffusers_from_config(tmp_path):
    """PCDMs builds UniPC from SD 2.1-base's PNDMScheduler config; loading that file (with its PNDM-only keys)
    through class_name must give diffusers' UniPCMultistepScheduler.from_config(pndm_config)."""
    pndm = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.8.0", "beta_end": 0.012,
            "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
            "num_train_timesteps": 1000, "prediction_type": "epsilon", "set_alpha_to_one": False,
            "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None}
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(pndm))
    sampler = from_diffusers_config(tmp_path, class_name="UniPCMultistepScheduler")
    x_T = np.random.default_rng(2).standard_normal((2, 4, 4, 3)).astype(np.float32)
    expected, scheduler = run_diffusers(dict(pndm, _class_name="UniPCMultistepScheduler"), x_T, 20)
    assert scheduler.config.timestep_spacing == "linspace" and scheduler.config.solver_type == "bh2"
    np.testing.assert_array_equal(sampler.timesteps(20), scheduler.timesteps.numpy())
    actual = jax.jit(lambda x: sampler.sample(_jax_model(sampler), x, num_inference_steps=20))(x_T)
    assert relative_error(actual, expected) <= TOLERANCE


@pytest.mark.parametrize("config,message", [
    ({"_class_name": "PNDMScheduler"}, "scheduler class 'PNDMScheduler' is not supported"),
    ({"beta_schedule": "linear"}, "no '_class_name'"),
    ({"_class_name": "DDIMScheduler", "thresholding": True}, "thresholding=True is not supported"),
    ({"_class_name": "UniPCMultistepScheduler", "use_karras_sigmas": True}, "use_karras_sigmas"),
    ({"_class_name": "DDPMScheduler", "skip_prk_steps": True}, "keys not supported: skip_prk_steps"),
    ({"_class_name": "DDPMScheduler", "variance_type": "fixed_large_log"}, "variance_type='fixed_large_log'"),
    ({"_class_name": "DDPMScheduler", "beta_schedule": "sigmoid"}, "beta_schedule='sigmoid'"),
    ({"_class_name": "UniPCMultistepScheduler", "solver_order": 4}, "solver_order=4"),
    ({"_class_name": "UnCLIPScheduler", "beta_schedule": "linear"}, "beta_schedule='linear' is not supported"),
])
def test_unsupported_configs_are_errors_naming_the_option(config, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        from_diffusers_config(config)


def test_config_files_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path))):
        from_diffusers_config(tmp_path)
    (tmp_path / "scheduler_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="scheduler_config.json: not valid JSON"):
        from_diffusers_config(tmp_path / "scheduler_config.json")
