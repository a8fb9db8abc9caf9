"""The RePoseDM method: a tiny `:demo` run trained 2 steps through the trainer on synthetic people; its loss on a fixed
batch against L_simple computed here plus vlb.py's term, the warp loss and the heatmap loss by hand (with and without
condition dropout; epsilon and x0 prediction; the demo's warped source concatenated to the UNet's input); the guided
epsilon against separately computed branches and a hand-written gradient of the pose distance; gradient guidance with
scale 0 equal to sampling without it; split and single sampling from the run directory alone; the pidm export loaded strictly into the PyTorch
statements of PIDM and of the alignment; the Gaussian heatmaps and the pose distance against loops; the configs'
ablations."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from pgpis_jax.diffusion import vlb
from pgpis_jax.methods.common.stage import first_test_examples, per_example_keys
from pgpis_jax.models.heatmaps import gaussian_heatmaps, pose_distance
from pgpis_jax.models.reposedm import warp

SIZE = 16


def tiny_config(data_dir, arg="demo"):
    """configs/reposedm.py:<arg> at 16x16: a one-level UNet (attention at 16), one alignment stage (an 8x8 grid),
    2 steps."""
    from configs import reposedm

    config = reposedm.get_config(arg)
    config.data.data_dir = data_dir
    config.total_steps = config.checkpoint_every_steps = 2
    config.batch_size = 4
    config.data.pipeline.image_size = SIZE
    config.loss.warp_size = SIZE
    config.sampling.num_inference_steps = 2
    config.loss.vlb_weight = 0.5      # the demo's is 0; the loss test weighs the term
    config.sampling.gradient_t_max = 1000     # the demo's 300 would leave t = 500 unguided in the guidance test
    config.model.unet.config.update(image_size=SIZE, channel_mult=(1,), attention_resolutions=(16,),
                                    embed_channels=32, position_encoding=False)
    config.model.alignment.config.update(stage_channels=(16,), kernels=(0, 3), radius=1)
    return config


@pytest.fixture(scope="module")
def run(demo_data, tmp_path_factory):
    """A tiny RePoseDM run directory trained 2 steps in process."""
    from pgpis_jax import methods, trainer

    workdir = str(tmp_path_factory.mktemp("reposedm_run") / "run")
    config = tiny_config(demo_data)
    assert trainer.train(methods.get_method("reposedm").build(config), config, workdir) == "done"
    return workdir


@pytest.fixture(scope="module")
def trained(run):
    from pgpis_jax.methods.common.run import load_trained

    return load_trained(run, ("reposedm",))


def _batch(trained, num=4):
    batch = first_test_examples(trained.config, num)
    return {k: jnp.asarray(v) for k, v in batch.items() if k not in ("source_name", "target_name")}


def _hand_heatmaps(keypoints, size, sigma, stride=4):
    """Loops: cell (i, j) centred on image pixel (stride i + (stride - 1) / 2, ...)."""
    cells = size // stride
    out = np.zeros((len(keypoints), cells, cells, keypoints.shape[1]), np.float64)
    for b, points in enumerate(np.asarray(keypoints, np.float64)):
        for k, (x, y) in enumerate(points):
            if x < 0 or y < 0:
                continue
            for i in range(cells):
                for j in range(cells):
                    cy, cx = stride * i + (stride - 1) / 2, stride * j + (stride - 1) / 2
                    out[b, i, j, k] = np.exp(-((cy - y) ** 2 + (cx - x) ** 2) / stride**2 / (2 * sigma**2))
    return out


def test_gaussian_heatmaps_and_pose_distance_against_loops():
    keypoints = np.array([[[5.0, 9.0], [-1.0, -1.0], [15.0, 0.0]]], np.float32)
    np.testing.assert_allclose(gaussian_heatmaps(keypoints, (16, 16), 1.5), _hand_heatmaps(keypoints, 16, 1.5),
                               atol=1e-6)
    heat = np.random.default_rng(0).uniform(0, 0.04, (1, 4, 4, 3)).astype(np.float32)
    targets = np.asarray(gaussian_heatmaps(keypoints, (16, 16), 1.0))
    union = (heat.sum(-1) > 0.1) | (targets.sum(-1) > 0.1)
    expected = (union * np.square(heat - targets).sum(-1)).mean()
    assert 0 < union.sum() < 16
    np.testing.assert_allclose(pose_distance(heat, targets, 0.1), [expected], rtol=1e-6)


def _predicting(trained, prediction_type):
    """The trained run's method, or one like it whose network predicts `prediction_type` (the same parameters)."""
    from pgpis_jax.methods.reposedm.stage import RePoseDM

    if trained.method.objective.prediction_type == prediction_type:
        return trained.method
    config = trained.config.copy_and_resolve_references()
    config.diffusion.train_scheduler.prediction_type = config.sampling.scheduler.prediction_type = prediction_type
    return RePoseDM(config, needs_data=False)


def _epsilon_by_hand(prediction_type, prediction, x_t, alpha_bar):
    """The noise implied by an epsilon or x0 prediction (in the arrays' precision); alpha_bar broadcastable against
    x_t."""
    if prediction_type == "epsilon":
        return prediction
    return (x_t - np.sqrt(alpha_bar) * prediction) / np.sqrt(1 - alpha_bar)


@pytest.mark.slow
@pytest.mark.parametrize("drop_rate, prediction_type", [(0.0, "epsilon"), (1.0, "sample")])
def test_loss_is_simple_plus_vlb_plus_warp_plus_heatmap_terms(trained, drop_rate, prediction_type):
    """loss_fn on a fixed batch = mean over examples of the mean squared error of the prediction (epsilon as PIDM,
    or x0; here by hand) + vlb.py's L_vlb of the implied epsilon (float64 tables from PIDM's betas) +
    gamma-weighted L1 of every iterate's warp + the estimator's squared error against loop-made heatmaps. drop_rate 1:
    the texture encoder reads zeros and the pose channels are zero (RePoseDM's joint null); the demo networks have
    no dropout, so the UNet output is reproducible outside the loss."""
    params, config = trained.params, trained.config
    method = _predicting(trained, prediction_type)
    method.drop_rate = drop_rate
    batch = _batch(trained)
    rng = jax.random.key(7)
    loss, aux = jax.jit(method.loss_fn)(params, batch, rng)
    method.drop_rate = float(config.diffusion.condition_dropout)

    source, target, pose = batch["source_image"], batch["target_image"], batch["target_pose"]
    t, x_t, _ = method.objective.training_pair(per_example_keys(rng, batch, 2)[0], target)
    alpha_bar = np.cumprod(1 - np.linspace(1e-4, 2e-2, 1000, dtype=np.float64))[np.asarray(t)][:, None, None, None]
    noise = (np.asarray(x_t, np.float64) - np.sqrt(alpha_bar) * np.asarray(target, np.float64)) / np.sqrt(1 - alpha_bar)
    warped, flows = method.align(params, source, pose)
    assert len(flows) == 2
    if drop_rate:
        warped, pose = jnp.zeros_like(warped), jnp.zeros_like(pose)
    # the demo's concat_source: the encoder's image also after the pose channels
    unet_in = jnp.concatenate([pose, warped], axis=-1)
    output = np.asarray(method.denoise(params, x_t, t, (unet_in, method.texture(params, warped))), np.float64)
    prediction, variance = output[..., :3], output[..., 3:]
    goal = noise if prediction_type == "epsilon" else np.asarray(target, np.float64)
    mse = np.square(prediction - goal).mean(axis=(1, 2, 3))
    epsilon = _epsilon_by_hand(prediction_type, prediction, np.asarray(x_t, np.float64), alpha_bar)
    tables = vlb.PosteriorTables.from_betas(np.linspace(1e-4, 2e-2, 1000, dtype=np.float64))
    vlb_term = np.asarray(vlb.vlb_terms(tables, jnp.asarray(epsilon, jnp.float32), jnp.asarray(variance, jnp.float32),
                                        target, x_t, t))
    gamma = config.loss.warp_gamma
    warp_term = sum(gamma ** (len(flows) - 1 - n) * np.abs(np.asarray(warp(source, flow)) - np.asarray(target)).mean(
        axis=(1, 2, 3)) for n, flow in enumerate(flows))
    heat = []
    for role in ("source", "target"):
        predicted = np.asarray(method.heatmaps(params, batch[f"{role}_image"]), np.float64)
        heat.append(np.square(predicted - _hand_heatmaps(batch[f"{role}_keypoints"], SIZE, config.loss.heatmap_sigma))
                    .mean(axis=(1, 2, 3)))
    heatmap_term = (heat[0] + heat[1]) / 2
    weights = config.loss
    expected = np.mean(mse + weights.vlb_weight * vlb_term + weights.warp_weight * warp_term
                       + weights.heatmap_weight * heatmap_term)
    print(f"loss {float(loss):.6f}, by hand {expected:.6f}; mse {mse.mean():.4f} vlb {vlb_term.mean():.4f} "
          f"warp {warp_term.mean():.4f} heatmap {heatmap_term.mean():.5f}")
    np.testing.assert_allclose(float(loss), expected, rtol=2e-5)
    np.testing.assert_allclose(float(aux["vlb"]), vlb_term.mean(), rtol=2e-5)
    assert vlb_term.mean() > 0 and warp_term.mean() > 0 and heatmap_term.mean() > 0


@pytest.mark.slow
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample"])
def test_guided_epsilon_is_cfg_of_branches_plus_the_pose_distance_gradient(trained, prediction_type):
    """model_fn(y_t, t) = eps_u + w (eps_c - eps_u) + w s sqrt(1 - abar_t) g / max(1, rms(g)), with the branches
    computed one by one (null: zero pose, texture of a zero image) and g = d/dx0 of the masked heatmap distance
    written out here, at x0 = clip(Tweedie of the guided epsilon). As PIDM (epsilon), and with the run's network
    read as an x0 predictor: its branches turned into epsilon here and model_fn's output the x0 of the guided
    epsilon."""
    params, config = trained.params, trained.config
    method = _predicting(trained, prediction_type)
    batch = _batch(trained, 2)
    w, s, t = 2.0, 3.0, jnp.int32(500)
    alpha_bar = float(method.objective.alphas_cumprod[500])
    x_t = jax.random.normal(jax.random.key(1), (2, SIZE, SIZE, 3))
    guided, _ = method.model_fn(params, batch, w, s)
    plain, _ = method.model_fn(params, batch, w, None)
    pose, source = batch["target_pose"], batch["source_image"]
    warped, _ = method.align(params, source, pose)
    conditional = method.denoise(params, x_t, t, (jnp.concatenate([pose, warped], -1),
                                                  method.texture(params, warped)))[..., :3]
    null = method.denoise(params, x_t, t, (jnp.concatenate([0 * pose, 0 * warped], -1),
                                           method.texture(params, 0 * warped)))[..., :3]
    conditional, null = (_epsilon_by_hand(prediction_type, branch, x_t, alpha_bar) for branch in (conditional, null))
    epsilon = null + w * (conditional - null)

    def as_x0(eps):
        return (x_t - np.sqrt(1 - alpha_bar) * eps) / np.sqrt(alpha_bar)

    def as_output(eps):
        return eps if prediction_type == "epsilon" else as_x0(eps)

    # epsilon as before; the x0 read reaches ~|40| here, so its float32 error is relative
    tolerance = dict(atol=2e-5) if prediction_type == "epsilon" else dict(rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(plain(x_t, t), as_output(epsilon), **tolerance)

    x0 = jnp.clip(as_x0(epsilon), -1, 1)
    targets = jnp.asarray(_hand_heatmaps(batch["target_keypoints"], SIZE, config.loss.heatmap_sigma), jnp.float32)

    def distance(images):
        heat = method.heatmaps(params, images)
        mask = jax.lax.stop_gradient(((heat.sum(-1) > 0.1) | (targets.sum(-1) > 0.1)).astype(jnp.float32))
        return jnp.sum(jnp.mean(mask * jnp.square(heat - targets).sum(-1), axis=(1, 2)))

    g = jax.grad(distance)(x0)
    rms = jnp.sqrt(jnp.mean(jnp.square(g), axis=(1, 2, 3)))
    expected = epsilon + w * s * np.sqrt(1 - alpha_bar) * g / jnp.maximum(1.0, rms)[:, None, None, None]
    assert float(jnp.abs(g).max()) > 0
    np.testing.assert_allclose(guided(x_t, t), as_output(expected), **tolerance)


@pytest.mark.slow
def test_gradient_guidance_with_scale_zero_equals_sampling_without_it(trained):
    """The same DDIM run with the gradient computed and scaled by 0 (a traced scale) and without gradient guidance
    is bit-identical; a positive scale changes the samples."""
    method, params = trained.method, trained.params
    batch = {k: v for k, v in _batch(trained, 2).items() if k in method.condition_keys()}
    key = jax.random.key(3)
    with_scale = jax.jit(lambda b, g: method.generate(params, b, key, 2, 2.0, g)[0])
    without = jax.jit(lambda b: method.generate(params, b, key, 2, 2.0, None)[0])
    zero, plain = np.asarray(with_scale(batch, jnp.float32(0.0))), np.asarray(without(batch))
    assert np.array_equal(zero, plain)
    assert np.abs(np.asarray(with_scale(batch, jnp.float32(50.0))) - plain).max() > 1e-4


def _write_keypoints(path):
    points = np.array([[32, 10], [32, 18], [24, 18], [22, 28], [20, 36], [40, 18], [42, 28], [44, 36], [27, 38],
                       [27, 48], [27, 58], [37, 38], [37, 48], [37, 58], [30, 8], [34, 8], [28, 9], [36, 9]], float)
    np.savetxt(path, points)


@pytest.mark.slow
def test_sample_split_eval_and_one_image_from_the_run_alone(run, tmp_path):
    """sample.py's split mode writes generated/ and warped/ for all 96 test pairs at the run's size; single mode from a photo and a keypoint file; a pose image is refused with one line. Nothing is written into
    the run."""
    from PIL import Image

    from pgpis_jax.errors import UserError
    from pgpis_jax.methods.reposedm import sampling

    before = sorted(os.walk(run))
    results = sampling.sample_command(run, split="test", output_dir=str(tmp_path / "out"), batch_size=96)
    assert results["pairs"] == 96 and results["images_written"] == 2 * 96
    names = sorted(os.listdir(tmp_path / "out" / "generated"))
    assert names == sorted(os.listdir(tmp_path / "out" / "warped")) and len(names) == 96
    assert np.asarray(Image.open(tmp_path / "out" / "generated" / names[0])).shape == (SIZE, SIZE, 3)

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 64, 3), np.uint8)).save(tmp_path / "a.png")
    _write_keypoints(tmp_path / "b.txt")
    sampling.sample_command(run, source_image=str(tmp_path / "a.png"), target_pose=str(tmp_path / "b.txt"),
                            output=str(tmp_path / "single" / "b.png"))
    image = np.asarray(Image.open(tmp_path / "single" / "b.png"))
    assert image.shape == (SIZE, SIZE, 3) and image.std() > 0
    with pytest.raises(UserError, match="--target_pose=.*keypoints"):
        sampling.sample_command(run, source_image=str(tmp_path / "a.png"), target_pose=str(tmp_path / "a.png"),
                                output=str(tmp_path / "c.png"))
    assert sorted(os.walk(run)) == before


@pytest.mark.slow
def test_pidm_export_loads_strictly_into_the_torch_statements(run, trained, tmp_path):
    """export.py --format=pidm: pidm_checkpoint.pt loads with strict=True into the PyTorch statement of PIDM's
    BeatGANsAutoencModel (tests/test_pidm_models.py) and alignment.safetensors into that of the alignment
    (tests/test_reposedm_models.py); both then compute what our modules compute."""
    from safetensors.torch import load_file

    from pgpis_jax.methods.common.exporting import export_run
    from tests.test_pidm_models import TorchPIDM
    from tests.test_reposedm_models import TorchAlignment

    out = export_run(run, "pidm", str(tmp_path / "export"))
    assert sorted(os.listdir(out)) == ["alignment.safetensors", "manifest.json", "pidm_checkpoint.pt",
                                       "pose_estimator.safetensors"]
    method, params = trained.method, trained.params
    unet_fields = {k: v for k, v in dict(trained.config.model.unet.config).items() if k != "position_encoding"}
    reference = TorchPIDM(**{k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in unet_fields.items()})
    reference.load_state_dict(torch.load(os.path.join(out, "pidm_checkpoint.pt"), weights_only=True)["ema"],
                              strict=True)
    reference.eval()
    a = dict(trained.config.model.alignment.config)
    alignment = TorchAlignment(a["features"], a["stem_channels"], tuple(a["stage_channels"]), a["heads"],
                               tuple(a["kernels"]), a["radius"], a["accumulate"], a["symmetric"])
    alignment.load_state_dict(load_file(os.path.join(out, "alignment.safetensors")), strict=True)
    alignment.eval()

    batch = _batch(trained, 2)
    nchw = lambda x: torch.from_numpy(np.ascontiguousarray(np.asarray(x, np.float32).transpose(0, 3, 1, 2)))  # noqa
    with torch.no_grad():
        warped_torch, _ = alignment(nchw(batch["source_image"]), nchw(batch["target_pose"]))
    warped, _ = method.align(params, batch["source_image"], batch["target_pose"])
    np.testing.assert_allclose(warped_torch.numpy().transpose(0, 2, 3, 1), warped, atol=1e-4)

    x_t = np.random.default_rng(1).standard_normal((2, SIZE, SIZE, 3)).astype(np.float32)
    t = np.array([5, 700])
    ours = method.denoise(params, x_t, t, (np.concatenate([batch["target_pose"], warped], -1),
                                           method.texture(params, warped)))
    with torch.no_grad():
        maps = reference.encoder(nchw(warped))
        theirs = reference(torch.cat([nchw(x_t), nchw(batch["target_pose"]), nchw(warped)], 1), torch.from_numpy(t),
                           maps)
    np.testing.assert_allclose(theirs.numpy().transpose(0, 2, 3, 1), ours, atol=1e-4)


def test_configs_ablations_and_bad_settings():
    """B1 = PIDM (no alignment, no estimator, the source alone nulled), B2 no estimator, paper_literal no warp loss;
    a gradient-guided config without keypoints is one clear error."""
    from configs import reposedm
    from pgpis_jax.errors import UserError
    from pgpis_jax.methods.reposedm.stage import RePoseDM

    b1, b2, literal = (reposedm.get_config(a) for a in ("B1", "B2", "paper_literal"))
    assert (b1.model.rpa, b1.model.gradient_guidance, b1.model.null_condition) == (False, False, "source")
    assert (b2.model.rpa, b2.model.gradient_guidance) == (True, False)
    assert literal.loss.warp_weight == 0 and reposedm.get_config().loss.warp_weight == 1
    assert not any(c.model.concat_source for c in (b1, b2, literal))
    assert reposedm.get_config("demo,B1").model.concat_source
    assert reposedm.get_config("market").data.pipeline.image_size == (128, 64)
    with pytest.raises(ValueError, match="unknown config argument 'B3'"):
        reposedm.get_config("B3")
    config = reposedm.get_config("demo")
    config.data.pipeline.keypoints = False
    with pytest.raises(UserError, match="config.data.pipeline.keypoints"):
        RePoseDM(config, needs_data=False)
