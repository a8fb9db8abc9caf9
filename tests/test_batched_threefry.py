"""trainer.batched_threefry: the same bits as the function it wraps, from far fewer Threefry hashes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pgpis_jax.trainer.batched_threefry import with_batched_threefry


def _draws(key):
    """Keys split, folded (scalar and array messages) and vmapped; bits of 8 to 32 bits, an odd count, normals,
    uniforms, a permutation, bits in the other Threefry counter layout, a draw through a custom_jvp function: every
    way init code draws."""
    a, b, c = jax.random.split(key, 3)
    folded = jax.random.fold_in(a, 7)
    per_row = jax.vmap(lambda k: jax.random.normal(k, (5,)))(jax.random.split(b, 4))
    messages = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(c, jnp.arange(3, dtype=jnp.uint32))
    with jax.threefry_partitionable(not jax.config.jax_threefry_partitionable):   # the other counter layout
        other_layout = jax.random.bits(c, (4, 3))
    return {"bits8": jax.random.bits(folded, (3, 3), jnp.uint8),
            "bits16": jax.random.bits(folded, (7,), jnp.uint16),
            "odd": jax.random.bits(jax.random.fold_in(folded, 1), (3, 5)),
            "uniform": jax.random.uniform(c, (2, 3)),
            "per_row": per_row,
            "folded_rows": jax.vmap(lambda k: jax.random.bits(k, (2,)))(messages),
            "permutation": jax.random.permutation(a, 10),
            "other_layout": other_layout,
            "through_a_custom_rule": jax.nn.relu(jax.random.normal(jax.random.fold_in(b, 5), (6,))),
            "large": jax.random.normal(jax.random.fold_in(key, 3), (70, 1000))}


def _assert_bitwise_equal(expected, got):
    assert jax.tree.structure(expected) == jax.tree.structure(got)
    for (path, want), have in zip(jax.tree_util.tree_flatten_with_path(expected)[0], jax.tree.leaves(got)):
        assert want.dtype == have.dtype and want.shape == have.shape, jax.tree_util.keystr(path)
        np.testing.assert_array_equal(np.asarray(have).view(np.uint8), np.asarray(want).view(np.uint8),
                                      err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("max_elements", [1, 64, 1 << 16])
def test_every_kind_of_draw_gives_the_same_bits(max_elements):
    key = jax.random.key(3)
    _assert_bitwise_equal(jax.jit(_draws)(key), jax.jit(with_batched_threefry(_draws, max_elements))(key))


def test_legacy_uint32_keys_give_the_same_bits():
    draw = lambda seed: jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(seed), 2), (4, 4))
    _assert_bitwise_equal(jax.jit(draw)(5), jax.jit(with_batched_threefry(draw))(5))


class _Stack(nn.Module):
    """Twelve dense layers and norms: about 50 parameters, each with its own key."""

    @nn.compact
    def __call__(self, x):
        for width in (8, 16, 12, 8) * 3:
            x = nn.LayerNorm(use_scale=True, bias_init=nn.initializers.normal(0.1))(nn.Dense(width)(x))
        return x


def test_a_flax_init_is_bit_identical_and_compiles_far_fewer_hash_loops():
    init = lambda key: _Stack().init(key, jnp.zeros((1, 4)))
    plain, batched = (jax.jit(fn).lower(jax.random.key(0)).compile() for fn in (init, with_batched_threefry(init)))
    _assert_bitwise_equal(plain(jax.random.key(0)), batched(jax.random.key(0)))
    # on CPU each hash is a while loop: one per parameter before (48 here), one per level of keys after
    loops = [compiled.as_text().count(" while(") for compiled in (plain, batched)]
    assert loops[0] >= 48 and loops[1] <= 6, loops


def test_a_program_with_effects_is_left_as_it_is(capfd):
    def draw(key):
        jax.debug.print("drawn")
        return jax.random.normal(key, (3,))

    _assert_bitwise_equal(jax.jit(draw)(jax.random.key(1)), jax.jit(with_batched_threefry(draw))(jax.random.key(1)))
    assert capfd.readouterr().out.count("drawn") == 2


def test_draws_nobody_reads_are_left_out():
    def first_of_two(key):
        a, b = jax.random.split(key)
        return jax.random.normal(a, (4,)), jax.random.normal(b, (1000,))[0]

    only_first = lambda key: first_of_two(key)[0]
    _assert_bitwise_equal(jax.jit(only_first)(jax.random.key(2)),
                          jax.jit(with_batched_threefry(only_first))(jax.random.key(2)))
    text = jax.jit(with_batched_threefry(only_first)).lower(jax.random.key(2)).as_text()
    assert "1000" not in text and "1004" not in text
