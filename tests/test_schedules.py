"""Beta schedules and inference timestep spacings against diffusers' PyTorch schedulers."""

import numpy as np
import pytest
from diffusers import DDIMScheduler, DDPMScheduler, UnCLIPScheduler, UniPCMultistepScheduler

from pgpis_jax.diffusion import spacing
from pgpis_jax.diffusion.schedules import NoiseSchedule

T = 1000
TRAINED_BETAS = (np.linspace(0.01, 0.15, T) ** 2).tolist()

SCHEDULE_CASES = {
    "linear": dict(beta_schedule="linear"),
    "linear-T250": dict(beta_schedule="linear", num_train_timesteps=250, beta_start=0.0002, beta_end=0.03),
    "scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    "squaredcos_cap_v2": dict(beta_schedule="squaredcos_cap_v2"),
    "trained_betas": dict(trained_betas=TRAINED_BETAS),
    "zero_snr-scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                   rescale_betas_zero_snr=True),
    "zero_snr-linear": dict(beta_schedule="linear", rescale_betas_zero_snr=True),
}


@pytest.mark.parametrize("config", SCHEDULE_CASES.values(), ids=SCHEDULE_CASES.keys())
def test_schedule_matches_diffusers(config):
    reference = DDPMScheduler(**config)
    kwargs = dict(config)
    name = kwargs.pop("beta_schedule", "linear")
    ours = NoiseSchedule.create(name, **kwargs)
    assert ours.num_train_timesteps == reference.config.num_train_timesteps
    if config.get("rescale_betas_zero_snr"):
        # 1 - alpha and the ratios of a vanishing alpha_bar are ill-conditioned in float32: compare absolutely.
        tolerances = {"betas": dict(rtol=0, atol=1e-5), "alphas": dict(rtol=0, atol=1e-5),
                      "alphas_cumprod": dict(rtol=0, atol=1e-6)}
        assert ours.betas[-1] == 1.0 and ours.alphas_cumprod[-1] == 0.0 == reference.alphas_cumprod[-1].item()
        assert ours.alphas_cumprod[-2] > 0.0
    else:
        # betas: NumPy's float64 linspace rounded vs torch's float32 linspace, within 1e-6; the cumulative
        # product of equal alphas is accumulated as torch does, so it may differ only through the betas.
        tolerances = {"betas": dict(rtol=1e-6), "alphas": dict(rtol=1e-6), "alphas_cumprod": dict(rtol=1e-6)}
    for field, tolerance in tolerances.items():
        np.testing.assert_allclose(getattr(ours, field), getattr(reference, field).numpy(), err_msg=field, **tolerance)
    if name == "squaredcos_cap_v2":  # betas computed identically in float64: the tables must be bit-equal
        np.testing.assert_array_equal(ours.alphas_cumprod, reference.alphas_cumprod.numpy())


def test_unknown_beta_schedule_raises():
    with pytest.raises(ValueError, match="cosine_v9"):
        NoiseSchedule.create("cosine_v9")


def _reference_timesteps(cls, n, **config):
    scheduler = cls(num_train_timesteps=T, **config)
    scheduler.set_timesteps(n)
    return scheduler.timesteps.numpy()


SPACINGS = ("linspace", "leading", "trailing")
STEPS = (1, 7, 20, 50, 1000)


@pytest.mark.parametrize("offset", (0, 1))
@pytest.mark.parametrize("timestep_spacing", SPACINGS)
@pytest.mark.parametrize("cls, ours", [(DDPMScheduler, spacing.ddpm_timesteps), (DDIMScheduler, spacing.ddpm_timesteps),
                                       (UniPCMultistepScheduler, spacing.unipc_timesteps)],
                         ids=["DDPM", "DDIM", "UniPC"])
def test_timesteps_match_diffusers(cls, ours, timestep_spacing, offset):
    for n in STEPS:
        expected = _reference_timesteps(cls, n, timestep_spacing=timestep_spacing, steps_offset=offset)
        actual = ours(timestep_spacing, T, n, offset)
        assert actual.dtype == np.int64
        np.testing.assert_array_equal(actual, expected, err_msg=f"n={n}")


def test_unclip_timesteps_match_diffusers():
    for n in STEPS[1:]:
        np.testing.assert_array_equal(spacing.unclip_timesteps(T, n), _reference_timesteps(UnCLIPScheduler, n),
                                      err_msg=f"n={n}")


def test_hand_computed_timesteps():
    unipc = spacing.unipc_timesteps("linspace", T, 20)
    assert len(unipc) == 20
    assert unipc[:3].tolist() == [999, 949, 899] and unipc[-2:].tolist() == [100, 50]
    assert set(np.diff(unipc).tolist()) <= {-49, -50, -51}

    unclip = spacing.unclip_timesteps(T, 20)
    assert len(unclip) == 20
    assert unclip[:3].tolist() == [999, 946, 894] and unclip[-1] == 0

    np.testing.assert_array_equal(spacing.ddpm_timesteps("leading", T, 50, steps_offset=1), np.arange(981, 0, -20))
    np.testing.assert_array_equal(spacing.ddpm_timesteps("trailing", T, 4), [999, 749, 499, 249])


@pytest.mark.parametrize("fn, n", [
    (lambda n: spacing.ddpm_timesteps("linspace", T, n), 0),
    (lambda n: spacing.ddpm_timesteps("leading", T, n), T + 1),
    (lambda n: spacing.unipc_timesteps("trailing", T, n), 0),
    (lambda n: spacing.unipc_timesteps("linspace", T, n), T + 1),
    (lambda n: spacing.unclip_timesteps(T, n), 1),
    (lambda n: spacing.unclip_timesteps(T, n), T + 1),
])
def test_num_inference_steps_out_of_range_raises(fn, n):
    with pytest.raises(ValueError, match=f"num_inference_steps={n}"):
        fn(n)


def test_unknown_spacing_raises():
    with pytest.raises(ValueError, match="uniformish"):
        spacing.ddpm_timesteps("uniformish", T, 10)
