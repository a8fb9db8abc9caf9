"""The splash (TPU Pallas, interpret mode on CPU) and chunked (blockwise, plain JAX) attention kernels against the
xla einsum path (itself checked against NumPy and diffusers in test_nn_blocks.py), float32 on CPU, at lengths
that are not multiples of the block size; gradients; the modules built with them; "auto"'s choice per device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pgpis_jax.models.encoders.swin import SwinModel
from pgpis_jax.models.unet import UNet2DConditionModel
from pgpis_jax.nn.attention import (CPU_BLOCK_SIZE, CPU_CHUNKED_MIN_KEYS, Attention, dot_product_attention,
                                   resolve_implementation)
from tests.parity import jitted, jitted_init

TOLERANCE = 1e-5
BATCH, HEADS, HEAD_DIM = 2, 2, 40
# (query length, key length): self-attention, and cross-attention with more keys than queries, none a multiple of
# the blocks used below (64 for chunked; 128 for splash, which pads to whole blocks)
LENGTHS = {"self": (230, 230), "cross": (200, 300)}
CHUNK = 64
SPLASH_BLOCK = 128


def _qkv(query_length, key_length, seed=0, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(seed), 3)
    shapes = [(BATCH, length, HEADS, HEAD_DIM) for length in (query_length, key_length, key_length)]
    return [jax.random.normal(k, s).astype(dtype) for k, s in zip(keys, shapes)]


def _bias(shape, seed=1):
    return 2.0 * jax.random.normal(jax.random.key(seed), shape)


def _bias_shapes(query_length, key_length):
    """None, a full bias, and biases broadcast along each axis (a per-key mask, per-query rows, one scalar)."""
    return {"none": None, "full": (BATCH, HEADS, query_length, key_length), "per_key": (1, HEADS, 1, key_length),
            "per_query": (BATCH, 1, query_length, 1), "scalar": (1, 1, 1, 1)}


def _max_error(actual, expected):
    return float(jnp.abs(jnp.asarray(actual, jnp.float32) - jnp.asarray(expected, jnp.float32)).max())


@pytest.mark.parametrize("bias_kind", ["none", "full", "per_key", "per_query", "scalar"])
@pytest.mark.parametrize("kind", ["self", "cross"])
def test_chunked_matches_xla(kind, bias_kind):
    query_length, key_length = LENGTHS[kind]
    q, k, v = _qkv(query_length, key_length)
    if kind == "self":
        k, v = q, jnp.flip(q, axis=1)
    shape = _bias_shapes(query_length, key_length)[bias_kind]
    bias = None if shape is None else _bias(shape)
    expected = dot_product_attention(q, k, v, "xla", bias=bias)
    for block_size in (CHUNK, None):   # several blocks with a padded last one; one block (the default, 512)
        actual = dot_product_attention(q, k, v, "chunked", bias=bias, block_size=block_size)
        assert actual.shape == expected.shape and actual.dtype == jnp.float32
        error = _max_error(actual, expected)
        print(f"chunked {kind} bias={bias_kind} block={block_size}: max abs error {error:.1e}")
        assert error <= TOLERANCE


def test_chunked_takes_a_minus_infinity_mask():
    """A bias of -inf over the first key block of some rows (no finite logit yet when the scan starts there)."""
    query_length, key_length = LENGTHS["cross"]
    q, k, v = _qkv(query_length, key_length, seed=9)
    masked = (jnp.arange(query_length)[:, None] % 3 == 0) & (jnp.arange(key_length)[None] < 2 * CHUNK)
    bias = jnp.where(masked, -jnp.inf, 0.0)[None, None]
    actual = dot_product_attention(q, k, v, "chunked", bias=bias, block_size=CHUNK)
    error = _max_error(actual, dot_product_attention(q, k, v, "xla", bias=bias))
    print(f"chunked with a -inf mask: max abs error {error:.1e}")
    assert bool(jnp.isfinite(actual).all()) and error <= TOLERANCE


@pytest.mark.parametrize("bias_kind", ["none", "full", "per_key", "per_query", "scalar", "batch_broadcast"])
@pytest.mark.parametrize("kind", ["self", "cross"])
def test_chunked_gradients_match_xla(kind, bias_kind):
    """d/d(query, key, value, bias) of a weighted sum of the output (the chunked kernel's hand-written backward
    against autodiff of xla), with the bias full, broadcast along each axis, or over the batch only. A bias constant
    along the keys shifts whole softmax rows: its exact gradient is zero, where xla's has rounding noise."""
    query_length, key_length = LENGTHS[kind]
    q, k, v = _qkv(query_length, key_length, seed=2)
    shapes = dict(_bias_shapes(query_length, key_length), batch_broadcast=(1, HEADS, query_length, key_length))
    bias = None if shapes[bias_kind] is None else _bias(shapes[bias_kind], seed=3)
    weights = jax.random.normal(jax.random.key(4), (BATCH, query_length, HEADS, HEAD_DIM))

    def gradients(implementation):
        loss = lambda *args: jnp.sum(weights * dot_product_attention(  # noqa: E731
            *args[:3], implementation, bias=args[3], block_size=CHUNK))
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2) if bias is None else (0, 1, 2, 3)))(q, k, v, bias)

    for name, actual, expected in zip(("query", "key", "value", "bias"), gradients("chunked"), gradients("xla")):
        error = _max_error(actual, expected)
        print(f"chunked gradient w.r.t. {name}: max abs error {error:.1e} (scale {float(jnp.abs(expected).max()):.2f})")
        assert actual.shape == expected.shape and error <= TOLERANCE
        if name == "bias" and bias.shape[3] == 1:
            assert not bool(jnp.any(actual))


def test_chunked_gradients_under_a_minus_infinity_mask():
    """Masked logits get exactly zero gradient and the rest match xla's (keys masked per query row)."""
    query_length, key_length = LENGTHS["cross"]
    q, k, v = _qkv(query_length, key_length, seed=6)
    masked = (jnp.arange(query_length)[:, None] % 3 == 0) & (jnp.arange(key_length)[None] < 2 * CHUNK)
    bias = jnp.where(masked, -jnp.inf, 0.0)[None, None]

    def gradients(implementation):
        loss = lambda q, k, v: jnp.sum(jnp.sin(dot_product_attention(  # noqa: E731
            q, k, v, implementation, bias=bias, block_size=CHUNK)))
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

    for actual, expected in zip(gradients("chunked"), gradients("xla")):
        assert bool(jnp.isfinite(actual).all()) and _max_error(actual, expected) <= TOLERANCE


def test_chunked_keeps_the_query_dtype():
    """bfloat16 inputs: the output is bfloat16 and close to xla's (both take logits and softmax in float32)."""
    q, k, v = _qkv(*LENGTHS["cross"], seed=5, dtype=jnp.bfloat16)
    actual = dot_product_attention(q, k, v, "chunked", block_size=CHUNK)
    assert actual.dtype == jnp.bfloat16
    assert _max_error(actual, dot_product_attention(q, k, v, "xla")) <= 2e-2


@pytest.mark.parametrize("kind", ["self", "cross"])
def test_splash_matches_xla(kind):
    query_length, key_length = LENGTHS[kind]
    q, k, v = _qkv(query_length, key_length, seed=6)
    scale = 0.3   # not 1 / sqrt(40): the scale must reach the kernel
    actual = dot_product_attention(q, k, v, "splash", scale=scale, block_size=SPLASH_BLOCK)
    error = _max_error(actual, dot_product_attention(q, k, v, "xla", scale=scale))
    print(f"splash {kind}: max abs error {error:.1e}")
    assert actual.shape == q.shape and error <= TOLERANCE


def test_splash_gradients_match_xla():
    """Through splash's own backward kernels, with padded queries and keys (200 -> 256, 300 -> 384)."""
    q, k, v = _qkv(*LENGTHS["cross"], seed=7)
    weights = jax.random.normal(jax.random.key(8), q.shape)

    def gradients(implementation):
        loss = lambda *qkv: jnp.sum(weights * dot_product_attention(  # noqa: E731
            *qkv, implementation, block_size=SPLASH_BLOCK))
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

    for name, actual, expected in zip(("query", "key", "value"), gradients("splash"), gradients("xla")):
        error = _max_error(actual, expected)
        print(f"splash gradient w.r.t. {name}: max abs error {error:.1e}")
        assert error <= TOLERANCE


def test_splash_refuses_a_bias_and_odd_blocks():
    q, k, v = _qkv(8, 8)
    with pytest.raises(ValueError, match="'splash' takes no additive bias.*Swin's relative position bias"):
        dot_product_attention(q, k, v, "splash", bias=jnp.zeros((1, HEADS, 8, 8)))
    with pytest.raises(ValueError, match="block_size must be a multiple of 128, got 100"):
        dot_product_attention(q, k, v, "splash", block_size=100)
    with pytest.raises(ValueError, match="'attention_implementation'='splash'.*relative position bias"):
        SwinModel(attention_implementation="splash")


def test_auto_resolution():
    """The choice per platform, then "auto" on this machine's backend (the CPU in the suite; a GPU in
    bench/accelerator.sh) against the kernel it must pick."""
    assert resolve_implementation("auto", jnp.float32, platform="cpu") == "xla"
    assert resolve_implementation("auto", jnp.bfloat16, platform="cpu") == "xla"
    assert resolve_implementation("auto", jnp.float32, platform="tpu") == "splash"
    assert resolve_implementation("auto", jnp.float32, platform="tpu", has_bias=True) == "xla"
    assert resolve_implementation("auto", jnp.bfloat16, platform="gpu") == "cudnn"
    assert resolve_implementation("auto", jnp.float32, platform="gpu") == "xla"
    assert resolve_implementation("auto", jnp.bfloat16, platform="gpu", dropout=True) == "xla"
    assert resolve_implementation("chunked", jnp.float32, platform="tpu") == "chunked"
    assert resolve_implementation("auto", jnp.float32, platform="cpu", key_length=CPU_CHUNKED_MIN_KEYS - 1) == "xla"
    assert resolve_implementation("auto", jnp.float32, platform="cpu", key_length=CPU_CHUNKED_MIN_KEYS) == "chunked"
    assert resolve_implementation("auto", jnp.float32, platform="cpu", key_length=4096, dropout=True) == "xla"
    assert resolve_implementation("auto", jnp.float32, platform="gpu", key_length=4096) == "xla"
    q, k, v = _qkv(300, CPU_CHUNKED_MIN_KEYS + 20)
    if jax.default_backend() == "gpu":
        q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
        np.testing.assert_array_equal(dot_product_attention(q, k, v, "auto"), dot_product_attention(q, k, v, "cudnn"))
    elif jax.default_backend() == "cpu":
        short = _qkv(200, CPU_CHUNKED_MIN_KEYS - 1)
        np.testing.assert_array_equal(dot_product_attention(*short, "auto"), dot_product_attention(*short, "xla"))
        np.testing.assert_array_equal(dot_product_attention(q, k, v, "auto"),   # long keys: chunked over CPU blocks
                                      dot_product_attention(q, k, v, "chunked", block_size=CPU_BLOCK_SIZE))
    with pytest.raises(ValueError, match="'flash' is not supported"):
        dot_product_attention(q, k, v, "flash")


@pytest.mark.parametrize("implementation", ["chunked", "splash"])
def test_attention_module_matches_xla(implementation):
    """Spatial self-attention with group norm over 24 x 25 = 600 tokens (two default 512-token chunks, five
    128-token splash blocks), and cross-attention to 7 context tokens."""
    hidden = jax.random.normal(jax.random.key(9), (1, 24, 25, 16))
    context = jax.random.normal(jax.random.key(10), (1, 7, 12))
    for module, args in ((Attention(heads=2, dim_head=8, norm_num_groups=4, residual_connection=True), (hidden,)),
                         (Attention(heads=2, dim_head=8), (hidden.reshape(1, 600, 16), context))):
        params = module.init(jax.random.key(11), *args)
        expected = module.apply(params, *args)
        actual = module.clone(implementation=implementation).apply(params, *args)
        error = _max_error(actual, expected)
        print(f"Attention module, {implementation}: max abs error {error:.1e}")
        assert error <= TOLERANCE


@pytest.mark.slow
def test_unet_with_chunked_attention_matches_xla():
    config = dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                  norm_num_groups=8, cross_attention_dim=16, attention_head_dim=(2, 4), use_linear_projection=True,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    module = UNet2DConditionModel.from_config(config)
    params = jitted_init(module.init_params)(jax.random.key(12))
    sample = jax.random.normal(jax.random.key(13), (1, 16, 16, 4))
    context = jax.random.normal(jax.random.key(14), (1, 5, 16))
    run = lambda m: jitted(m.apply)({"params": params}, sample, jnp.array([500]), context)  # noqa: E731
    expected = run(module)
    error = _max_error(run(module.clone(attention_implementation="chunked")), expected)
    print(f"UNet, chunked: max abs error {error:.1e} (output scale {float(jnp.abs(expected).max()):.2f})")
    assert error <= TOLERANCE
