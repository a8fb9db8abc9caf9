"""Guidance rules against closed forms and diffusers' `rescale_noise_cfg`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

from pgpis_jax.diffusion import guidance

SHAPE = (3, 4, 5, 2)


def _branches(n, shape=SHAPE, seed=0):
    rng = np.random.default_rng(seed)
    # Different scales per branch so that std(cond) != std(guided).
    return [(1.0 + 0.5 * k) * rng.standard_normal(shape).astype(np.float32) for k in range(n)]


def test_classifier_free():
    u, c = _branches(2)
    np.testing.assert_allclose(guidance.classifier_free(u, c, 7.5), -6.5 * u + 7.5 * c, rtol=1e-5, atol=1e-5)


def test_cumulative():
    b = _branches(4)
    expected = b[0] + 2.0 * (b[1] - b[0]) + 0.5 * (b[2] - b[1]) + 3.0 * (b[3] - b[2])
    np.testing.assert_allclose(guidance.cumulative(b, [2.0, 0.5, 3.0]), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(guidance.cumulative(b[:2], [4.0]), b[0] + 4.0 * (b[1] - b[0]), rtol=1e-5, atol=1e-5)
    for scales in ([2.0, 0.5], [2.0, 0.5, 3.0, 1.0]):
        with pytest.raises(ValueError, match="4 branches"):
            guidance.cumulative(b, scales)


def test_cfld():
    uc, down, full = _branches(3)
    expected = uc + 1.5 * (down - uc) + 4.0 * (full - down)
    np.testing.assert_allclose(guidance.cfld(uc, down, full, pose_scale=1.5, appearance_scale=4.0), expected,
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(guidance.cfld(uc, down, full), uc + 2 * (down - uc) + 2 * (full - down),
                               rtol=1e-5, atol=1e-5)


def test_fpdm():
    u, src, glob = _branches(3)
    np.testing.assert_allclose(guidance.fpdm(u, src, glob, scale=2.5), u + 2.5 * (src - u) + 2.5 * (glob - src),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [SHAPE, (2, 1, 12)], ids=str)
@pytest.mark.parametrize("phi", [0.7, 2.0])
def test_rescale_matches_diffusers(phi, shape):
    guided, cond = _branches(2, shape, seed=1)
    expected = rescale_noise_cfg(torch.from_numpy(guided), torch.from_numpy(cond), guidance_rescale=phi).numpy()
    np.testing.assert_allclose(guidance.rescale(guided, cond, phi), expected, rtol=1e-5, atol=1e-5)


def test_pcdm():
    u, c = _branches(2, seed=2)
    for scale in (1.0, 0.5):
        assert np.array_equal(np.asarray(guidance.pcdm(u, c, scale, guidance_rescale=0.7)), c)
    np.testing.assert_allclose(guidance.pcdm(u, c, 2.0), u + 2.0 * (c - u), rtol=1e-5, atol=1e-5)
    cfg = u + 2.0 * (c - u)
    expected = rescale_noise_cfg(torch.from_numpy(cfg), torch.from_numpy(c), guidance_rescale=2.0).numpy()
    np.testing.assert_allclose(guidance.pcdm(u, c, 2.0, guidance_rescale=2.0), expected, rtol=1e-5, atol=1e-5)


def test_guided_batches_condition_pytrees_branch_major_and_combines_slices():
    x = _branches(1, seed=3)[0]
    batch, seen = x.shape[0], []
    conditions = [{"scale": jnp.full((batch,), float(k + 1)), "shift": (jnp.full((batch, 1), 10.0 * k),)}
                  for k in range(3)]

    def denoise(xs, t, condition):
        seen.append((np.asarray(xs), t, jax.tree.map(np.asarray, condition)))
        return xs * condition["scale"].reshape(-1, 1, 1, 1) + condition["shift"][0].reshape(-1, 1, 1, 1) + t

    model_fn = guidance.guided(denoise, conditions, lambda a, b, c: (a, b, c, a - 2 * b + 5 * c))
    a, b, c, combined = model_fn(x, 0.25)
    assert len(seen) == 1
    np.testing.assert_array_equal(seen[0][0], np.concatenate([x] * 3, axis=0))
    np.testing.assert_array_equal(seen[0][2]["scale"], np.repeat([1.0, 2.0, 3.0], batch))
    assert seen[0][1] == 0.25
    for k, out in enumerate((a, b, c)):
        np.testing.assert_allclose(out, x * (k + 1) + 10.0 * k + 0.25, rtol=1e-6)
    np.testing.assert_allclose(combined, a - 2 * b + 5 * c, rtol=1e-6)
    single = guidance.guided(denoise, conditions[1:2])(x, 0.5)
    np.testing.assert_allclose(single, 2 * x + 10.0 + 0.5, rtol=1e-6)
    assert len(seen) == 2 and seen[1][0].shape == x.shape
