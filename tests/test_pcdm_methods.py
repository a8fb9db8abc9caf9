"""PCDMs methods: warm-start merging against a diffusers checkpoint, the pixel-shuffle codec against torch,
and a tiny end-to-end run (train two stages, sample a split with the reference's file names, resume)."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch

from pgpis_jax.errors import UserError
from pgpis_jax.models.latent_codec import PixelShuffleCodec
from pgpis_jax.weights.partial import merge_pretrained
from tests.parity import jitted, jitted_init

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL_INPAINT = f"{REPO}/tests/small_pcdm_config.py:inpaint"   # the demo stage 2 with a one-level UNet


def test_pixel_shuffle_codec_is_torch_pixel_unshuffle_and_exactly_invertible():
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (2, 16, 24, 3)).astype(np.float32)
    codec = PixelShuffleCodec(factor=4, scaling=0.5)
    mean, logvar = codec.moments({}, images)
    assert logvar is None
    expected = torch.nn.functional.pixel_unshuffle(torch.from_numpy(images).permute(0, 3, 1, 2), 4)
    # torch orders unshuffled channels (c, dy, dx); ours (dy, dx, c): compare after reordering.
    expected = expected.reshape(2, 3, 4, 4, 4, 6).permute(0, 4, 5, 2, 3, 1).reshape(2, 4, 6, 48).numpy()
    np.testing.assert_array_equal(np.asarray(mean), expected)
    latent = codec.latent(mean, logvar, None)
    np.testing.assert_array_equal(np.asarray(latent), expected * 0.5)
    np.testing.assert_allclose(np.asarray(codec.decode({}, latent)), images, atol=1e-7)


def test_dct_basis_is_scipy_block_dct_with_frequency_gain_and_exactly_invertible():
    import scipy.fft

    rng = np.random.default_rng(1)
    images = rng.uniform(-1, 1, (2, 16, 24, 3)).astype(np.float32)
    codec = PixelShuffleCodec(factor=8, scaling=0.5, basis="dct", high_frequency_gain=1.5)
    mean, _ = codec.moments({}, images)
    blocks = images.reshape(2, 2, 8, 3, 8, 3).transpose(0, 1, 3, 2, 4, 5).astype(np.float64)
    gain = 1 + 1.5 * np.add.outer(np.arange(8), np.arange(8))[..., None]
    expected = scipy.fft.dctn(blocks, type=2, norm="ortho", axes=(3, 4)) * gain
    np.testing.assert_allclose(np.asarray(mean), expected.reshape(2, 2, 3, 192), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(mean)[..., :3], 8 * blocks.mean(axis=(3, 4)), atol=1e-5)   # (0, 0)
    np.testing.assert_allclose(np.asarray(codec.decode({}, codec.latent(mean, None, None))), images, atol=1e-5)
    with pytest.raises(ValueError, match="high_frequency_gain and low_pass need basis .dct."):
        PixelShuffleCodec(factor=8, high_frequency_gain=1.0)
    import ml_collections

    from pgpis_jax.methods.common.networks import NetworkBuilder

    spec = ml_collections.ConfigDict(dict(kind="pixel_shuffle", factor=8, scaling=1.0, basis="wavelet"))
    with pytest.raises(UserError, match=r"config.model.vae: PixelShuffleCodec basis 'wavelet'"):
        NetworkBuilder().codec(spec, "config.model.vae", np.float32)


def test_low_pass_dct_keeps_the_coefficients_below_the_cutoff_and_decodes_as_scipy_idct():
    import scipy.fft

    rng = np.random.default_rng(2)
    images = rng.uniform(-1, 1, (2, 16, 24, 3)).astype(np.float32)
    codec = PixelShuffleCodec(factor=8, basis="dct", high_frequency_gain=1.0, low_pass=4)
    assert codec.channels == 30                      # (u, v) with u + v < 4: 1 + 2 + 3 + 4 = 10 pairs
    mean, _ = codec.moments({}, images)
    blocks = images.reshape(2, 2, 8, 3, 8, 3).transpose(0, 1, 3, 2, 4, 5).astype(np.float64)
    coefficients = scipy.fft.dctn(blocks, type=2, norm="ortho", axes=(3, 4))
    kept = [(u, v) for u in range(8) for v in range(8) if u + v < 4]
    expected = np.stack([coefficients[:, :, :, u, v] * (1 + u + v) for u, v in kept], axis=3)
    np.testing.assert_allclose(np.asarray(mean), expected.reshape(2, 2, 3, 30), rtol=1e-5, atol=1e-4)
    low = np.zeros_like(coefficients)
    for u, v in kept:
        low[:, :, :, u, v] = coefficients[:, :, :, u, v]
    expected_images = scipy.fft.idctn(low, type=2, norm="ortho", axes=(3, 4)).transpose(0, 1, 3, 2, 4, 5)
    np.testing.assert_allclose(np.asarray(codec.decode({}, mean)), expected_images.reshape(images.shape), atol=1e-5)
    with pytest.raises(ValueError, match="low_pass=16"):
        PixelShuffleCodec(factor=8, basis="dct", low_pass=16)


def _tiny_unet_config(in_channels):
    return dict(sample_size=8, in_channels=in_channels, out_channels=4, layers_per_block=1,
                block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16, attention_head_dim=(1, 2),
                norm_num_groups=32, use_linear_projection=True)


@pytest.mark.slow
def test_stage2_warm_start_keeps_pretrained_weights_and_declared_fresh_ones(tmp_path):
    """SD-like UNet saved by diffusers with 4 input channels -> our 9-channel stage-2 UNet with a projection
    class embedding: conv_in's kernel and the class embedding stay fresh, conv_in's bias and every other tensor
    equal the PyTorch ones."""
    from diffusers import UNet2DConditionModel as TorchUNet

    from configs import pcdm_common
    from pgpis_jax.methods.common.networks import NetworkBuilder, load_pretrained

    torch.manual_seed(0)
    TorchUNet(**_tiny_unet_config(4)).save_pretrained(tmp_path / "unet")
    spec = pcdm_common.network(str(tmp_path), "unet", overrides=dict(
        in_channels=9, class_embed_type="projection", projection_class_embeddings_input_dim=16),
        keep_fresh=("conv_in/kernel", "class_embedding/.*"))
    builder = NetworkBuilder()
    resolved = builder.network(spec, "config.model.unet", "diffusers")
    builder.raise_if_any("test")
    fresh = jax.device_get(jitted_init(resolved.module.init_params)(jax.random.key(1)))
    params = load_pretrained(resolved, fresh)
    state = TorchUNet.from_pretrained(tmp_path / "unet").state_dict()
    np.testing.assert_array_equal(params["conv_in"]["kernel"], fresh["conv_in"]["kernel"])
    assert params["conv_in"]["kernel"].shape == (3, 3, 9, 32)
    np.testing.assert_array_equal(params["conv_in"]["bias"], state["conv_in.bias"].numpy())
    np.testing.assert_array_equal(params["class_embedding"]["linear_1"]["kernel"],
                                  fresh["class_embedding"]["linear_1"]["kernel"])
    np.testing.assert_array_equal(params["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]["attn2"]["to_k"]
                                  ["kernel"], state["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"]
                                  .numpy().T)
    np.testing.assert_array_equal(params["time_embedding"]["linear_2"]["bias"], state["time_embedding.linear_2.bias"])


def test_merge_pretrained_reports_every_undeclared_difference():
    fresh = {"a": {"kernel": np.zeros((2, 3))}, "b": np.zeros(4), "c": np.zeros(2)}
    with pytest.raises(UserError) as error:
        merge_pretrained(fresh, {"a": {"kernel": np.ones((3, 3))}, "b": np.ones(4), "extra": np.ones(1)}, "ckpt")
    message = str(error.value)
    assert "ckpt" in message and "missing (1): c" in message and "a/kernel: (3, 3) (expected (2, 3))" in message
    assert "extra" in message
    merged = merge_pretrained(fresh, {"a": {"kernel": np.ones((3, 3))}, "b": np.ones(4), "extra": np.ones(1)},
                              "ckpt", keep_fresh=("a/kernel", "c"), drop_pretrained=("extra",))
    np.testing.assert_array_equal(merged["b"], np.ones(4))
    np.testing.assert_array_equal(merged["a"]["kernel"], np.zeros((2, 3)))
    with pytest.raises(UserError, match="match no parameter"):
        merge_pretrained(fresh, {"a": {"kernel": np.ones((2, 3))}, "b": np.ones(4), "c": np.ones(2)}, "ckpt",
                         keep_fresh=("no_such/.*",))


def _run(*args, cwd):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def _snapshot(*folders):
    """{path: (size, mtime)} of every file and folder under `folders` (what a read-only command must not change)."""
    seen = {}
    for folder in folders:
        for root, dirs, files in os.walk(folder):
            for name in dirs + files:
                path = os.path.join(root, name)
                seen[path] = (os.path.getsize(path), os.stat(path).st_mtime_ns)
    return seen


def _write_keypoints(path, shift):
    """An 18-line `x y` keypoint file of a standing figure in a 64 x 64 image, moved right by `shift` pixels."""
    points = np.array([[32, 10], [32, 18], [24, 18], [22, 28], [20, 36], [40, 18], [42, 28], [44, 36], [27, 38],
                       [27, 48], [27, 58], [37, 38], [37, 48], [37, 58], [30, 8], [34, 8], [28, 9], [36, 9]], float)
    np.savetxt(path, points + [shift, 0])


@pytest.mark.slow
def test_prior_and_inpaint_train_then_sample_from_the_run_directories_alone(demo_data, tmp_path):
    """Train two tiny stages (the prior's demo, stage 2 with a one-level UNet); sample a split (best of two, reference
    names, resume) and one image from the run directories without --config, the second with the dataset moved away;
    nothing is written into the runs, and a failed call writes nothing at all."""
    import shutil

    from skimage.metrics import structural_similarity

    data = tmp_path / "data"
    shutil.copytree(demo_data, data)
    common = [f"--config.data.data_dir={data}", "--config.total_steps=2", "--config.checkpoint_every_steps=2"]
    runs = {stage: tmp_path / "runs" / stage for stage in ("prior", "inpaint")}
    configs = {"prior": f"{REPO}/configs/pcdm_prior.py:demo", "inpaint": SMALL_INPAINT}
    for stage, run in runs.items():
        result = _run(os.path.join(REPO, "train.py"), f"--config={configs[stage]}", f"--workdir={run}", *common,
                      cwd=REPO)
        assert result.returncode == 0, result.stderr[-3000:]
        assert (run / "networks.json").exists() and (run / "frozen_params").exists()
    trained = _snapshot(*runs.values())
    out = tmp_path / "out"
    sample = [os.path.join(REPO, "sample.py"), f"--workdir={runs['inpaint']}", f"--prior_workdir={runs['prior']}",
              "--split=test", f"--output_dir={out}", "--batch_size=48", "--best_of=2",
              "--config.sampling.num_inference_steps=2"]
    result = _run(*sample, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["ablation"] == "B2" and results["best_of"] == 2 and results["prior_cosine_similarity_pairs"] == 96
    assert results["images_written"] == 3 * 96 and results["pairs"] == 96
    assert -1.0 <= results["prior_cosine_similarity"] <= 1.0
    recorded = json.loads((out / "sample_config.json").read_text())
    assert recorded["config"]["sampling"]["num_inference_steps"] == 2 and recorded["best_of"] == 2
    names = sorted(os.listdir(out / "stage2"))
    assert len(names) == 96 and all(n.endswith(".png") and "_to_" in n for n in names)
    assert [sorted(os.listdir(out / "stage2_candidates" / f"sample_{k}")) for k in (0, 1)] == [names, names]

    # The kept image is the candidate of higher SSIM (Gaussian 1.2, candidate's range) against the ground truth.
    from PIL import Image

    truth = {}
    for records in _test_pairs(demo_data):
        truth.update(records)
    chosen = []
    for name in names:
        kept = np.asarray(Image.open(out / "stage2" / name))
        candidates = [np.asarray(Image.open(out / "stage2_candidates" / f"sample_{k}" / name)) for k in (0, 1)]
        scores = [structural_similarity(c.astype(np.float64), truth[name].astype(np.float64), channel_axis=2,
                                        gaussian_weights=True, sigma=1.2, use_sample_covariance=False,
                                        data_range=float(c.max()) - float(c.min())) for c in candidates]
        chosen.append(int(np.argmax(scores)))
        np.testing.assert_array_equal(kept, candidates[chosen[-1]])
    assert 0 < sum(chosen) < len(chosen)   # both candidates win somewhere: the selection is not a constant

    result = _run(*sample, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = json.loads((out / "results.json").read_text())
    assert resumed["images_written"] == 0 and resumed["prior_cosine_similarity_pairs"] == 96
    assert resumed["prior_cosine_similarity"] == results["prior_cosine_similarity"]

    # One image with the training data moved away: the runs hold everything the stages need.
    data.rename(tmp_path / "moved_away")
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 64, 3), np.uint8)).save(inputs / "a.png")
    _write_keypoints(inputs / "a.txt", 0)
    _write_keypoints(inputs / "b.txt", 6)
    single = [os.path.join(REPO, "sample.py"), f"--workdir={runs['inpaint']}", f"--prior_workdir={runs['prior']}",
              f"--source_image={inputs / 'a.png'}", f"--source_pose={inputs / 'a.txt'}",
              f"--target_pose={inputs / 'b.txt'}"]
    # Inference settings may differ from the run's config (here where the data lives, and the eval settings).
    result = _run(*single, f"--output={tmp_path / 'single' / 'b.png'}",
                  f"--config.data.data_dir={tmp_path / 'moved_away'}", "--config.eval.metrics=ssim", cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    image = np.asarray(Image.open(tmp_path / "single" / "b.png"))
    assert image.shape == (64, 64, 3) and image.std() > 0
    assert _snapshot(*runs.values()) == trained

    # Failed calls write nothing: a missing source image, an output that exists, a config that changes the model.
    before = _snapshot(tmp_path)
    failures = [
        [*single[:3], f"--source_image={inputs / 'missing.png'}", *single[4:],
         f"--output={tmp_path / 'new' / 'c.png'}"],
        [*single, f"--output={tmp_path / 'single' / 'b.png'}"],
        [*single, f"--output={tmp_path / 'new' / 'c.png'}", f"--config={SMALL_INPAINT}",
         "--config.model.image_proj.hidden=32"],
    ]
    expected = ["missing.png: image not found", "b.png exists", "model.image_proj.hidden"]
    for args, message in zip(failures, expected):
        result = _run(*args, cwd=REPO)
        assert result.returncode != 0
        errors = [line for line in result.stderr.splitlines() if line.startswith("sample.py: error")]
        assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
        assert _snapshot(tmp_path) == before


def _test_pairs(data_dir):
    """{<source>_to_<target>.png: ground-truth target as the pipeline squashes it (uint8)} per test batch."""
    import ml_collections

    from configs import pcdm_inpaint
    from pgpis_jax import input_pipeline
    from pgpis_jax.methods.common.split_sampler import pair_stem, to_uint8

    config = pcdm_inpaint.get_config("demo")
    config.data.data_dir = data_dir
    config.batch_size = 48
    for batch in input_pipeline.from_config(ml_collections.ConfigDict(config), split="test", train=False,
                                            include_names=True, process_index=0, process_count=1):
        target = to_uint8(np.split(np.asarray(batch["image"]), 2, axis=2)[1])
        yield {f"{pair_stem(s, t)}.png": image
               for s, t, image, real in zip(batch["source_name"], batch["target_name"], target, batch["mask"])
               if real}


def _demo_prior(guidance_scale):
    """The demo prior stage rebuilt as from a run (its CLIP config given as recorded), with fresh parameters."""
    from configs import pcdm_common, pcdm_prior
    from pgpis_jax.methods.pcdm import prior

    config = pcdm_prior.get_config("demo")
    config.sampling.guidance_scale = guidance_scale
    stage = prior.build(config, saved_networks={"config.model.image_encoder": dict(pcdm_common.demo_clip().config)})
    return config, stage, stage.init(jax.random.key(3))


@pytest.mark.slow
def test_prior_guidance_is_the_cfg_combination_of_separately_computed_branches():
    """w = 2: x0 = u + 2 (c - u) per step, u from the CLIP embedding of a zero source input and zeroed poses (as
    training drops them), each branch computed on its own here; w = 1 samples the conditional branch alone."""
    config, stage, params = _demo_prior(2.0)
    rng = np.random.default_rng(0)
    size = config.data.pipeline["clip_size"]
    source_clip = rng.normal(size=(3, size, size, 3)).astype(np.float32)
    source_pose, target_pose = (rng.uniform(0, 1, (3, 36)).astype(np.float32) for _ in range(2))
    key, steps = jax.random.key(7), 4
    guided = np.asarray(stage.generate(params, source_clip, source_pose, target_pose, key, steps, 2.0))
    plain = np.asarray(stage.generate(params, source_clip, source_pose, target_pose, key, steps, 1.0))

    encoder = stage.encoders.module("image_encoder")
    embed = jitted(lambda pixels: encoder.apply({"params": params["image_encoder"]}, pixels)["image_embeds"])
    cond = (embed(source_clip), source_pose, target_pose)
    uncond = (embed(np.zeros_like(source_clip)), np.zeros_like(source_pose), np.zeros_like(target_pose))

    def prior_x0(x, t, condition):
        return stage.prior.apply({"params": params["prior"]}, x, t, *condition)

    def hand_cfg(x, t):
        u, c = prior_x0(x, t, uncond), prior_x0(x, t, cond)
        return u + 2.0 * (c - u)

    noise_key, step_key = jax.random.split(key)
    x_T = jax.random.normal(noise_key, cond[0].shape, np.float32)
    expected = stage.objective.sampler.sample(hand_cfg, x_T, step_key, num_inference_steps=steps)
    np.testing.assert_allclose(guided, np.asarray(stage.denormalize(expected)), rtol=1e-4, atol=1e-5)
    conditional = stage.objective.sampler.sample(lambda x, t: prior_x0(x, t, cond), x_T, step_key,
                                                 num_inference_steps=steps)
    np.testing.assert_allclose(plain, np.asarray(stage.denormalize(conditional)), rtol=1e-4, atol=1e-5)
    assert np.max(np.abs(guided - plain)) > 1e-2


def test_paper_prior_config_guides_with_two_and_released_does_not():
    from configs import pcdm_prior

    assert pcdm_prior.get_config().sampling.guidance_scale == 2.0
    assert pcdm_prior.get_config("released").sampling.guidance_scale == 0.0
