"""diffusers model directories through our loader and exporter, against the PyTorch classes that wrote or
read them: tiny UNet and VAE written with save_pretrained, loaded by load_diffusers; ours exported with
save_diffusers, loaded by from_pretrained."""

import json
import os

import diffusers
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from pgpis_jax.weights.diffusers_io import SAFETENSORS_NAME, load_diffusers, save_diffusers
from tests.parity import jitted

UNET = dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8, cross_attention_dim=16,
            attention_head_dim=(2, 4), use_linear_projection=True, class_embed_type="projection",
            projection_class_embeddings_input_dim=12)
VAE = dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, latent_channels=4,
           down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)


@pytest.fixture(scope="module")
def torch_models():
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(**UNET).eval(), diffusers.AutoencoderKL(**VAE).eval()


def _unet_inputs():
    rng = np.random.default_rng(0)
    return (rng.standard_normal((2, 16, 16, 4)).astype(np.float32), np.array([10, 900]),
            rng.standard_normal((2, 5, 16)).astype(np.float32), rng.standard_normal((2, 12)).astype(np.float32))


def _torch_unet_output(model, inputs):
    sample, t, context, labels = inputs
    with torch.no_grad():
        out = model(torch.from_numpy(sample.transpose(0, 3, 1, 2)), torch.from_numpy(t), torch.from_numpy(context),
                    class_labels=torch.from_numpy(labels)).sample
    return out.numpy().transpose(0, 2, 3, 1)


def _jax_unet_output(module, params, inputs):
    sample, t, context, labels = inputs
    return np.asarray(jitted(module.apply)({"params": params}, sample, t, context, class_labels=labels))


def _image():
    return np.random.default_rng(1).standard_normal((1, 16, 24, 3)).astype(np.float32)


def _torch_vae_output(model, image):
    with torch.no_grad():
        return model(torch.from_numpy(image.transpose(0, 3, 1, 2))).sample.numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("safe_serialization", [True, False])
def test_unet_loads_from_save_pretrained_and_exports_back(torch_models, tmp_path, safe_serialization):
    model = torch_models[0]
    model.save_pretrained(tmp_path / "model" / "unet", safe_serialization=safe_serialization)
    module, params = load_diffusers(str(tmp_path / "model"), subfolder="unet")
    inputs = _unet_inputs()
    expected = _torch_unet_output(model, inputs)
    np.testing.assert_allclose(_jax_unet_output(module, params, inputs), expected, atol=1e-4)

    save_diffusers(module, params, str(tmp_path / "export"))
    reloaded = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "export").eval()
    np.testing.assert_allclose(_torch_unet_output(reloaded, inputs), expected, atol=1e-5)


def test_vae_loads_exports_and_accepts_deprecated_attention_names(torch_models, tmp_path):
    model = torch_models[1]
    model.save_pretrained(tmp_path / "vae")
    expected = _torch_vae_output(model, _image())
    module, params = load_diffusers(str(tmp_path / "vae"))
    np.testing.assert_allclose(jitted(module.apply)({"params": params}, _image()), expected, atol=1e-4)

    save_diffusers(module, params, str(tmp_path / "export"))
    reloaded = diffusers.AutoencoderKL.from_pretrained(tmp_path / "export").eval()
    np.testing.assert_allclose(_torch_vae_output(reloaded, _image()), expected, atol=1e-5)

    old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = load_file(tmp_path / "vae" / SAFETENSORS_NAME)
    renamed = {}
    for key, value in state.items():
        for new, old in old_names.items():
            key = key.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        renamed[key] = value
    assert any(".proj_attn." in key for key in renamed)
    save_file(renamed, tmp_path / "vae" / SAFETENSORS_NAME)
    module, params = load_diffusers(str(tmp_path / "vae"))
    np.testing.assert_allclose(jitted(module.apply)({"params": params}, _image()), expected, atol=1e-4)


def test_bad_checkpoints_are_errors_naming_what_is_wrong(torch_models, tmp_path):
    model = torch_models[0]
    directory = tmp_path / "unet"
    model.save_pretrained(directory)
    weights = directory / SAFETENSORS_NAME
    state = load_file(weights)

    broken = dict(state)
    del broken["conv_in.bias"]
    broken["extra.weight"] = np.zeros(3, np.float32)
    broken["conv_out.weight"] = np.zeros((4, 32, 1, 1), np.float32)
    save_file(broken, weights)
    with pytest.raises(ValueError) as error:
        load_diffusers(str(directory))
    message = str(error.value)
    assert str(directory) in message
    assert "missing (1): conv_in/bias" in message and "unexpected (1): extra/scale" in message
    assert "conv_out/kernel: (1, 1, 32, 4) (expected (3, 3, 32, 4))" in message

    config = json.loads((directory / "config.json").read_text())
    config["_class_name"] = "UNet3DConditionModel"
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"unet/config.json: config _class_name 'UNet3DConditionModel' is not supp"):
        load_diffusers(str(directory))

    config["_class_name"] = "UNet2DConditionModel"
    (directory / "config.json").write_text(json.dumps(config))
    os.remove(weights)
    with pytest.raises(FileNotFoundError, match="no weights; expected diffusion_pytorch_model.safetensors"):
        load_diffusers(str(directory))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_diffusers(str(tmp_path))


def test_export_refuses_to_overwrite(torch_models, tmp_path):
    torch_models[1].save_pretrained(tmp_path / "vae")
    module, params = load_diffusers(str(tmp_path / "vae"))
    with pytest.raises(FileExistsError, match="already holds a model"):
        save_diffusers(module, params, str(tmp_path / "vae"))
