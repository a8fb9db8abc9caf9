"""FPDM methods (stage 1 `fpdm_fusion`, stage 2 `fpdm`): the published configs of the networks the configs name
against diffusers / transformers on the meta device, the parameter report of both full-size configs, and two tiny
stages trained on synthetic people: stage 2 on the stage-1 run, stage-1 validation, per-batch condition drops,
the demo's source tokens keeping the source's brightness, three-branch guidance against separately computed
branches, split sampling with the original's names, eval.py's fpdm protocol on them, single-image sampling."""

import json
import os

import diffusers
import jax
import numpy as np
import pytest
import torch
import transformers

from configs import fpdm_common
from pgpis_jax.weights import diffusers_io, transformers_io
from pgpis_jax.weights.published import published_config

# The issue's numbers (../shared/reference/fpdm.md) and the reference libraries' counts of the published configs.
SD21_UNET = 865_910_724
SD21_VAE = 83_653_863
CLIP_VIT_L_VISION = 303_966_208   # vision tower 303,179,776 + 1024 -> 768 projection
DINOV2_LARGE = 304_368_640
FUSION_MLP = 1_574_912
SOURCE_TOKEN_PROJECTOR = 1_576_192
POSE_ENCODER = 1_086_480
COMBINER = 4_133_377


def _count(tree):
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(tree))


def _torch_count(module):
    return sum(p.numel() for p in module.parameters())


def _ours(module):
    return _count(jax.eval_shape(lambda: module.init_params(jax.random.key(0))))


def _diffusers_kwargs(config):
    return {k: v for k, v in config.items() if not k.startswith("_")}


def test_published_configs_build_the_reference_libraries_networks():
    """Each published config of FPDM's networks builds, on the meta device, a diffusers / transformers model with
    as many parameters as our module built from the same config (and as the known totals)."""
    unet = published_config(fpdm_common.SD21, "unet")
    vae = published_config(fpdm_common.SD21, "vae")
    clip = published_config(fpdm_common.CLIP_VIT_L)
    dino = published_config(fpdm_common.DINOV2_LARGE)
    with torch.device("meta"):
        reference = {
            "unet": diffusers.UNet2DConditionModel(**_diffusers_kwargs(unet)),
            "vae": diffusers.AutoencoderKL(**_diffusers_kwargs(vae)),
            "clip": transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(
                **clip["vision_config"], projection_dim=clip["projection_dim"])),
            "dino": transformers.Dinov2Model(transformers.Dinov2Config(
                **{k: v for k, v in dino.items() if k != "architectures"})),
        }
    ours = {"unet": diffusers_io.module_from_diffusers_config(unet),
            "vae": diffusers_io.module_from_diffusers_config(vae),
            "clip": transformers_io.module_from_transformers_config(clip),
            "dino": transformers_io.module_from_transformers_config(dino)}
    expected = {"unet": SD21_UNET, "vae": SD21_VAE, "clip": CLIP_VIT_L_VISION, "dino": DINOV2_LARGE}
    for name, module in ours.items():
        count = _ours(module)
        print(f"{name}: ours {count:,}, reference library {_torch_count(reference[name]):,}")
        assert count == _torch_count(reference[name]) == expected[name], name
    assert reference["unet"].config.upcast_attention and reference["unet"].config.sample_size == 96


def test_parameter_report_of_both_full_size_configs():
    """python -m pgpis_jax.inspect's report (in process) for configs/fpdm_fusion.py and configs/fpdm_diffusion.py:
    the trainable stage-2 networks are the original's (counted here again from PyTorch statements on the meta
    device), the frozen ones SD 2.1's VAE, DINOv2-L and the stage-1 model."""
    from configs import fpdm_diffusion, fpdm_fusion
    from diffusers.models.controlnets.controlnet import ControlNetConditioningEmbedding
    from pgpis_jax.inspect import config_report
    from tests.test_fpdm_models import TorchCombiner, TorchSourceProjector, torch_fpdm_unet

    stage1 = config_report(fpdm_fusion.get_config())
    assert stage1["networks"] == {"img_encoder": CLIP_VIT_L_VISION, "combiner": COMBINER}
    assert stage1["trainable"] == CLIP_VIT_L_VISION + COMBINER and stage1["frozen"] == 0

    stage2 = config_report(fpdm_diffusion.get_config())
    unet_config = published_config(fpdm_common.SD21, "unet")
    with torch.device("meta"):
        reference = {"unet": _torch_count(torch_fpdm_unet(768, **_diffusers_kwargs(unet_config))),
                     "srcimage_proj_model": _torch_count(TorchSourceProjector(1024, 768, 1024)),
                     "pose_t_proj": _torch_count(ControlNetConditioningEmbedding(320, 3, (16, 32, 96, 256))),
                     "combiner": _torch_count(TorchCombiner(768, 768, 768))}
    print(json.dumps(stage2["networks"]))
    assert reference == {"unet": SD21_UNET + FUSION_MLP, "srcimage_proj_model": SOURCE_TOKEN_PROJECTOR,
                         "pose_t_proj": POSE_ENCODER, "combiner": COMBINER}
    assert stage2["networks"] == {"unet": SD21_UNET + FUSION_MLP, "srcimage_proj_model": SOURCE_TOKEN_PROJECTOR,
                                  "pose_t_proj": POSE_ENCODER, "vae": SD21_VAE, "src_image_encoder": DINOV2_LARGE,
                                  "fusion_model": CLIP_VIT_L_VISION + COMBINER}
    trainable = SD21_UNET + FUSION_MLP + SOURCE_TOKEN_PROJECTOR + POSE_ENCODER
    assert stage2["trainable"] == trainable == 870_148_308
    assert stage2["frozen"] == SD21_VAE + DINOV2_LARGE + CLIP_VIT_L_VISION + COMBINER


# ------------------------------------------------------------------------------------------ tiny runs


def tiny_configs(data_dir, fusion_workdir=""):
    """The `:demo` configs of both stages for 2-step runs, stage 2 with a one-level 32-channel UNet (cross-attention
    in its mid block only)."""
    from configs import fpdm_diffusion, fpdm_fusion

    stage1, stage2 = fpdm_fusion.get_config("demo"), fpdm_diffusion.get_config("demo")
    for config in (stage1, stage2):
        config.data.data_dir = data_dir
        config.total_steps = config.checkpoint_every_steps = 2
        config.batch_size = 8
    stage2.model.unet.config.update(block_out_channels=[32], attention_head_dim=[1],
                                    down_block_types=["DownBlock2D"], up_block_types=["UpBlock2D"])
    stage2.model.fusion_model.workdir = fusion_workdir
    stage2.sampling.num_inference_steps = 2
    return stage1, stage2


@pytest.fixture(scope="module")
def runs(demo_data, tmp_path_factory):
    """{"fusion", "diffusion": run directories}: both tiny stages trained 2 steps in process."""
    from pgpis_jax import methods, trainer

    root = tmp_path_factory.mktemp("fpdm_runs")
    workdirs = {"fusion": str(root / "fusion"), "diffusion": str(root / "diffusion")}
    for name, config in zip(workdirs, tiny_configs(demo_data, workdirs["fusion"])):
        assert trainer.train(methods.get_method(config.method).build(config), config, workdirs[name]) == "done"
    return workdirs


def _flat(tree):
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.slow
def test_stage2_trains_on_the_stage1_run_and_stage1_validates(runs):
    """Stage 2's frozen fusion model is the stage-1 run's, bit for bit, and it records the CLIP config the stage-1 run
    recorded; stage 1's validation covers every test pair."""
    from pgpis_jax.methods.common.run import load_trained, recorded_networks
    from pgpis_jax.methods.fpdm import fusion

    stage1 = load_trained(runs["fusion"], ("fpdm_fusion",))
    stage2 = load_trained(runs["diffusion"], ("fpdm",))
    frozen, trained = _flat(stage2.params["fusion_model"]), _flat({k: stage1.params[k] for k in ("img_encoder",
                                                                                                  "combiner")})
    assert frozen.keys() == trained.keys()
    assert all(np.array_equal(frozen[k], trained[k]) for k in frozen)
    assert recorded_networks(runs["diffusion"])["config.model.fusion_model.image_encoder"] == \
        recorded_networks(runs["fusion"])["config.model.img_encoder"]
    results = fusion.validate(stage1, batch_size=48)
    print(results)
    assert results["pairs"] == 96 and 0 <= results["top1"] <= 1 and -1 <= results["fusion_cosine"] <= 1
    assert results["val_loss"] > 0


@pytest.mark.slow
def test_condition_drops_are_per_batch_with_the_configured_rates(runs):
    from pgpis_jax.methods.common.run import load_trained

    stage = load_trained(runs["diffusion"], ("fpdm",)).method
    batch = {"example_id": np.arange(6, dtype=np.int32)}
    draws = jax.vmap(lambda key: stage.condition_drops(key, batch))(jax.random.split(jax.random.key(0), 4000))
    for name in ("pose", "tokens", "fusion"):
        drops = np.asarray(draws[name])
        assert (drops == drops[:, :1]).all(), name                   # one draw for the whole batch
        assert abs(drops[:, 0].mean() - 0.2) < 0.025, (name, drops[:, 0].mean())
    everything = np.asarray(draws["pose"][:, 0] & draws["tokens"][:, 0] & draws["fusion"][:, 0])
    assert everything.mean() < 0.02                                  # independent draws: 0.2^3 = 0.008
    stage.dropout_per = "example"
    drops = np.asarray(stage.condition_drops(jax.random.key(1), {"example_id": np.arange(64, dtype=np.int32)})["pose"])
    assert 0 < drops.sum() < 64


@pytest.mark.slow
def test_demo_source_tokens_keep_the_source_brightness(runs):
    """The demo's random frozen DINOv2 (LayerNorm eps 1): a flat image and the same twice as far from the mean
    colour give tokens of different norms; with eps 1e-6 the final LayerNorm gives both the same norm."""
    from pgpis_jax.methods.common.run import load_trained

    trained = load_trained(runs["diffusion"], ("fpdm",))
    encoder = trained.method.encoders.module("src_image_encoder")
    params = {"params": trained.params["src_image_encoder"]}
    flat = np.broadcast_to(np.float32([0.5, -0.3, 0.8]), (1, 56, 56, 3))

    def norm_ratio(module):
        once, twice = (np.linalg.norm(module.apply(params, scale * flat)["last_hidden_state"], axis=-1)
                       for scale in (1.0, 2.0))
        return float(np.mean(twice / once))

    assert encoder.layer_norm_eps == 1.0 and norm_ratio(encoder) > 1.5
    assert abs(norm_ratio(encoder.clone(layer_norm_eps=1e-6)) - 1.0) < 1e-3


@pytest.mark.slow
def test_three_branch_guidance_is_fpdm_rule_on_separately_computed_branches(runs):
    """w = 2: v = u + 2 (src - u) + 2 (global - src) per step, each branch computed on its own here (uncond: zero
    pose, context and fusion; src: zero fusion); w = 1 samples the global branch alone."""
    from pgpis_jax.methods.common.run import load_trained
    from pgpis_jax.methods.common.stage import first_test_examples

    trained = load_trained(runs["diffusion"], ("fpdm",))
    stage, params = trained.method, trained.params
    batch = {k: v for k, v in first_test_examples(trained.config, 2).items() if k in stage.INPUTS}
    key, steps = jax.random.key(3), 3
    guided = np.asarray(jax.jit(lambda b: stage.generate(params, b, key, steps, 2.0))(batch))
    plain = np.asarray(jax.jit(lambda b: stage.generate(params, b, key, steps, 1.0))(batch))

    pose, context, fusion = stage.conditions(params, batch)
    branches = {"uncond": (0 * pose, 0 * context, 0 * fusion), "src": (pose, context, 0 * fusion),
                "global": (pose, context, fusion)}

    def hand_guided(x, t):
        u, s, g = (stage.denoise(params, x, t, branches[name]) for name in ("uncond", "src", "global"))
        return u + 2.0 * (s - u) + 2.0 * (g - s)

    noise_key, step_key = jax.random.split(key)
    x_T = jax.random.normal(noise_key, (2, 8, 8, stage.codec.channels), np.float32)
    decode = lambda x0: np.clip(np.asarray(stage.codec.decode(None, x0)), -1, 1)  # noqa: E731
    sampler = stage.objective.sampler
    expected = decode(jax.jit(lambda x: sampler.sample(hand_guided, x, step_key, num_inference_steps=steps))(x_T))
    np.testing.assert_allclose(guided, expected, atol=2e-4)
    conditional = decode(jax.jit(lambda x: sampler.sample(
        lambda y, t: stage.denoise(params, y, t, branches["global"]), x, step_key, num_inference_steps=steps))(x_T))
    np.testing.assert_allclose(plain, conditional, atol=2e-4)
    assert np.abs(guided - plain).max() > 1e-3


def _write_keypoints(path, shift):
    points = np.array([[32, 10], [32, 18], [24, 18], [22, 28], [20, 36], [40, 18], [42, 28], [44, 36], [27, 38],
                       [27, 48], [27, 58], [37, 38], [37, 48], [37, 58], [30, 8], [34, 8], [28, 9], [36, 9]], float)
    np.savetxt(path, points + [shift, 0])


@pytest.mark.slow
def test_sample_a_split_evaluate_with_fpdm_names_and_one_image(runs, tmp_path):
    """sample.py's split mode writes the original's `<source>_2_<target>.png` names; eval.py's config mode scores
    them against the reference targets through the fpdm protocol's pairing (96 pairs) at the protocol's other size
    (config.eval.eval_size; its default 512x352 has 4x the pixels to score); single mode from a photo and a keypoint
    file. Nothing is written into the run."""
    from PIL import Image

    from pgpis_jax.methods.common.run import saved_config
    from pgpis_jax.methods.fpdm import sampling

    run = runs["diffusion"]
    before = sorted(os.walk(run))
    config = saved_config(run)
    config.eval.metrics = "ssim,psnr"
    config.eval.eval_size = "256x176"
    results = sampling.sample_command(run, config, split="test", output_dir=str(tmp_path / "out"), batch_size=48)
    assert results["images_written"] == results["pairs"] == 96
    names = sorted(os.listdir(tmp_path / "out" / "generated"))
    assert len(names) == 96 and all(".jpg_2_" in n and n.endswith(".jpg.png") for n in names)
    assert np.asarray(Image.open(tmp_path / "out" / "generated" / names[0])).shape == (64, 64, 3)
    metrics = sampling.evaluate_command(run, str(tmp_path / "eval"), config)
    assert metrics["protocol"] == "fpdm" and metrics["counts"]["pairs"] == 96
    settings = metrics["settings"]
    assert settings["pixel_generated"]["size"] == settings["pixel_reference"]["size"] == (256, 176)
    assert len(os.listdir(tmp_path / "eval" / "test_set" / "reference")) == 96
    assert 0 < metrics["metrics"]["ssim"] < 1
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["metrics"] == metrics["metrics"]

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 64, 3), np.uint8)).save(tmp_path / "a.png")
    _write_keypoints(tmp_path / "b.txt", 6)
    sampling.sample_command(run, config, source_image=str(tmp_path / "a.png"), target_pose=str(tmp_path / "b.txt"),
                            output=str(tmp_path / "single" / "b.png"))
    image = np.asarray(Image.open(tmp_path / "single" / "b.png"))
    assert image.shape == (64, 64, 3) and image.std() > 0
    assert sorted(os.walk(run)) == before
