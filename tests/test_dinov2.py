"""DINOv2 against transformers' PyTorch Dinov2Model (tiny random configs, fp32, every parameter randomised,
layer scales included): at the native size and at other sizes (position-embedding interpolation), with the MLP
and with SwiGLU; transformers 4.32's position-table resize (position_interpolation="scale_factor") against
its formula written in torch; the state-dict layouts; config and input errors; full-size parameter counts
(large, giant)."""

import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

from pgpis_jax.interpolation import bicubic_weights
from pgpis_jax.nn import attention as attention_lib
from pgpis_jax.models.encoders import dinov2
from pgpis_jax.models.encoders.dinov2 import DropPath, Dinov2Model, interpolate_pos_encoding
from pgpis_jax.weights.encoder_checkpoints import dinov2_params_from_state_dict
from pgpis_jax.weights.pytorch import check_params_match
from pgpis_jax.weights.transformers_io import module_from_transformers_config
from tests.parity import jitted, jitted_init

TOLERANCE = 1e-4

_TINY = dict(image_size=28, patch_size=7, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
CONFIGS = {
    # dropout and stochastic depth are set but off in eval, as in torch's .eval()
    "mlp": dict(_TINY, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, drop_path_rate=0.1),
    # DINOv2-giant's SwiGLU: hidden (int(128 * 2 / 3) + 7) // 8 * 8 = 88
    "swiglu": dict(_TINY, use_swiglu_ffn=True),
}
FULL_SIZE = {
    "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, mlp_ratio=4, patch_size=14,
                  image_size=518, layerscale_value=1.0),
    "giant": dict(hidden_size=1536, num_hidden_layers=40, num_attention_heads=24, mlp_ratio=4, patch_size=14,
                  image_size=518, layerscale_value=1.0, use_swiglu_ffn=True),
}


def _nhwc(tensor):
    return tensor.detach().numpy().transpose(0, 2, 3, 1)


def _randomise(model):
    """Every parameter random and O(1)-ish in effect: weights ~ 1/sqrt(fan_in), biases, CLS and position
    embeddings ~ 0.5 N(0, 1), norm weights 1 + 0.2 N(0, 1), layer scales uniform in [0.2, 1.5] with random
    signs (transformers initialises them all to layerscale_value)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lambda1"):
                p.copy_(torch.empty_like(p).uniform_(0.2, 1.5) * torch.sign(torch.randn_like(p)))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("weight") and p.ndim >= 2:
                p.copy_(torch.randn_like(p) / p[0].numel() ** 0.5)
            else:
                p.copy_(0.5 * torch.randn_like(p))


def _state_dict(model):
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


@functools.lru_cache(maxsize=None)
def _models(name):
    """(torch model, our module, converted params); the params are checked key for key against eval_shape."""
    torch.manual_seed(sum(map(ord, name)))
    config = transformers.Dinov2Config(**CONFIGS[name])
    reference = transformers.Dinov2Model(config).eval()
    _randomise(reference)
    module = Dinov2Model.from_config(config.to_dict())
    params = dinov2_params_from_state_dict(_state_dict(reference), config.to_dict())
    check_params_match(params, jax.eval_shape(module.init_params, jax.random.key(0)), f"Dinov2Model ({name})")
    return reference, module, params


@functools.lru_cache(maxsize=None)
def _jitted_apply(module):
    return jitted(module.apply)


def _pixels(height, width, seed=7):
    return torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(seed))


def _check(actual, expected, label):
    error = float(np.abs(np.asarray(actual) - expected).max())
    print(f"{label}: max abs error {error:.2e} (output scale {np.abs(expected).max():.2f})")
    assert error <= TOLERANCE, f"{label}: max abs error {error}"


@pytest.mark.parametrize("size", [(28, 28), (42, 35)], ids=["native", "42x35"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_transformers(name, size):
    reference, module, params = _models(name)
    pixels = _pixels(*size)
    with torch.no_grad():
        expected = reference(pixels)
    actual = _jitted_apply(module)({"params": params}, _nhwc(pixels))
    assert set(actual) == {"last_hidden_state", "pooler_output"}
    tokens = 1 + (size[0] // 7) * (size[1] // 7)
    assert actual["last_hidden_state"].shape == (2, tokens, 32) and actual["pooler_output"].shape == (2, 32)
    for key in actual:
        _check(actual[key], getattr(expected, key).numpy(), f"{name} {size[0]}x{size[1]} {key}")


@pytest.mark.parametrize("size", [(28, 28), (29, 29), (28, 29), (35, 28), (13, 60), (70, 70), (7, 7), (14, 700)])
def test_position_embeddings_match_transformers(size):
    """transformers keeps the table for a square input with the native patch count (29x29 -> 4x4) and resizes
    it otherwise (28x29 also goes through the resize, which is then the identity)."""
    reference, _, params = _models("mlp")
    height, width = size
    tokens = 1 + (height // 7) * (width // 7)
    with torch.no_grad():
        expected = reference.embeddings.interpolate_pos_encoding(torch.zeros(1, tokens, 32), height, width).numpy()
    actual = interpolate_pos_encoding(params["embeddings"]["position_embeddings"], height, width, 7)
    assert actual.shape == expected.shape == (1, tokens, 32)
    error = float(np.abs(np.asarray(actual) - expected).max())
    print(f"position embeddings {height}x{width}: max abs error {error:.1e}")
    assert error <= 1e-6
    if (height, width) in ((28, 28), (29, 29)):
        assert actual is params["embeddings"]["position_embeddings"]


def test_position_interpolation_is_a_differentiable_linear_map():
    table = jnp.asarray(np.random.default_rng(0).standard_normal((1, 17, 3)), jnp.float32)
    gradient = jax.grad(lambda t: interpolate_pos_encoding(t, 42, 35, 7).sum())(table)
    # d(sum)/d(cell i, j) = column sums of the two axis maps; the CLS entry passes through
    expected = np.outer(bicubic_weights(4, 6, precision=np.float32).sum(0),
                        bicubic_weights(4, 5, precision=np.float32).sum(0))
    np.testing.assert_allclose(np.asarray(gradient[0, 1:, 0]).reshape(4, 4), expected, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(gradient[0, 0]), 1.0)


def _transformers_432_positions(table, height, width, patch_size):
    """transformers 4.32's Dinov2Embeddings.interpolate_pos_encoding, written out in torch: the square patch
    grid resized by F.interpolate with scale_factor (new side + 0.1) / sqrt(N) (bicubic, align_corners=False)."""
    num_positions = table.shape[1] - 1
    if (height // patch_size) * (width // patch_size) == num_positions and height == width:
        return table
    side, dim = math.sqrt(num_positions), table.shape[-1]
    grid = table[:, 1:].reshape(1, int(side), int(side), dim).permute(0, 3, 1, 2)
    scale = ((height // patch_size + 0.1) / side, (width // patch_size + 0.1) / side)
    grid = torch.nn.functional.interpolate(grid, scale_factor=scale, mode="bicubic", align_corners=False)
    assert grid.shape[-2:] == (height // patch_size, width // patch_size)
    return torch.cat([table[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)


# (table side, patch size, input height, width): PCDMs' 224 input on DINOv2-giant's 518-trained 37 x 37 table,
# other sizes on it, and the tiny configs' 4 x 4 table (patch 7), up and down, square and not
SCALE_FACTOR_CASES = [(37, 14, 224, 224), (37, 14, 448, 336), (37, 14, 98, 518), (37, 14, 518, 518),
                      (4, 7, 42, 35), (4, 7, 13, 60), (4, 7, 70, 70), (4, 7, 14, 700), (4, 7, 28, 29),
                      (4, 7, 28, 28), (4, 7, 7, 7)]


@pytest.mark.parametrize("side,patch,height,width", SCALE_FACTOR_CASES)
def test_scale_factor_position_interpolation_matches_transformers_4_32(side, patch, height, width):
    table = torch.randn(1, 1 + side * side, 8, generator=torch.Generator().manual_seed(side + height + width))
    expected = _transformers_432_positions(table, height, width, patch).numpy()
    actual = interpolate_pos_encoding(jnp.asarray(table.numpy()), height, width, patch, mode="scale_factor")
    assert actual.shape == expected.shape == (1, 1 + (height // patch) * (width // patch), 8)
    error = float(np.abs(np.asarray(actual) - expected).max())
    print(f"scale_factor positions {side}x{side} table, {height}x{width} input: max abs error {error:.1e}")
    assert error <= 1e-5


def test_position_interpolation_modes_differ_for_pcdms():
    """At PCDMs' 224 input the 37 x 37 table is sampled at steps of 37 / 16.1 (4.32) instead of 37 / 16 (5.x):
    the two tables differ by a sizeable fraction of the table's scale."""
    table = jnp.asarray(np.random.default_rng(0).standard_normal((1, 1 + 37 * 37, 8)), jnp.float32)
    by_size = np.asarray(interpolate_pos_encoding(table, 224, 224, 14, mode="size"))
    by_scale = np.asarray(interpolate_pos_encoding(table, 224, 224, 14, mode="scale_factor"))
    difference = np.abs(by_size - by_scale)[0, 1:]
    print(f"224 input, 37x37 table: max |size - scale_factor| {difference.max():.2f}, mean {difference.mean():.2f}")
    assert difference.max() > 0.5 and difference.mean() > 0.05
    with pytest.raises(ValueError, match="position_interpolation='area'"):
        interpolate_pos_encoding(table, 224, 224, 14, mode="area")


def test_scale_factor_model_matches_transformers_with_4_32_positions(monkeypatch):
    """The whole tiny model with position_interpolation="scale_factor" against transformers' Dinov2Model whose
    interpolate_pos_encoding is replaced by the 4.32 formula (transformers 5 has no switch for it)."""
    reference, module, params = _models("mlp")
    table = reference.embeddings.position_embeddings
    monkeypatch.setattr(reference.embeddings, "interpolate_pos_encoding",
                        lambda embeddings, height, width: _transformers_432_positions(table, height, width, 7))
    pixels = _pixels(42, 35)
    with torch.no_grad():
        expected = reference(pixels).last_hidden_state.numpy()
    scaled = module.clone(position_interpolation="scale_factor")
    actual = _jitted_apply(scaled)({"params": params}, _nhwc(pixels))["last_hidden_state"]
    _check(actual, expected, "scale_factor 42x35 last_hidden_state")
    by_size = _jitted_apply(module)({"params": params}, _nhwc(pixels))["last_hidden_state"]
    assert np.abs(np.asarray(by_size) - expected).max() > 10 * TOLERANCE


def test_position_interpolation_option():
    """An option of the module (through module_from_transformers_config), not a config.json key."""
    config = transformers.Dinov2Config(**CONFIGS["mlp"]).to_dict()
    module = module_from_transformers_config(config, position_interpolation="scale_factor")
    assert isinstance(module, Dinov2Model) and module.position_interpolation == "scale_factor"
    assert module_from_transformers_config(config).position_interpolation == "size"
    assert "position_interpolation" not in module.to_config()
    with pytest.raises(ValueError, match="position_interpolation='nearest'"):
        module_from_transformers_config(config, position_interpolation="nearest")
    with pytest.raises(ValueError, match="unknown DINOv2 config key 'position_interpolation'"):
        module_from_transformers_config(dict(config, position_interpolation="scale_factor"))


def test_bool_masked_pos_matches_transformers():
    reference, module, params = _models("mlp")
    pixels = _pixels(28, 35)
    mask = torch.rand(2, 20, generator=torch.Generator().manual_seed(3)) > 0.5
    with torch.no_grad():
        expected = reference(pixels, bool_masked_pos=mask).last_hidden_state.numpy()
    actual = module.apply({"params": params}, _nhwc(pixels), bool_masked_pos=mask.numpy())["last_hidden_state"]
    _check(actual, expected, "bool_masked_pos")


def test_checkpoint_layouts(tmp_path):
    """The Hub layout (save_pretrained: attention.attention.query, mlp.weights_in / weights_out), transformers
    5's in-memory layout (q_proj, gate_proj + up_proj, down_proj) and Dinov2ForImageClassification's
    `dinov2.`-prefixed state dict give the same tree; an unexpected key survives to check_params_match."""
    reference, module, params = _models("swiglu")
    reference.save_pretrained(tmp_path)
    hub = load_file(str(tmp_path / "model.safetensors"))
    assert "encoder.layer.0.attention.attention.query.weight" in hub and "encoder.layer.0.mlp.weights_in.weight" in hub
    config = json.loads((tmp_path / "config.json").read_text())
    assert Dinov2Model.from_config(config) == module
    from_hub = dinov2_params_from_state_dict(hub, config)
    classifier = dict({f"dinov2.{k}": v for k, v in hub.items()}, **{"classifier.weight": np.zeros((2, 64)),
                                                                     "classifier.bias": np.zeros(2)})
    from_classifier = dinov2_params_from_state_dict(classifier, config)
    for tree in (from_hub, from_classifier):
        jax.tree_util.tree_map(np.testing.assert_array_equal, tree, params)

    stray = dict(hub, **{"encoder.layer.0.mlp.extra.weight": np.zeros((2, 2))})
    with pytest.raises(ValueError, match=r"unexpected \(1\): encoder/layer_0/mlp/extra/kernel"):
        check_params_match(dinov2_params_from_state_dict(stray, config),
                           jax.eval_shape(module.init_params, jax.random.key(0)), "checkpoint")
    with pytest.raises(ValueError, match="missing"):  # a SwiGLU checkpoint into an MLP model
        check_params_match(from_hub, jax.eval_shape(_models("mlp")[1].init_params, jax.random.key(0)), "checkpoint")


def test_init_params_follow_transformers():
    module = Dinov2Model.from_config(dict(CONFIGS["swiglu"], layerscale_value=0.25, initializer_range=0.05))
    params = jitted_init(module.init_params)(jax.random.key(0))
    layer = params["encoder"]["layer_0"]
    np.testing.assert_array_equal(layer["layer_scale1"]["lambda1"], 0.25)
    np.testing.assert_array_equal(params["embeddings"]["mask_token"], 0.0)
    np.testing.assert_array_equal(layer["mlp"]["weights_in"]["bias"], 0.0)
    assert layer["mlp"]["weights_in"]["kernel"].shape == (32, 176)
    assert abs(float(np.std(layer["mlp"]["weights_in"]["kernel"])) - 0.05) < 0.005


def test_config_handling():
    config = transformers.Dinov2Config(**CONFIGS["mlp"]).to_dict()  # every key, bookkeeping too
    module = Dinov2Model.from_config(dict(config, torch_dtype="float32", out_features=["stage2"]),
                                     dtype=jnp.bfloat16)
    assert module.dtype == jnp.bfloat16 and module.drop_path_rate == 0.1
    restored = Dinov2Model.from_config(module.to_config(), dtype=jnp.bfloat16)
    assert restored == module
    assert transformers.Dinov2Config(**{k: v for k, v in module.to_config().items()
                                        if k != "architectures"}).hidden_size == 32
    cases = [({"some_new_option": 1}, "some_new_option"), ({"model_type": "vit"}, "model_type"),
             ({"hidden_act": "gelu_fancy"}, "hidden_act"), ({"pruned_heads": {0: [1]}}, "pruned_heads"),
             ({"head_dim": 16}, "head_dim"), ({"image_size": [28, 35]}, "image_size"),
             ({"image_size": 5}, "image_size")]
    for change, key in cases:
        with pytest.raises(ValueError, match=key):
            Dinov2Model.from_config(dict(config, **change))
    assert Dinov2Model.from_config(dict(config, head_dim=8)).head_dim == 8
    with pytest.raises(ValueError, match="attention_implementation"):
        Dinov2Model.from_config(config, attention_implementation="flash")
    with pytest.raises(TypeError, match="colour"):
        Dinov2Model.from_config(config, colour="red")


def test_bad_pixel_values():
    _, module, params = _models("mlp")
    run = functools.partial(jax.eval_shape, module.apply, {"params": params})
    cases = [(jnp.zeros((2, 28, 28)), "NHWC"), (jnp.zeros((2, 3, 28, 28)), "NHWC"),
             (jnp.zeros((2, 28, 28, 4)), "NHWC"), (jnp.zeros((2, 28, 28, 3), jnp.int32), "floating"),
             (np.zeros((2, 28, 28, 3), np.uint8), "floating"), (jnp.zeros((2, 6, 28, 3)), "patch")]
    for pixels, message in cases:
        with pytest.raises(ValueError, match=message):
            run(pixels)
    assert run(jnp.zeros((1, 28, 28, 3), jnp.bfloat16))["pooler_output"].shape == (1, 32)


def test_dtype_policy_and_kernels(monkeypatch):
    """bfloat16 parameters and compute; attention_implementation reaches every attention call (cudnn itself needs
    a GPU: the kernel is recorded and replaced by the XLA one here)."""
    calls = []

    def recording(query, key, value, implementation="xla", **options):
        calls.append((implementation, query.dtype))
        return attention_lib.dot_product_attention(query, key, value, "xla", **options)

    monkeypatch.setattr(dinov2, "dot_product_attention", recording)
    _, module, params = _models("swiglu")
    pixels = jnp.zeros((2, 42, 35, 3))
    shapes = jax.eval_shape(module.clone(param_dtype=jnp.bfloat16).init_params, jax.random.key(0))
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(shapes)} == {jnp.dtype(jnp.bfloat16)}
    calls.clear()
    out = jax.eval_shape(module.clone(dtype=jnp.bfloat16, attention_implementation="cudnn").apply,
                         {"params": params}, pixels)
    assert out["last_hidden_state"].dtype == jnp.bfloat16 and out["last_hidden_state"].shape == (2, 31, 32)
    assert calls == [("cudnn", jnp.bfloat16)] * 2


def test_training_mode():
    """Dropout, attention dropout and drop path act with deterministic=False (and a "dropout" RNG); drop path
    keeps or zeroes whole samples, rescaled by 1 / (1 - rate)."""
    x = jnp.ones((64, 3, 2))
    dropped = DropPath(0.25).apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(1)})
    per_sample = np.asarray(dropped)[:, 0, 0]
    np.testing.assert_allclose(np.unique(per_sample), [0.0, 1 / 0.75], rtol=1e-6)
    assert 4 <= (per_sample == 0).sum() <= 32
    np.testing.assert_array_equal(DropPath(0.25).apply({}, x), x)

    _, module, params = _models("mlp")
    pixels = _nhwc(_pixels(28, 28))
    train = jitted(functools.partial(module.apply, deterministic=False))(
        {"params": params}, pixels, rngs={"dropout": jax.random.key(0)})
    evaluation = _jitted_apply(module)({"params": params}, pixels)
    difference = np.abs(np.asarray(train["last_hidden_state"]) - np.asarray(evaluation["last_hidden_state"]))
    assert np.isfinite(difference).all() and difference.max() > 1e-2


def _torch_count(config):
    with torch.device("meta"):
        model = transformers.Dinov2Model(transformers.Dinov2Config(**config))
    return model, sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", list(FULL_SIZE))
def test_full_size_parameter_count(name):
    reference, expected = _torch_count(FULL_SIZE[name])
    module = Dinov2Model.from_config(FULL_SIZE[name])
    shapes = jax.eval_shape(module.init_params, jax.random.key(0))
    count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(shapes))
    print(f"DINOv2-{name}: {count:,} parameters (transformers: {expected:,})")
    assert count == expected
    if name == "large":  # key for key, with the shapes of the real checkpoint layout (no memory: broadcast views)
        state_dict = {k: np.broadcast_to(np.float32(0), tuple(v.shape)) for k, v in reference.state_dict().items()}
        check_params_match(dinov2_params_from_state_dict(state_dict), shapes, "DINOv2-large (meta)")
    else:
        mlp = shapes["encoder"]["layer_0"]["mlp"]
        assert mlp["weights_in"]["kernel"].shape == (1536, 8192) and mlp["weights_out"]["kernel"].shape == (4096, 1536)
