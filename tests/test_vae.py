"""AutoencoderKL against diffusers' PyTorch AutoencoderKL: tiny random models (fp32) converted with the
state-dict converter, the key/shape oracle, encode / decode / forward parity, posterior sampling, config
handling, and the full-size SD VAE's parameter count via eval_shape."""

import json
import re

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.models.autoencoders import vae as torch_vae_module

from pgpis_jax.models.vae import AutoencoderKL, DiagonalGaussian, from_config, sample_posterior
from pgpis_jax.weights.pytorch import check_params_match, state_dict_to_params
from tests.parity import jitted

TOLERANCE = 1e-4
DOWN, UP = "DownEncoderBlock2D", "UpDecoderBlock2D"

CONFIGS = {
    "tiny": dict(block_out_channels=(32, 64), down_block_types=(DOWN,) * 2, up_block_types=(UP,) * 2,
                 layers_per_block=1, norm_num_groups=8, latent_channels=4),
    "three_level": dict(block_out_channels=(16, 32, 32), down_block_types=(DOWN,) * 3, up_block_types=(UP,) * 3,
                        layers_per_block=2, norm_num_groups=8, latent_channels=4),
    # the optional parts switched off (no quant convs, no mid-block attention), other channel counts
    "bare": dict(block_out_channels=(16, 32), down_block_types=(DOWN,) * 2, up_block_types=(UP,) * 2,
                 layers_per_block=1, norm_num_groups=4, latent_channels=6, in_channels=2, out_channels=5,
                 use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=False,
                 shift_factor=0.1, scaling_factor=1.5),
}
SD_VAE = dict(block_out_channels=(128, 256, 512, 512), down_block_types=(DOWN,) * 4, up_block_types=(UP,) * 4,
              layers_per_block=2, latent_channels=4, norm_num_groups=32, sample_size=512)
SD_VAE_PARAMETERS = 83_653_863

_cache = {}


def _model(name):
    """(torch model, our module, converted params) for CONFIGS[name], built once."""
    if name not in _cache:
        torch.manual_seed(sorted(CONFIGS).index(name))
        reference = diffusers.AutoencoderKL(**CONFIGS[name]).eval()
        module = AutoencoderKL.from_config(dict(reference.config))
        params = state_dict_to_params({k: v.numpy() for k, v in reference.state_dict().items()})
        _cache[name] = reference, module, params
    return _cache[name]


def _nhwc(tensor):
    return tensor.detach().numpy().transpose(0, 2, 3, 1)


def _nchw(array):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(array).transpose(0, 3, 1, 2)))


def _max_error(actual, expected):
    return float(np.max(np.abs(np.asarray(actual, np.float64) - np.asarray(expected, np.float64))))


def _images(name, height, width, seed=0):
    channels = CONFIGS[name].get("in_channels", 3)
    return torch.from_numpy(np.random.default_rng(seed).uniform(-1, 1, (2, channels, height, width)).astype(np.float32))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_converted_state_dict_matches_init_tree(name):
    _, module, params = _model(name)
    channels = CONFIGS[name].get("in_channels", 3)
    expected = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 16, 16, channels)))["params"]
    check_params_match(params, expected, f"diffusers AutoencoderKL ({name})")
    check_params_match(params, jax.eval_shape(module.init_params, jax.random.key(0)), "init_params")


def _encoder(module):
    """(params, images [B, H, W, C]) -> the posterior, jitted."""
    return jitted(lambda params, images: module.apply({"params": params}, images, method="encode"))


def _decoder(module):
    """(params, latents [B, h, w, c]) -> images, jitted."""
    return jitted(lambda params, latents: module.apply({"params": params}, latents, method="decode"))


@pytest.mark.parametrize("name,height,width", [("tiny", 32, 32), ("tiny", 24, 40), ("three_level", 32, 32),
                                               ("bare", 24, 40)])
def test_encode_matches_diffusers(name, height, width):
    reference, module, params = _model(name)
    x = _images(name, height, width)
    with torch.no_grad():
        expected = reference.encode(x).latent_dist
    posterior = _encoder(module)(params, _nhwc(x))
    factor = 2 ** (len(CONFIGS[name]["block_out_channels"]) - 1)
    assert posterior.mean.shape == (2, height // factor, width // factor, module.latent_channels)
    assert posterior.mean.dtype == posterior.logvar.dtype == jnp.float32
    assert _max_error(posterior.mean, _nhwc(expected.mean)) <= TOLERANCE
    assert _max_error(posterior.logvar, _nhwc(expected.logvar)) <= TOLERANCE


@pytest.mark.parametrize("name,height,width", [("tiny", 12, 20), ("three_level", 8, 8),
                                               ("bare", 12, 20)])
def test_decode_matches_diffusers(name, height, width):
    reference, module, params = _model(name)
    z = torch.randn(2, module.latent_channels, height, width, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference.decode(z).sample
    image = _decoder(module)(params, _nhwc(z))
    assert image.shape == _nhwc(expected).shape
    assert _max_error(image, _nhwc(expected)) <= TOLERANCE


@pytest.mark.parametrize("name,height,width", [("tiny", 32, 32), ("tiny", 24, 40), ("three_level", 24, 40),
                                               ("bare", 32, 32)])
def test_forward_with_posterior_mode_matches_diffusers(name, height, width):
    reference, module, params = _model(name)
    x = _images(name, height, width, seed=2)
    with torch.no_grad():
        expected = reference(x, sample_posterior=False).sample
    actual = jitted(module.apply)({"params": params}, _nhwc(x))
    assert _max_error(actual, _nhwc(expected)) <= TOLERANCE


def test_forward_with_sampled_posterior_matches_diffusers_given_the_same_noise(monkeypatch):
    reference, module, params = _model("tiny")
    x, rng = _images("tiny", 24, 40, seed=3), jax.random.key(7)
    noise = jax.random.normal(rng, (2, 12, 20, 4), jnp.float32)  # what sample_posterior draws from rng
    monkeypatch.setattr(torch_vae_module, "randn_tensor", lambda shape, **kwargs: _nchw(noise))
    with torch.no_grad():
        expected = reference(x, sample_posterior=True).sample
    actual = module.apply({"params": params}, _nhwc(x), rng, sample_posterior=True)
    assert _max_error(actual, _nhwc(expected)) <= TOLERANCE
    mode = module.apply({"params": params}, _nhwc(x))
    assert _max_error(actual, mode) > 1e-3  # the sample is not the mode
    with pytest.raises(ValueError, match="needs an rng key"):
        module.apply({"params": params}, _nhwc(x), sample_posterior=True)


def test_posterior_sampling_and_kl_follow_the_closed_form(monkeypatch):
    generator = np.random.default_rng(4)
    mean = generator.standard_normal((2, 3, 5, 4)).astype(np.float32)
    logvar = generator.uniform(-3, 3, (2, 3, 5, 4)).astype(np.float32)
    logvar[0, 0, 0, :2] = (-45.0, 27.0)  # outside [-30, 20]: clipped
    rng = jax.random.key(11)
    noise = np.asarray(jax.random.normal(rng, mean.shape, jnp.float32))
    expected = mean + np.exp(0.5 * np.clip(logvar, -30.0, 20.0)) * noise
    np.testing.assert_allclose(sample_posterior(jnp.asarray(mean), jnp.asarray(logvar), rng), expected, rtol=1e-6)

    posterior = DiagonalGaussian.from_moments(jnp.concatenate([mean, logvar], axis=-1))
    torch_posterior = torch_vae_module.DiagonalGaussianDistribution(_nchw(np.concatenate([mean, logvar], -1)))
    monkeypatch.setattr(torch_vae_module, "randn_tensor", lambda shape, **kwargs: _nchw(noise))
    np.testing.assert_allclose(posterior.logvar, _nhwc(torch_posterior.logvar), rtol=0, atol=0)
    np.testing.assert_allclose(posterior.sample(rng), _nhwc(torch_posterior.sample()), rtol=1e-6)
    np.testing.assert_array_equal(posterior.mode(), mean)
    other = DiagonalGaussian(jnp.asarray(mean[::-1]), jnp.asarray(np.clip(logvar[::-1], -30, 20)))
    torch_other = torch_vae_module.DiagonalGaussianDistribution(_nchw(np.concatenate([mean, logvar], -1)[::-1]))
    np.testing.assert_allclose(posterior.kl(), torch_posterior.kl().numpy(), rtol=1e-5)
    np.testing.assert_allclose(posterior.kl(other), torch_posterior.kl(torch_other).numpy(), rtol=1e-5)


def test_bfloat16_compute_keeps_float32_norms_and_moments():
    reference, _, params = _model("tiny")
    module = AutoencoderKL.from_config(dict(reference.config), dtype=jnp.bfloat16)
    x = _images("tiny", 16, 16, seed=5)
    posterior = _encoder(module)(params, _nhwc(x))
    assert posterior.mean.dtype == jnp.float32
    with torch.no_grad():
        expected = reference.encode(x).latent_dist.mean
    assert _max_error(posterior.mean, _nhwc(expected)) < 0.1
    image = _decoder(module)(params, posterior.mean)
    assert image.dtype == jnp.bfloat16
    shapes = jax.eval_shape(AutoencoderKL.from_config(dict(reference.config), param_dtype=jnp.bfloat16).init,
                            jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(shapes)} == {jnp.dtype(jnp.bfloat16)}


def test_from_config_reads_a_saved_config_json(tmp_path):
    reference, module, _ = _model("bare")
    reference.save_config(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    loaded = from_config(config, attention_implementation="xla")
    assert loaded == module
    assert loaded.scaling_factor == 1.5 and loaded.shift_factor == 0.1
    assert loaded.to_config() == {k: v for k, v in config.items() if k != "_diffusers_version"}
    assert AutoencoderKL.from_config(loaded.to_config()) == module
    assert from_config(config, latent_channels=3, remat=True) == module.clone(latent_channels=3, remat=True)


@pytest.mark.parametrize("override,key", [
    ({"act_fn": "gelu"}, "act_fn"),
    ({"down_block_types": [DOWN, "AttnDownEncoderBlock2D"]}, "down_block_types"),
    ({"up_block_types": [UP, "AttnUpDecoderBlock2D"]}, "up_block_types"),
    ({"up_block_types": [UP]}, "up_block_types"),
    ({"norm_type": "spatial"}, "norm_type"),
    ({"_class_name": "AutoencoderTiny"}, "_class_name"),
])
def test_from_config_rejects_what_it_does_not_build(override, key):
    with pytest.raises(ValueError, match=key):
        AutoencoderKL.from_config({**CONFIGS["tiny"], **override})


def test_unsupported_values_are_rejected_at_construction():
    with pytest.raises(ValueError, match="attention_implementation='flash'"):
        AutoencoderKL.from_config(CONFIGS["tiny"], attention_implementation="flash")
    with pytest.raises(ValueError, match="act_fn='mish'"):
        AutoencoderKL(act_fn="mish")
    with pytest.raises(TypeError, match="heads"):
        AutoencoderKL.from_config(CONFIGS["tiny"], heads=2)


def test_full_size_sd_vae_parameter_count_and_shapes_match_diffusers():
    with torch.device("meta"):
        reference = diffusers.AutoencoderKL(**SD_VAE)
    expected = sum(p.numel() for p in reference.parameters())
    assert expected == SD_VAE_PARAMETERS
    module = AutoencoderKL.from_config(dict(reference.config))
    image = jax.ShapeDtypeStruct((1, 512, 512, 3), jnp.float32)
    shapes = jax.eval_shape(module.init, jax.random.key(0), image)["params"]
    assert sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(shapes)) == SD_VAE_PARAMETERS
    # the converter's tree for the full-size state dict, from zero-stride stand-ins (no memory)
    stand_ins = {k: np.broadcast_to(np.float32(0), v.shape) for k, v in reference.state_dict().items()}
    check_params_match(state_dict_to_params(stand_ins), shapes, "diffusers AutoencoderKL (SD)")
    posterior = jax.eval_shape(lambda p, x: module.apply({"params": p}, x, method="encode"), shapes, image)
    assert posterior.mean.shape == posterior.logvar.shape == (1, 64, 64, 4)
    decoded = jax.eval_shape(lambda p, z: module.apply({"params": p}, z, method="decode"), shapes, posterior.mean)
    assert decoded.shape == (1, 512, 512, 3)


def test_remat_wraps_blocks_without_changing_parameters():
    _, module, params = _model("tiny")
    rematted = module.clone(remat=True)
    check_params_match(params, jax.eval_shape(rematted.init_params, jax.random.key(0)), "remat")
    z = jax.random.normal(jax.random.key(3), (1, 8, 8, 4))
    decode = lambda m: lambda p: m.apply({"params": p}, z, method="decode")  # noqa: E731
    def rematerialised(m):  # the program holds checkpoint (a.k.a. remat) primitives
        program = str(jax.make_jaxpr(decode(m))(params))
        return re.search(r"\b(checkpoint|remat\d*)\b", program) is not None

    assert rematerialised(rematted) and not rematerialised(module)
