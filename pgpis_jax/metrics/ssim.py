"""SSIM and PSNR per image, with scikit-image's `structural_similarity` / `peak_signal_noise_ratio` semantics.

SSIM (Wang et al. 2004) compares local means, variances and the covariance of two images inside a sliding
window: S = (2 ux uy + C1)(2 vxy + C2) / ((ux^2 + uy^2 + C1)(vx + vy + C2)), C1 = (k1 R)^2, C2 = (k2 R)^2
with R the data range. As in scikit-image: the window is either a normalised Gaussian (radius
int(truncate * sigma + 0.5)) or a uniform box of `win_size`; borders are reflected (d c b a | a b c d);
"sample covariance" multiplies the variances by n / (n - 1) with n = win_size^2 (also for the Gaussian);
the SSIM map loses (win_size - 1) // 2 pixels on each border before its mean; colour images get one SSIM
per channel, then the mean over channels. The filtering runs in float64 (JAX with x64 enabled locally), as
two matrix products with banded [H_out, H] and [W_out, W] window matrices (borders folded in).
"""

from __future__ import annotations

from typing import Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

PER_IMAGE_PRED_RANGE = "per_image_pred_range"
WINDOWS = ("gaussian", "uniform")


def _as_nhwc(images, name: str, channel_axis: Optional[int]) -> np.ndarray:
    """float64 [N, H, W, C] from [N, H, W, C] (channels on `channel_axis`) or grayscale [N, H, W]."""
    images = np.asarray(images)
    if images.ndim == 3:
        return images.astype(np.float64)[..., None]
    if images.ndim != 4:
        raise ValueError(f"{name}: expected [N, H, W, C] or grayscale [N, H, W] images, got shape {images.shape}")
    if channel_axis is None or channel_axis % 4 not in (1, 3):
        raise ValueError(f"channel_axis={channel_axis!r}: for 4-D images it must be 1, 3 or -1 (the channel axis)")
    return np.moveaxis(images, channel_axis % 4, -1).astype(np.float64)


def _window_taps(window: str, sigma: float, win_size: Optional[int], truncate: float) -> np.ndarray:
    """The normalised 1-D filter taps (float64, odd length) of the separable SSIM window."""
    if window == "gaussian":
        if sigma <= 0:
            raise ValueError(f"sigma={sigma}: must be positive")
        radius = int(truncate * sigma + 0.5)
        if win_size is not None and win_size != 2 * radius + 1:
            raise ValueError(f"win_size={win_size} contradicts the gaussian window: sigma={sigma} and "
                             f"truncate={truncate} give {2 * radius + 1} taps; leave win_size=None")
        offsets = np.arange(-radius, radius + 1, dtype=np.float64)
        taps = np.exp(-0.5 * (offsets / sigma) ** 2)
        return taps / taps.sum()
    if window == "uniform":
        if win_size is None or win_size < 1 or win_size % 2 != 1:
            raise ValueError(f"win_size={win_size!r}: the uniform window needs an odd positive size (e.g. 7 or 51)")
        return np.full(win_size, 1.0 / win_size)
    raise ValueError(f"window={window!r}: expected one of {WINDOWS}")


def _data_ranges(a: np.ndarray, data_range: Union[float, str]) -> np.ndarray:
    """R per image [N] (float64): a fixed number, or max - min of each predicted image `a`."""
    if isinstance(data_range, str):
        if data_range != PER_IMAGE_PRED_RANGE:
            raise ValueError(f"data_range={data_range!r}: expected a number or {PER_IMAGE_PRED_RANGE!r}")
        flat = a.reshape(a.shape[0], -1)
        return flat.max(axis=1) - flat.min(axis=1)
    return np.full(a.shape[0], float(data_range))


def _filter_matrix(length: int, taps: np.ndarray, crop_border: bool) -> np.ndarray:
    """[L_out, length] float64 matrix applying the window along one image axis: output i is centred on input
    i + r (L_out = length - 2r) when cropping, else on input i with reflected borders (L_out = length)."""
    radius = len(taps) // 2
    outputs = np.arange(length - 2 * radius) + radius if crop_border else np.arange(length)
    sources = outputs[:, None] + np.arange(-radius, radius + 1)[None, :]
    sources = np.where(sources < 0, -sources - 1, sources)
    sources = np.where(sources >= length, 2 * length - sources - 1, sources)
    matrix = np.zeros((len(outputs), length))
    np.add.at(matrix, (np.repeat(np.arange(len(outputs)), len(taps)), sources.ravel()), np.tile(taps, len(outputs)))
    return matrix


def _ssim_per_channel(a, b, ranges, rows_filter, cols_filter, cov_norm, k1, k2):
    """Mean SSIM [N, C] of float64 [N, H, W, C] images; ranges [N]; the window as two filter matrices."""
    def local_mean(x):
        x = jnp.einsum("ih,nhwc->niwc", rows_filter, x, precision="highest")
        return jnp.einsum("jw,niwc->nijc", cols_filter, x, precision="highest")

    mean_a, mean_b = local_mean(a), local_mean(b)
    var_a = cov_norm * (local_mean(a * a) - mean_a * mean_a)
    var_b = cov_norm * (local_mean(b * b) - mean_b * mean_b)
    cov_ab = cov_norm * (local_mean(a * b) - mean_a * mean_b)
    c1 = ((k1 * ranges) ** 2)[:, None, None, None]
    c2 = ((k2 * ranges) ** 2)[:, None, None, None]
    ssim_map = ((2 * mean_a * mean_b + c1) * (2 * cov_ab + c2)
                / ((mean_a ** 2 + mean_b ** 2 + c1) * (var_a + var_b + c2)))
    return ssim_map.mean(axis=(1, 2))


_ssim_per_channel_jit = jax.jit(_ssim_per_channel, static_argnames=("cov_norm", "k1", "k2"))


def ssim(a, b, *, data_range: Union[float, str], window: str = "gaussian", sigma: float = 1.5,
         win_size: Optional[int] = None, truncate: float = 3.5, use_sample_covariance: bool = False,
         k1: float = 0.01, k2: float = 0.03, channel_axis: Optional[int] = -1,
         crop_border: bool = True) -> np.ndarray:
    """Mean SSIM per image pair, float64 [N].

    a: predicted images, b: reference images, [N, H, W, C] (channels on `channel_axis`) or grayscale
    [N, H, W], any real dtype (computed in float64). data_range: R (e.g. 255 for uint8, 1 for [0, 1]) or
    "per_image_pred_range" (max - min over all pixels and channels of each image of `a`, as PCDMs / CFLD).
    window: "gaussian" (sigma, truncate; win_size = 2 int(truncate sigma + 0.5) + 1, leave it None) or
    "uniform" (win_size required). crop_border: drop (win_size - 1) // 2 border pixels of the SSIM map
    before its mean, as scikit-image does. Defaults are Wang et al.'s (Gaussian sigma 1.5, 11x11,
    population covariance); scikit-image's own default is use_sample_covariance=True.
    """
    a, b = _as_nhwc(a, "a", channel_axis), _as_nhwc(b, "b", channel_axis)
    if a.shape != b.shape:
        raise ValueError(f"a and b differ in shape: {a.shape} vs {b.shape}")
    taps = _window_taps(window, sigma, win_size, truncate)
    if len(taps) > min(a.shape[1:3]):
        raise ValueError(f"the {len(taps)}x{len(taps)} SSIM window exceeds the {a.shape[1]}x{a.shape[2]} images")
    n_window = len(taps) ** 2
    if use_sample_covariance and n_window == 1:
        raise ValueError("use_sample_covariance needs a window of more than one pixel (n / (n - 1))")
    cov_norm = n_window / (n_window - 1) if use_sample_covariance else 1.0
    ranges = _data_ranges(a, data_range)
    with jax.enable_x64(True):
        per_channel = _ssim_per_channel_jit(
            jnp.asarray(a), jnp.asarray(b), jnp.asarray(ranges),
            jnp.asarray(_filter_matrix(a.shape[1], taps, crop_border)),
            jnp.asarray(_filter_matrix(a.shape[2], taps, crop_border)),
            cov_norm=cov_norm, k1=float(k1), k2=float(k2))
        return np.asarray(per_channel, np.float64).mean(axis=1)


def psnr(a, b, *, data_range: float) -> np.ndarray:
    """PSNR in dB per image pair, float64 [N]: 10 log10(R^2 / MSE), MSE over all pixels and channels of
    image i (float64). a, b: [N, ...] same shape. Identical images give +inf."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim < 2:
        raise ValueError(f"a and b must be [N, ...] batches of the same shape, got {a.shape} and {b.shape}")
    mse = ((a - b) ** 2).reshape(a.shape[0], -1).mean(axis=1)
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(float(data_range) ** 2 / mse)
