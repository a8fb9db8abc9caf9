"""L_vlb with a learned-range variance (pgpis_jax/diffusion/vlb.py) against a float64 computation by hand from
improved DDPM's formulas (Nichol & Dhariwal 2021, App. and guided-diffusion's losses, as PIDM uses them):
posterior tables, KL for t > 0, the discretised Gaussian decoder NLL at t = 0 (per element, case by case),
the frozen mean, and two closed-form values."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pgpis_jax.diffusion.vlb import PosteriorTables, vlb_terms

# PIDM's schedule: linear betas 1e-4 .. 2e-2 over 1000 steps, float64.
BETAS = np.linspace(1e-4, 2e-2, 1000, dtype=np.float64)


def hand_tables():
    """Posterior tables by explicit recursion in float64."""
    T = len(BETAS)
    alpha_bar = np.empty(T)
    product = 1.0
    for i in range(T):
        product *= 1.0 - BETAS[i]
        alpha_bar[i] = product
    prev = np.concatenate([[1.0], alpha_bar[:-1]])
    tilde = BETAS * (1 - prev) / (1 - alpha_bar)
    return alpha_bar, prev, tilde


def phi(x):
    return 0.5 * (1 + math.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def hand_vlb(eps, v, x0, x_t, t):
    """Per example, bits per dimension, float64, one element at a time for the decoder."""
    alpha_bar, prev, tilde = hand_tables()
    out = []
    for b in range(x0.shape[0]):
        s = int(t[b])
        log_tilde = math.log(tilde[max(s, 1)])
        beta, a, ap = BETAS[s], alpha_bar[s], prev[s]
        x0_hat = (x_t[b] - math.sqrt(1 - a) * eps[b]) / math.sqrt(a)
        c1, c2 = beta * math.sqrt(ap) / (1 - a), (1 - ap) * math.sqrt(1 - beta) / (1 - a)
        mean = c1 * x0_hat + c2 * x_t[b]
        log_var = (v[b] + 1) / 2 * math.log(beta) + (1 - (v[b] + 1) / 2) * log_tilde
        if s > 0:
            true_mean = c1 * x0[b] + c2 * x_t[b]
            var = np.exp(log_var)
            kl = 0.5 * (np.log(var) - log_tilde + np.exp(log_tilde) / var + (true_mean - mean) ** 2 / var - 1)
            out.append(kl.mean() / math.log(2))
            continue
        terms = []
        for x, m, lv in zip(x0[b].ravel(), mean.ravel(), log_var.ravel()):
            std = math.exp(0.5 * lv)
            upper, lower = phi((x - m + 1 / 255) / std), phi((x - m - 1 / 255) / std)
            if x < -0.999:
                p = upper
            elif x > 0.999:
                p = 1 - lower
            else:
                p = upper - lower
            terms.append(-math.log(max(p, 1e-12)))
        out.append(np.mean(terms) / math.log(2))
    return np.array(out)


def _batch(seed, t):
    rng = np.random.default_rng(seed)
    shape = (len(t), 4, 5, 3)
    x0 = rng.integers(0, 256, shape) / 127.5 - 1   # 8-bit levels, edges included
    noise = rng.normal(size=shape)
    alpha_bar = hand_tables()[0][np.asarray(t)].reshape(-1, 1, 1, 1)
    x_t = np.sqrt(alpha_bar) * x0 + np.sqrt(1 - alpha_bar) * noise
    eps = noise + 0.3 * rng.normal(size=shape)        # an imperfect prediction
    v = rng.uniform(-1, 1, shape)
    return eps, v, x0, x_t


def _ours(eps, v, x0, x_t, t):
    args = [jnp.asarray(a, jnp.float32) for a in (eps, v, x0, x_t)]
    return np.asarray(vlb_terms(PosteriorTables.from_betas(BETAS), *args, jnp.asarray(t)))


def test_tables_match_the_hand_recursion():
    tables = PosteriorTables.from_betas(BETAS)
    alpha_bar, prev, tilde = hand_tables()
    np.testing.assert_allclose(tables.alphas_cumprod, alpha_bar, rtol=1e-12)
    np.testing.assert_allclose(tables.alphas_cumprod_prev, prev, rtol=1e-12)
    np.testing.assert_allclose(tables.posterior_variance, tilde, rtol=1e-12)
    assert tables.posterior_variance[0] == 0
    np.testing.assert_allclose(tables.posterior_log_variance_clipped, np.log(np.r_[tilde[1], tilde[1:]]), rtol=1e-12)


@pytest.mark.parametrize("t", [[0, 0, 0], [1, 500, 999], [0, 10, 250]], ids=["decoder", "kl", "mixed"])
def test_vlb_matches_float64_hand_computation(t):
    eps, v, x0, x_t = _batch(sum(t) + 1, t)
    expected = hand_vlb(eps, v, x0, x_t, t)
    actual = _ours(eps, v, x0, x_t, t)
    print(f"t={t}: ours {actual}, hand {expected}, max rel error {np.max(np.abs(actual / expected - 1)):.2e}")
    np.testing.assert_allclose(actual, expected, rtol=2e-4)


def test_closed_form_values_and_frozen_mean():
    t = np.array([0, 3, 700])
    _, _, x0, x_t = _batch(7, t)
    alpha_bar, _, tilde = hand_tables()
    a = alpha_bar[t].reshape(-1, 1, 1, 1)
    true_eps = (x_t - np.sqrt(a) * x0) / np.sqrt(1 - a)
    # the true noise and v = -1 (sigma^2 = beta~_t) give the true posterior: KL = 0 for t > 0
    terms = _ours(true_eps, -np.ones_like(x0), x0, x_t, t)
    np.testing.assert_allclose(terms[1:], 0.0, atol=1e-5)
    # at t = 0 the decoder mean is x0 itself and sigma = sqrt(beta~_1): each interior bin holds 2 Phi(h / sigma) - 1,
    # an edge bin Phi(h / sigma) (h = 1 / 255; exact Phi here, the tanh approximation is within 1e-3 of it)
    z = (1 / 255) / math.sqrt(tilde[1])
    cdf = 0.5 * (1 + math.erf(z / math.sqrt(2)))
    edge = np.abs(x0[0]) > 0.999
    closed = np.where(edge, -math.log2(cdf), -math.log2(2 * cdf - 1)).mean()
    np.testing.assert_allclose(terms[0], closed, rtol=1e-2)

    # only the variance learns from L_vlb: no gradient reaches epsilon, a non-zero one reaches v
    tables = PosteriorTables.from_betas(BETAS)
    eps, v, x0, x_t = (jnp.asarray(a, jnp.float32) for a in _batch(8, t))

    def total(eps, v):
        return vlb_terms(tables, eps, v, x0, x_t, jnp.asarray(t)).sum()

    grad_eps, grad_v = jax.grad(total, argnums=(0, 1))(eps, v)
    assert not np.asarray(grad_eps).any() and np.abs(np.asarray(grad_v)).max() > 0
    unfrozen = jax.grad(lambda e: vlb_terms(tables, e, v, x0, x_t, jnp.asarray(t), freeze_mean=False).sum())(eps)
    assert np.abs(np.asarray(unfrozen)).max() > 0
    with pytest.raises(ValueError, match="vlb_terms needs epsilon, variance_values, x0 and x_t of one shape"):
        vlb_terms(tables, eps, v[..., :2], x0, x_t, jnp.asarray(t))
    print(f"tilde beta_1 = {tilde[1]:.3e}, decoder NLL at the true mean {terms[0]:.4f} bits/dim (closed form "
          f"{closed:.4f})")
