"""pgpis_jax.interpolation (torch's bicubic F.interpolate as fixed linear maps in NumPy) against torch itself:
up- and down-sampling, odd and non-square sizes, explicit sizes versus scale factors (with and without
recompute_scale_factor), align_corners both ways, float64 and float32 inputs."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pgpis_jax.interpolation import bicubic_weights, resize_bicubic

TOLERANCE = 1e-6

IN_SIZES = [(37, 37), (5, 7), (1, 3), (13, 4), (16, 16)]
SIZES = [(42, 35), (74, 74), (3, 2), (1, 1), (6, 5), (27, 12), "same"]
SCALES = [0.5, 0.3, 1.0, 1.7, 2.0, 3.0, (1.37, 0.8), 37 / 16 + 0.1 / 16]


def _cases():
    for in_hw in IN_SIZES:
        for size in SIZES:
            yield in_hw, dict(size=in_hw if size == "same" else size)
        for scale in SCALES:
            smallest = scale if isinstance(scale, float) else min(scale)
            if int(min(in_hw) * smallest) < 1:  # torch refuses an empty output
                continue
            for recompute in (None, True):
                yield in_hw, dict(scale_factor=scale, recompute_scale_factor=recompute)


CASES = list(_cases())


def _compare(dtype, data):
    rng = np.random.default_rng(0)
    worst = 0.0
    for in_hw, kwargs in CASES:
        for align_corners in (False, True):
            x = data(rng, (2, 3) + in_hw).astype(dtype)
            expected = F.interpolate(torch.from_numpy(x), mode="bicubic", align_corners=align_corners,
                                     **kwargs).numpy()
            actual = resize_bicubic(x, align_corners=align_corners, **kwargs)
            assert actual.shape == expected.shape, (in_hw, kwargs)
            assert actual.dtype == expected.dtype
            error = float(np.abs(actual - expected).max())
            assert error <= TOLERANCE, f"{in_hw} {kwargs} align_corners={align_corners}: max abs error {error}"
            worst = max(worst, error)
    return worst


def test_float64_matches_torch():
    worst = _compare(np.float64, lambda rng, shape: rng.standard_normal(shape) * 3)
    print(f"float64, {len(CASES) * 2} cases: max abs error {worst:.1e}")
    assert worst < 1e-12


def test_float32_matches_torch():
    """torch computes float32 positions in float32 (a fused multiply-add); the exact float64 map would differ
    from it by up to ~1e-5 here, the emulated float32 map by float32 rounding of the sums."""
    worst = _compare(np.float32, lambda rng, shape: rng.uniform(-1, 1, shape))
    print(f"float32, {len(CASES) * 2} cases: max abs error {worst:.1e}")

    # DINOv2's case, 37 x 37 -> 42 x 35: the exact (float64-arithmetic) map is further from torch's float32 result
    x = np.random.default_rng(2).uniform(-1, 1, (4, 37, 37)).astype(np.float32)
    expected = F.interpolate(torch.from_numpy(x)[None], size=(42, 35), mode="bicubic", align_corners=False)[0].numpy()
    exact = np.einsum("oh,chw,pw->cop", bicubic_weights(37, 42), x.astype(np.float64), bicubic_weights(37, 35))
    emulated = np.einsum("oh,chw,pw->cop", bicubic_weights(37, 42, precision=np.float32), x.astype(np.float64),
                         bicubic_weights(37, 35, precision=np.float32))
    assert np.abs(exact - expected).max() > 3e-6 and np.abs(emulated - expected).max() < TOLERANCE


def test_scale_factor_differs_from_size():
    """An explicit scale factor sets the source step (1 / s), not in / out: 37 * 0.3 -> 11 outputs at step 3.33
    instead of 37 / 11 = 3.36; recompute_scale_factor=True falls back to the size rule."""
    by_scale = bicubic_weights(37, scale_factor=0.3)
    by_size = bicubic_weights(37, 11)
    assert by_scale.shape == by_size.shape == (11, 37)
    assert np.abs(by_scale - by_size).max() > 1e-2
    x = np.random.default_rng(1).standard_normal((1, 1, 37, 37))
    np.testing.assert_allclose(resize_bicubic(x, scale_factor=0.3, recompute_scale_factor=True),
                               resize_bicubic(x, size=(11, 11)), rtol=0, atol=1e-15)


def test_weights_properties():
    for in_size, out_size in [(37, 42), (37, 5), (1, 4), (4, 1), (9, 9)]:
        weights = bicubic_weights(in_size, out_size)
        assert weights.shape == (out_size, in_size) and weights.dtype == np.float64
        np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=1e-12)  # the cubic kernel is a partition of 1
        assert (np.count_nonzero(weights, axis=1) <= 4).all()
    np.testing.assert_array_equal(bicubic_weights(9, 9), np.eye(9))
    # a = -0.75 (torch / OpenCV), not Keys' -0.5 of jax.image.resize (which would give -0.0625, 0.5625):
    # 8 -> 4, output 1 sits at 2.5, halfway between samples 2 and 3
    np.testing.assert_allclose(bicubic_weights(8, 4)[1], [0, -0.09375, 0.59375, 0.59375, -0.09375, 0, 0, 0],
                               atol=1e-15)


def test_bad_arguments():
    x = np.zeros((1, 1, 4, 4))
    with pytest.raises(ValueError, match="exactly one"):
        resize_bicubic(x)
    with pytest.raises(ValueError, match="exactly one"):
        resize_bicubic(x, size=3, scale_factor=2.0)
    with pytest.raises(ValueError, match="floating"):
        resize_bicubic(np.zeros((4, 4), np.int32), size=3)
    with pytest.raises(ValueError, match="recompute_scale_factor"):
        resize_bicubic(x, size=3, recompute_scale_factor=True)
    with pytest.raises(ValueError, match="out_size"):
        bicubic_weights(4, 0)
    with pytest.raises(ValueError, match="out_size"):
        bicubic_weights(4, scale_factor=0.1)  # floor(0.4) = 0 outputs
    with pytest.raises(ValueError, match="scale_factor"):
        bicubic_weights(4, scale_factor=-1.0)
    with pytest.raises(ValueError, match="precision"):
        bicubic_weights(4, 3, precision=np.float16)
