"""transformers save_pretrained directories through load_transformers, against the PyTorch models that
wrote them; strict errors for mismatching checkpoints."""

import json

import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from pgpis_jax.weights.transformers_io import load_transformers

PIXELS = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(np.float32)

MODELS = {
    "clip_projection": (transformers.CLIPVisionModelWithProjection, transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
        patch_size=8, projection_dim=24), ("last_hidden_state", "image_embeds")),
    "clip": (transformers.CLIPVisionModel, transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
        patch_size=8, hidden_act="gelu"), ("last_hidden_state", "pooler_output")),
    "dinov2": (transformers.Dinov2Model, transformers.Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=16, patch_size=4),
        ("last_hidden_state", "pooler_output")),
    "swin": (transformers.SwinModel, transformers.SwinConfig(
        image_size=32, patch_size=2, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=4),
        ("last_hidden_state", "pooler_output")),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def saved_model(request, tmp_path_factory):
    model_class, config, outputs = MODELS[request.param]
    torch.manual_seed(0)
    model = model_class(config).eval()
    directory = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(directory)
    with torch.no_grad():
        expected = model(pixel_values=torch.from_numpy(PIXELS.transpose(0, 3, 1, 2)))
    return directory, {name: getattr(expected, name).numpy() for name in outputs}


def test_loaded_encoder_matches_transformers(saved_model):
    directory, expected = saved_model
    module, params = load_transformers(str(directory))
    actual = module.apply({"params": params}, PIXELS)
    for name, value in expected.items():
        np.testing.assert_allclose(actual[name], value, atol=1e-4, err_msg=name)


def test_mismatching_checkpoint_is_an_error_naming_the_key(saved_model, tmp_path):
    directory, _ = saved_model
    for item in directory.iterdir():
        (tmp_path / item.name).write_bytes(item.read_bytes())
    weights = tmp_path / "model.safetensors"
    state = load_file(weights)
    removed = sorted(state)[0]
    del state[removed]
    save_file(state, weights)
    with pytest.raises(ValueError, match="missing \\(1\\)") as error:
        load_transformers(str(tmp_path))
    assert str(tmp_path) in str(error.value)

    config = json.loads((tmp_path / "config.json").read_text())
    config["architectures"] = ["BertModel"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="config.json: architecture 'BertModel'"):
        load_transformers(str(tmp_path))
