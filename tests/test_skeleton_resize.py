"""pgpis_jax.skeleton_resize: the sparse NumPy resize equals `input_pipeline.resize` (TensorFlow) bit for bit on
dense random images and on "pidm" skeletons (edges, missing joints, empty canvas, borders), for FPDM's sizes."""

import numpy as np
import pytest
import tensorflow as tf

from pgpis_jax import poses
from pgpis_jax.input_pipeline import resize
from pgpis_jax.skeleton_resize import SparseResize

FPDM_CANVAS = (550, 375)
FUSION_CANVAS = (1101, 750)
SIZE_PAIRS = [(FPDM_CANVAS, (512, 352)), (FPDM_CANVAS, (224, 224)), (FUSION_CANVAS, (224, 224))]

# A standing person facing the camera, (x, y) as fractions of the canvas width and height: head at 6 %,
# ankles at 94 % of the height.
STANDING = np.array([
    [0.50, 0.12], [0.50, 0.31], [0.29, 0.31], [0.21, 0.47], [0.17, 0.62], [0.71, 0.31], [0.79, 0.47],
    [0.83, 0.62], [0.38, 0.62], [0.33, 0.78], [0.31, 0.94], [0.62, 0.62], [0.67, 0.78], [0.69, 0.94],
    [0.42, 0.06], [0.58, 0.06], [0.33, 0.16], [0.67, 0.16],
], np.float32)


@pytest.fixture(scope="module")
def resizers():
    return {pair: SparseResize(*pair) for pair in SIZE_PAIRS}


def _assert_same(image, out_hw, resizer):
    expected = resize(tf.constant(image), out_hw).numpy()
    actual = resizer(image)
    assert actual.dtype == expected.dtype == np.uint8 and actual.shape == expected.shape
    np.testing.assert_array_equal(actual, expected)


def _skeleton(keypoints, canvas):
    return poses.draw_skeleton(keypoints, canvas, "pidm", stickwidth=4, radius=4)


def _standing(canvas, rng, height=0.8, missing=0):
    """A standing person filling `height` of the canvas, jittered and placed at random, `missing` joints lost."""
    h, w = canvas
    kp = STANDING * np.float32(height) + rng.normal(0, 0.01, STANDING.shape).astype(np.float32)
    kp += np.float32([rng.uniform(0, 1 - height), rng.uniform(0, 1 - height)])
    kp *= np.float32([w, h])
    kp[rng.choice(poses.NUM_KEYPOINTS, missing, replace=False)] = poses.MISSING
    return kp


def _poses(canvas, rng):
    """Keypoint sets covering the cases the pipeline meets: typical people, partial poses, joints on and past
    the edges, an empty canvas and a figure that touches all four borders."""
    h, w = canvas
    edges = _standing(canvas, rng)
    edges[[4, 7, 10, 13]] = [[0, h * 0.5], [w - 1, h * 0.5], [w * 0.3, h - 1], [w + 20, h - 1]]
    edges[[14, 15]] = [[w * 0.4, 0], [w * 0.6, -30]]
    spread = np.stack([rng.uniform(-0.1 * w, 1.1 * w, 18), rng.uniform(-0.1 * h, 1.1 * h, 18)], -1)
    borders = STANDING * np.float32([w - 1, h - 1]) / np.float32([0.83, 0.94])
    borders[[4, 14, 10]] = [[0, h * 0.6], [w * 0.4, 0], [w * 0.3, h - 1]]
    return {
        "standing": _standing(canvas, rng),
        "small and off-centre": _standing(canvas, rng, height=0.3),
        "missing joints": _standing(canvas, rng, missing=6),
        "only the head": np.where(np.arange(18)[:, None] >= 14, _standing(canvas, rng), poses.MISSING),
        "joints on and past the edges": edges,
        "scattered": spread.astype(np.float32),
        "touching all borders": borders,
        "empty": np.full((18, 2), poses.MISSING, np.float32),
    }


@pytest.mark.parametrize("pair", SIZE_PAIRS, ids=lambda p: f"{p[0]}->{p[1]}")
def test_matches_tensorflow_on_dense_random_images(pair, resizers):
    for seed in range(3):
        image = np.random.default_rng(seed).integers(0, 256, (*pair[0], 3), dtype=np.uint8)
        _assert_same(image, pair[1], resizers[pair])


@pytest.mark.parametrize("pair", SIZE_PAIRS, ids=lambda p: f"{p[0]}->{p[1]}")
def test_matches_tensorflow_on_skeletons(pair, resizers):
    canvas, out_hw = pair
    for name, keypoints in _poses(canvas, np.random.default_rng(1)).items():
        image = _skeleton(keypoints, canvas)
        assert image.any() == (name != "empty")
        if name == "touching all borders":
            assert image[0].any() and image[-1].any() and image[:, 0].any() and image[:, -1].any()
        _assert_same(image, out_hw, resizers[pair])


def test_matches_tensorflow_off_the_tile_grid_and_on_one_channel():
    """Sizes that are not multiples of the 8-pixel tiles, sparse and dense, with one and with three channels."""
    rng = np.random.default_rng(2)
    for channels in (1, 3):
        resizer = SparseResize((61, 45), (27, 19), channels=channels)
        dense = rng.integers(0, 256, (61, 45, channels), dtype=np.uint8)
        sparse = np.where(rng.random((61, 45, 1)) < 0.02, dense, 0).astype(np.uint8)
        for image in (dense, sparse):
            _assert_same(image, (27, 19), resizer)


def test_runs_inside_numpy_function(resizers):
    pair = SIZE_PAIRS[0]
    image = _skeleton(_standing(pair[0], np.random.default_rng(3)), pair[0])
    out = tf.numpy_function(resizers[pair], [tf.constant(image)], tf.uint8)
    np.testing.assert_array_equal(out.numpy(), resize(tf.constant(image), pair[1]).numpy())


@pytest.mark.parametrize("in_hw, out_hw", [
    ((550, 375), (600, 352)), ((550, 375), (512, 375)), ((550, 375), (550, 375)), ((550, 375), (0, 100))])
def test_rejects_sizes_that_do_not_shrink(in_hw, out_hw):
    with pytest.raises(ValueError, match="only shrinks"):
        SparseResize(in_hw, out_hw)


def test_rejects_wrong_images(resizers):
    resizer = resizers[SIZE_PAIRS[1]]
    wrong = [np.zeros((550, 375, 3), np.float32), np.zeros((375, 550, 3), np.uint8), np.zeros((550, 375), np.uint8),
             np.zeros((550, 375, 4), np.uint8), tf.zeros((550, 375, 3), tf.uint8)]
    for image in wrong:
        with pytest.raises(ValueError, match="expects a uint8 NumPy image"):
            resizer(image)
