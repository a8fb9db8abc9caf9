"""SSIM and PSNR against scikit-image (the implementation every paper's evaluation script calls) and a
hand-computed PSNR case."""

import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from pgpis_jax.metrics.ssim import psnr, ssim

WANG = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)


def random_pair(n, h, w, seed):
    """Independent-ish uint8 noise images [n, h, w, 3]: b is a noisy copy of a."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    b = np.clip(a + rng.normal(0, 40, a.shape), 0, 255).astype(np.uint8)
    return a, b


def structured_pair(n, h, w, seed):
    """Smooth scenes with sharp edges (sinusoids, a ramp, rectangles) and a degraded copy (shifted by a few
    pixels, blurred, brightened, with mild noise), uint8 [n, h, w, 3]."""
    rng = np.random.default_rng(seed)
    rows, cols = np.meshgrid(np.arange(h) / h, np.arange(w) / w, indexing="ij")
    scenes = []
    for _ in range(n):
        channels = []
        for _ in range(3):
            fx, fy, phase = rng.uniform(1, 6, 2).tolist() + [rng.uniform(0, 2 * np.pi)]
            image = 0.35 * np.sin(2 * np.pi * (fx * rows + fy * cols) + phase) + 0.3 * rows
            top, left = rng.integers(0, h // 2), rng.integers(0, w // 2)
            image[top:top + h // 3, left:left + w // 3] += rng.uniform(-0.5, 0.5)
            channels.append(image)
        scene = np.stack(channels, -1)
        scenes.append((scene - scene.min()) / (scene.max() - scene.min()) * 255)
    a = np.stack(scenes)
    shifted = np.roll(a, (2, -1), axis=(1, 2))
    blurred = (shifted + np.roll(shifted, 1, axis=1) + np.roll(shifted, 1, axis=2)) / 3
    b = 0.9 * blurred + 12 + rng.normal(0, 4, a.shape)
    return np.round(a).astype(np.uint8), np.clip(np.round(b), 0, 255).astype(np.uint8)


PAIRS = {
    "random_64x48": lambda: random_pair(2, 64, 48, 0),
    "structured_64x48": lambda: structured_pair(2, 64, 48, 1),
    "structured_256x176": lambda: structured_pair(2, 256, 176, 2),
}


def skimage_per_image(a, b, **options):
    return np.array([structural_similarity(x, y, **options) for x, y in zip(a, b)])


@pytest.mark.parametrize("pair", sorted(PAIRS))
def test_wang_default_on_uint8(pair):
    """Gaussian sigma 1.5 (11x11), population covariance, R = 255 on uint8, per RGB channel then averaged."""
    a, b = PAIRS[pair]()
    expected = skimage_per_image(a, b, data_range=255, channel_axis=2, **WANG)
    np.testing.assert_allclose(ssim(a, b, data_range=255), expected, rtol=0, atol=1e-10)
    assert expected.min() < 0.95, "the pair should not be near-identical"


@pytest.mark.parametrize("pair", ["random_64x48", "structured_256x176"])
def test_pcdms_sigma_1_2_with_prediction_range(pair):
    """PCDMs' reported SSIM: float32 images x255, sigma 1.2 (9x9), population covariance, R = max - min of
    each prediction. scikit-image computes float32 inputs in float32, we in float64."""
    pred, gt = (x.astype(np.float32) for x in PAIRS[pair]())
    pred = pred * np.float32(0.8) + np.float32(20.3)
    ranges = [float(p.max() - p.min()) for p in pred]
    expected = np.array([structural_similarity(g, p, gaussian_weights=True, sigma=1.2, use_sample_covariance=False,
                                               data_range=r, channel_axis=2) for p, g, r in zip(pred, gt, ranges)])
    ours = ssim(pred, gt, data_range="per_image_pred_range", sigma=1.2)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-5)
    expected64 = skimage_per_image(pred.astype(np.float64), gt.astype(np.float64), gaussian_weights=True,
                                   sigma=1.2, use_sample_covariance=False, data_range=ranges[0], channel_axis=2)
    ours64 = ssim(pred, gt, data_range=ranges[0], sigma=1.2)
    np.testing.assert_allclose(ours64, expected64, rtol=0, atol=1e-10)


@pytest.mark.parametrize("pair", ["structured_256x176", "random_64x48"])
def test_uniform_51_sample_covariance_data_range_1(pair):
    """CFLD / GFLA `ssim`: uniform 51x51 window (47x47 on the 64x48 pair), sample covariance, R = 1 on [0, 1]
    float images, 25-pixel border excluded."""
    a, b = (x / 255.0 for x in PAIRS[pair]())
    size = min(51, a.shape[2] - 1)
    expected = skimage_per_image(a, b, win_size=size, data_range=1, channel_axis=2, use_sample_covariance=True)
    ours = ssim(a, b, data_range=1, window="uniform", win_size=size, use_sample_covariance=True)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-10)
    expected32 = skimage_per_image(a.astype(np.float32), b.astype(np.float32), win_size=size, data_range=1,
                                   channel_axis=2, use_sample_covariance=True)
    np.testing.assert_allclose(ssim(a.astype(np.float32), b.astype(np.float32), data_range=1, window="uniform",
                                    win_size=size, use_sample_covariance=True), expected32, rtol=0, atol=1e-5)


def test_grayscale_and_gaussian_sample_covariance():
    """[N, H, W] grayscale; sample covariance with a Gaussian window uses n = win_size^2 as scikit-image."""
    a, b = (x[..., 0] for x in structured_pair(2, 64, 48, 3))
    expected = skimage_per_image(a, b, data_range=255, gaussian_weights=True, sigma=1.5, use_sample_covariance=True)
    np.testing.assert_allclose(ssim(a, b, data_range=255, use_sample_covariance=True), expected, rtol=0, atol=1e-10)
    expected = skimage_per_image(a, b, data_range=255, win_size=7, use_sample_covariance=False)
    np.testing.assert_allclose(ssim(a, b, data_range=255, window="uniform", win_size=7), expected, rtol=0, atol=1e-10)


def test_uncropped_mean_uses_reflected_borders():
    """crop_border=False averages scikit-image's full SSIM map (reflect-padded borders included)."""
    a, b = structured_pair(2, 64, 48, 4)
    expected = [np.mean([structural_similarity(x[..., c], y[..., c], data_range=255, full=True, **WANG)[1].mean()
                         for c in range(3)]) for x, y in zip(a, b)]
    np.testing.assert_allclose(ssim(a, b, data_range=255, crop_border=False), expected, rtol=0, atol=1e-10)


def test_channels_first_layout():
    a, b = random_pair(2, 64, 48, 5)
    a_nchw, b_nchw = a.transpose(0, 3, 1, 2), b.transpose(0, 3, 1, 2)
    expected = skimage_per_image(a_nchw, b_nchw, data_range=255, channel_axis=0, **WANG)
    np.testing.assert_allclose(ssim(a_nchw, b_nchw, data_range=255, channel_axis=1), expected, rtol=0, atol=1e-10)


def test_identical_images_give_one():
    a, _ = structured_pair(1, 64, 48, 6)
    np.testing.assert_allclose(ssim(a, a, data_range=255), [1.0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("options, message", [
    (dict(window="gaussian", win_size=7), "contradicts the gaussian window"),
    (dict(window="uniform"), "win_size=None"),
    (dict(window="uniform", win_size=8), "win_size=8"),
    (dict(window="uniform", win_size=65), "exceeds the 64x48 images"),
    (dict(window="box"), "window='box'"),
    (dict(sigma=0.0), "sigma=0.0"),
    (dict(data_range="pred_range"), "data_range='pred_range'"),
    (dict(channel_axis=2), "channel_axis=2"),
])
def test_bad_options_are_named(options, message):
    a, b = random_pair(1, 64, 48, 7)
    with pytest.raises(ValueError, match=message):
        ssim(a, b, **{"data_range": 255, **options})


def test_shape_mismatch_is_an_error():
    a, b = random_pair(1, 64, 48, 8)
    with pytest.raises(ValueError, match="differ in shape"):
        ssim(a, b[:, :, :40], data_range=255)


def test_psnr_hand_computed_case():
    """Squared errors 0, 4, 16, 0 on a 2x2 image: MSE 5, PSNR = 10 log10(255^2 / 5) dB."""
    a = np.zeros((1, 2, 2), np.uint8)
    b = np.array([[[0, 2], [4, 0]]], np.uint8)
    np.testing.assert_allclose(psnr(a, b, data_range=255), [10 * np.log10(255 ** 2 / 5)], rtol=0, atol=1e-12)
    assert psnr(b, b, data_range=255)[0] == np.inf


@pytest.mark.parametrize("scale, data_range", [(1 / 255, 1.0), (1.0, 255.0)])
def test_psnr_matches_skimage(scale, data_range):
    a, b = structured_pair(3, 64, 48, 9)
    a, b = a * scale, b * scale
    expected = [peak_signal_noise_ratio(x, y, data_range=data_range) for x, y in zip(a, b)]
    np.testing.assert_allclose(psnr(a, b, data_range=data_range), expected, rtol=0, atol=1e-9)
