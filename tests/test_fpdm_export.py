"""FPDM's export formats (pgpis_jax/methods/fpdm/formats.py) the way a user meets them: PyTorch statements of the
original's Lightning modules (FusionModel; FPDM with its UNet registered twice, the modified UNet as diffusers' with
the fusion MLP as class embedding and the pose features added after conv_in) at the tiny test configs' sizes, with
random weights, saved as Lightning checkpoints and imported with `export.py --import_original`'s function. Then: the
imported stage 2 samples; the "original" exports load strictly into fresh PyTorch statements, equal bit for bit to
what went in, and import back bit for bit; the "diffusers" exports, loaded with diffusers / transformers /
safetensors into PyTorch, compute what our networks compute (1e-5)."""

import json
import os

import diffusers
import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from diffusers.models.controlnets.controlnet import ControlNetConditioningEmbedding
from safetensors.torch import load_file

from pgpis_jax.methods.common import exporting, importing
from pgpis_jax.methods.common.run import load_trained
from pgpis_jax.methods.fpdm import sampling
from pgpis_jax.methods.fpdm.formats import LIGHTNING_CHECKPOINT
from tests.parity import jitted, nchw
from tests.test_fpdm_methods import _write_keypoints, tiny_configs
from tests.test_fpdm_models import (_DINOV2_4X_NAMES, TorchCombiner, TorchFusionMLP, TorchSourceProjector,
                                    _lightning_checkpoint, perturb, torch_fpdm_unet)

pytestmark = pytest.mark.slow   # end-to-end (README, Tests: `make test` leaves these out)

TOLERANCE = 1e-5


def _hf_config(spec, config_class):
    return config_class(**{k: v for k, v in spec.config.items() if k not in ("architectures", "model_type")})


class TorchFusionModel(torch.nn.Module):
    """FusionModel's modules: img_encoder, pose_encoder (the same object), combiner."""

    def __init__(self, config):
        super().__init__()
        clip = _hf_config(config.model.img_encoder if "img_encoder" in config.model
                          else config.model.fusion_model.image_encoder, transformers.CLIPVisionConfig)
        combiner = config.model.combiner if "combiner" in config.model else config.model.fusion_model.combiner
        self.img_encoder = transformers.CLIPVisionModelWithProjection(clip)
        self.pose_encoder = self.img_encoder
        self.combiner = TorchCombiner(clip.projection_dim, combiner.projection_dim, combiner.hidden_dim)

    def forward(self, source, pose):
        return self.combiner(self.img_encoder(source).image_embeds, self.pose_encoder(pose).image_embeds)


class TorchSDModel(torch.nn.Module):
    def __init__(self, unet, config, token_dim):
        super().__init__()
        m = config.model
        self.srcimage_proj_model = TorchSourceProjector(token_dim, m.srcimage_proj.hidden,
                                                        unet.config.cross_attention_dim)
        self.pose_t_proj = ControlNetConditioningEmbedding(unet.config.block_out_channels[0], 3,
                                                           tuple(m.pose_encoder.block_out_channels))
        self.unet = unet


class TorchFPDM(torch.nn.Module):
    """The stage-2 LightningModule's modules (no VAE: the tiny configs use the parameter-free code)."""

    def __init__(self, config):
        super().__init__()
        unet_config = {k: v for k, v in config.model.unet.config.items() if not k.startswith("_")
                       and k not in ("class_embed_type", "projection_class_embeddings_input_dim")}
        fusion_dim = config.model.unet.config["projection_class_embeddings_input_dim"]
        self.unet = torch_fpdm_unet(fusion_dim, **unet_config)
        self.fusion_model = TorchFusionModel(config)
        self.src_image_encoder = transformers.Dinov2Model(_hf_config(config.model.src_image_encoder,
                                                                      transformers.Dinov2Config))
        self.sd_model = TorchSDModel(self.unet, config, self.src_image_encoder.config.hidden_size)


def _to_4x(state_dict):
    """transformers 5's in-memory DINOv2 names -> the 4.x names the original's checkpoints hold."""
    out = {}
    for key, value in state_dict.items():
        for new, old in _DINOV2_4X_NAMES.items():
            key = key.replace(new, old)
        out[key] = value
    return out


def _from_4x(state_dict):
    out = {}
    for key, value in state_dict.items():
        for new, old in _DINOV2_4X_NAMES.items():
            key = key.replace(old, new)
        out[key] = value
    return out


def listing(folder):
    return sorted((root, tuple(sorted(files))) for root, _, files in os.walk(folder))


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """{stage: (config, torch statement, its Lightning file, the run imported from it)}."""
    root = tmp_path_factory.mktemp("fpdm_released")
    stage1, stage2 = tiny_configs(data_dir="")
    out = {}
    for name, config, statement in (("fusion", stage1, TorchFusionModel), ("diffusion", stage2, TorchFPDM)):
        torch.manual_seed(3)
        module = perturb(statement(config), 3)
        path = root / f"{name}.ckpt"
        torch.save(_lightning_checkpoint(_to_4x(module.state_dict())), path)
        run = str(root / "runs" / name)
        importing.import_original(config, run, str(path))
        out[name] = (config, module, str(path), run)
    return out


def _flat(tree):
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_original_exports_load_strictly_bit_identical_and_import_back(released, tmp_path):
    """Both stages' last.ckpt load strictly into fresh statements, equal bit for bit to what was imported; stage 2's
    (all six networks) imports back to bit-identical parameters."""
    for name, (config, module, _, run) in released.items():
        output = exporting.export_run(run, "original", str(tmp_path / name))
        content = torch.load(os.path.join(output, LIGHTNING_CHECKPOINT), map_location="cpu", weights_only=True)
        assert content["hparams_name"] == "args" and content["global_step"] == 0
        fresh = type(module)(config)
        fresh.load_state_dict(_from_4x(content["state_dict"]), strict=True)
        for key, tensor in module.state_dict().items():
            assert torch.equal(fresh.state_dict()[key], tensor), (name, key)
        manifest = json.loads(open(os.path.join(output, exporting.MANIFEST)).read())
        assert manifest["format"] == "original" and [f["path"] for f in manifest["files"]] == [LIGHTNING_CHECKPOINT]
    config, _, _, run = released["diffusion"]
    again = str(tmp_path / "diffusion_reimported")
    importing.import_original(config, again, os.path.join(tmp_path / "diffusion", LIGHTNING_CHECKPOINT))
    first, second = (_flat(load_trained(r, ["fpdm"], which="raw").params) for r in (run, again))
    assert first.keys() == second.keys() and all(np.array_equal(first[k], second[k]) for k in first)
    hyper = torch.load(os.path.join(tmp_path / "diffusion", LIGHTNING_CHECKPOINT), weights_only=True)[
        "hyper_parameters"]
    assert hyper["class_embed_type"] == "mlp" and hyper["pose_drop_rate"] == 0.2 and hyper["noise_offset"] == 0.1


def test_imported_stage2_samples_one_image(released, tmp_path):
    from PIL import Image

    run = released["diffusion"][3]
    before = listing(run)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 64, 3), np.uint8)).save(tmp_path / "a.png")
    _write_keypoints(tmp_path / "b.txt", 6)
    sampling.sample_command(run, source_image=str(tmp_path / "a.png"), target_pose=str(tmp_path / "b.txt"),
                            output=str(tmp_path / "b.png"))
    image = np.asarray(Image.open(tmp_path / "b.png"))
    assert image.shape == (64, 64, 3) and image.std() > 0
    assert listing(run) == before


def _inputs(config, batch=2, seed=0):
    rng = np.random.default_rng(seed)
    clip = config.model.fusion_model.image_encoder.config["image_size"]
    dino = config.data.pipeline["dino_size"]
    return {"target_pose": rng.uniform(0, 1, (batch, 64, 64, 3)).astype(np.float32),
            "source_dino": rng.normal(size=(batch, dino, dino, 3)).astype(np.float32),
            "source_clip": rng.normal(size=(batch, clip, clip, 3)).astype(np.float32),
            "target_pose_clip": rng.normal(size=(batch, clip, clip, 3)).astype(np.float32)}


def _check(ours, theirs, label):
    error = float(np.abs(np.asarray(ours) - np.asarray(theirs)).max())
    print(f"{label}: max abs error {error:.2e} (scale {np.abs(np.asarray(theirs)).max():.2f})")
    assert error <= TOLERANCE, (label, error)


def test_diffusers_exports_reloaded_in_pytorch_equal_ours(released, tmp_path):
    config, _, _, run = released["diffusion"]
    output = exporting.export_run(run, "diffusers", str(tmp_path / "diffusion"))
    trained = load_trained(run, ["fpdm"])
    stage, params = trained.method, trained.params

    unet = diffusers.UNet2DConditionModel.from_pretrained(os.path.join(output, "unet"), class_embed_type="identity")
    fusion_dim = config.model.unet.config["projection_class_embeddings_input_dim"]
    unet.class_embedding = TorchFusionMLP(fusion_dim, 768, 4 * unet.config.block_out_channels[0])
    unet.class_embedding.load_state_dict(load_file(os.path.join(output, "class_embedding.safetensors")), strict=True)
    pose = ControlNetConditioningEmbedding(unet.config.block_out_channels[0], 3,
                                           tuple(config.model.pose_encoder.block_out_channels))
    pose.load_state_dict(load_file(os.path.join(output, "pose_t_proj.safetensors")), strict=True)
    dino = transformers.Dinov2Model.from_pretrained(os.path.join(output, "src_image_encoder"))
    projector = TorchSourceProjector(dino.config.hidden_size, config.model.srcimage_proj.hidden,
                                     unet.config.cross_attention_dim)
    projector.load_state_dict(load_file(os.path.join(output, "srcimage_proj_model.safetensors")), strict=True)
    clip = transformers.CLIPVisionModelWithProjection.from_pretrained(os.path.join(output, "fusion_model",
                                                                                   "img_encoder"))
    combiner = TorchCombiner(clip.config.projection_dim, config.model.fusion_model.combiner.projection_dim,
                             config.model.fusion_model.combiner.hidden_dim)
    combiner.load_state_dict(load_file(os.path.join(output, "fusion_model", "combiner.safetensors")), strict=True)
    for module in (unet, pose, dino, projector, clip, combiner):
        module.eval()
    scheduler = diffusers.DDPMScheduler.from_pretrained(os.path.join(output, "scheduler"))
    assert scheduler.config.prediction_type == config.sampling.scheduler.prediction_type

    batch = _inputs(config)
    latents = np.random.default_rng(1).normal(size=(2, 8, 8, stage.codec.channels)).astype(np.float32)
    timesteps = np.array([951, 1])
    with torch.no_grad():
        fusion = combiner(clip(nchw(batch["source_clip"])).image_embeds,
                          clip(nchw(batch["target_pose_clip"])).image_embeds)
        context = projector(dino(nchw(batch["source_dino"])).last_hidden_state)
        features = pose(nchw(batch["target_pose"]))
        handle = unet.conv_in.register_forward_hook(lambda module, args, out: out + features)
        expected = unet(nchw(latents), torch.from_numpy(timesteps), encoder_hidden_states=context,
                        class_labels=fusion).sample.numpy().transpose(0, 2, 3, 1)
        handle.remove()
    ours = jitted(stage.conditions)(params, batch)
    _check(ours[2], fusion.numpy(), "fusion embedding (CLIP + Combiner)")
    _check(ours[1], context.numpy(), "projected DINOv2 tokens")
    _check(ours[0], features.numpy().transpose(0, 2, 3, 1), "pose features")
    _check(jitted(stage.denoise)(params, latents, timesteps, ours), expected, "stage-2 UNet output")
    contents = json.loads(open(os.path.join(output, exporting.MANIFEST)).read())["contents"]
    assert "class_embedding.safetensors" in contents and "vae/" not in contents

    config1, _, _, run1 = released["fusion"]
    output = exporting.export_run(run1, "diffusers", str(tmp_path / "fusion"))
    stage1 = load_trained(run1, ["fpdm_fusion"])
    clip = transformers.CLIPVisionModelWithProjection.from_pretrained(os.path.join(output, "img_encoder")).eval()
    combiner = TorchCombiner(clip.config.projection_dim, config1.model.combiner.projection_dim,
                             config1.model.combiner.hidden_dim).eval()
    combiner.load_state_dict(load_file(os.path.join(output, "combiner.safetensors")), strict=True)
    with torch.no_grad():
        expected = combiner(clip(nchw(batch["source_clip"])).image_embeds,
                            clip(nchw(batch["target_pose_clip"])).image_embeds).numpy()
    from pgpis_jax.methods.fpdm.fusion import fusion_vector

    _, _, fused = fusion_vector(stage1.method.clip.module, stage1.method.combiner, stage1.params,
                                batch["source_clip"], batch["target_pose_clip"])
    _check(fused, expected, "stage-1 fusion embedding")
    assert np.allclose(np.linalg.norm(expected, axis=-1), 1.0, atol=1e-5)
    assert F.cosine_similarity(torch.from_numpy(np.array(fused)), torch.from_numpy(expected)).min() > 0.999
