"""The CFLD method (pgpis_jax/methods/cfld): the parameter report of the full-size config against the paper's
Table 1, and a tiny run trained two steps in process: only the up-block attn2.to_k / to_v train inside the UNet,
the training batch is the self-reconstruction batch with cubic timesteps and the learned null prompt as condition
dropout (checked against closed forms on a recorded UNet call), cumulative guidance against separately computed
branches, sample.py on the run directory and the appearance editing modes."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The paper's Table 1 rows (../shared/reference/cfld.md), exact: the PRD with its learned null prompt.
TABLE_1 = {"Swin-B": 86_991_864, "HGA": 22_549_632, "PRD": 97_724_416, "pose adapter": 30_636_480}
UNET_KV = 10_321_920          # attn2.to_k / to_v of the nine up-block transformers: 3 (320 + 640 + 1280) 2 768
SD15_UNET = 859_520_964
SD15_VAE = 83_653_863
# The tiny run's UNet parameters that train: one cross-attention up block with two transformers.
TINY_TRAINED_UNET = {f"up_blocks_1/attentions_{i}/transformer_blocks_0/attn2/to_{kv}/kernel"
                     for i in (0, 1) for kv in "kv"}


def test_parameter_report_gives_table_1_exactly():
    """python -m pgpis_jax.inspect --config=configs/cfld.py --json (in process; eval_shape only)."""
    from configs import cfld
    from pgpis_jax.inspect import config_report

    report = config_report(cfld.get_config())
    print(json.dumps(report["groups"]))
    for label, count in TABLE_1.items():
        assert report["groups"][label] == {"parameters": count, "trainable": count}, label
    assert report["groups"]["UNet"] == {"parameters": SD15_UNET, "trainable": UNET_KV}
    assert report["trainable_networks"]["vae"] == 0 and report["networks"]["vae"] == SD15_VAE
    assert report["trainable"] == sum(TABLE_1.values()) + UNET_KV == 248_224_312
    assert report["frozen"] == SD15_UNET - UNET_KV + SD15_VAE


def tiny_config(data_dir=""):
    """configs/cfld.py:demo shrunk for 2-step runs: a two-level 32-channel UNet (one cross-attention up block of
    two transformers, one adapter residual), a two-stage Swin, one-block PRD and HGA, 2 sampling steps; CFLD's
    epsilon prediction, DDPM sampling with Eq. 7 guidance and trained parameters (the demo trains its whole random
    UNet and samples unguided)."""
    from configs import cfld

    config = cfld.get_config("demo")
    config.data.data_dir = data_dir
    config.total_steps = 2
    config.checkpoint_every_steps = 1
    config.batch_size = 8
    config.sampling.num_inference_steps = 2
    m = config.model
    m.unet.config.update(block_out_channels=[32, 32], attention_head_dim=[1, 1],
                         down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                         up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"])
    m.backbone.config.update(embed_dim=16, depths=[1, 1], num_heads=[1, 2])
    m.appearance_encoder = cfld.hga((16, 16), (16, 16), (1, 1), (32, 32), depth=1, block_indices=(1, 0))
    m.pose_encoder.update(in_channels=32, channels=(32,))
    m.decoder.update(depth=1)
    full_size = cfld.get_config()
    config.diffusion.train_scheduler = full_size.diffusion.train_scheduler
    config.sampling.scheduler = full_size.sampling.scheduler
    config.sampling.guidance = full_size.sampling.guidance
    config.param_groups.trainable = cfld.trainable(config, "")
    return config


@pytest.fixture(scope="module")
def run(demo_data, tmp_path_factory):
    """The tiny CFLD run trained 2 steps in process (checkpoints of steps 1 and 2)."""
    from pgpis_jax import methods, trainer

    workdir = str(tmp_path_factory.mktemp("cfld_run") / "run")
    config = tiny_config(demo_data)
    assert trainer.train(methods.get_method("cfld").build(config), config, workdir) == "done"
    return workdir


@pytest.fixture(scope="module")
def pipe(run):
    """The run opened for sampling (its jitted functions compile once for the tests that use them)."""
    from pgpis_jax.methods.cfld import pipeline

    return pipeline.CFLDPipeline(pipeline.load_trained(run, ("cfld",)))


def _flat(tree):
    return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.slow
def test_only_up_block_cross_attention_keys_and_values_train_in_the_unet(run):
    """The optimizer's trainable UNet leaves are the hand-listed attn2.to_k / to_v of the up block; from the
    checkpoint of step 1 to that of step 2 exactly those UNet leaves change, and every conditioner network (and the
    null prompt) changes and is trainable."""
    from pgpis_jax.methods.common.run import load_trained
    from pgpis_jax.trainer import loop
    from pgpis_jax.trainer import mesh as mesh_lib

    first, second = (load_trained(run, ("cfld",), which="raw", step=step) for step in (1, 2))
    s = loop.setup(second.method, second.config, mesh_lib.make_mesh(second.config))
    before, after = _flat(first.params), _flat(second.params)
    assert before.keys() == after.keys()
    unet = {path[len("unet/"):] for path in after if path.startswith("unet/")}
    assert {path for path in unet if s.opt.is_trainable("unet/" + path)} == TINY_TRAINED_UNET
    changed = {path for path in after if not np.array_equal(before[path], after[path])}
    assert {path[len("unet/"):] for path in changed if path.startswith("unet/")} == TINY_TRAINED_UNET
    for network in ("backbone", "appearance_encoder", "pose_encoder", "decoder", "learnable_vector"):
        assert any(path.startswith(network) for path in changed), network
        assert all(s.opt.is_trainable(path) for path in after if path.startswith(network)), network


def _scaled_linear_alphas_cumprod():
    """SD 1.5's noise schedule in closed form: betas = linspace(sqrt(0.00085), sqrt(0.012), 1000)^2."""
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


@pytest.mark.slow
def test_training_batch_is_self_reconstruction_with_cubic_timesteps_and_the_learned_null_prompt(run):
    """One loss_fn call on 192 random pairs with the UNet call recorded (it returns zeros): the 384 latents are
    the codes of [sources ; targets]; x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps with SD 1.5's schedule and eps
    the regression target; t follows the cubic law P(t <= k) = 1 - (1 - (k + 1) / T)^(1/3) (Kolmogorov-Smirnov);
    the pose residuals are the adapter's on [source poses ; target poses]; about 20 % of the prompts are exactly
    the learned null vector, the rest the source's prompt shared by both halves; HGA biases are never dropped;
    the loss is mean(eps^2)."""
    from pgpis_jax.methods.common.run import load_trained

    trained = load_trained(run, ("cfld",), which="raw")
    stage, params = trained.method, trained.params
    rng = np.random.default_rng(0)
    pairs = 192
    batch = {"source_image": rng.uniform(-1, 1, (pairs, 64, 64, 3)), "target_image": rng.uniform(-1, 1, (pairs, 64,
                                                                                                          64, 3)),
             "condition_image": rng.uniform(-1, 1, (pairs, 64, 64, 3)),
             "source_pose": rng.uniform(0, 1, (pairs, 64, 64, 21)), "target_pose": rng.uniform(0, 1, (pairs, 64, 64,
                                                                                                      21)),
             "example_id": np.arange(pairs, dtype=np.int32)}
    batch = {k: v.astype(np.float32) if v.dtype == np.float64 else v for k, v in batch.items()}
    recorded = {}

    def record_pair(keys, x0):
        t, x_t, target = training_pair(keys, x0)
        recorded.update(x0=np.asarray(x0), t=np.asarray(t), x_t=np.asarray(x_t), eps=np.asarray(target))
        return t, x_t, target

    def record_unet(params_, x_t, t, condition):
        recorded.update(unet_x_t=np.asarray(x_t), unet_t=np.asarray(t), condition=jax.device_get(condition))
        return jnp.zeros_like(x_t)

    training_pair = stage.objective.training_pair
    stage.objective.training_pair, stage.denoise = record_pair, record_unet
    try:
        loss, metrics = stage.loss_fn(params, batch, jax.random.key(7))
    finally:
        del stage.objective.training_pair, stage.denoise

    codes = np.asarray(stage.codec.latent(stage.codec.moments(None, np.concatenate(
        [batch["source_image"], batch["target_image"]]))[0], None, None))
    np.testing.assert_array_equal(recorded["x0"], codes)
    t, eps = recorded["t"], recorded["eps"]
    abar = _scaled_linear_alphas_cumprod()[t].reshape(-1, 1, 1, 1)
    np.testing.assert_allclose(recorded["x_t"], np.sqrt(abar) * codes + np.sqrt(1 - abar) * eps, atol=2e-5)
    np.testing.assert_array_equal(recorded["unet_x_t"], recorded["x_t"])
    np.testing.assert_array_equal(recorded["unet_t"], t)
    np.testing.assert_allclose(float(loss), np.mean(eps.astype(np.float64) ** 2), rtol=1e-5)

    def cubic_cdf(k):
        return 1 - (1 - (np.asarray(k) + 1) / 1000.0) ** (1 / 3)

    levels = np.unique(t)     # both sides of every step of the empirical CDF (t = 999 alone has P = 0.1)
    distance = max(np.abs(np.mean(t[:, None] <= levels, axis=0) - cubic_cdf(levels)).max(),
                   np.abs(np.mean(t[:, None] < levels, axis=0) - cubic_cdf(levels - 1)).max())
    assert distance < 1.63 / np.sqrt(len(t))                             # Kolmogorov-Smirnov at the 1 % level
    assert np.mean(t >= 500) > 0.7 and not np.array_equal(t[:pairs], t[pairs:])   # uniform would give 0.5

    prompt, residuals, biases = recorded["condition"]
    expected_residuals = stage.encode_pose(params, np.concatenate([batch["source_pose"], batch["target_pose"]]))
    for ours, expected in zip(residuals, expected_residuals):
        np.testing.assert_allclose(ours, np.asarray(expected), atol=1e-5)
    null = np.asarray(params["learnable_vector"])[0]
    assert np.abs(null).mean() > 0.5                                     # N(0, 1) at init: not a zero prompt
    dropped = np.array([np.array_equal(p, null) for p in prompt])
    assert abs(dropped.mean() - 0.2) < 0.07 and float(metrics["condition_dropped"]) == pytest.approx(dropped.mean())
    both = ~dropped[:pairs] & ~dropped[pairs:]
    np.testing.assert_array_equal(prompt[:pairs][both], prompt[pairs:][both])
    assert len({p.tobytes() for p in prompt[:pairs][both]}) == both.sum()   # one prompt per source
    for bias in (residual.query for residual in biases):
        np.testing.assert_array_equal(bias[:pairs], bias[pairs:])
        assert (np.abs(bias).reshape(2 * pairs, -1).max(axis=1) > 0).all()  # trained HGA: never zeroed


@pytest.mark.slow
def test_cumulative_guidance_is_equation_7_on_separately_computed_branches(pipe):
    """w_pose = w_app = 2: eps = u + 2 (d - u) + 2 (f - d) per step, with u = (null prompt, no pose, no HGA),
    d = (null prompt, pose, no HGA), f = everything, each branch run on its own here."""
    from pgpis_jax.methods.common.stage import first_test_examples

    stage, params = pipe.trained.method, pipe.trained.params
    assert pipe.config.sampling.guidance == "uc_down_full" and pipe.config.sampling.pose_scale == 2.0
    batch = first_test_examples(pipe.config, 2)
    key = jax.random.key(3)
    guided = np.asarray(pipe._generate(params, batch["condition_image"], batch["target_pose"], key))

    prompt, biases = stage.encode_appearance(params, batch["condition_image"])
    pose = stage.encode_pose(params, batch["target_pose"])
    null = jnp.broadcast_to(params["learnable_vector"], prompt.shape)
    no_pose, no_bias = [0 * r for r in pose], jax.tree.map(jnp.zeros_like, biases)
    branches = [(null, no_pose, no_bias), (null, pose, no_bias), (prompt, pose, biases)]

    def hand_guided(x, t):
        u, d, f = (stage.denoise(params, x, t, branch) for branch in branches)
        return u + 2.0 * (d - u) + 2.0 * (f - d)

    noise_key, step_key = jax.random.split(key)
    x_T = jax.random.normal(noise_key, (2, 8, 8, stage.codec.channels), jnp.float32)
    x0 = jax.jit(lambda x: stage.objective.sampler.sample(hand_guided, x, step_key, num_inference_steps=2))(x_T)
    expected = np.clip(np.asarray(stage.codec.decode(None, x0)), -1, 1)
    np.testing.assert_allclose(guided, expected, atol=2e-4)
    assert np.abs(guided).max() > 0.1


def _run(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def listing(folder):
    return sorted((root, tuple(sorted(files))) for root, _, files in os.walk(folder))


@pytest.mark.slow
def test_sample_py_on_the_run_directory(run, tmp_path):
    """sample.py --workdir=RUN --split=test: every held-out pair as <source>_to_<target>.png at the output size;
    nothing written into the run."""
    from PIL import Image

    before = listing(run)
    out = tmp_path / "out"
    result = _run("sample.py", f"--workdir={run}", "--split=test", f"--output_dir={out}", "--batch_size=48")
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["images_written"] == results["pairs"] == 96
    names = sorted(os.listdir(out / "cfld"))
    assert len(names) == 96 and all("_to_" in name and name.endswith(".png") for name in names)
    images = np.stack([np.asarray(Image.open(out / "cfld" / name)) for name in names[:8]])
    assert images.shape == (8, 64, 64, 3) and images.std() > 0
    assert listing(run) == before


def _write_keypoints(path, shift):
    """An 18-line `x y` keypoint file of a standing figure in a 64 x 64 image, moved right by `shift` pixels."""
    points = np.array([[32, 10], [32, 18], [24, 18], [22, 28], [20, 36], [40, 18], [42, 28], [44, 36], [27, 38],
                       [27, 48], [27, 58], [37, 38], [37, 48], [37, 58], [30, 8], [34, 8], [28, 9], [36, 9]], float)
    np.savetxt(path, points + [shift, 0])


@pytest.mark.slow
def test_appearance_editing_interpolation_ends_and_masked_style_transfer(run, pipe, tmp_path):
    """Style interpolation: weight 0 is plain sampling of source A, weight 1 of source B, 0.5 neither. Masked style
    transfer: an all-white mask is plain sampling in the reference's pose; where the mask is black every step
    denoises to the reference latent, so those 8x8 blocks decode to the reference's own code (the DCT code decodes
    block by block), the white half does not. sample.py's editing mode writes one image per weight side by side."""
    from PIL import Image

    from pgpis_jax.methods.cfld import pipeline

    params, codec = pipe.trained.params, pipe.trained.method.codec
    rng = np.random.default_rng(4)
    for name in ("a", "b", "ref"):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), np.uint8)).save(tmp_path / f"{name}.png")
    _write_keypoints(tmp_path / "pose.txt", 4)
    a = pipe.single_inputs(str(tmp_path / "a.png"), str(tmp_path / "pose.txt"))
    b = pipe.single_inputs(str(tmp_path / "b.png"), str(tmp_path / "pose.txt"))
    plain = {name: np.asarray(pipe._generate(params, x["condition_image"], x["target_pose"], pipe.rng))
             for name, x in (("a", a), ("b", b))}
    assert np.abs(plain["a"] - plain["b"]).max() > 1e-2
    mixed = {w: np.asarray(pipe.interpolated(params, a["condition_image"], b["condition_image"], np.float32(w),
                                             a["target_pose"], pipe.rng)) for w in (0.0, 0.5, 1.0)}
    np.testing.assert_allclose(mixed[0.0], plain["a"], atol=1e-5)
    np.testing.assert_allclose(mixed[1.0], plain["b"], atol=1e-5)
    assert min(np.abs(mixed[0.5] - plain[k]).max() for k in "ab") > 1e-3

    reference = pipeline._resized(np.asarray(Image.open(tmp_path / "ref.png")), (64, 64))
    own_code = np.clip(np.asarray(codec.decode(None, codec.latent(codec.moments(None, reference)[0], None, None))),
                       -1, 1)
    half = np.zeros((1, 8, 8, 1), np.float32)
    half[:, :, 4:] = 1.0
    outputs = {name: np.asarray(pipe.transferred(params, a["condition_image"], a["target_pose"], reference, mask,
                                                 pipe.rng))
               for name, mask in (("white", np.ones_like(half)), ("half", half))}
    np.testing.assert_allclose(outputs["white"], plain["a"], atol=1e-5)
    np.testing.assert_allclose(outputs["half"][:, :, :32], own_code[:, :, :32], atol=1e-4)
    assert np.abs(outputs["half"][:, :, 32:] - own_code[:, :, 32:]).max() > 0.1

    before = listing(run)
    pipeline.sample_command(run, source_image=str(tmp_path / "a.png"), target_pose=str(tmp_path / "pose.txt"),
                            output=str(tmp_path / "strip.png"), style_image=str(tmp_path / "b.png"),
                            interpolation="0,0.5,1")
    strip = np.asarray(Image.open(tmp_path / "strip.png"))
    assert strip.shape == (64, 3 * 64, 3)
    levels = np.asarray(pipeline.to_output(plain["a"], (64, 64))[0] * 127.5 + 127.5).round()
    difference = np.abs(strip[:, :64].astype(np.float64) - levels)   # truncation may flip a level at 1e-5
    assert difference.max() <= 1 and difference.mean() < 0.01
    Image.fromarray((np.broadcast_to(half[0, :, :, :1], (8, 8, 3)) * 255).astype(np.uint8)).resize(
        (64, 64), Image.NEAREST).save(tmp_path / "mask.png")
    np.testing.assert_array_equal(pipeline._mask_weights(str(tmp_path / "mask.png"), (8, 8)), half)
    with pytest.raises(pipeline.UserError, match="masked style transfer needs --reference_image and --mask"):
        pipeline.sample_command(run, source_image=str(tmp_path / "a.png"), target_pose=str(tmp_path / "pose.txt"),
                                output=str(tmp_path / "t.png"), mask=str(tmp_path / "mask.png"))
    with pytest.raises(pipeline.UserError, match="--interpolation=0,x"):
        pipeline.sample_command(run, source_image=str(tmp_path / "a.png"), target_pose=str(tmp_path / "pose.txt"),
                                output=str(tmp_path / "t.png"), style_image=str(tmp_path / "b.png"),
                                interpolation="0,x")
    with pytest.raises(pipeline.UserError, match="--reference_image=.*missing.png: file not found"):
        pipeline.sample_command(run, source_image=str(tmp_path / "a.png"), target_pose=str(tmp_path / "pose.txt"),
                                output=str(tmp_path / "t.png"), mask=str(tmp_path / "mask.png"),
                                reference_image=str(tmp_path / "missing.png"))
    assert not (tmp_path / "t.png").exists() and listing(run) == before
