"""LPIPS v0.1 (Zhang et al. 2018; the `lpips` package's `LPIPS(net=..., version="0.1")`), NHWC.

distance(x, y) for images in [-1, 1]: shift and scale the input per channel (the package's ScalingLayer),
take the five ReLU taps of a torchvision AlexNet or VGG16 trunk for both images, divide each feature vector
by its L2 norm over channels (+1e-10) at every pixel, square the differences, weight the channels with a
non-negative 1x1 head (no bias), average over the tap's pixels, and sum over the five taps.

Parameter names mirror the PyTorch files they are read from: the trunk's `features.{i}.{weight,bias}`
(torchvision `alexnet-owt-7be5be79.pth`, `vgg16-397923af.pth`) and the heads' `lin{k}.model.1.weight` (the
lpips package's `weights/v0.1/{alex,vgg}.pth`).
"""

from __future__ import annotations

import re
from typing import Callable, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pgpis_jax.metrics.weights import find_weight_file, load_torch_weights

INPUT_SHIFT = (-0.030, -0.088, -0.188)
INPUT_SCALE = (0.458, 0.448, 0.450)
NORM_EPSILON = 1e-10

# torchvision alexnet().features: (index, out channels, kernel, stride, padding, max-pool 3/2 before it);
# every conv is followed by a ReLU whose output is an LPIPS tap.
ALEXNET_CONVS = ((0, 64, 11, 4, 2, False), (3, 192, 5, 1, 2, True), (6, 384, 3, 1, 1, True),
                 (8, 256, 3, 1, 1, False), (10, 256, 3, 1, 1, False))
# torchvision vgg16().features: 3x3 pad-1 convs (each + ReLU) in five stages split by max-pool 2/2; the last
# ReLU of each stage is an LPIPS tap.
VGG16_STAGES = (((0, 64), (2, 64)), ((5, 128), (7, 128)), ((10, 256), (12, 256), (14, 256)),
                ((17, 512), (19, 512), (21, 512)), ((24, 512), (26, 512), (28, 512)))

WEIGHT_FILES = {
    # net: (torchvision trunk file, lpips v0.1 head file)
    "alex": ("alexnet-owt-7be5be79.pth", "alex.pth"),
    "vgg": ("vgg16-397923af.pth", "vgg.pth"),
}
# Keys of the torchvision files that LPIPS does not use (the ImageNet classifier): accepted and dropped.
TRUNK_UNUSED_KEYS = {
    "alex": tuple(f"classifier.{i}.{leaf}" for i in (1, 4, 6) for leaf in ("weight", "bias")),
    "vgg": tuple(f"classifier.{i}.{leaf}" for i in (0, 3, 6) for leaf in ("weight", "bias")),
}


class AlexNetFeatures(nn.Module):
    """torchvision's AlexNet trunk (64-192-384-256-256). x [N, H, W, 3] -> the five post-ReLU taps,
    [N, h_k, w_k, C_k] (64x64 input: 15, 7, 3, 3, 3 pixels a side)."""

    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x) -> Tuple[jnp.ndarray, ...]:
        taps = []
        for index, channels, kernel, stride, padding, pool_before in ALEXNET_CONVS:
            if pool_before:
                x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")
            x = nn.Conv(channels, (kernel, kernel), strides=(stride, stride), padding=((padding, padding),) * 2,
                        dtype=self.dtype, param_dtype=self.param_dtype, name=f"features_{index}")(x)
            x = nn.relu(x)
            taps.append(x)
        return tuple(taps)


class VGG16Features(nn.Module):
    """torchvision's VGG16 trunk. x [N, H, W, 3] -> the five post-ReLU taps relu1_2 ... relu5_3,
    [N, H / 2^k, W / 2^k, C_k]."""

    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x) -> Tuple[jnp.ndarray, ...]:
        taps = []
        for stage, convs in enumerate(VGG16_STAGES):
            if stage:
                x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
            for index, channels in convs:
                x = nn.Conv(channels, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                            param_dtype=self.param_dtype, name=f"features_{index}")(x)
                x = nn.relu(x)
            taps.append(x)
        return tuple(taps)


class _LinearHead(nn.Module):
    """The lpips package's NetLinLayer in eval mode: a 1x1 convolution C -> 1 without bias (`model.1`)."""

    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        return nn.Conv(1, (1, 1), use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                       name="model_1")(x)


class LinearHeads(nn.Module):
    """The five LPIPS heads `lin0` ... `lin4`. squared_differences: the per-tap squared differences of the
    unit-normalised features, [N, h_k, w_k, C_k] -> [N]: sum over taps of the head output's spatial mean."""

    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, squared_differences: Sequence[jnp.ndarray]) -> jnp.ndarray:
        total = 0.0
        for k, difference in enumerate(squared_differences):
            weighted = _LinearHead(self.dtype, self.param_dtype, name=f"lin{k}")(difference)
            total = total + weighted.astype(jnp.float32).mean(axis=(1, 2, 3))
        return total


TRUNKS = {"alex": AlexNetFeatures, "vgg": VGG16Features}


def _unit_normalise(features: jnp.ndarray) -> jnp.ndarray:
    """features / (L2 norm over channels + 1e-10) at every pixel, in float32."""
    features = features.astype(jnp.float32)
    return features / (jnp.sqrt(jnp.sum(features * features, axis=-1, keepdims=True)) + NORM_EPSILON)


class LPIPS(nn.Module):
    """LPIPS v0.1 distance. x, y [N, H, W, 3] in [-1, 1] -> [N] float32.
    Parameters: {"net": trunk (AlexNetFeatures / VGG16Features), "heads": LinearHeads}."""

    net: str = "alex"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, y) -> jnp.ndarray:
        if self.net not in TRUNKS:
            raise ValueError(f"net={self.net!r}: expected one of {sorted(TRUNKS)}")
        trunk = TRUNKS[self.net](self.dtype, self.param_dtype, name="net")
        shift, scale = jnp.asarray(INPUT_SHIFT, jnp.float32), jnp.asarray(INPUT_SCALE, jnp.float32)
        taps_x, taps_y = (trunk(((images.astype(jnp.float32) - shift) / scale).astype(self.dtype))
                          for images in (x, y))
        differences = [jnp.square(_unit_normalise(tap_x) - _unit_normalise(tap_y))
                       for tap_x, tap_y in zip(taps_x, taps_y)]
        return LinearHeads(self.dtype, self.param_dtype, name="heads")(differences)


def _abstract_params(module: nn.Module, *inputs) -> dict:
    """The parameter tree of `module` as ShapeDtypeStructs; inputs: ShapeDtypeStructs."""
    return jax.eval_shape(lambda *arrays: module.init(jax.random.PRNGKey(0), *arrays), *inputs)["params"]


def load_lpips_params(net: str = "alex", weights_dir: Optional[str] = None) -> dict:
    """{"net": ..., "heads": ...} for `LPIPS(net)` from the torchvision trunk file and the lpips v0.1 head
    file, found by `find_weight_file` (in `weights_dir`, or $PGPIS_METRIC_WEIGHTS)."""
    if net not in TRUNKS:
        raise ValueError(f"net={net!r}: expected one of {sorted(TRUNKS)}")
    trunk_file, head_file = WEIGHT_FILES[net]
    image = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    expected = _abstract_params(LPIPS(net), image, image)
    trunk = load_torch_weights(find_weight_file(trunk_file, weights_dir), expected["net"],
                               f"LPIPS {net} trunk (torchvision)",
                               ignored_keys=[re.escape(key) for key in TRUNK_UNUSED_KEYS[net]])
    heads = load_torch_weights(find_weight_file(head_file, weights_dir), expected["heads"],
                               f"LPIPS {net} v0.1 linear heads")
    return {"net": trunk, "heads": heads}


def load_lpips(net: str = "alex", weights_dir: Optional[str] = None) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """distance_fn(x, y) -> float64 [N] for [N, H, W, 3] float images in [-1, 1] (map [0, 1] images with
    2x - 1 first, unless reproducing PCDMs, which passes them unmapped). Jitted per input shape, convolutions
    at full float32 precision."""
    module = LPIPS(net)
    params = load_lpips_params(net, weights_dir)
    apply = jax.jit(module.apply)

    def distance_fn(x, y) -> np.ndarray:
        x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
        if x.shape != y.shape or x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"LPIPS expects two [N, H, W, 3] batches of one shape, got {x.shape} and {y.shape}")
        with jax.default_matmul_precision("highest"):
            return np.asarray(apply({"params": params}, x, y), np.float64)

    return distance_fn
