"""Optimizer, parameter groups, accumulation, EMA and precision of the trainer, on the toy method
in-process (one CPU device)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pgpis_jax.errors import UserError
from pgpis_jax.trainer import optimizer as opt_lib, precision, tree
from tests.trainer_utils import Stepper, max_abs_diff, toy as toy_demo

FROZEN = ("blocks_0/.*", "time_embedding/.*")


def toy(**overrides):
    """The toy demo config with a smaller network (these tests compile many steps)."""
    return toy_demo(**{"model.hidden": 64, "model.depth": 2, **overrides})


# --- learning-rate schedules ---------------------------------------------------------------------------

def _lr(config, steps):
    schedule = opt_lib.learning_rate_schedule(config)
    return np.asarray([float(schedule(s)) for s in steps])


def test_constant_schedule():
    config = toy(**{"optimizer.schedule": "constant", "lr_schedule.warmup_steps": 0, "optimizer.learning_rate": 3e-4})
    np.testing.assert_allclose(_lr(config, range(50)), 3e-4, rtol=1e-6)


def test_linear_warmup_matches_closed_form():
    config = toy(**{"optimizer.schedule": "linear_warmup", "lr_schedule.warmup_steps": 10,
                    "lr_schedule.warmup_start_factor": 0.0, "optimizer.learning_rate": 2e-3})
    steps = np.arange(30)
    expected = 2e-3 * np.minimum(steps + 1, 10) / 10
    np.testing.assert_allclose(_lr(config, steps), expected, rtol=1e-6)


def test_cfld_step_decay_matches_closed_form():
    """CFLD: lr = base * (0.1 + 0.9 * (s + 1) / W) for s < W, then base * 0.1 ** (boundaries passed)."""
    base, warmup, bounds = 1e-4, 100, (250, 400)
    config = toy(**{"optimizer.schedule": "step_decay", "optimizer.learning_rate": base,
                    "lr_schedule.warmup_steps": warmup, "lr_schedule.warmup_start_factor": 0.1,
                    "lr_schedule.decay_boundaries": bounds, "lr_schedule.decay_factor": 0.1})
    steps = np.arange(500)
    expected = np.where(steps < warmup, base * (0.1 + 0.9 * (steps + 1) / warmup),
                        base * 0.1 ** np.sum(steps[:, None] >= np.asarray(bounds)[None, :], axis=1))
    np.testing.assert_allclose(_lr(config, steps), expected, rtol=1e-5)
    assert _lr(config, [0])[0] == pytest.approx(base * (0.1 + 0.9 / warmup), rel=1e-6)
    assert _lr(config, [249, 250, 399, 400]) == pytest.approx([base, base / 10, base / 10, base / 100], rel=1e-5)


def test_logged_learning_rate_is_the_schedule_of_each_update():
    config = toy(**{"optimizer.schedule": "linear_warmup", "lr_schedule.warmup_steps": 4})
    stepper = Stepper(config)
    logged = [stepper.step()["learning_rate"] for _ in range(6)]
    np.testing.assert_allclose(logged, _lr(config, range(6)), rtol=1e-6)


@pytest.mark.parametrize("overrides, fragment", [
    ({"optimizer.schedule": "constant", "lr_schedule.warmup_steps": 5}, "warmup_steps=5"),
    ({"optimizer.schedule": "cosine"}, "'cosine' is not supported"),
    ({"optimizer.schedule": "linear_warmup", "lr_schedule.warmup_steps": 0}, "warmup_steps > 0"),
])
def test_schedule_config_errors(overrides, fragment):
    with pytest.raises(UserError, match=fragment):
        opt_lib.learning_rate_schedule(toy(**overrides))


# --- encoded batches -------------------------------------------------------------------------------------

class _QuarterScaleImages:
    """The toy iterator with its images sent as 4 x the value and a `device_decode` that divides by 4 (exact in
    float32), as the input pipeline sends uint8 levels."""

    def __init__(self, iterator):
        self._iterator = iterator

    def __next__(self):
        batch = dict(next(self._iterator))
        batch["image"] = batch["image"] * np.float32(4)
        return batch

    @staticmethod
    def device_decode(batch):
        return {**batch, "image": batch["image"] / 4}


def test_the_iterators_device_decode_runs_inside_the_step():
    """Steps on encoded batches equal steps on the plain batches bit for bit (losses and parameters), and an
    encoded batch without its decode trains on other values."""
    config = toy(**{"batch_size": 4})
    plain, encoded = Stepper(config), Stepper(config, wrap_iterator=_QuarterScaleImages)
    losses = [(plain.step()["loss"], encoded.step()["loss"]) for _ in range(3)]
    assert all(a == b for a, b in losses), losses
    assert max_abs_diff(plain.params(), encoded.params()) == 0.0
    undecoded = Stepper(config)
    batch = undecoded.batch()
    assert undecoded.step({**batch, "image": batch["image"] * np.float32(4)})["loss"] != losses[0][0]


# --- frozen groups ---------------------------------------------------------------------------------------

def test_frozen_groups_have_no_optimizer_state_and_do_not_change():
    stepper = Stepper(toy(**{"param_groups.frozen": FROZEN, "ema.decay": 0.9}))
    before = tree.flatten(stepper.params())
    for _ in range(3):
        stepper.step()
    after = tree.flatten(stepper.params())
    frozen = {p for p in before if any(tree.path_str(p).startswith(f.split("/")[0] + "/") for f in FROZEN)}
    assert frozen and len(frozen) < len(before)
    for path in before:
        if path in frozen:
            np.testing.assert_array_equal(after[path], before[path])
        else:
            assert not np.array_equal(after[path], before[path]), tree.path_str(path)
    # every optimizer-state array belongs to a trainable parameter (Adam mu / nu) or is a scalar count
    opt_leaves = tree.flatten_with_paths(stepper.state["opt_state"])
    param_paths = set(before)
    owners = []
    for path, leaf in opt_leaves:
        if leaf.ndim == 0:
            continue
        owner = next(path[-n:] for n in range(len(path), 0, -1) if path[-n:] in param_paths)
        owners.append(owner)
    assert not set(owners) & frozen
    assert sorted(owners) == sorted(2 * [p for p in before if p not in frozen])  # mu and nu, nothing else
    assert set(tree.flatten(stepper.state["ema"])) == set(before) - frozen


def test_group_pattern_matching_nothing_is_an_error():
    with pytest.raises(UserError, match=r"frozen pattern 'blocks_9/\.\*' matches no parameter"):
        Stepper(toy(**{"param_groups.frozen": ("blocks_9/.*",)}))
    with pytest.raises(UserError, match="no trainable parameter"):
        Stepper(toy(**{"param_groups.frozen": (".*",)}))


# --- gradient accumulation, clipping ---------------------------------------------------------------------

@pytest.mark.parametrize("overrides", [{"grad.accumulation_steps": 4}, {"grad.max_per_device_batch": 8}])
def test_accumulated_micro_batches_equal_one_big_batch(overrides):
    """4 micro-batches of the toy's 32 rows, given as a count or as at most 8 rows on the one device."""
    one, four = Stepper(toy()), Stepper(toy(**overrides))
    for _ in range(3):
        batch = one.batch()
        m1, m4 = one.step(batch), four.step(batch)
        assert abs(m1["loss"] - m4["loss"]) < 1e-6
        assert abs(m1["grad_norm"] - m4["grad_norm"]) < 1e-6 * max(1.0, m1["grad_norm"])
    assert max_abs_diff(one.params(), four.params()) < 1e-6
    assert four.config.batch_size == 32
    jaxpr = jax.make_jaxpr(four.setup.train_step)(four.state, four.host.to_global(batch))
    assert [e.params["length"] for e in jaxpr.eqns if e.primitive.name == "scan"] == [4]


def test_batch_not_divisible_by_micro_batches_is_an_error():
    with pytest.raises(UserError, match="accumulation_steps 3"):
        Stepper(toy(**{"grad.accumulation_steps": 3}))


@pytest.mark.parametrize("batch, devices, limit, expected", [
    (32, 1, 4, 8), (32, 1, 5, 8), (32, 1, 32, 1), (32, 1, 100, 1), (32, 4, 4, 2), (32, 8, 4, 1), (24, 2, 5, 3),
    (24, 2, 1, 12)])
def test_max_per_device_batch_derives_the_fewest_even_micro_batches(batch, devices, limit, expected):
    """Hand-worked: 32 rows on 4 devices are 8 a device; at most 4 a device takes 2 micro-batches. 24 on 2 devices
    are 12 a device; at most 5 takes 3 micro-batches of 4 (2 would leave 6)."""
    from types import SimpleNamespace

    from pgpis_jax.trainer import step as step_lib

    config = toy(**{"batch_size": batch, "grad.max_per_device_batch": limit})
    mesh = SimpleNamespace(shape={"data": devices, "fsdp": 1})
    assert step_lib.accumulation_steps(config, mesh) == expected


def test_max_per_device_batch_excludes_accumulation_steps():
    with pytest.raises(UserError, match=r"max_per_device_batch=8 derives the accumulation steps: leave "
                                        r"config.grad.accumulation_steps at 1 \(got 2\)"):
        Stepper(toy(**{"grad.max_per_device_batch": 8, "grad.accumulation_steps": 2}))


def test_clipping_scales_the_gradient_to_the_clip_norm():
    free, clipped = Stepper(toy()), Stepper(toy(**{"grad.clip_norm": 0.01}))
    batch = free.batch()
    m_free, m_clip = free.step(batch), clipped.step(batch)
    assert m_free["grad_norm"] == pytest.approx(m_clip["grad_norm"], rel=1e-6)  # logged before clipping
    b1 = free.config.optimizer.b1

    def first_moments(stepper):
        return [leaf for path, leaf in tree.flatten_with_paths(jax.device_get(stepper.state["opt_state"]))
                if "mu" in path]

    grads = [m / (1 - b1) for m in first_moments(free)]
    clipped_grads = [m / (1 - b1) for m in first_moments(clipped)]
    scale = 0.01 / m_free["grad_norm"]
    for g, c in zip(grads, clipped_grads):
        np.testing.assert_allclose(c, g * scale, rtol=1e-4, atol=1e-9)


# --- EMA -------------------------------------------------------------------------------------------------

def test_ema_follows_its_recursion():
    decay = 0.8
    stepper = Stepper(toy(**{"ema.decay": decay}))
    expected = stepper.params()
    assert max_abs_diff(jax.device_get(stepper.state["ema"]), expected) == 0.0
    for _ in range(4):
        stepper.step()
        expected = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, expected, stepper.params())
    assert max_abs_diff(jax.device_get(stepper.state["ema"]), expected) < 1e-6


def test_no_ema_by_default():
    assert Stepper(toy(**{"ema.decay": 0.0})).state["ema"] == {}


# --- precision and remat ---------------------------------------------------------------------------------

def test_bfloat16_compute_keeps_float32_params_and_bf16_first_moment():
    stepper = Stepper(toy(**{"precision.compute_dtype": "bfloat16", "precision.mu_dtype": "bfloat16"}))
    metrics = stepper.step()
    assert np.isfinite(metrics["loss"]) and np.asarray(metrics["loss"]).dtype == np.float32
    assert {leaf.dtype for leaf in jax.tree.leaves(stepper.state["params"])} == {jnp.dtype("float32")}
    moments = {("mu" if "mu" in path else "nu"): leaf.dtype
               for path, leaf in tree.flatten_with_paths(stepper.state["opt_state"]) if leaf.ndim == 2}
    assert moments == {"mu": jnp.dtype("bfloat16"), "nu": jnp.dtype("float32")}
    compute = stepper.method.net.dtype
    assert compute == jnp.bfloat16


def test_bfloat16_params():
    stepper = Stepper(toy(**{"precision.param_dtype": "bfloat16"}))
    stepper.step()
    assert {leaf.dtype for leaf in jax.tree.leaves(stepper.state["params"])} == {jnp.dtype("bfloat16")}


def test_remat_policy_gives_the_same_step():
    plain, remat = Stepper(toy()), Stepper(toy(remat="dots_with_no_batch_dims_saveable"))
    batch = plain.batch()
    assert plain.step(batch)["loss"] == pytest.approx(remat.step(batch)["loss"], abs=1e-6)
    assert max_abs_diff(plain.params(), remat.params()) < 1e-6
    assert precision.remat_policy("full") == (True, None)
    with pytest.raises(UserError, match="config.remat 'sometimes'"):
        precision.remat_policy("sometimes")
