"""Export and import (export.py, methods/common/exporting.py and importing.py, methods/pcdm/formats.py) and the
parameter report (python -m pgpis_jax.inspect).

The runs are made the way a user makes one from a released model: PyTorch statements of the three PCDMs demo stages
(diffusers' UNet2DConditionModel and ControlNetConditioningEmbedding, the prior and MLPs of test_pcdm_models) with
random weights are saved as the original's DeepSpeed files and imported. Then: the diffusers export loads with
diffusers / transformers `from_pretrained` and computes what our networks compute; the original export loads strictly
into the PyTorch statements, equal bit for bit to the weights that went in, and imports back to bit-identical
parameters; failures write nothing; readers change nothing in a run."""

import json
import os
import subprocess
import sys

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from diffusers.models.controlnets.controlnet import ControlNetConditioningEmbedding

from configs import pcdm_inpaint, pcdm_prior, pcdm_refine
from pgpis_jax.errors import UserError
from pgpis_jax.methods.common import exporting, importing
from pgpis_jax.methods.common.run import load_trained
from pgpis_jax.weights.pcdm_checkpoint import DEEPSPEED_MODEL_STATES
from tests.parity import jitted
from tests.test_pcdm_models import TorchMLP, TorchPrior, TorchStage, perturb

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {"prior": pcdm_prior, "inpaint": pcdm_inpaint, "refine": pcdm_refine}
TOLERANCE = 1e-4


def demo_config(stage):
    return CONFIGS[stage].get_config("demo")


def torch_statement(stage, seed=0):
    """The original's stage-`stage` module (its state-dict names) at the demo config's sizes, random weights."""
    config = demo_config(stage)
    torch.manual_seed(seed)
    if stage == "prior":
        prior = config.model.prior
        embedding = config.model.image_encoder.config.projection_dim
        return perturb(TorchPrior(embedding, prior.num_layers, prior.num_attention_heads, prior.attention_head_dim,
                                  36, prior.pose_hidden), seed)
    unet_config = {k: v for k, v in config.model.unet.config.items() if not k.startswith("_")}
    unet = diffusers.UNet2DConditionModel(**unet_config)
    projector = TorchMLP(config.model.dinov2.config.hidden_size, config.model.image_proj.hidden,
                         unet_config["cross_attention_dim"], final_norm=False)
    pose = ControlNetConditioningEmbedding(unet_config["block_out_channels"][0], 3,
                                           tuple(config.model.pose_encoder.block_out_channels)) \
        if stage == "inpaint" else None
    return perturb(TorchStage(unet, projector, pose), seed)


def save_original(module, path):
    torch.save({"module": module.state_dict()}, path)
    return str(path)


def listing(folder):
    """{path: (size, mtime)} of everything under `folder`."""
    seen = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(root, name)
            seen[path] = (os.path.getsize(path), os.stat(path).st_mtime_ns)
    return seen


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """{stage: (torch statement, its original file, the run imported from it)}."""
    root = tmp_path_factory.mktemp("released")
    out = {}
    for stage in CONFIGS:
        module = torch_statement(stage)
        path = save_original(module, root / f"{stage}.pt")
        run = str(root / "runs" / stage)
        importing.import_original(demo_config(stage), run, path)
        networks = ["prior"] if stage == "prior" else sorted(name for name, _ in module.named_children())
        assert json.loads(open(os.path.join(run, importing.IMPORT_RECORD)).read())["networks"] == networks
        out[stage] = (module, path, run)
    return out


def _flat(tree):
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.slow
def test_original_export_loads_strictly_bit_identical_and_imports_back_bit_identical(released, tmp_path):
    """Every stage's export loads strictly into its PyTorch statement, equal bit for bit to the weights that went in;
    the stage-2 export (all three of its networks) imports back to bit-identical parameters."""
    for stage, (module, _, run) in released.items():
        output = exporting.export_run(run, "original", str(tmp_path / stage))
        state = torch.load(os.path.join(output, DEEPSPEED_MODEL_STATES), map_location="cpu", weights_only=True)
        fresh = torch_statement(stage, seed=1)
        fresh.load_state_dict(state["module"], strict=True)
        for name, tensor in module.state_dict().items():
            assert torch.equal(fresh.state_dict()[name], tensor), (stage, name)
        manifest = json.loads(open(os.path.join(output, exporting.MANIFEST)).read())
        assert manifest["format"] == "original" and manifest["step"] == 0 and manifest["method"] == f"pcdm_{stage}"
        assert [f["path"] for f in manifest["files"]] == [DEEPSPEED_MODEL_STATES]

    run = released["inpaint"][2]
    again = str(tmp_path / "inpaint_reimported")
    importing.import_original(demo_config("inpaint"), again, str(tmp_path / "inpaint" / DEEPSPEED_MODEL_STATES))
    first, second = (_flat(load_trained(r, ["pcdm_inpaint"], which="raw").params) for r in (run, again))
    assert first.keys() == second.keys()
    for key in first:
        np.testing.assert_array_equal(first[key], second[key], err_msg=key)


def _unet_inputs(unet_config, class_embedding):
    rng = np.random.default_rng(0)
    size = unet_config["sample_size"]
    inputs = dict(sample=rng.normal(size=(2, unet_config["in_channels"], size, 2 * size)).astype(np.float32),
                  timestep=np.array([10, 700]),
                  encoder_hidden_states=rng.normal(size=(2, 5, unet_config["cross_attention_dim"])).astype(np.float32))
    if class_embedding:
        inputs["class_labels"] = rng.normal(
            size=(2, unet_config["projection_class_embeddings_input_dim"])).astype(np.float32)
    return inputs


@pytest.mark.slow
def test_diffusers_export_loads_with_diffusers_and_transformers_and_matches_ours(released, tmp_path):
    for stage, (module, _, run) in released.items():
        before = listing(run)
        output = exporting.export_run(run, "diffusers", str(tmp_path / stage))
        assert listing(run) == before
        trained = load_trained(run, [f"pcdm_{stage}"])
        params = trained.params
        if stage == "prior":
            statement = torch_statement("prior", seed=1)
            from safetensors.torch import load_file

            statement.load_state_dict(load_file(os.path.join(output, "prior.safetensors")), strict=True)
            rng = np.random.default_rng(1)
            x, source = (rng.normal(size=(2, 32)).astype(np.float32) for _ in range(2))
            poses = [rng.uniform(-1, 1, size=(2, 36)).astype(np.float32) for _ in range(2)]
            t = np.array([3, 900])
            with torch.no_grad():
                expected = statement(*(torch.from_numpy(a) for a in (x, t, source, *poses))).numpy()
            ours = jitted(trained.method.prior.apply)({"params": params["prior"]}, x, t, source, *poses)
            error = float(np.abs(np.asarray(ours) - expected).max())
            assert error < TOLERANCE, error
        else:
            reference = diffusers.UNet2DConditionModel.from_pretrained(os.path.join(output, "unet")).eval()
            inputs = _unet_inputs(dict(reference.config), stage == "inpaint")
            with torch.no_grad():
                expected = reference(**{k: torch.from_numpy(v) for k, v in inputs.items()}).sample.numpy()
            unet = trained.method.unet.module
            ours = jitted(unet.apply)({"params": params["unet"]}, jnp.asarray(inputs["sample"].transpose(0, 2, 3, 1)),
                                       inputs["timestep"], inputs["encoder_hidden_states"],
                                       class_labels=inputs.get("class_labels"))
            error = float(np.abs(np.asarray(ours).transpose(0, 3, 1, 2) - expected).max())
            print(f"{stage} UNet: diffusers from_pretrained vs ours max abs error {error:.2e}")
            assert error < TOLERANCE, error
            # the exported UNet is the released one (the run holds no EMA: its parameters are the imported ones)
            assert trained.which == "raw"
            for name, tensor in module.unet.state_dict().items():
                assert torch.equal(reference.state_dict()[name], tensor), name
        encoders = {"image_encoder": transformers.CLIPVisionModelWithProjection, "dinov2": transformers.Dinov2Model}
        for name in set(encoders) & set(params):
            model, info = encoders[name].from_pretrained(os.path.join(output, name), output_loading_info=True)
            assert not any(info.values()), (name, info)
            size = model.config.image_size
            pixels = np.random.default_rng(2).normal(size=(1, 3, size, size)).astype(np.float32)
            with torch.no_grad():
                hidden = model(torch.from_numpy(pixels)).last_hidden_state.numpy()
            ours = jitted(trained.method.encoders.module(name).apply)({"params": params[name]},
                                                                       pixels.transpose(0, 2, 3, 1))
            error = float(np.abs(np.asarray(ours["last_hidden_state"]) - hidden).max())
            assert error < TOLERANCE, (name, error)
        contents = json.loads(open(os.path.join(output, exporting.MANIFEST)).read())["contents"]
        assert set(contents) == {f"{name}/" if name in ("unet", "image_encoder", "dinov2") else f"{name}.safetensors"
                                 for name in params}


@pytest.mark.slow
def test_failed_exports_and_imports_write_nothing(released, tmp_path):
    _, inpaint_file, inpaint_run = released["inpaint"]
    prior_file = released["prior"][1]
    os.makedirs(tmp_path / "taken")
    runs_before = {run: listing(run) for _, _, run in released.values()}
    before = listing(tmp_path)
    failures = [
        (lambda: exporting.export_run(inpaint_run, "diffusers", str(tmp_path / "taken")), "exists"),
        (lambda: exporting.export_run(inpaint_run, "onnx", str(tmp_path / "a" / "b")), "exports to diffusers, original"),
        (lambda: exporting.export_run(inpaint_run, "diffusers", str(tmp_path / "a" / "b"), step=7),
         "no checkpoint of step 7"),
        (lambda: importing.import_original(demo_config("inpaint"), str(tmp_path / "taken"), inpaint_file), "exists"),
        (lambda: importing.import_original(demo_config("inpaint"), str(tmp_path / "c" / "run"), prior_file),
         "look like stage 'prior'"),
        (lambda: importing.import_original(demo_config("inpaint"), str(tmp_path / "c" / "run"),
                                           str(tmp_path / "missing.pt")), "does not exist"),
    ]
    for call, message in failures:
        with pytest.raises(UserError, match=message):
            call()
        assert listing(tmp_path) == before
    assert {run: listing(run) for run in runs_before} == runs_before


def test_simplified_stage2_checkpoint_without_class_embedding_is_refused_with_the_reason(tmp_path):
    module = torch_statement("inpaint")
    state = {k: v for k, v in module.state_dict().items() if ".class_embedding." not in k}
    state = {k.replace("image_proj_model_p.", "image_proj_model."): v for k, v in state.items()}
    torch.save({"module": state}, tmp_path / "PCDMs_ckpt.pt")
    with pytest.raises(UserError, match="simplified stage-2 model"):
        importing.import_original(demo_config("inpaint"), str(tmp_path / "run"), str(tmp_path / "PCDMs_ckpt.pt"))
    assert os.listdir(tmp_path) == ["PCDMs_ckpt.pt"]


def _run(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_command_line_export_and_sampling_of_imported_runs(released, tmp_path):
    """export.py as the README shows it (a second export to the same output and an import into an existing workdir
    are one-line errors), then sample.py on the imported stage-1 and stage-2 runs; neither changes the runs."""
    _, inpaint_file, run = released["inpaint"]
    before = listing(run)
    result = _run("export.py", f"--workdir={run}", "--format=diffusers", f"--output={tmp_path / 'D'}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "orbax" not in result.stderr
    assert (tmp_path / "D" / "unet" / "config.json").exists()
    for args in ([f"--workdir={run}", "--format=diffusers", f"--output={tmp_path / 'D'}"],
                 [f"--import_original={inpaint_file}", f"--config={REPO}/configs/pcdm_inpaint.py:demo",
                  f"--workdir={run}"]):
        result = _run("export.py", *args)
        errors = [line for line in result.stderr.splitlines() if line.startswith("export.py: error")]
        assert result.returncode != 0 and len(errors) == 1 and "exists" in errors[0], result.stderr[-2000:]

    from PIL import Image

    from tests.test_pcdm_methods import _write_keypoints

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 64, 3), np.uint8)).save(tmp_path / "a.png")
    _write_keypoints(tmp_path / "a.txt", 0)
    _write_keypoints(tmp_path / "b.txt", 6)
    result = _run("sample.py", f"--workdir={run}", f"--prior_workdir={released['prior'][2]}",
                  f"--source_image={tmp_path / 'a.png'}", f"--source_pose={tmp_path / 'a.txt'}",
                  f"--target_pose={tmp_path / 'b.txt'}", f"--output={tmp_path / 'b.png'}",
                  "--config.sampling.num_inference_steps=2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert np.asarray(Image.open(tmp_path / "b.png")).std() > 0
    assert listing(run) == before


@pytest.mark.slow
def test_inspect_reports_the_full_size_counts_without_weights():
    """The stage-2 UNet (SD 2.1-base, 9 input channels, projection class embedding) and the prior at full size, and
    the same counts from diffusers' UNet and the PyTorch prior statement on the meta device."""
    result = _run("-m", "pgpis_jax.inspect", "--config=configs/pcdm_inpaint.py", "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    inpaint = json.loads(result.stdout)
    result = _run("-m", "pgpis_jax.inspect", "--config=configs/pcdm_prior.py", "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    prior = json.loads(result.stdout)
    assert inpaint["networks"]["unet"] == 868_876_804 and prior["networks"]["prior"] == 1_027_166_208

    from pgpis_jax.weights.published import published_config

    config = pcdm_inpaint.get_config()
    unet_config = published_config(config.model.unet.weights, "unet")
    unet_config.update(dict(config.model.unet.overrides))
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**{k: v for k, v in unet_config.items() if not k.startswith("_")})
        statement = TorchPrior(1024, 20, 32, 64, 36, 512)
    assert sum(p.numel() for p in unet.parameters()) == inpaint["networks"]["unet"]
    assert sum(p.numel() for p in statement.parameters()) == prior["networks"]["prior"]
    trainable = sum(inpaint["networks"][name] for name in ("unet", "pose_proj", "image_proj_model_p"))
    assert inpaint["trainable"] == trainable and inpaint["frozen"] == sum(inpaint["networks"].values()) - trainable
    # float32 parameters, Adam's two moments, two int32 counters; the step and its key
    assert inpaint["checkpoint_bytes"]["per_step"] == {"params": 4 * trainable, "opt_state": 8 * trainable + 8,
                                                       "progress": 4 + 8}
