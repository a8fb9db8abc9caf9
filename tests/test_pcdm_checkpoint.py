"""Reading and writing the original PCDMs checkpoints: DeepSpeed file and directory layouts, fp16, the
simplified demo model, the prior's ignored entries, one clear error per bad file, and the export back to
PyTorch (strict load into the torch reference modules, same outputs)."""

import datetime

import jax
import numpy as np
import pytest
import torch

from pgpis_jax.errors import UserError
from pgpis_jax.weights.pcdm_checkpoint import (DEEPSPEED_MODEL_STATES, load_pcdm_checkpoint,
                                               resolve_checkpoint_file, save_pcdm_checkpoint)
from tests.parity import nchw, nhwc
from tests.test_pcdm_models import (TINY_PRIOR, TINY_PROJECTOR, TorchPrior, _jit, tiny_modules,
                                    tiny_torch_prior, tiny_torch_stage)


def _state_dict(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _save(path, state_dict, **extra):
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"module": state_dict, **extra}, path)
    return str(path)


def _flat(tree):
    return {"/".join(k.key for k in path): np.asarray(v) for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _assert_trees_equal(a, b):
    a, b = _flat(a), _flat(b)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.fixture(scope="module")
def inpaint():
    """(torch stage-2 container, its state dict, our abstract params)."""
    reference = tiny_torch_stage("inpaint", seed=1)
    return reference, _state_dict(reference), tiny_modules("inpaint")[1]


@pytest.fixture(scope="module")
def prior():
    reference = tiny_torch_prior(seed=2)
    prior_module, expected = tiny_modules("prior")
    return reference, _state_dict(reference), prior_module, expected


def _error(path, stage, expected):
    with pytest.raises(UserError) as info:
        load_pcdm_checkpoint(path, stage, expected)
    return str(info.value)


# --------------------------------------------------------------------------------------------- errors


def test_missing_key_is_an_error_naming_file_and_key(inpaint, tmp_path):
    _, state_dict, expected = inpaint
    state_dict = dict(state_dict)
    del state_dict["unet.conv_in.bias"]
    path = _save(tmp_path / "missing.pt", state_dict)
    message = _error(path, "inpaint", expected)
    assert path in message and "missing (1): unet/conv_in/bias" in message


def test_unexpected_keys_are_an_error_naming_file_and_keys(inpaint, tmp_path):
    _, state_dict, expected = inpaint
    state_dict = dict(state_dict, **{"unet.extra.weight": torch.zeros(2, 3), "vae.decoder.bias": torch.zeros(3)})
    path = _save(tmp_path / "unexpected.pt", state_dict)
    message = _error(path, "inpaint", expected)
    assert path in message and "unexpected (1): unet/extra/kernel" in message
    assert "unexpected keys outside the inpaint prefixes (unet., pose_proj., image_proj_model_p.) (1): " \
        "vae.decoder.bias" in message


def test_wrong_shape_is_an_error_naming_file_key_and_shapes(inpaint, tmp_path):
    _, state_dict, expected = inpaint
    state_dict = dict(state_dict, **{"pose_proj.conv_in.weight": torch.zeros(4, 3, 5, 5)})
    path = _save(tmp_path / "shape.pt", state_dict)
    message = _error(path, "inpaint", expected)
    assert path in message and "pose_proj/conv_in/kernel: (5, 5, 3, 4) (expected (3, 3, 3, 4))" in message


def test_missing_file_and_bad_contents_are_errors(inpaint, tmp_path):
    _, state_dict, expected = inpaint
    missing = str(tmp_path / "nowhere" / DEEPSPEED_MODEL_STATES)
    assert missing in _error(missing, "inpaint", expected)
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    assert f"{empty_dir} holds no {DEEPSPEED_MODEL_STATES}" in _error(str(empty_dir), "inpaint", expected)
    not_deepspeed = tmp_path / "plain.pt"
    torch.save({"state_dict": state_dict}, not_deepspeed)
    assert "under 'module'" in _error(str(not_deepspeed), "inpaint", expected)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    assert str(garbage) in _error(str(garbage), "inpaint", expected)
    with pytest.raises(UserError, match="unknown PCDMs stage 'stage2'"):
        load_pcdm_checkpoint(str(garbage), "stage2", expected)


def test_a_stage_2_file_read_as_stage_3_says_so(inpaint, tmp_path):
    _, state_dict, _ = inpaint
    path = _save(tmp_path / "s2.pt", state_dict)
    message = _error(path, "refine", tiny_modules("refine")[1])
    assert "look like stage 'inpaint'" in message and "pose_proj.conv_in.weight" in message
    assert "unet/conv_in/kernel: (3, 3, 9, 32) (expected (3, 3, 8, 32))" in message


def test_pickled_objects_need_weights_only_false(inpaint, tmp_path):
    _, state_dict, expected = inpaint
    path = _save(tmp_path / "objects.pt", state_dict, saved_on=datetime.date(2024, 1, 1))
    assert "datetime.date" in _error(path, "inpaint", expected)
    params = load_pcdm_checkpoint(path, "inpaint", expected, weights_only=False)
    assert set(params) == {"unet", "pose_proj", "image_proj_model_p"}


# ------------------------------------------------------------------------------------------- layouts


def test_deepspeed_directory_layouts(inpaint, tmp_path):
    _, state_dict, expected = inpaint
    direct = _save(tmp_path / "direct" / DEEPSPEED_MODEL_STATES, state_dict)
    assert resolve_checkpoint_file(str(tmp_path / "direct")) == direct
    only_step = _save(tmp_path / "one" / "5000" / DEEPSPEED_MODEL_STATES, state_dict)
    assert resolve_checkpoint_file(str(tmp_path / "one")) == only_step
    _save(tmp_path / "two" / "5000" / DEEPSPEED_MODEL_STATES, state_dict)
    newest = _save(tmp_path / "two" / "10000" / DEEPSPEED_MODEL_STATES, state_dict)
    with pytest.raises(UserError, match="several step folders \\(10000, 5000\\)"):
        resolve_checkpoint_file(str(tmp_path / "two"))
    (tmp_path / "two" / "latest").write_text("10000")
    assert resolve_checkpoint_file(str(tmp_path / "two")) == newest
    (tmp_path / "two" / "latest").write_text("15000")
    with pytest.raises(UserError, match="names step folder '15000'"):
        resolve_checkpoint_file(str(tmp_path / "two"))
    assert set(load_pcdm_checkpoint(str(tmp_path / "one"), "inpaint", expected)) == {"unet", "pose_proj",
                                                                                      "image_proj_model_p"}


def test_fp16_checkpoint_loads_as_float32(prior, tmp_path):
    _, state_dict, _, expected = prior
    half = {k: v.half() for k, v in state_dict.items()}
    params = load_pcdm_checkpoint(_save(tmp_path / "half.pt", half), "prior", expected)
    assert all(v.dtype == np.float32 for v in jax.tree_util.tree_leaves(params))
    np.testing.assert_array_equal(params["proj_in"]["kernel"], half["proj_in.weight"].float().numpy().T)
    np.testing.assert_array_equal(params["pose_encoder1"]["net_6"]["scale"],
                                  half["pose_encoder1.net.6.weight"].float().numpy())


def test_prior_drops_the_unused_kandinsky_entries_but_nothing_else(prior, tmp_path):
    _, state_dict, _, expected = prior
    reference = load_pcdm_checkpoint(_save(tmp_path / "plain.pt", state_dict), "prior", expected)
    extra = dict(state_dict, clip_mean=torch.zeros(1, 16), clip_std=torch.ones(1, 16),
                 causal_attention_mask=torch.zeros(1, 6, 6))
    _assert_trees_equal(load_pcdm_checkpoint(_save(tmp_path / "extra.pt", extra), "prior", expected), reference)
    other = dict(state_dict, clip_scale=torch.zeros(1, 16))
    assert "unexpected (1): clip_scale" in _error(_save(tmp_path / "other.pt", other), "prior", expected)


def test_simplified_demo_model_names_its_projector_without_p(inpaint, tmp_path):
    _, state_dict, expected = inpaint
    reference = load_pcdm_checkpoint(_save(tmp_path / "paper.pt", state_dict), "inpaint", expected)
    renamed = {k.replace("image_proj_model_p.", "image_proj_model."): v for k, v in state_dict.items()}
    simplified = load_pcdm_checkpoint(_save(tmp_path / "PCDMs_ckpt.pt", renamed), "inpaint", expected)
    _assert_trees_equal(simplified, reference)
    both = dict(state_dict, **{"image_proj_model.net.0.bias": state_dict["image_proj_model_p.net.0.bias"]})
    assert "mixes image_proj_model.* with image_proj_model_p.*" in _error(_save(tmp_path / "both.pt", both),
                                                                           "inpaint", expected)


# -------------------------------------------------------------------------------------------- export


def test_save_load_round_trip_and_no_overwrite(inpaint, tmp_path):
    _, state_dict, expected = inpaint
    params = load_pcdm_checkpoint(_save(tmp_path / "in.pt", state_dict), "inpaint", expected)
    out = str(tmp_path / "export" / DEEPSPEED_MODEL_STATES)
    assert save_pcdm_checkpoint(params, "inpaint", out) == out
    _assert_trees_equal(load_pcdm_checkpoint(out, "inpaint", expected), params)
    with pytest.raises(UserError, match="already exists"):
        save_pcdm_checkpoint(params, "inpaint", out)
    with pytest.raises(UserError, match="exactly the subtrees unet, image_proj_model_p"):
        save_pcdm_checkpoint(params, "refine", str(tmp_path / "refine.pt"))


def test_exported_stage_2_loads_strictly_into_torch_and_computes_the_same(tmp_path):
    modules, expected = tiny_modules("inpaint")
    rng = np.random.default_rng(3)
    params = jax.tree_util.tree_map(lambda x: rng.normal(0, 0.2, x.shape).astype(np.float32), expected)
    path = save_pcdm_checkpoint(params, "inpaint", str(tmp_path / "s2.pt"))
    reference = tiny_torch_stage("inpaint", seed=9)
    reference.load_state_dict(torch.load(path, weights_only=True)["module"], strict=True)
    pose = np.random.default_rng(0).uniform(-1, 1, (2, 24, 16, 3)).astype(np.float32)
    tokens = np.random.default_rng(1).normal(size=(2, 5, TINY_PROJECTOR["in_features"])).astype(np.float32)
    with torch.no_grad():
        torch_pose = nhwc(reference.pose_proj(nchw(pose)))
        torch_tokens = reference.image_proj_model_p(torch.from_numpy(tokens)).numpy()
    np.testing.assert_allclose(_jit(modules["pose_proj"])({"params": params["pose_proj"]}, pose), torch_pose,
                               atol=1e-5)
    assert np.abs(torch_pose).max() > 1e-2
    projected = _jit(modules["image_proj_model_p"])({"params": params["image_proj_model_p"]}, tokens)
    np.testing.assert_allclose(projected, torch_tokens, atol=1e-5)
    np.testing.assert_array_equal(reference.unet.conv_in.weight.detach().numpy(),
                                  np.asarray(params["unet"]["conv_in"]["kernel"]).transpose(3, 2, 0, 1))


def test_exported_prior_loads_strictly_into_torch_and_computes_the_same(prior, tmp_path):
    _, _, prior_module, expected = prior
    rng = np.random.default_rng(4)
    params = jax.tree_util.tree_map(lambda x: rng.normal(0, 0.2, x.shape).astype(np.float32), expected)
    path = save_pcdm_checkpoint(params, "prior", str(tmp_path / "prior" / DEEPSPEED_MODEL_STATES))
    reference = TorchPrior(**TINY_PRIOR)
    reference.load_state_dict(torch.load(path, weights_only=True)["module"], strict=True)
    inputs = [rng.normal(size=(2, w)).astype(np.float32) for w in (16, 16, 36, 36)]
    timesteps = np.array([7, 600])
    with torch.no_grad():
        expected = reference.eval()(torch.from_numpy(inputs[0]), torch.from_numpy(timesteps),
                                    *map(torch.from_numpy, inputs[1:])).numpy()
    actual = _jit(prior_module)({"params": params}, inputs[0], timesteps, *inputs[1:])
    np.testing.assert_allclose(actual, expected, atol=1e-4)
