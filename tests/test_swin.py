"""Swin (pgpis_jax.models.encoders.swin) against transformers' PyTorch SwinModel on tiny random configs (fp32):
shifted windows, windows clipped by the resolution, padding, absolute position embeddings; weight conversion from
transformers' and Microsoft's layouts; the CFLD relative-position-table resize against torch F.interpolate;
stochastic depth; config and input errors; full-size parameter counts."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file
from transformers.models.swin.modeling_swin import SwinRelativePositionBias

from pgpis_jax.models.encoders.swin import CFLD_SWIN_B_CONFIG, SwinModel, drop_path
from pgpis_jax.nn.attention import dot_product_attention
from pgpis_jax.weights.encoder_checkpoints import (load_swin_checkpoint, resize_relative_position_bias_table,
                                                   swin_params_from_state_dict)
from pgpis_jax.weights.pytorch import check_params_match
from tests.parity import FAST_COMPILE

TOLERANCE = 1e-4

_TINY = dict(image_size=32, patch_size=2, embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=4)
CONFIGS = {
    # stages 16x16 and 8x8 tokens, window 4: every odd block is shifted (shift 2) and masked
    "shifted": _TINY,
    # stages 8x8 (window 4, shifted) and 4x4 (= window: one window, no shift); a block-norm eps far from the
    # 1e-5 that transformers uses for the embedding and patch-merging norms; absolute position embeddings
    "clipped_equal": dict(_TINY, patch_size=4, layer_norm_eps=0.05, use_absolute_embeddings=True),
    # window 6: stages 16x16 and 8x8 padded to 18x18 and 12x12 (shift 3), stage 3 (4x4) clipped to window 4
    # with a 7x7 table (transformers keeps a window-6 table there and fails, so the reference is patched)
    "clipped_below": dict(_TINY, embed_dim=8, depths=(2, 2, 2), num_heads=(2, 2, 4), window_size=6),
}
EXPECTED_WINDOWS = {"shifted": ((4, 2), (4, 2)), "clipped_equal": ((4, 2), (4, 0)),
                    "clipped_below": ((6, 3), (6, 3), (4, 0))}


def _randomise(model, seed):
    """transformers initialises the bias tables (and position embeddings) to zero: give every parameter O(1)
    random values so that each one matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if name.endswith("relative_position_bias_table"):
                parameter.copy_(noise)
            elif parameter.ndim >= 2 and not name.endswith("position_embeddings"):
                parameter.copy_(noise / parameter[0].numel() ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                parameter.copy_(1 + 0.2 * noise)
            else:
                parameter.copy_(0.2 * noise)
    return model


def _clip_tables(model):
    """Give the stages whose resolution is below the window a table for the clipped window (Microsoft's and
    CFLD's layout), which transformers' forward then uses with its clipped window."""
    config = model.config
    for stage, heads in zip(model.encoder.layers, config.num_heads):
        size = min(stage.blocks[0].input_resolution)
        if size < config.window_size:
            for block in stage.blocks:
                block.attention.relative_position_bias = SwinRelativePositionBias(heads, (size, size))


def _torch_model(config, seed):
    torch.manual_seed(seed)
    model = transformers.SwinModel(transformers.SwinConfig(**config)).eval()
    _clip_tables(model)
    return _randomise(model, seed)


def _save_pretrained(model, tmp):
    model.save_pretrained(tmp)
    with open(os.path.join(tmp, "config.json")) as f:
        config = json.load(f)
    return config, load_file(os.path.join(tmp, "model.safetensors"))


@functools.lru_cache(maxsize=None)
def _models(name):
    """(torch model, config.json dict, saved state dict, our module, converted params checked against
    eval_shape)."""
    import tempfile

    reference = _torch_model(CONFIGS[name], sum(map(ord, name)))
    with tempfile.TemporaryDirectory() as tmp:
        config, state = _save_pretrained(reference, tmp)
    module = SwinModel.from_config(config)
    params = swin_params_from_state_dict(state, config)
    check_params_match(params, jax.eval_shape(module.init_params, jax.random.key(0)), f"transformers Swin ({name})")
    return reference, config, state, module, params


def _pixels(height=32, width=32, seed=5):
    return torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(seed))


@functools.lru_cache(maxsize=None)
def _jitted_apply(module):
    return jax.jit(module.apply, static_argnames=("deterministic",), compiler_options=FAST_COMPILE)


def _run(module, params, pixels, **kwargs):
    out = _jitted_apply(module)({"params": params}, pixels.numpy().transpose(0, 2, 3, 1), **kwargs)
    return jax.tree_util.tree_map(np.asarray, out)


def _reference(model, pixels):
    """transformers' outputs as ours: last_hidden_state, pooler_output, and the stages before downsampling
    (reshaped_hidden_states[1:], [B, C, H, W]) flattened to [B, H*W, C]."""
    with torch.no_grad():
        out = model(pixels, output_hidden_states=True, output_hidden_states_before_downsampling=True)
    stages = tuple(s.flatten(2).transpose(1, 2).numpy() for s in out.reshaped_hidden_states[1:])
    return {"last_hidden_state": out.last_hidden_state.numpy(), "pooler_output": out.pooler_output.numpy(),
            "stage_features": stages}


def _check(actual, expected, label):
    assert set(actual) == set(expected), f"{label}: output names {sorted(actual)} != {sorted(expected)}"
    errors = {}
    for key in expected:
        pairs = zip(actual[key], expected[key]) if key == "stage_features" else [(actual[key], expected[key])]
        for i, (a, e) in enumerate(pairs):
            assert a.shape == e.shape, f"{label} {key}[{i}]: shape {a.shape} != {e.shape}"
            errors[f"{key}[{i}]" if key == "stage_features" else key] = float(np.abs(a - e).max())
    print(f"{label}: max abs errors " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    assert max(errors.values()) <= TOLERANCE, f"{label}: {errors}"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_swin_matches_transformers(name):
    reference, _, _, module, params = _models(name)
    assert module.stage_windows() == EXPECTED_WINDOWS[name]
    pixels = _pixels()
    expected = _reference(reference, pixels)
    _check(_run(module, params, pixels), expected, name)
    if name == "clipped_equal":  # the position embeddings and the eps do matter
        other = _run(module, dict(params, embeddings=dict(params["embeddings"], position_embeddings=0 *
                                                           params["embeddings"]["position_embeddings"])), pixels)
        assert np.abs(other["last_hidden_state"] - expected["last_hidden_state"]).max() > 1e-2
        eps = _run(module.clone(layer_norm_eps=1e-5), params, pixels)
        assert np.abs(eps["last_hidden_state"] - expected["last_hidden_state"]).max() > 1e-2


def test_odd_input_size_is_padded_as_transformers():
    """34x30 pixels -> 17x15 patches (window padding 20x16 and a shifted mask over the padding) -> patch merging
    pads to 18x16 -> 9x8 (padded to 12x8)."""
    reference, _, _, module, params = _models("shifted")
    pixels = _pixels(34, 30)
    _check(_run(module, params, pixels), _reference(reference, pixels), "shifted 34x30")


def test_final_norm_false_and_no_pooling():
    """CFLD's Swin: no final LayerNorm (its parameters are dropped from the checkpoint); last_hidden_state is
    then the un-normalised last stage."""
    reference, config, state, _, _ = _models("shifted")
    assert any(key.startswith("layernorm.") for key in state)
    module = SwinModel.from_config(config, final_norm=False, add_pooling_layer=False)
    params = swin_params_from_state_dict(state, config, final_norm=False)
    assert "layernorm" not in params
    check_params_match(params, jax.eval_shape(module.init_params, jax.random.key(0)), "final_norm=False")
    pixels = _pixels()
    expected = _reference(reference, pixels)
    actual = _run(module, params, pixels)
    assert set(actual) == {"last_hidden_state", "stage_features"}
    error = float(np.abs(actual["last_hidden_state"] - expected["stage_features"][-1]).max())
    print(f"final_norm=False: last_hidden_state max abs error {error:.1e}")
    assert error <= TOLERANCE
    np.testing.assert_array_equal(actual["last_hidden_state"], actual["stage_features"][-1])


def _microsoft_layout(state, config):
    """The official Microsoft checkpoint layout of a transformers state dict (the inverse renaming): fused qkv,
    with the buffers (relative_position_index, attn_mask) and the classification head it also holds."""
    out = {"head.weight": np.ones((10, state["layernorm.weight"].shape[0]), np.float32),
           "head.bias": np.zeros(10, np.float32)}
    blocks = {"layernorm_before": "norm1", "attention.output.dense": "attn.proj", "layernorm_after": "norm2",
              "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2",
              "attention.self.relative_position_bias_table": "attn.relative_position_bias_table"}
    for key, value in state.items():
        parts = key.split(".")
        if key.startswith("embeddings.patch_embeddings.projection."):
            out[f"patch_embed.proj.{parts[-1]}"] = value
        elif key.startswith("embeddings.norm."):
            out[f"patch_embed.norm.{parts[-1]}"] = value
        elif key == "embeddings.position_embeddings":
            out["absolute_pos_embed"] = value
        elif key.startswith("layernorm."):
            out[f"norm.{parts[-1]}"] = value
        elif parts[3] == "downsample":
            out[key[len("encoder."):]] = value
        else:
            block = f"layers.{parts[2]}.blocks.{parts[4]}"
            inner = ".".join(parts[5:-1])
            if inner == "attention.self.query":
                fused = [state[key.replace(".query.", f".{name}.")] for name in ("query", "key", "value")]
                out[f"{block}.attn.qkv.{parts[-1]}"] = np.concatenate(fused, axis=0)
            elif inner in ("attention.self.key", "attention.self.value"):
                continue
            elif parts[-1] == "relative_position_bias_table":
                out[f"{block}.attn.relative_position_bias_table"] = value
                window = int(round((value.shape[0] ** 0.5 + 1) / 2))
                out[f"{block}.attn.relative_position_index"] = np.zeros((window**2, window**2), np.int64)
                if int(parts[4]) % 2:
                    out[f"{block}.attn_mask"] = np.zeros((4, window**2, window**2), np.float32)
            else:
                out[f"{block}.{blocks[inner]}.{parts[-1]}"] = value
    return out


def _flat(tree):
    return {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _assert_same_tree(actual, expected):
    actual, expected = _flat(actual), _flat(expected)
    assert sorted(actual) == sorted(expected)
    for key in expected:
        np.testing.assert_array_equal(actual[key], expected[key], err_msg=key)


@pytest.mark.parametrize("name", ["shifted", "clipped_equal"])
def test_other_checkpoint_layouts_give_the_same_tree(name):
    """Microsoft's layout (fused qkv, buffers, head), transformers >= 5's in-memory names (q_proj, o_proj,
    relative_position_bias.*, mlp.fc1), and SwinForImageClassification's (swin. prefix + classifier)."""
    reference, config, state, _, params = _models(name)
    microsoft = _microsoft_layout(state, config)
    assert any(key.endswith("attn.qkv.weight") for key in microsoft)
    _assert_same_tree(swin_params_from_state_dict(microsoft, config), params)
    no_norm = {k: v for k, v in params.items() if k != "layernorm"}
    _assert_same_tree(swin_params_from_state_dict(microsoft, config, final_norm=False), no_norm)
    in_memory = {k: v.numpy() for k, v in reference.state_dict().items()}
    assert any(".q_proj." in key for key in in_memory)
    _assert_same_tree(swin_params_from_state_dict(in_memory, config), params)
    classifier = {f"swin.{k}": v for k, v in state.items()}
    classifier.update({"classifier.weight": np.zeros((3, 32), np.float32), "classifier.bias": np.zeros(3, np.float32)})
    _assert_same_tree(swin_params_from_state_dict(classifier, config), params)


def test_unexpected_keys_survive_into_the_tree():
    _, config, state, module, _ = _models("shifted")
    extra = dict(state, **{"embeddings.mask_token": np.zeros((1, 1, 16), np.float32)})
    params = swin_params_from_state_dict(extra, config)
    with pytest.raises(ValueError, match="unexpected.*mask_token"):
        check_params_match(params, jax.eval_shape(module.init_params, jax.random.key(0)), "extra")


@pytest.mark.parametrize("sizes", [(23, 31), (23, 15), (7, 11), (11, 7)])
def test_table_resize_matches_torch_interpolate(sizes):
    """CFLD's resize: window 12 (23x23) -> 16 (31x31) for stages 1-3 and -> 8 (15x15) for stage 4."""
    old, new = sizes
    table = torch.randn(old * old, 4, generator=torch.Generator().manual_seed(old * new))
    expected = torch.nn.functional.interpolate(table.permute(1, 0).reshape(1, 4, old, old), size=(new, new),
                                               mode="bicubic", align_corners=False)
    expected = expected.reshape(4, new * new).permute(1, 0).numpy()
    actual = resize_relative_position_bias_table(table.numpy(), (new + 1) // 2)
    assert actual.shape == (new * new, 4) and actual.dtype == np.float32
    error = float(np.abs(actual - expected).max())
    print(f"table {old}x{old} -> {new}x{new}: max abs error {error:.1e}")
    assert error <= 1e-6


def test_window_size_change_at_load():
    """A window-4 checkpoint loaded into a window-6 model (tables 7x7 -> 11x11) equals a torch window-6 model
    whose tables were resized with torch's F.interpolate."""
    source, config, state, _, _ = _models("shifted")
    module = SwinModel.from_config(config, window_size=6)
    params = swin_params_from_state_dict(state, config, window_size=6)
    check_params_match(params, jax.eval_shape(module.init_params, jax.random.key(0)), "window 6")
    assert params["encoder"]["layers_1"]["blocks_1"]["attention"]["self"]["relative_position_bias_table"].shape \
        == (121, 4)
    with pytest.raises(ValueError, match="wrong shape.*relative_position_bias_table"):
        check_params_match(swin_params_from_state_dict(state, config, resize_tables=False, window_size=6),
                           jax.eval_shape(module.init_params, jax.random.key(0)), "not resized")

    target = transformers.SwinModel(transformers.SwinConfig(**dict(CONFIGS["shifted"], window_size=6))).eval()
    resized = {}
    for key, value in source.state_dict().items():
        if key.endswith("relative_position_bias_table"):
            heads = value.shape[1]
            value = torch.nn.functional.interpolate(value.permute(1, 0).reshape(1, heads, 7, 7), size=(11, 11),
                                                    mode="bicubic", align_corners=False)
            value = value.reshape(heads, 121).permute(1, 0)
        resized[key] = value
    target.load_state_dict(resized)
    pixels = _pixels()
    _check(_run(module, params, pixels), _reference(target, pixels), "window 4 -> 6")


def test_load_swin_checkpoint(tmp_path):
    """A Microsoft .pth ({"model": state_dict}) and a CFLD-style file whose Swin keys sit under "backbone."."""
    _, config, state, _, params = _models("shifted")
    microsoft = {k: torch.from_numpy(np.array(v)) for k, v in _microsoft_layout(state, config).items()}
    path = tmp_path / "swin.pth"
    torch.save({"model": microsoft, "epoch": 3}, path)
    _assert_same_tree(load_swin_checkpoint(str(path), config), params)
    cfld = {f"backbone.{k}": v for k, v in microsoft.items()}
    cfld["decoder.query_feat"] = torch.zeros(16, 768)
    torch.save(cfld, tmp_path / "cfld.bin")
    no_norm = {k: v for k, v in params.items() if k != "layernorm"}
    _assert_same_tree(load_swin_checkpoint(str(tmp_path / "cfld.bin"), config, prefix="backbone.", final_norm=False),
                      no_norm)
    with pytest.raises(ValueError, match="missing"):
        load_swin_checkpoint(str(path), dict(config, depths=[2, 3]))
    with pytest.raises(FileNotFoundError, match="nothing.pth"):
        load_swin_checkpoint(str(tmp_path / "nothing.pth"), config)


def test_drop_path():
    x = jnp.ones((2000, 3, 2))
    out = np.asarray(drop_path(x, 0.3, jax.random.key(1)))
    per_sample = out.reshape(2000, -1)
    assert np.all(per_sample == per_sample[:, :1])  # one decision per sample
    np.testing.assert_allclose(np.unique(per_sample), [0.0, 1 / 0.7], rtol=1e-6)
    assert abs((per_sample[:, 0] > 0).mean() - 0.7) < 0.04

    _, _, _, module, params = _models("shifted")
    assert module.drop_path_rate == 0.1  # transformers' default, written in config.json
    pixels = jnp.asarray(_pixels().numpy().transpose(0, 2, 3, 1))
    apply = jax.jit(module.apply, static_argnames="deterministic", compiler_options=FAST_COMPILE)
    plain = apply({"params": params}, pixels)["last_hidden_state"]
    rngs = {"dropout": jax.random.key(0)}
    train = apply({"params": params}, pixels, deterministic=False, rngs=rngs)["last_hidden_state"]
    assert float(jnp.abs(train - plain).max()) > 1e-3
    np.testing.assert_array_equal(train, apply({"params": params}, pixels, deterministic=False, rngs=rngs)[
        "last_hidden_state"])
    np.testing.assert_array_equal(plain, _jitted_apply(module)({"params": params}, pixels, rngs=rngs)[
        "last_hidden_state"])


def test_attention_bias_in_dot_product_attention():
    keys = jax.random.split(jax.random.key(3), 4)
    q, k, v = (jax.random.normal(key, (3, 5, 2, 4)) for key in keys[:3])
    bias = jax.random.normal(keys[3], (1, 2, 5, 5))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / 2.0 + bias
    expected = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)
    np.testing.assert_allclose(dot_product_attention(q, k, v, bias=bias), expected, atol=1e-6)


def test_bad_pixel_values_and_sizes_raise():
    _, _, _, module, params = _models("shifted")
    variables = {"params": params}
    with pytest.raises(ValueError, match=r"NHWC \[B, H, W, 3\]"):
        module.apply(variables, jnp.zeros((32, 32, 3)))
    with pytest.raises(ValueError, match=r"NHWC \[B, H, W, 3\]"):
        module.apply(variables, jnp.zeros((1, 32, 32, 4)))
    with pytest.raises(ValueError, match="floating point"):
        module.apply(variables, jnp.zeros((1, 32, 32, 3), jnp.uint8))
    # 12x12 pixels: stage 1 at 6x6 keeps window 4, but stage 2 at 3x3 would clip it to 3 (no table for that)
    with pytest.raises(ValueError, match="tables for window 4"):
        module.apply(variables, jnp.zeros((1, 12, 12, 3)))


@pytest.mark.skipif(jax.default_backend() != "gpu",
                    reason="cuDNN flash attention needs an NVIDIA GPU; this machine has none")
def test_cudnn_window_attention_matches_xla_in_bf16():
    """The relative-position bias and the shifted-window mask reach cuDNN as an additive bias: in bf16, cuDNN is
    no further from the float32 model than XLA's einsum path in bf16 is (a bias left out would be O(1) off)."""
    _, _, _, module, params = _models("shifted")
    pixels = _pixels().numpy().transpose(0, 2, 3, 1)
    reference = np.asarray(module.apply({"params": params}, jnp.asarray(pixels))["last_hidden_state"])
    errors = {}
    for implementation in ("xla", "cudnn"):
        bf16 = module.clone(dtype=jnp.bfloat16, attention_implementation=implementation)
        output = bf16.apply({"params": params}, jnp.asarray(pixels, jnp.bfloat16))["last_hidden_state"]
        errors[implementation] = float(np.abs(np.asarray(output, np.float32) - reference).max())
    print(f"max abs error against float32: {errors}")
    assert errors["cudnn"] <= 2 * errors["xla"]


def test_config_errors():
    _, config, _, _, _ = _models("shifted")
    inert = dict(config, architectures=["SwinForImageClassification"], id2label={"0": "a"}, torch_dtype="float32",
                 path_norm=True, encoder_stride=32, _name_or_path="x")
    assert SwinModel.from_config(inert) == SwinModel.from_config(config)
    with pytest.raises(ValueError, match="'use_v2_block'"):
        SwinModel.from_config(dict(config, use_v2_block=True))
    with pytest.raises(ValueError, match="'hidden_act'"):
        SwinModel.from_config(dict(config, hidden_act="relu"))
    with pytest.raises(ValueError, match="'hidden_size'"):
        SwinModel.from_config(dict(config, hidden_size=64))
    with pytest.raises(ValueError, match="'model_type'"):
        SwinModel.from_config(dict(config, model_type="swinv2"))
    module = SwinModel.from_config(config)
    assert SwinModel.from_config(module.to_config()) == module


def _torch_parameter_count(config):
    with torch.device("meta"):
        model = transformers.SwinModel(transformers.SwinConfig(**config))
    return sum(p.numel() for p in model.parameters())


def _count(module):
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(jax.eval_shape(module.init_params,
                                                                                        jax.random.key(0))))


SWIN_B_384 = dict(image_size=384, patch_size=4, embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32],
                  window_size=12)
SWIN_B_384_PARAMETERS = 86_878_584  # transformers' SwinModel (no pooler parameters)
# window 16 at 256x256 (stage 4 clipped to 8: 225-row tables), no final norm; cfld.md's analytic 86.99M
CFLD_SWIN_B_PARAMETERS = 86_991_864


def test_full_size_parameter_counts_and_cfld_shapes():
    ours = _count(SwinModel.from_config(SWIN_B_384))
    assert ours == _torch_parameter_count(SWIN_B_384) == SWIN_B_384_PARAMETERS

    cfld = SwinModel.from_config(CFLD_SWIN_B_CONFIG, final_norm=False)
    assert cfld.stage_windows() == ((16, 8), (16, 8), (16, 0), (8, 0))
    shapes = jax.eval_shape(cfld.init_params, jax.random.key(0))
    tables = [shapes["encoder"][f"layers_{i}"]["blocks_0"]["attention"]["self"]["relative_position_bias_table"].shape
              for i in range(4)]
    assert tables == [(961, 4), (961, 8), (961, 16), (225, 32)]
    assert "layernorm" not in shapes
    count = _count(cfld)
    print(f"Swin-B 384 window 12: {ours:,} parameters; CFLD's Swin-B (window 16, 256x256, no final norm): "
          f"{count:,}")
    assert count == CFLD_SWIN_B_PARAMETERS
    out = jax.eval_shape(cfld.clone(dtype=jnp.bfloat16).apply, {"params": shapes}, jnp.zeros((2, 256, 256, 3)))
    assert [s.shape for s in out["stage_features"]] == [(2, 4096, 128), (2, 1024, 256), (2, 256, 512), (2, 64, 1024)]
    assert out["last_hidden_state"].shape == (2, 64, 1024) and out["last_hidden_state"].dtype == jnp.bfloat16
