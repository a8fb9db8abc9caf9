"""CFLD's released checkpoint layout (pgpis_jax/methods/cfld/formats.py) the way a user meets it: PyTorch statements
of the original's build_model container and UNet wrapper (tests/test_cfld_models.py) at the tiny test config's
sizes, with perturbed random weights, saved as pytorch_model.bin / pytorch_model_1.bin and imported with
`export.py --import_original`'s function. The import is strict and samples; the "original" export loads strictly
into fresh torch statements, bit for bit what went in; the "diffusers" export
(export.py on the command line), reloaded with diffusers' from_pretrained and safetensors into PyTorch, computes
what our networks compute (1e-5)."""

import json
import os
import shutil

import diffusers
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pgpis_jax.errors import UserError
from pgpis_jax.methods.cfld import pipeline
from pgpis_jax.methods.cfld.formats import CONDITIONER_SAFETENSORS
from pgpis_jax.methods.common import exporting, importing
from pgpis_jax.methods.common.run import load_trained
from pgpis_jax.weights.cfld_checkpoint import CONDITIONER_FILE, UNET_FILE
from tests.parity import jitted, nchw, nhwc
from tests.test_cfld_methods import _run, listing, tiny_config
from tests.test_cfld_models import TorchBuildModel, TorchUNetWrapper, install_appearance_processors, perturb
from tests.test_pcdm_methods import _write_keypoints

pytestmark = pytest.mark.slow   # end-to-end (README, Tests: `make test` leaves these out)

TOLERANCE = 1e-5


def torch_statements(config):
    """(build_model container, UNet wrapper) of the config's sizes, torch's default init."""
    m = config.model
    swin = {k: m.backbone.config[k] for k in ("image_size", "patch_size", "embed_dim", "depths", "num_heads",
                                               "window_size", "drop_path_rate")}
    hga = m.appearance_encoder
    container = TorchBuildModel(
        swin, {k: tuple(hga[k]) for k in ("in_channels", "embed_dims", "heads", "out_channels")} | {"depth": hga.depth},
        {k: m.pose_encoder[k] for k in ("downscale_factor", "in_channels", "norm_num_groups")}
        | {"channels": tuple(m.pose_encoder.channels)},
        {k: m.decoder[k] for k in ("num_queries", "width", "depth", "heads")}, block_indices=tuple(hga.block_indices))
    unet = TorchUNetWrapper(**{k: v for k, v in m.unet.config.items() if not k.startswith("_")})
    return container, unet


def _state(module):
    return {key: value.detach().clone() for key, value in module.state_dict().items()}


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """{"config", "container", "unet": the torch statements, "folder": their .bin files, "run": imported}."""
    root = tmp_path_factory.mktemp("cfld_released")
    config = tiny_config()
    torch.manual_seed(5)
    container, unet = (perturb(module, seed) for module, seed in zip(torch_statements(config), (5, 6)))
    folder = root / "released"
    folder.mkdir()
    torch.save(_state(container), folder / CONDITIONER_FILE)
    torch.save(_state(unet), folder / UNET_FILE)
    run = importing.import_original(config, str(root / "run"), str(folder))
    return {"config": config, "container": container, "unet": unet, "folder": str(folder), "run": run}


def test_import_is_strict_and_the_imported_run_samples(released, tmp_path):
    """A key missing from pytorch_model.bin or an extra one in pytorch_model_1.bin is one UserError naming the file,
    and nothing is written; the imported run holds the torch values; sample.py's single mode on it gives an image
    and writes nothing into the run."""
    from PIL import Image

    config, folder = released["config"], released["folder"]
    state = torch.load(os.path.join(folder, CONDITIONER_FILE), weights_only=True)
    for name, broken, message in (
            (CONDITIONER_FILE, {k: v for k, v in state.items() if k != "decoder.query_feat"},
             r"pytorch_model\.bin: not a matching CFLD checkpoint.*decoder/query_feat"),
            (UNET_FILE, {**torch.load(os.path.join(folder, UNET_FILE), weights_only=True),
                         "model.extra.weight": torch.zeros(1)}, r"pytorch_model_1\.bin: not a matching.*extra")):
        bad = tmp_path / f"bad_{name}"
        shutil.copytree(folder, bad)
        torch.save(broken, bad / name)
        with pytest.raises(UserError, match=message):
            importing.import_original(config, str(tmp_path / "run"), str(bad))
        assert not (tmp_path / "run").exists()

    trained = load_trained(released["run"], ("cfld",))
    params = trained.params
    container, unet = released["container"], released["unet"]
    np.testing.assert_array_equal(params["learnable_vector"], container.learnable_vector.detach().numpy())
    np.testing.assert_array_equal(params["decoder"]["query_feat"], container.decoder.query_feat.detach().numpy())
    kernel = params["unet"]["up_blocks_1"]["attentions_0"]["transformer_blocks_0"]["attn2"]["to_k"]["kernel"]
    np.testing.assert_array_equal(kernel, unet.model.up_blocks[1].attentions[0].transformer_blocks[0].attn2.to_k
                                  .weight.detach().numpy().T)

    before = listing(released["run"])
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 64, 3), np.uint8)).save(tmp_path / "a.png")
    _write_keypoints(tmp_path / "b.txt", 6)
    pipeline.sample_command(released["run"], source_image=str(tmp_path / "a.png"),
                            target_pose=str(tmp_path / "b.txt"), output=str(tmp_path / "b.png"))
    image = np.asarray(Image.open(tmp_path / "b.png"))
    assert image.shape == (64, 64, 3) and image.std() > 0
    assert listing(released["run"]) == before


def test_original_export_loads_strictly_bit_identical(released, tmp_path):
    output = exporting.export_run(released["run"], "original", str(tmp_path / "original"))
    fresh = torch_statements(released["config"])
    for name, module, reference in zip((CONDITIONER_FILE, UNET_FILE), fresh, (released["container"],
                                                                               released["unet"])):
        state = torch.load(os.path.join(output, name), weights_only=True)
        module.load_state_dict(state, strict=True)
        for key, tensor in reference.state_dict().items():     # the Swin buffers included
            assert torch.equal(state[key], tensor), (name, key)
    manifest = json.loads(open(os.path.join(output, exporting.MANIFEST)).read())
    assert manifest["format"] == "original" and sorted(f["path"] for f in manifest["files"]) == [CONDITIONER_FILE,
                                                                                                 UNET_FILE]


def _check(ours, theirs, label):
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    assert ours.shape == theirs.shape, label
    error = float(np.abs(ours - theirs).max())
    print(f"{label}: max abs error {error:.2e} (scale {np.abs(theirs).max():.2f})")
    assert error <= TOLERANCE, (label, error)


def test_diffusers_export_reloaded_in_pytorch_equals_ours(released, tmp_path):
    """export.py --format=diffusers; diffusers' UNet2DConditionModel.from_pretrained and the conditioner's
    safetensors in a fresh build_model statement (strict), run as the original runs them (adapter residuals,
    query-bias processors), equal our prompt, residuals, biases and UNet output."""
    run = released["run"]
    before = listing(run)
    result = _run("export.py", f"--workdir={run}", "--format=diffusers", f"--output={tmp_path / 'D'}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert listing(run) == before
    unet = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "D" / "unet").eval()
    container, _ = torch_statements(released["config"])
    container.load_state_dict(load_file(tmp_path / "D" / CONDITIONER_SAFETENSORS), strict=True)
    container.eval()
    processors = install_appearance_processors(unet)

    rng = np.random.default_rng(2)
    image = rng.uniform(-1, 1, (2, 64, 64, 3)).astype(np.float32)
    pose = rng.uniform(0, 1, (2, 64, 64, 21)).astype(np.float32)
    latents = rng.normal(size=(2, 8, 8, unet.config.in_channels)).astype(np.float32)
    timesteps = np.array([951, 1])
    with torch.no_grad():
        prompt, residuals, biases = container(nchw(image), nchw(pose))
        ordered = [biases[key] for key in sorted(biases, key=lambda k: int(k.split("_")[1]))]
        for index, bias in zip(sorted(processors), ordered):
            processors[index].bias = bias
        expected = unet(nchw(latents), torch.from_numpy(timesteps), prompt,
                        down_intrablock_additional_residuals=list(residuals)).sample

    trained = load_trained(run, ("cfld",))
    stage, params = trained.method, trained.params
    ours_prompt, ours_biases = jitted(stage.encode_appearance)(params, image)
    ours_residuals = jitted(stage.encode_pose)(params, pose)
    _check(ours_prompt, prompt.numpy(), "prompt (Swin -> PRD)")
    for i, (ours, theirs) in enumerate(zip(ours_residuals, residuals, strict=True)):
        _check(ours, nhwc(theirs), f"pose residual {i}")
    for i, (ours, theirs) in enumerate(zip(ours_biases, ordered, strict=True)):
        _check(ours.query, theirs.numpy(), f"HGA query bias {i}")
    _check(jitted(stage.denoise)(params, latents, timesteps, (ours_prompt, ours_residuals, ours_biases)),
           nhwc(expected), "UNet epsilon")
    contents = json.loads((tmp_path / "D" / exporting.MANIFEST).read_text())["contents"]
    assert "unet/" in contents and "vae/" not in contents
