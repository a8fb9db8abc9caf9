"""torch's `F.interpolate(mode="bicubic")` (no antialias) in NumPy, as fixed linear maps.

Bicubic resizing is separable: along each axis the output is W @ input for a matrix W [out, in] that depends
only on the two sizes (and the scale factor, see below). `bicubic_weights` builds that matrix in float64 with
torch's rules, so it can also be baked into a JAX graph as a constant (an exact, differentiable resize of a
parameter, e.g. DINOv2's position-embedding table) -- `jax.image.resize(method="bicubic")` uses Keys' cubic
with a = -0.5 and antialiasing, torch uses a = -0.75 without.

torch's rules (aten's CPU/CUDA bicubic kernels, `area_pixel_compute_scale` / `_source_index`):
  * scale: with align_corners=False, 1 / scale_factor when an explicit scale factor reaches the kernel (i.e.
    `F.interpolate(scale_factor=s)` with recompute_scale_factor None or False), otherwise in_size / out_size;
    with align_corners=True, (in_size - 1) / (out_size - 1) (0 for a single output), scale factors ignored.
  * source position of output i: scale * (i + 0.5) - 0.5 (align_corners=False, not clamped at 0 for cubic),
    scale * i (align_corners=True).
  * x0 = min(floor(position), in_size - 1), t = clip(position - x0, 0, 1); taps x0-1 .. x0+2 with weights
    [K(t + 1), K(t), K(1 - t), K(2 - t)], K the cubic convolution kernel with a = -0.75; taps outside the
    input are clamped to the border (their weights add onto the first or last input sample).
  * output size with a scale factor: floor(in_size * scale_factor).

torch computes positions and coefficients in the input's precision (float32 for float32 inputs), which moves
its float32 results by up to ~1e-5 (for O(1) data) from the exact map; `bicubic_weights(precision=np.float32)`
reproduces that arithmetic (to ~1e-7), and `resize_bicubic` picks the precision from the array's dtype. The
weights are then applied in float64 and the result cast back, so results agree with torch to its float32
rounding of the sums, not bit for bit.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import numpy as np

CUBIC_A = -0.75  # torch's (and OpenCV's) cubic convolution coefficient

Pair = Union[int, float, Sequence[Union[int, float]]]


def _mul_add(a, b, c):
    """a * b + c with one rounding, in the type of the arguments (a fused multiply-add). float32 arguments:
    the float64 product of two float32 numbers is exact, and so is the float64 sum for the magnitudes of
    resampling positions, so rounding that sum to float32 is the fused result."""
    a, b, c = np.broadcast_arrays(a, b, c)
    if a.dtype == np.float64:
        return a * b + c
    return (a.astype(np.float64) * b.astype(np.float64) + c.astype(np.float64)).astype(a.dtype)


def _cubic_near(x, a):
    """K(x) = ((a + 2) x - (a + 3)) x^2 + 1 for |x| <= 1 (aten's cubic_convolution1), in the type of x."""
    real = lambda v: np.asarray(v, x.dtype)  # noqa: E731
    return _mul_add(_mul_add(a + real(2), x, -(a + real(3))) * x, x, real(1))


def _cubic_far(x, a):
    """K(x) = ((a x - 5a) x + 8a) x - 4a for 1 <= |x| <= 2 (aten's cubic_convolution2), in the type of x."""
    real = lambda v: np.asarray(v, x.dtype)  # noqa: E731
    return _mul_add(_mul_add(_mul_add(a, x, -(real(5) * a)), x, real(8) * a), x, -(real(4) * a))


def _check_size(value, what: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{what} must be a positive int, got {value!r}")
    return int(value)


def output_size(in_size: int, scale_factor: float) -> int:
    """The output length torch gives for `in_size` resized by `scale_factor`: floor(in_size * scale_factor)."""
    return int(math.floor(float(in_size) * float(scale_factor)))


def bicubic_weights(in_size: int, out_size: Optional[int] = None, scale_factor: Optional[float] = None,
                    align_corners: bool = False, precision=np.float64) -> np.ndarray:
    """The float64 matrix W [out_size, in_size] with which torch's bicubic resize maps an axis of length
    in_size to out_size (output = W @ input along that axis).

    scale_factor: the scale factor that reaches torch's kernel (an explicit `F.interpolate(scale_factor=...)`
    without recompute_scale_factor); it then sets the source positions (1 / scale_factor per output step)
    instead of in_size / out_size. out_size defaults to floor(in_size * scale_factor) and must be given when
    scale_factor is not.

    precision: the floating type in which the source positions and cubic coefficients are computed, as
    aten does in the input's "opmath" type: float32 for float32 / float16 / bfloat16 inputs, float64 for
    float64 inputs. The default float64 is the exact map (torch's, for a float64 input). np.float32 reproduces
    aten's float32 arithmetic as compiled for x86-64 (AVX2 / AVX-512 kernels) and CUDA, where the position
    scale * (i + 0.5) - 0.5 is a fused multiply-add: its float32 rounding moves torch's float32 weights by
    up to ~3e-6 from the exact ones (e.g. 37 -> 42), and this reproduces them to ~1e-7.
    """
    precision = np.dtype(precision).type
    if precision not in (np.float32, np.float64):
        raise ValueError(f"precision must be float32 or float64, got {np.dtype(precision)}")
    in_size = _check_size(in_size, "in_size")
    if scale_factor is not None:
        scale_factor = float(scale_factor)
        if not math.isfinite(scale_factor) or scale_factor <= 0:
            raise ValueError(f"scale_factor must be a positive finite number, got {scale_factor!r}")
        if out_size is None:
            out_size = output_size(in_size, scale_factor)
    if out_size is None:
        raise ValueError("bicubic_weights needs out_size or scale_factor")
    out_size = _check_size(out_size, "out_size")

    # every step below in `precision`, as aten does (sizes are exact in either type)
    real = lambda v: np.asarray(v, precision)  # noqa: E731
    index = np.arange(out_size).astype(precision)
    if align_corners:
        step = real(in_size - 1) / real(out_size - 1) if out_size > 1 else real(0)
        position = step * index
    else:
        step = real(1.0 / scale_factor) if scale_factor is not None else real(in_size) / real(out_size)
        position = _mul_add(step, index + real(0.5), real(-0.5))
    start = np.minimum(np.floor(position).astype(np.int64), in_size - 1)
    t = np.clip(position - start.astype(precision), real(0), real(1))
    one, a = real(1), real(CUBIC_A)
    taps_weights = np.stack([_cubic_far(t + one, a), _cubic_near(t, a), _cubic_near(one - t, a),
                             _cubic_far((one - t) + one, a)], axis=1).astype(np.float64)
    taps = np.clip(start[:, None] + np.arange(-1, 3)[None, :], 0, in_size - 1)
    weights = np.zeros((out_size, in_size), np.float64)
    np.add.at(weights, (np.repeat(np.arange(out_size), 4), taps.reshape(-1)), taps_weights.reshape(-1))
    return weights


def _pair(value, what: str) -> Tuple:
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ValueError(f"{what} must be a number or a pair (height, width), got {value!r}")
        return tuple(value)
    return (value, value)


def resize_weights(in_hw: Tuple[int, int], size: Optional[Pair] = None, scale_factor: Optional[Pair] = None,
                   recompute_scale_factor: Optional[bool] = None, align_corners: bool = False,
                   precision=np.float64) -> Tuple[np.ndarray, np.ndarray]:
    """(W_h [out_h, in_h], W_w [out_w, in_w]) for `F.interpolate(x, size, scale_factor, mode="bicubic",
    align_corners, recompute_scale_factor)` of an input with spatial shape in_hw; exactly one of size and
    scale_factor is given. precision: see `bicubic_weights` (np.float32 for a float32 torch input)."""
    kw = dict(align_corners=align_corners, precision=precision)
    if (size is None) == (scale_factor is None):
        raise ValueError("give exactly one of size and scale_factor")
    if size is not None:
        if recompute_scale_factor:
            raise ValueError("recompute_scale_factor is not meaningful with an explicit size")
        sizes = _pair(size, "size")
        return tuple(bicubic_weights(n, s, **kw) for n, s in zip(in_hw, sizes))
    scales = _pair(scale_factor, "scale_factor")
    if recompute_scale_factor:  # torch computes the size, then forgets the scale factor
        return tuple(bicubic_weights(n, output_size(n, s), **kw) for n, s in zip(in_hw, scales))
    return tuple(bicubic_weights(n, scale_factor=s, **kw) for n, s in zip(in_hw, scales))


def resize_bicubic(array, size: Optional[Pair] = None, scale_factor: Optional[Pair] = None,
                   recompute_scale_factor: Optional[bool] = None, align_corners: bool = False) -> np.ndarray:
    """torch's `F.interpolate(x, size=size, scale_factor=scale_factor, mode="bicubic",
    align_corners=align_corners, recompute_scale_factor=recompute_scale_factor)` for a NumPy array
    [..., H, W] of floating dtype (any number of leading axes): computed in float64, returned in the input's
    dtype. size and scale_factor: a number or a (height, width) pair; exactly one is given.

    Source positions and cubic coefficients are computed as torch does for this dtype (float64 for float64
    arrays, float32 otherwise: aten's opmath type), then applied in float64; the result matches torch to
    float32 rounding of the sums (float32) or ~1e-15 (float64)."""
    array = np.asarray(array)
    if array.ndim < 2 or not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"resize_bicubic needs a floating array [..., H, W], got dtype {array.dtype} and shape "
                         f"{array.shape}")
    precision = np.float64 if array.dtype == np.float64 else np.float32
    weights_h, weights_w = resize_weights(array.shape[-2:], size, scale_factor, recompute_scale_factor,
                                          align_corners, precision)
    out = np.einsum("oh,...hw,pw->...op", weights_h, array.astype(np.float64), weights_w)
    return out.astype(array.dtype)


__all__ = ["CUBIC_A", "bicubic_weights", "output_size", "resize_bicubic", "resize_weights"]
