"""Shared building blocks against their diffusers PyTorch counterparts (fp32, random weights), and the
state-dict converter's round trip."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention as TorchAttention
from diffusers.models.resnet import Downsample2D as TorchDownsample
from diffusers.models.resnet import ResnetBlock2D as TorchResnet
from diffusers.models.resnet import Upsample2D as TorchUpsample

from pgpis_jax.nn.activations import gelu
from pgpis_jax.nn.attention import Attention, dot_product_attention
from pgpis_jax.nn.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from pgpis_jax.weights.pytorch import check_params_match, params_to_state_dict, state_dict_to_params

TOLERANCE = 1e-5


def _nhwc(tensor):
    return tensor.detach().numpy().transpose(0, 2, 3, 1)


def _params(module):
    return state_dict_to_params({k: v.numpy() for k, v in module.state_dict().items()})


def test_gelu_matches_torch_exact_gelu_in_float64():
    """Values and gradients over [-15, 15] (both tails) against torch's exact GELU computed in float64."""
    x = np.linspace(-15.0, 15.0, 20001)
    reference = torch.from_numpy(x).requires_grad_()
    torch.nn.functional.gelu(reference).sum().backward()
    value, grad = jax.vmap(jax.value_and_grad(gelu))(jnp.asarray(x, jnp.float32))
    assert value.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(value, np.float64), torch.nn.functional.gelu(reference).detach().numpy(),
                               rtol=1e-6, atol=2e-6)
    np.testing.assert_allclose(np.asarray(grad, np.float64), reference.grad.numpy(), rtol=1e-5, atol=2e-6)


def test_cross_attention_matches_diffusers():
    torch.manual_seed(0)
    reference = TorchAttention(query_dim=32, heads=4, dim_head=8, cross_attention_dim=24).eval()
    x, context = torch.randn(2, 10, 32), torch.randn(2, 7, 24)
    expected = reference(x, encoder_hidden_states=context).detach().numpy()
    actual = Attention(heads=4, dim_head=8).apply({"params": _params(reference)}, x.numpy(), context.numpy())
    np.testing.assert_allclose(actual, expected, atol=TOLERANCE)


def test_spatial_attention_with_group_norm_matches_diffusers():
    torch.manual_seed(1)
    reference = TorchAttention(query_dim=32, heads=1, dim_head=32, norm_num_groups=8, eps=1e-6,
                               residual_connection=True, bias=True, upcast_softmax=True,
                               _from_deprecated_attn_block=True).eval()
    x = torch.randn(2, 32, 4, 5)
    module = Attention(heads=1, dim_head=32, use_bias=True, norm_num_groups=8, norm_eps=1e-6,
                       residual_connection=True)
    actual = module.apply({"params": _params(reference)}, _nhwc(x))
    np.testing.assert_allclose(actual, _nhwc(reference(x)), atol=TOLERANCE)


@pytest.mark.parametrize("in_channels,out_channels", [(16, 32), (32, 32)])
def test_resnet_block_matches_diffusers(in_channels, out_channels):
    torch.manual_seed(2)
    reference = TorchResnet(in_channels=in_channels, out_channels=out_channels, temb_channels=20, groups=8,
                            eps=1e-5).eval()
    x, temb = torch.randn(2, in_channels, 6, 6), torch.randn(2, 20)
    module = ResnetBlock2D(out_channels=out_channels, groups=8, eps=1e-5)
    actual = module.apply({"params": _params(reference)}, _nhwc(x), temb.numpy())
    np.testing.assert_allclose(actual, _nhwc(reference(x, temb)), atol=TOLERANCE)


@pytest.mark.parametrize("padding", [0, 1])
def test_downsample_matches_diffusers(padding):
    torch.manual_seed(3)
    reference = TorchDownsample(8, use_conv=True, out_channels=12, padding=padding).eval()
    x = torch.randn(2, 8, 7, 6)
    actual = Downsample2D(12, padding=padding).apply({"params": _params(reference)}, _nhwc(x))
    np.testing.assert_allclose(actual, _nhwc(reference(x)), atol=TOLERANCE)


@pytest.mark.parametrize("output_size", [None, (9, 7)])
def test_upsample_matches_diffusers(output_size):
    torch.manual_seed(4)
    reference = TorchUpsample(8, use_conv=True, out_channels=8).eval()
    x = torch.randn(2, 8, 4, 3)
    expected = _nhwc(reference(x, output_size=output_size))
    actual = Upsample2D(8).apply({"params": _params(reference)}, _nhwc(x), output_size)
    np.testing.assert_allclose(actual, expected, atol=TOLERANCE)


def test_xla_attention_is_softmax_of_scaled_scores():
    rng = np.random.default_rng(5)
    q, k, v = (rng.standard_normal((1, n, 2, 4)).astype(np.float32) for n in (3, 5, 5))
    scores = np.einsum("qhd,khd->hqk", q[0], k[0]) / 2.0
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    expected = np.einsum("hqk,khd->qhd", weights, v[0])[None]
    np.testing.assert_allclose(dot_product_attention(q, k, v), expected, atol=1e-6)
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        dot_product_attention(q, k, v, implementation="cudnn")


def test_state_dict_round_trip_and_strict_check():
    torch.manual_seed(6)
    reference = TorchResnet(in_channels=8, out_channels=16, temb_channels=4, groups=4)
    state = {k: v.numpy() for k, v in reference.state_dict().items()}
    params = state_dict_to_params(state)
    back = params_to_state_dict(params, list_names=())
    assert set(back) == set(state)
    for key in state:
        np.testing.assert_array_equal(back[key], state[key])
    expected = {k: dict(v) for k, v in params.items()}
    check_params_match(params, expected, "ok")
    del expected["conv1"]["bias"]
    expected["norm2"]["scale"] = np.zeros(3)
    with pytest.raises(ValueError, match=r"unexpected \(1\): conv1/bias; wrong shape \(1\): norm2/scale"):
        check_params_match(params, expected, "ckpt")


@pytest.mark.skipif(jax.default_backend() != "gpu",
                    reason="cuDNN flash attention needs an NVIDIA GPU; this machine has none")
def test_cudnn_attention_matches_xla_reference_in_bf16():
    rng = np.random.default_rng(7)
    q, k, v = (jnp.asarray(rng.standard_normal((2, n, 4, 64)), jnp.bfloat16) for n in (256, 258, 258))
    reference = dot_product_attention(q, k, v, "xla").astype(jnp.float32)
    flash = dot_product_attention(q, k, v, "cudnn").astype(jnp.float32)
    np.testing.assert_allclose(flash, reference, atol=2e-2)


def test_attention_dropout_masks_and_rescales_the_weights():
    rng = np.random.default_rng(8)
    q, k, v = (rng.standard_normal((1, n, 2, 4)).astype(np.float32) for n in (3, 5, 5))
    key = jax.random.key(3)
    scores = np.einsum("qhd,khd->hqk", q[0], k[0]) / 2.0
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    keep = np.asarray(jax.random.bernoulli(key, 0.7, (1, 2, 3, 5)))[0]
    expected = np.einsum("hqk,khd->qhd", np.where(keep, weights / 0.7, 0.0), v[0])[None]
    actual = dot_product_attention(q, k, v, dropout_rate=0.3, dropout_rng=key)
    np.testing.assert_allclose(actual, expected, atol=1e-6)
    with pytest.raises(ValueError, match="dropout_rng"):
        dot_product_attention(q, k, v, dropout_rate=0.3)
