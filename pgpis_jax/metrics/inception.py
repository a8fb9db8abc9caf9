"""Inception-v3 pool3 features (2048-d) for FID, in linen, NHWC, with torchvision's parameter names.

Two variants share the skeleton of torchvision's `Inception3` (BasicConv2d = conv without bias, BatchNorm with
eps 1e-3 and running statistics, ReLU; stem, Mixed_5b..Mixed_7c, global average pool; no AuxLogits, no fc):
- "torchvision": ImageNet weights `inception_v3_google-0cc3c7bd.pth`; the pool branches of Mixed_5b-5d,
  6b-6e, 7b, 7c average 3x3 windows counting the zero padding. All four papers' FID code uses it (with the
  "legacy_pidm" input transform).
- "pt_inception": pytorch-fid's port of the TF FID network, `pt_inception-2015-12-05-6726825d.pth` (fc of 1008
  classes); those average pools exclude the padding, and Mixed_7c's pool branch is a 3x3 max pool.

Parameters: `<Block>/conv/kernel` [kh, kw, I, O] and `<Block>/bn/{scale, bias, running_mean, running_var}`,
i.e. the state-dict keys `<Block>.conv.weight`, `<Block>.bn.{weight, bias, running_mean, running_var}`
converted by pgpis_jax.weights.pytorch.

Input transforms (images [N, H, W, 3] in [0, 1], any H, W): bilinear resize to 299x299 (half-pixel centres,
edge clamp, no antialiasing: torch's F.interpolate(align_corners=False)), then
- "pytorch_fid": 2x - 1 (pytorch-fid since 2019);
- "legacy_pidm": x * (std_c / 0.5) + (mean_c - 0.5) / 0.5 with ImageNet mean/std, per channel: torchvision's
  `transform_input` applied to [0, 1] data by the GFLA / PIDM / PCDMs / FPDM / CFLD wrappers (and by
  pytorch-fid before 2019).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pgpis_jax.errors import UserError
from pgpis_jax.metrics.weights import find_weight_file, load_torch_weights

VARIANTS = ("pt_inception", "torchvision")
INPUT_TRANSFORMS = ("pytorch_fid", "legacy_pidm")
WEIGHT_FILES = {"pt_inception": "pt_inception-2015-12-05-6726825d.pth",
                "torchvision": "inception_v3_google-0cc3c7bd.pth"}
# The transform each variant's reference code feeds it with.
DEFAULT_INPUT_TRANSFORM = {"pt_inception": "pytorch_fid", "torchvision": "legacy_pidm"}
# Classifier sizes: the fc weight tells the two files apart (it is not loaded).
NUM_CLASSES = {"pt_inception": 1008, "torchvision": 1000}
# State-dict entries of the files that the pool3 network does not use.
IGNORED_KEYS = (r"fc\.bias", r"AuxLogits\..*", r".*\.num_batches_tracked")

INPUT_SIZE = 299
FEATURES = 2048
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Pool branch of InceptionA / C / E: 3x3, stride 1, padding 1.
POOLS = ("avg_include_pad", "avg_exclude_pad", "max")

Dtype = Any


class FrozenBatchNorm(nn.Module):
    """BatchNorm in inference mode with torch's names (scale, bias, running_mean, running_var); float32."""
    features: int
    epsilon: float = 1e-3
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (self.features,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
        mean = self.param("running_mean", nn.initializers.zeros, (self.features,), self.param_dtype)
        var = self.param("running_var", nn.initializers.ones, (self.features,), self.param_dtype)
        factor = scale.astype(jnp.float32) * jax.lax.rsqrt(var.astype(jnp.float32) + self.epsilon)
        return (x.astype(jnp.float32) - mean.astype(jnp.float32)) * factor + bias.astype(jnp.float32)


class BasicConv2d(nn.Module):
    """Conv (no bias) -> FrozenBatchNorm (eps 1e-3) -> ReLU. padding: torch's (ph, pw), symmetric."""
    features: int
    kernel_size: Tuple[int, int]
    strides: int = 1
    padding: Tuple[int, int] = (0, 0)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(self.features, self.kernel_size, strides=self.strides,
                    padding=tuple((p, p) for p in self.padding), use_bias=False, dtype=self.dtype,
                    param_dtype=self.param_dtype, precision=self.precision, name="conv")(x)
        x = FrozenBatchNorm(self.features, param_dtype=self.param_dtype, name="bn")(x)
        return nn.relu(x).astype(self.dtype)


def pool_3x3(x, pool: str):
    """The 3x3, stride-1, padding-1 pool of the Inception pool branches (`pool` in POOLS)."""
    padding = ((1, 1), (1, 1))
    if pool == "max":
        return nn.max_pool(x, (3, 3), strides=(1, 1), padding=padding)
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=padding, count_include_pad=pool == "avg_include_pad")


def max_pool_3x3_stride_2(x):
    return nn.max_pool(x, (3, 3), strides=(2, 2))


class _ConvModule(nn.Module):
    """Base of the Inception modules: `conv(name, features, kernel, ...)` makes a named BasicConv2d."""
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = jax.lax.Precision.HIGHEST

    def conv(self, name, features, kernel_size, strides=1, padding=(0, 0)):
        return BasicConv2d(features, kernel_size, strides, padding, dtype=self.dtype, param_dtype=self.param_dtype,
                           precision=self.precision, name=name)


class InceptionA(_ConvModule):
    """Mixed_5b/5c/5d: [1x1 64, 1x1 48 -> 5x5 64, 1x1 64 -> 3x3 96 -> 3x3 96, pool -> 1x1 pool_features]."""
    pool_features: int = 32
    pool: str = "avg_include_pad"

    @nn.compact
    def __call__(self, x):
        branch1x1 = self.conv("branch1x1", 64, (1, 1))(x)
        branch5x5 = self.conv("branch5x5_1", 48, (1, 1))(x)
        branch5x5 = self.conv("branch5x5_2", 64, (5, 5), padding=(2, 2))(branch5x5)
        branch3x3dbl = self.conv("branch3x3dbl_1", 64, (1, 1))(x)
        branch3x3dbl = self.conv("branch3x3dbl_2", 96, (3, 3), padding=(1, 1))(branch3x3dbl)
        branch3x3dbl = self.conv("branch3x3dbl_3", 96, (3, 3), padding=(1, 1))(branch3x3dbl)
        branch_pool = self.conv("branch_pool", self.pool_features, (1, 1))(pool_3x3(x, self.pool))
        return jnp.concatenate([branch1x1, branch5x5, branch3x3dbl, branch_pool], axis=-1)


class InceptionB(_ConvModule):
    """Mixed_6a (35 -> 17): [3x3/2 384, 1x1 64 -> 3x3 96 -> 3x3/2 96, max pool 3x3/2]."""

    @nn.compact
    def __call__(self, x):
        branch3x3 = self.conv("branch3x3", 384, (3, 3), strides=2)(x)
        branch3x3dbl = self.conv("branch3x3dbl_1", 64, (1, 1))(x)
        branch3x3dbl = self.conv("branch3x3dbl_2", 96, (3, 3), padding=(1, 1))(branch3x3dbl)
        branch3x3dbl = self.conv("branch3x3dbl_3", 96, (3, 3), strides=2)(branch3x3dbl)
        return jnp.concatenate([branch3x3, branch3x3dbl, max_pool_3x3_stride_2(x)], axis=-1)


class InceptionC(_ConvModule):
    """Mixed_6b-6e: [1x1 192, 1x1 c7 -> 1x7 -> 7x1 192, 1x1 c7 -> 7x1 -> 1x7 -> 7x1 -> 1x7 192, pool -> 1x1 192]."""
    channels_7x7: int = 128
    pool: str = "avg_include_pad"

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        branch1x1 = self.conv("branch1x1", 192, (1, 1))(x)
        branch7x7 = self.conv("branch7x7_1", c7, (1, 1))(x)
        branch7x7 = self.conv("branch7x7_2", c7, (1, 7), padding=(0, 3))(branch7x7)
        branch7x7 = self.conv("branch7x7_3", 192, (7, 1), padding=(3, 0))(branch7x7)
        branch7x7dbl = self.conv("branch7x7dbl_1", c7, (1, 1))(x)
        branch7x7dbl = self.conv("branch7x7dbl_2", c7, (7, 1), padding=(3, 0))(branch7x7dbl)
        branch7x7dbl = self.conv("branch7x7dbl_3", c7, (1, 7), padding=(0, 3))(branch7x7dbl)
        branch7x7dbl = self.conv("branch7x7dbl_4", c7, (7, 1), padding=(3, 0))(branch7x7dbl)
        branch7x7dbl = self.conv("branch7x7dbl_5", 192, (1, 7), padding=(0, 3))(branch7x7dbl)
        branch_pool = self.conv("branch_pool", 192, (1, 1))(pool_3x3(x, self.pool))
        return jnp.concatenate([branch1x1, branch7x7, branch7x7dbl, branch_pool], axis=-1)


class InceptionD(_ConvModule):
    """Mixed_7a (17 -> 8): [1x1 192 -> 3x3/2 320, 1x1 192 -> 1x7 -> 7x1 -> 3x3/2 192, max pool 3x3/2]."""

    @nn.compact
    def __call__(self, x):
        branch3x3 = self.conv("branch3x3_1", 192, (1, 1))(x)
        branch3x3 = self.conv("branch3x3_2", 320, (3, 3), strides=2)(branch3x3)
        branch7x7x3 = self.conv("branch7x7x3_1", 192, (1, 1))(x)
        branch7x7x3 = self.conv("branch7x7x3_2", 192, (1, 7), padding=(0, 3))(branch7x7x3)
        branch7x7x3 = self.conv("branch7x7x3_3", 192, (7, 1), padding=(3, 0))(branch7x7x3)
        branch7x7x3 = self.conv("branch7x7x3_4", 192, (3, 3), strides=2)(branch7x7x3)
        return jnp.concatenate([branch3x3, branch7x7x3, max_pool_3x3_stride_2(x)], axis=-1)


class InceptionE(_ConvModule):
    """Mixed_7b/7c: [1x1 320, 1x1 384 -> (1x3 | 3x1) 768, 1x1 448 -> 3x3 384 -> (1x3 | 3x1) 768,
    pool -> 1x1 192]."""
    pool: str = "avg_include_pad"

    @nn.compact
    def __call__(self, x):
        branch1x1 = self.conv("branch1x1", 320, (1, 1))(x)
        branch3x3 = self.conv("branch3x3_1", 384, (1, 1))(x)
        branch3x3 = jnp.concatenate([self.conv("branch3x3_2a", 384, (1, 3), padding=(0, 1))(branch3x3),
                                     self.conv("branch3x3_2b", 384, (3, 1), padding=(1, 0))(branch3x3)], axis=-1)
        branch3x3dbl = self.conv("branch3x3dbl_1", 448, (1, 1))(x)
        branch3x3dbl = self.conv("branch3x3dbl_2", 384, (3, 3), padding=(1, 1))(branch3x3dbl)
        branch3x3dbl = jnp.concatenate([self.conv("branch3x3dbl_3a", 384, (1, 3), padding=(0, 1))(branch3x3dbl),
                                        self.conv("branch3x3dbl_3b", 384, (3, 1), padding=(1, 0))(branch3x3dbl)],
                                       axis=-1)
        branch_pool = self.conv("branch_pool", 192, (1, 1))(pool_3x3(x, self.pool))
        return jnp.concatenate([branch1x1, branch3x3, branch3x3dbl, branch_pool], axis=-1)


def check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise UserError(f"unknown Inception variant {variant!r}; known: {', '.join(VARIANTS)}")


def block_pools(variant: str) -> dict:
    """The pool-branch kind of each Inception A / C / E block of `variant`."""
    check_variant(variant)
    blocks = ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7b",
              "Mixed_7c")
    if variant == "torchvision":
        return {block: "avg_include_pad" for block in blocks}
    return {**{block: "avg_exclude_pad" for block in blocks}, "Mixed_7c": "max"}


class InceptionV3(_ConvModule):
    """Inception-v3 up to the global average pool. __call__(x [N, H, W, 3], already transformed, H, W >= 75)
    -> pool3 features [N, 2048] float32. dtype: compute dtype of the convolutions (BatchNorm in float32)."""
    variant: str = "torchvision"

    @nn.compact
    def __call__(self, x):
        pools = block_pools(self.variant)
        options = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        conv = self.conv
        x = x.astype(self.dtype)
        x = conv("Conv2d_1a_3x3", 32, (3, 3), strides=2)(x)
        x = conv("Conv2d_2a_3x3", 32, (3, 3))(x)
        x = conv("Conv2d_2b_3x3", 64, (3, 3), padding=(1, 1))(x)
        x = max_pool_3x3_stride_2(x)
        x = conv("Conv2d_3b_1x1", 80, (1, 1))(x)
        x = conv("Conv2d_4a_3x3", 192, (3, 3))(x)
        x = max_pool_3x3_stride_2(x)
        for name, pool_features in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):
            x = InceptionA(pool_features=pool_features, pool=pools[name], name=name, **options)(x)
        x = InceptionB(name="Mixed_6a", **options)(x)
        for name, channels_7x7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
            x = InceptionC(channels_7x7=channels_7x7, pool=pools[name], name=name, **options)(x)
        x = InceptionD(name="Mixed_7a", **options)(x)
        for name in ("Mixed_7b", "Mixed_7c"):
            x = InceptionE(pool=pools[name], name=name, **options)(x)
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


def prepare_input(images, input_transform: str):
    """Images [N, H, W, 3] in [0, 1] -> the network input [N, 299, 299, 3] float32 (bilinear resize, then the
    `input_transform` of INPUT_TRANSFORMS). Traceable."""
    x = jnp.asarray(images, jnp.float32)
    if x.shape[1:3] != (INPUT_SIZE, INPUT_SIZE):
        x = jax.image.resize(x, (x.shape[0], INPUT_SIZE, INPUT_SIZE, x.shape[3]), method="linear", antialias=False)
    if input_transform == "pytorch_fid":
        return 2.0 * x - 1.0
    if input_transform == "legacy_pidm":
        scale = np.asarray(IMAGENET_STD, np.float32) / 0.5
        shift = (np.asarray(IMAGENET_MEAN, np.float32) - 0.5) / 0.5
        return x * scale + shift
    raise UserError(f"unknown Inception input transform {input_transform!r}; known: {', '.join(INPUT_TRANSFORMS)}")


def make_feature_fn(module: InceptionV3, params, input_transform: str,
                    batch_size: int = 50) -> Callable[[np.ndarray], np.ndarray]:
    """features_fn(images [N, H, W, 3] float in [0, 1]) -> pool3 features [N, 2048] float64.

    Runs in batches of `batch_size` (the last one padded, so one compilation per image size; fewer than
    `batch_size` images run as one batch of their own size)."""
    if input_transform not in INPUT_TRANSFORMS:
        raise UserError(f"unknown Inception input transform {input_transform!r}; known: "
                        f"{', '.join(INPUT_TRANSFORMS)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    params = jax.device_put(params)

    @jax.jit
    def batch_features(params, images):
        return module.apply({"params": params}, prepare_input(images, input_transform))

    def features_fn(images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3 or not np.issubdtype(images.dtype, np.floating):
            raise ValueError(f"expected float images [N, H, W, 3] in [0, 1], got {images.dtype} {images.shape}")
        count = len(images)
        features = np.empty((count, FEATURES), np.float64)
        step = max(1, min(batch_size, count))
        for start in range(0, count, step):
            batch = images[start:start + step].astype(np.float32)
            size = len(batch)
            if size < step:
                batch = np.concatenate([batch, np.zeros((step - size,) + batch.shape[1:], np.float32)])
            features[start:start + size] = np.asarray(batch_features(params, batch))[:size]
        return features

    return features_fn


def load_inception_params(variant: str, weights_dir: Optional[str] = None) -> dict:
    """The parameters of InceptionV3(variant) from its weight file WEIGHT_FILES[variant] (found by
    pgpis_jax.metrics.weights.find_weight_file). The file's fc weight must have NUM_CLASSES[variant] rows, so
    that the ImageNet file is not taken for the FID one or vice versa."""
    check_variant(variant)
    module = InceptionV3(variant=variant)
    path = find_weight_file(WEIGHT_FILES[variant], weights_dir)
    expected = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 75, 75, 3)))["params"]
    return load_torch_weights(path, expected, f"{variant} Inception-v3 weights", ignored_keys=IGNORED_KEYS,
                              identifying_shapes={"fc.weight": (NUM_CLASSES[variant], FEATURES)})


def load_inception(variant: str, weights_dir: Optional[str] = None, input_transform: Optional[str] = None,
                   batch_size: int = 50) -> Callable[[np.ndarray], np.ndarray]:
    """features_fn(images [N, H, W, 3] float in [0, 1]) -> float64 [N, 2048] for `variant` with its weight
    file; input_transform defaults to the variant's reference (DEFAULT_INPUT_TRANSFORM)."""
    params = load_inception_params(variant, weights_dir)
    return make_feature_fn(InceptionV3(variant=variant), params,
                           input_transform or DEFAULT_INPUT_TRANSFORM[variant], batch_size)
