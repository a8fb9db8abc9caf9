"""Differentiable pose-heatmap estimators for RePoseDM's gradient guidance (Eq. 11, 15;
../shared/reference/reposedm.md Sec. 3.2, 3.5), the Gaussian target heatmaps they are trained on, and the pose
distance G of the guidance.

An estimator maps images [B, H, W, 3] in [-1, 1] to heatmaps [B, H / 4, W / 4, K] (stride 4, one map per joint
in the dataset's keypoint order, ~1 at a joint, ~0 elsewhere) and is differentiable in its input. `ESTIMATORS`
names the implementations a config may choose (config.model.pose_estimator.config.kind); a converted HigherHRNet
would be one more entry with the same interface.
"""

from __future__ import annotations

from typing import Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from pgpis_jax.nn.initializers import torch_default_kernel_init
from pgpis_jax.nn.resnet import GroupNorm

HEATMAP_STRIDE = 4


class TinyHeatmapNet(nn.Module):
    """A small stride-4 heatmap network (the reference's `TinyHeatmapNet`, Sec. 3.5): two stride-2 3x3
    convolutions (`down_0`, `down_1`) then `blocks` 3x3 convolutions (`block_{i}`) at stride 4, each followed by
    GroupNorm(8) and ReLU, and a 1x1 `head` to `joints` maps. image [B, H, W, 3] in [-1, 1] (H, W multiples of 4)
    -> heatmaps [B, H / 4, W / 4, joints] float32."""

    joints: int = 18
    channels: Tuple[int, ...] = (32, 64)
    blocks: int = 2
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, image):
        if image.ndim != 4 or image.shape[-1] != 3 or image.shape[1] % HEATMAP_STRIDE or image.shape[2] % HEATMAP_STRIDE:
            raise ValueError(f"heatmap estimator input must be [B, H, W, 3] with H, W multiples of {HEATMAP_STRIDE}, "
                             f"got {image.shape}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        widths = [self.channels[0], self.channels[-1]] + [self.channels[-1]] * self.blocks
        names = ["down_0", "down_1"] + [f"block_{i}" for i in range(self.blocks)]
        h = image.astype(self.dtype)
        for i, (width, name) in enumerate(zip(widths, names)):
            stride = 2 if i < 2 else 1
            h = nn.Conv(width, (3, 3), strides=(stride, stride), padding=((1, 1), (1, 1)),
                        kernel_init=torch_default_kernel_init, name=name, **kw)(h)
            h = nn.relu(GroupNorm(min(8, width), 1e-5, name=f"{name}_norm", **kw)(h))
        return nn.Conv(self.joints, (1, 1), kernel_init=torch_default_kernel_init, name="head", **kw)(h).astype(
            jnp.float32)

    def init_params(self, rng):
        return self.init(rng, jnp.zeros((1, 4 * HEATMAP_STRIDE, 4 * HEATMAP_STRIDE, 3), self.dtype))["params"]


ESTIMATORS = {"tiny": TinyHeatmapNet}


def build_estimator(config, **options):
    """The estimator of a network config {"kind": one of ESTIMATORS, **its fields}; ValueError otherwise."""
    fields = dict(config)
    kind = fields.pop("kind", None)
    if kind not in ESTIMATORS:
        raise ValueError(f"pose estimator kind {kind!r}; expected one of {', '.join(ESTIMATORS)}")
    if "channels" in fields:
        fields["channels"] = tuple(fields["channels"])
    return ESTIMATORS[kind](**fields, **options)


def gaussian_heatmaps(keypoints, image_hw: Tuple[int, int], sigma: float, stride: int = HEATMAP_STRIDE):
    """Target heatmaps [B, H / stride, W / stride, K] float32 of keypoints [B, K, 2] ((x, y) image pixels, negative
    = missing): exp(-d^2 / (2 sigma^2)), d the distance in heatmap cells from cell (i, j) to the joint. Cell i
    covers image pixels [i stride, (i + 1) stride), centred on pixel i stride + (stride - 1) / 2, so pixel x lies at
    cell coordinate (x - (stride - 1) / 2) / stride. Missing joints give all-zero maps."""
    height, width = image_hw[0] // stride, image_hw[1] // stride
    offset = (stride - 1) / (2.0 * stride)
    kp = jnp.asarray(keypoints, jnp.float32)
    x = kp[..., 0] / stride - offset
    y = kp[..., 1] / stride - offset
    visible = (kp[..., 0] >= 0) & (kp[..., 1] >= 0)
    rows = jnp.arange(height, dtype=jnp.float32)[None, :, None, None]
    cols = jnp.arange(width, dtype=jnp.float32)[None, None, :, None]
    squared = (rows - y[:, None, None, :]) ** 2 + (cols - x[:, None, None, :]) ** 2
    return jnp.where(visible[:, None, None, :], jnp.exp(-squared / (2.0 * sigma**2)), 0.0)


def pose_distance(heatmaps, targets, threshold: float):
    """G of Eq. 11 in heatmap mode (reference Sec. 3.2): per example [B], the mean over heatmap cells of
    W_h * sum_k (heatmaps_k - targets_k)^2 with W_h = 1[sum_k heatmaps_k > threshold or sum_k targets_k > threshold]
    (the union of the detected and the target support; no gradient through the mask). heatmaps, targets
    [B, h, w, K]."""
    mask = (jnp.sum(heatmaps, axis=-1) > threshold) | (jnp.sum(targets, axis=-1) > threshold)
    mask = jax.lax.stop_gradient(mask.astype(jnp.float32))
    squared = jnp.sum(jnp.square(heatmaps - targets), axis=-1)
    return jnp.mean((mask * squared).reshape(squared.shape[0], -1), axis=1)
