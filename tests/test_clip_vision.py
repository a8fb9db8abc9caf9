"""The CLIP vision transformer against transformers' PyTorch CLIPVisionModelWithProjection, CLIPVisionModel and
CLIPModel (tiny random configs saved with save_pretrained and read back as config.json + safetensors, fp32),
the checkpoint layouts and config forms it accepts, its errors, and full-size parameter counts."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

from pgpis_jax.models.encoders.clip_vision import CLIPVisionModel
from pgpis_jax.weights.encoder_checkpoints import clip_vision_params_from_state_dict
from pgpis_jax.weights.pytorch import check_params_match
from tests.parity import jitted

TOLERANCE = 1e-4

_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
               patch_size=8, projection_dim=24)
CONFIGS = {
    # (transformers class, vision config, our options)
    "projection_quick_gelu": ("CLIPVisionModelWithProjection", dict(_VISION, hidden_act="quick_gelu")),
    # OpenCLIP-style: exact GELU, an odd 5x5 patch grid, another LayerNorm eps
    "projection_gelu": ("CLIPVisionModelWithProjection",
                        dict(_VISION, hidden_act="gelu", image_size=30, patch_size=6, layer_norm_eps=1e-6)),
    "vision_only": ("CLIPVisionModel", dict(_VISION, hidden_act="gelu", num_hidden_layers=1)),
    "clip_model": ("CLIPModel", dict(_VISION, hidden_act="quick_gelu")),
}
_TEXT = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=49408,
             max_position_embeddings=8)

# Full-size vision towers (with projection) and transformers' parameter counts.
FULL_SIZE = {
    "openclip_vit_h14": (dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                              patch_size=14, image_size=224, projection_dim=1024, hidden_act="gelu",
                              layer_norm_eps=1e-5), 632_076_800),
    "openai_vit_l14": (dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                            patch_size=14, image_size=224, projection_dim=768, hidden_act="quick_gelu"), 303_966_208),
}


def _torch_model(name):
    architecture, vision = CONFIGS[name]
    torch.manual_seed(sum(map(ord, name)))
    if architecture == "CLIPModel":
        config = transformers.CLIPConfig(vision_config=vision, text_config=_TEXT, projection_dim=20)
    else:
        config = transformers.CLIPVisionConfig(**vision)
    return getattr(transformers, architecture)(config).eval()


@functools.lru_cache(maxsize=None)
def _saved(name, directory):
    """(torch model, config.json dict, state dict) of a tiny model written with save_pretrained."""
    reference = _torch_model(name)
    reference.save_pretrained(directory)
    config = json.loads((directory / "config.json").read_text())
    return reference, config, load_file(str(directory / "model.safetensors"))


_DIRS = {}  # name -> the save_pretrained directory of that tiny model


@functools.lru_cache(maxsize=None)
def _models(name, directory):
    reference, config, state_dict = _saved(name, directory)
    module = CLIPVisionModel.from_config(config)
    params = clip_vision_params_from_state_dict(state_dict, config)
    check_params_match(params, jax.eval_shape(module.init_params, jax.random.key(0)), f"transformers {name}")
    return reference, module, params


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """models(name) -> (torch model, our module, converted params), checked key for key against eval_shape."""
    def get(name):
        if name not in _DIRS:
            _DIRS[name] = tmp_path_factory.mktemp(name)
        return _models(name, _DIRS[name])
    return get


def _files(models, name):
    """(config.json dict, safetensors state dict) of the saved tiny model."""
    models(name)
    _, config, state_dict = _saved(name, _DIRS[name])
    return config, state_dict


def _pixels(size, batch=2, seed=0):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _nhwc(tensor):
    return tensor.detach().numpy().transpose(0, 2, 3, 1)


@functools.lru_cache(maxsize=None)
def _jitted_apply(module):
    return jitted(module.apply)


def _run(module, params, pixels):
    outputs = _jitted_apply(module)({"params": params}, _nhwc(pixels))
    return {k: np.asarray(v) for k, v in outputs.items()}


def _reference_outputs(reference, pixels):
    """transformers' outputs under our names: last_hidden_state, pooler_output (post-layernorm CLS) and, with a
    projection, image_embeds."""
    with torch.no_grad():
        if isinstance(reference, transformers.CLIPModel):
            vision = reference.vision_model(pixel_values=pixels)
            embeds = reference.get_image_features(pixel_values=pixels)
            embeds = embeds.pooler_output if hasattr(embeds, "pooler_output") else embeds
            return {"last_hidden_state": vision.last_hidden_state.numpy(),
                    "pooler_output": vision.pooler_output.numpy(), "image_embeds": embeds.numpy()}
        if isinstance(reference, transformers.CLIPVisionModelWithProjection):
            out = reference(pixel_values=pixels)
            vision = reference.vision_model(pixel_values=pixels)
            np.testing.assert_array_equal(vision.last_hidden_state.numpy(), out.last_hidden_state.numpy())
            return {"last_hidden_state": out.last_hidden_state.numpy(), "pooler_output": vision.pooler_output.numpy(),
                    "image_embeds": out.image_embeds.numpy()}
        out = reference(pixel_values=pixels)
        return {"last_hidden_state": out.last_hidden_state.numpy(), "pooler_output": out.pooler_output.numpy()}


def _check_outputs(actual, expected, label):
    assert sorted(actual) == sorted(expected), f"{label}: outputs {sorted(actual)} != {sorted(expected)}"
    for key in expected:
        assert actual[key].shape == expected[key].shape, f"{label} {key}: {actual[key].shape}"
        error = float(np.abs(actual[key] - expected[key]).max())
        print(f"{label} {key}: max abs error {error:.2e} (scale {np.abs(expected[key]).max():.2f})")
        assert error <= TOLERANCE, f"{label} {key}: max abs error {error}"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_outputs_match_transformers(models, name):
    reference, module, params = models(name)
    size = CONFIGS[name][1]["image_size"]
    pixels = _pixels(size, seed=len(name))
    _check_outputs(_run(module, params, pixels), _reference_outputs(reference, pixels), name)


def test_config_forms_decide_the_projection(models):
    _, with_projection, _ = models("projection_gelu")
    _, vision_only, _ = models("vision_only")
    _, clip_model, _ = models("clip_model")
    assert with_projection.with_projection and with_projection.projection_dim == 24
    assert with_projection.hidden_act == "gelu" and with_projection.layer_norm_eps == 1e-6
    assert with_projection.image_size == 30 and with_projection.patch_size == 6
    assert not vision_only.with_projection
    # CLIPModel: the top-level projection_dim (20), not the vision_config's default (512)
    assert clip_model.with_projection and clip_model.projection_dim == 20
    # to_config round-trips through transformers' CLIPVisionConfig
    config = with_projection.to_config()
    assert CLIPVisionModel.from_config(config) == with_projection
    assert transformers.CLIPVisionConfig(**config).hidden_act == "gelu"
    assert CLIPVisionModel.from_config(vision_only.to_config()) == vision_only


def test_clip_model_checkpoint_into_the_bare_vision_tower(models):
    """CFLD's ablation: a CLIPModel checkpoint (openai/clip-vit-large-patch14) used as CLIPVisionModel."""
    reference, _, _ = models("clip_model")
    config, state_dict = _files(models, "clip_model")
    assert {"logit_scale", "text_projection.weight"} <= set(state_dict)
    module = CLIPVisionModel.from_config(config, with_projection=False)
    params = clip_vision_params_from_state_dict(state_dict, config, with_projection=False)
    check_params_match(params, jax.eval_shape(module.init_params, jax.random.key(0)), "CLIPModel as vision tower")
    pixels = _pixels(32, seed=3)
    expected = _reference_outputs(reference, pixels)
    del expected["image_embeds"]
    _check_outputs(_run(module, params, pixels), expected, "clip_model without projection")


def test_legacy_checkpoint_and_config_layouts(models):
    """transformers 4.x: CLIPVisionModel keys under `vision_model.`, the position_ids buffer saved; a CLIPConfig
    with the legacy vision_config_dict and the generic keys every sub-config carried."""
    reference, module, params = models("vision_only")
    state_dict = {f"vision_model.{k}": v.numpy() for k, v in reference.state_dict().items()}
    state_dict["vision_model.embeddings.position_ids"] = np.arange(17)[None]
    legacy = clip_vision_params_from_state_dict(state_dict, {"architectures": ["CLIPVisionModel"]})
    jax.tree_util.tree_map(np.testing.assert_array_equal, legacy, params)

    clip, _ = _files(models, "clip_model")
    old = {"_name_or_path": "openai/clip-vit-large-patch14", "architectures": ["CLIPModel"], "model_type": "clip",
           "projection_dim": 20, "logit_scale_init_value": 2.6592, "initializer_factor": 1.0,
           "text_config": {"bad_words_ids": None, "vocab_size": 49408}, "text_config_dict": {"hidden_size": 16},
           "vision_config": {**clip["vision_config"], "hidden_size": 768, "num_beams": 1, "pruned_heads": {},
                             "id2label": {"0": "LABEL_0"}, "dropout": 0.0, "torch_dtype": None},
           "vision_config_dict": {"hidden_size": 32}, "torch_dtype": "float32", "transformers_version": "4.19.0"}
    _, expected, _ = models("clip_model")
    assert CLIPVisionModel.from_config(old) == expected


def test_unexpected_and_missing_checkpoint_keys_are_reported(models):
    reference, module, params = models("projection_quick_gelu")
    state_dict = {k: v.numpy() for k, v in reference.state_dict().items()}
    expected = jax.eval_shape(module.init_params, jax.random.key(0))
    # text keys belong to a CLIPModel checkpoint only: with a vision config they are unexpected
    extra = dict(state_dict, **{"text_projection.weight": np.zeros((4, 4), np.float32)})
    with pytest.raises(ValueError, match="unexpected.*text_projection"):
        check_params_match(clip_vision_params_from_state_dict(extra, reference.config.to_dict()), expected, "x")
    missing = {k: v for k, v in state_dict.items() if k != "visual_projection.weight"}
    with pytest.raises(ValueError, match="missing.*visual_projection/kernel"):
        check_params_match(clip_vision_params_from_state_dict(missing, reference.config.to_dict()), expected, "x")


@pytest.mark.parametrize("override,key", [
    ({"hidden_act": "relu"}, "hidden_act"),
    ({"attention_dropout": 0.1}, "attention_dropout"),
    ({"pruned_heads": {"0": [1]}}, "pruned_heads"),
    ({"use_flash_magic": True}, "use_flash_magic"),
    ({"image_size": [32, 48]}, "image_size"),
    ({"model_type": "siglip_vision_model"}, "model_type"),
    ({"architectures": ["CLIPForImageClassification"]}, "architectures"),
    ({"num_attention_heads": 5}, "num_attention_heads"),
])
def test_from_config_rejects_what_it_does_not_build(override, key):
    config = {"architectures": ["CLIPVisionModel"], "model_type": "clip_vision_model", **_VISION, **override}
    with pytest.raises(ValueError, match=key):
        CLIPVisionModel.from_config(config)


def test_from_config_options():
    config = {"model_type": "clip_vision_model", **_VISION}
    with pytest.raises(ValueError, match="with_projection"):
        CLIPVisionModel.from_config(config)
    module = CLIPVisionModel.from_config(config, with_projection=True, dtype=jnp.bfloat16, image_size=[16, 16])
    assert module.with_projection and module.dtype == jnp.bfloat16 and module.image_size == 16
    with pytest.raises(TypeError, match="heads"):
        CLIPVisionModel.from_config(config, with_projection=True, heads=2)
    with pytest.raises(ValueError, match="attention_implementation"):
        CLIPVisionModel.from_config(config, with_projection=True, attention_implementation="flash")
    with pytest.raises(ValueError, match="unknown CLIP config key 'extra'"):
        CLIPVisionModel.from_config({"model_type": "clip", "vision_config": _VISION, "extra": 1})


@pytest.mark.parametrize("shape,dtype,message", [
    ((2, 32, 32), np.float32, "got shape"),
    ((2, 3, 32, 32), np.float32, "NCHW"),
    ((2, 32, 32, 4), np.float32, "got shape"),
    ((2, 32, 32, 3), np.uint8, "floating-point"),
    ((2, 32, 32, 3), np.int32, "floating-point"),
    ((2, 48, 48, 3), np.float32, "position-embedding interpolation"),
])
def test_bad_pixel_values_raise(models, shape, dtype, message):
    _, module, params = models("projection_quick_gelu")
    with pytest.raises(ValueError, match=message):
        module.apply({"params": params}, np.zeros(shape, dtype))


def test_bfloat16_compute_keeps_float32_norms(models):
    reference, module, params = models("projection_quick_gelu")
    pixels = _pixels(32, seed=9)
    outputs = _jitted_apply(module.clone(dtype=jnp.bfloat16))({"params": params}, _nhwc(pixels))
    assert {v.dtype for v in outputs.values()} == {jnp.dtype(jnp.bfloat16)}
    expected = _reference_outputs(reference, pixels)
    for key in expected:
        assert np.abs(np.asarray(outputs[key], np.float32) - expected[key]).max() < 0.1, key


@pytest.mark.parametrize("name", list(FULL_SIZE))
def test_full_size_parameter_count_and_tree_match_transformers(name):
    vision, count = FULL_SIZE[name]
    config = transformers.CLIPVisionConfig(**vision)
    with torch.device("meta"):
        reference = transformers.CLIPVisionModelWithProjection(config)
    assert sum(p.numel() for p in reference.parameters()) == count
    module = CLIPVisionModel.from_config(config.to_dict(), with_projection=True)
    shapes = jax.eval_shape(module.init_params, jax.random.key(0))
    assert sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(shapes)) == count
    stand_ins = {k: np.broadcast_to(np.float32(0), v.shape) for k, v in reference.state_dict().items()}
    check_params_match(clip_vision_params_from_state_dict(stand_ins, config.to_dict()), shapes, name)
    pixels = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    outputs = jax.eval_shape(lambda p, x: module.apply({"params": p}, x), shapes, pixels)
    assert outputs["last_hidden_state"].shape == (1, 257, vision["hidden_size"])
    assert outputs["image_embeds"].shape == (1, vision["projection_dim"])
