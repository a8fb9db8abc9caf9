"""PyTorch's default initialisation of `nn.Linear` and `nn.Conv2d` (their `reset_parameters`) for linen
layers, so that networks ported from PyTorch start from the same distribution when trained from scratch or
when layers are created fresh on top of pretrained ones (PCDMs' conv_in and class embedding).

torch draws the weight with kaiming_uniform_(a=sqrt(5)), i.e. U(-b, b) with b = gain * sqrt(3 / fan_in) and
gain = sqrt(2 / (1 + a^2)) = sqrt(1 / 3), so b = 1 / sqrt(fan_in); the bias from U(-1 / sqrt(fan_in),
1 / sqrt(fan_in)) with the same fan_in (in_features; in_channels * kh * kw for a convolution). Both have
standard deviation 1 / sqrt(3 fan_in), about 1.7x smaller than Flax's default lecun_normal kernel; Flax's
default bias is zero.
"""

from __future__ import annotations

from typing import Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Padding = Union[str, Sequence[Sequence[int]]]
NO_PADDING = ((0, 0), (0, 0))


def _uniform(key, shape, dtype, fan_in: int):
    bound = 1.0 / np.sqrt(fan_in)
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def torch_default_kernel_init(key, shape, dtype=jnp.float32):
    """torch's default weight init for a linen kernel [..., in, out] (Dense [in, out], Conv [kh, kw, in, out]):
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with fan_in = the product of all axes but the last."""
    return _uniform(key, shape, dtype, int(np.prod(shape[:-1])))


def torch_default_bias_init(fan_in: int):
    """torch's default bias init of a layer with `fan_in` inputs per output (in_features, or in_channels *
    kh * kw): an initialiser drawing U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""

    def init(key, shape, dtype=jnp.float32):
        return _uniform(key, shape, dtype, fan_in)

    return init


def torch_dense(features: int, in_features: int, name: str, dtype, param_dtype, use_bias: bool = True) -> nn.Dense:
    """nn.Dense(features) on inputs of width in_features, initialised as torch's nn.Linear."""
    return nn.Dense(features, use_bias=use_bias, kernel_init=torch_default_kernel_init,
                    bias_init=torch_default_bias_init(in_features), dtype=dtype, param_dtype=param_dtype, name=name)


def torch_conv(features: int, kernel_size: int, in_channels: int, name: str, dtype, param_dtype, strides: int = 1,
               padding: Padding = NO_PADDING) -> nn.Conv:
    """A square nn.Conv on in_channels input channels, initialised as torch's nn.Conv2d (padding as for
    nn.Conv; default none, torch's default)."""
    return nn.Conv(features, (kernel_size, kernel_size), strides=(strides, strides), padding=padding,
                   kernel_init=torch_default_kernel_init,
                   bias_init=torch_default_bias_init(in_channels * kernel_size * kernel_size), dtype=dtype,
                   param_dtype=param_dtype, name=name)


__all__ = ["torch_conv", "torch_default_bias_init", "torch_default_kernel_init", "torch_dense"]
