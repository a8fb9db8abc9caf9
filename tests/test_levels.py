"""pgpis_jax.levels: the level tables equal TensorFlow's float32 arithmetic (what the pipeline computed before it
sent levels), and the lookup gives the same bits in NumPy and in JAX under jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from pgpis_jax import levels
from pgpis_jax.preprocessing import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

ALL_LEVELS = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)
TF_FORMULAS = {
    "signed": lambda x: x / 127.5 - 1.0,
    "unit": lambda x: x / 255.0,
    "clip": lambda x: (x / 255.0 - tf.constant(OPENAI_CLIP_MEAN)) / tf.constant(OPENAI_CLIP_STD),
    "imagenet": lambda x: (x / 255.0 - tf.constant(IMAGENET_DEFAULT_MEAN)) / tf.constant(IMAGENET_DEFAULT_STD),
}


@pytest.mark.parametrize("kind", levels.KINDS)
def test_tables_equal_tensorflow_float32_arithmetic_and_jit_lookup_equals_numpy(kind):
    expected = TF_FORMULAS[kind](tf.cast(tf.constant(ALL_LEVELS), tf.float32)).numpy()
    np.testing.assert_array_equal(levels.level_table(kind), expected)
    image = np.random.default_rng(0).integers(0, 256, (2, 5, 7, 3)).astype(np.uint8)
    on_host = levels.from_levels(image, kind)
    assert on_host.dtype == np.float32 and on_host.shape == image.shape
    np.testing.assert_array_equal(on_host, expected[image, np.arange(3)])
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda x: levels.from_levels(x, kind, jnp))(image)), on_host)
    np.testing.assert_array_equal(levels.from_levels(image[..., :1], kind), on_host[..., :1])


def test_bad_kind_and_channels():
    with pytest.raises(ValueError, match="unknown level kind 'sRGB'"):
        levels.level_table("sRGB")
    with pytest.raises(ValueError, match="at most 3 channels"):
        levels.from_levels(np.zeros((2, 2, 4), np.uint8), "unit")
