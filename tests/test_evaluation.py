"""Folder scoring (pgpis_jax.evaluation), its protocols and image handling, against independent references:
torch's F.interpolate and PIL for the resizers (cv2 when installed), scikit-image for SSIM / PSNR, numpy /
scipy for FID, the values of metrics.md's preset table."""

import dataclasses
import json
import os

import ml_collections
import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from pgpis_jax import evaluation
from pgpis_jax.errors import UserError
from pgpis_jax.metrics import images, protocols
from pgpis_jax.metrics.images import Preparation

# (input height, width) -> (output height, width): the papers' resizes, a one-axis resize and an upscale.
RESIZES = [((128, 128), (64, 44)), ((64, 64), (64, 44)), ((110, 75), (32, 22)), ((20, 14), (37, 29))]


def _smooth_image(rng, height, width):
    """uint8 [H, W, 3]: low-frequency colour fields plus noise (not flat, not pure noise)."""
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    phases = rng.uniform(0, 2 * np.pi, (3, 2))
    base = np.stack([np.sin(5 * x + p[0]) * np.cos(4 * y + p[1]) for p in phases], axis=-1)
    return np.clip(127.5 + 90 * base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)


def _noisy(rng, image, amplitude):
    noise = rng.integers(-amplitude, amplitude + 1, image.shape)
    return np.clip(image.astype(np.int32) + noise, 0, 255).astype(np.uint8)


def _save(folder, name, image):
    os.makedirs(folder, exist_ok=True)
    Image.fromarray(image).save(os.path.join(folder, name))


def _torch_resize(image, size, mode, antialias=False):
    x = torch.from_numpy(np.asarray(image, np.float64)).permute(2, 0, 1)[None]
    y = torch.nn.functional.interpolate(x, size=size, mode=mode, align_corners=False, antialias=antialias)
    return y[0].permute(1, 2, 0).numpy()


# --- resizers ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("in_size,out_size", RESIZES)
def test_float_kernels_equal_torch_interpolate(in_size, out_size):
    image = _smooth_image(np.random.default_rng(0), *in_size)
    # torch's non-antialiased bicubic is Keys a=-0.75 with clamped taps, as cv2's INTER_CUBIC (metrics.md 2.1)
    cubic = images.resize(image, out_size, "cv2_cubic")
    assert np.abs(cubic - _torch_resize(image, out_size, "bicubic")).max() < 1e-9
    linear = images.resize(image, out_size, "cv2_linear")
    assert np.abs(linear - _torch_resize(image, out_size, "bilinear")).max() < 1e-9
    antialiased = images.resize(image, out_size, "bicubic_aa")
    assert np.abs(antialiased - _torch_resize(image, out_size, "bicubic", antialias=True)).max() < 1e-9


def test_cv2_cubic_hand_computed_row():
    """4 -> 2 pixels: output 0 samples x=0.5, taps at -1 (edge repeated), 0, 1, 2 with Keys a=-0.75 weights
    k(1.5) = -0.09375 and k(0.5) = 0.59375."""
    row = np.array([10.0, 50.0, 90.0, 200.0])
    image = np.repeat(row[None, :, None], 3, axis=2).astype(np.uint8)
    out = images.resize(image, (1, 2), "cv2_cubic")[0, :, 0]
    far, near = -0.09375, 0.59375
    expected0 = far * 10 + near * 10 + near * 50 + far * 90
    expected1 = far * 50 + near * 90 + near * 200 + far * 200
    assert out == pytest.approx([expected0, expected1], abs=1e-12)


@pytest.mark.parametrize("in_size,out_size", RESIZES)
def test_cv2_kernels_equal_opencv(in_size, out_size):
    cv2 = pytest.importorskip("cv2")
    image = _smooth_image(np.random.default_rng(1), *in_size)
    for kernel, flag in (("cv2_cubic", cv2.INTER_CUBIC), ("cv2_linear", cv2.INTER_LINEAR)):
        reference = cv2.resize(image.astype(np.float32), out_size[::-1], interpolation=flag)
        assert np.abs(images.resize(image, out_size, kernel) - reference).max() < 1e-3, kernel


@pytest.mark.parametrize("in_size,out_size", RESIZES + [((75, 110), (75, 52))])
def test_pil_bicubic_is_bit_exact(in_size, out_size):
    rng = np.random.default_rng(2)
    for image in (_smooth_image(rng, *in_size), rng.integers(0, 256, in_size + (3,), dtype=np.uint8)):
        expected = np.asarray(Image.fromarray(image).resize(out_size[::-1], Image.BICUBIC))
        np.testing.assert_array_equal(images.resize(image, out_size, "pil_bicubic"), expected)


def test_floor_quantizer_matches_cfld_truncation():
    """CFLD: F.interpolate(bicubic, antialias) of [0, 1] images, * 255, clamp, .to(uint8)."""
    image = _smooth_image(np.random.default_rng(3), 128, 128)
    ours = Preparation("bicubic_aa", (64, 44), "floor").apply(image)
    x = torch.from_numpy(image.astype(np.float32) / 255).permute(2, 0, 1)[None]
    y = torch.nn.functional.interpolate(x, (64, 44), mode="bicubic", align_corners=False, antialias=True)
    cfld = (y * 255).clamp(0, 255).to(torch.uint8)[0].permute(1, 2, 0).numpy()
    difference = np.abs(ours.astype(np.int32) - cfld)
    assert difference.max() <= 1 and (difference > 0).mean() < 1e-3
    assert (ours == np.floor(ours)).all() and ours.max() <= 255


def test_preparation_rejects_inconsistent_settings():
    with pytest.raises(ValueError, match="round"):
        Preparation("cv2_cubic", (4, 4), "round")
    with pytest.raises(ValueError, match="size"):
        Preparation("none", (4, 4), "none")


# --- protocol presets (values from metrics.md sections 1 and 5.1) ----------------------------------------------


def test_standard_protocol_is_the_textbook_one():
    p = protocols.get_protocol("standard")
    (ssim,) = p.ssim
    assert (ssim.window, ssim.sigma, ssim.use_sample_covariance, ssim.data_range, ssim.value_scale) == \
        ("gaussian", 1.5, False, 255.0, 255.0)
    assert 2 * int(3.5 * ssim.sigma + 0.5) + 1 == 11
    assert (p.psnr.data_range, p.psnr.value_scale) == (255.0, 255.0)
    assert (p.fid_network, p.fid_input_transform, p.lpips_net, p.lpips_input) == \
        ("pt_inception", "pytorch_fid", "alex", "minus_one_one")
    assert p.pixel_generated.kernel == "none" and p.oracle_candidates == 1


def test_pcdms_preset():
    p = protocols.get_protocol("pcdms")
    assert p.pixel_generated == p.network_reference == Preparation("cv2_cubic", (256, 176), "none")
    assert p.match == "target_after_to"
    assert (p.fid_network, p.fid_input_transform, p.fid_real_set, p.fid_whole_batches_of) == \
        ("torchvision", "legacy_pidm", "train", 128)
    assert (p.lpips_input, p.lpips_whole_batches_of) == ("zero_one_raw", 64)
    assert (p.ssim[0].window, p.ssim[0].sigma, p.ssim[0].use_sample_covariance, p.ssim[0].data_range) == \
        ("gaussian", 1.2, False, "per_image_pred_range")
    assert (p.ssim[1].win_size, p.ssim[1].use_sample_covariance) == (51, True)
    assert p.psnr.data_range == 1.0
    assert p.oracle_candidates == 4 and p.oracle_ssim.sigma == 1.2


def test_cfld_preset():
    p = protocols.get_protocol("cfld")
    assert p.network_generated == Preparation("bicubic_aa", (256, 176), "floor")
    assert p.network_reference == Preparation("pil_bicubic", (256, 176), "round")
    assert (p.fid_real_set, p.fid_whole_batches_of, p.lpips_input, p.lpips_whole_batches_of) == \
        ("train", 0, "minus_one_one", 0)
    assert (p.ssim[0].window, p.ssim[0].win_size, p.ssim[0].use_sample_covariance, p.ssim[0].data_range) == \
        ("uniform", 51, True, 1.0)
    assert (p.ssim[1].sigma, p.ssim[1].data_range) == (1.5, "per_image_pred_range")
    assert p.oracle_candidates == 1 and protocols.get_protocol("nted") == p


def test_fpdm_and_pidm_presets():
    f = protocols.get_protocol("fpdm")
    assert f.pixel_generated == Preparation("pil_bicubic", (512, 352), "round")
    assert (f.fid_real_set, f.fid_whole_batches_of, f.lpips_whole_batches_of) == ("test_targets", 0, 10)
    assert f.ssim[0].win_size == 51 and f.ssim[1].sigma == 1.5
    d = protocols.get_protocol("pidm")
    assert d.network_generated == Preparation("cv2_linear", (256, 176), "none")
    assert d.pixel_generated.kernel == "none" and d.match == "target_after_to"
    assert (d.fid_real_set, d.fid_whole_batches_of, d.lpips_input, d.lpips_whole_batches_of) == \
        ("train", 64, "minus_one_one", 64)
    assert (d.ssim[0].sigma, d.ssim[0].data_range) == (1.2, "per_image_pred_range")
    assert protocols.get_protocol("reposedm") == d


def test_eval_size_override_and_bad_names():
    p = protocols.get_protocol("cfld", protocols.parse_size("512x352"))
    assert p.pixel_generated.size == p.network_reference.size == (512, 352)
    d = protocols.get_protocol("pidm", (128, 64))
    assert d.network_generated.size == (128, 64) and d.pixel_generated.size is None
    with pytest.raises(UserError, match="known: cfld, fpdm, pcdms, pidm, standard"):
        protocols.get_protocol("nope")
    with pytest.raises(UserError, match="own size"):
        protocols.get_protocol("standard", (256, 176))
    with pytest.raises(UserError, match="HEIGHTxWIDTH"):
        protocols.parse_size("256")


# --- scoring folders -------------------------------------------------------------------------------------------


@pytest.fixture
def folders(tmp_path):
    """Five pairs of 40x32 PNGs: generated = reference + noise of growing amplitude."""
    rng = np.random.default_rng(4)
    pairs = []
    for i in range(5):
        reference = _smooth_image(rng, 40, 32)
        generated = _noisy(rng, reference, 6 + 8 * i)
        _save(tmp_path / "ref", f"im{i}.png", reference)
        _save(tmp_path / "gen", f"im{i}.png", generated)
        pairs.append((generated, reference))
    return str(tmp_path / "gen"), str(tmp_path / "ref"), pairs


def test_standard_ssim_psnr_equal_scikit_image(folders):
    generated_dir, reference_dir, pairs = folders
    results = evaluation.score_folders(generated_dir, reference_dir, "ssim,psnr", batch_size=2)
    ssim = np.mean([structural_similarity(r, g, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                          data_range=255, channel_axis=2) for g, r in pairs])
    psnr = np.mean([peak_signal_noise_ratio(r, g, data_range=255) for g, r in pairs])
    assert results["metrics"]["ssim"] == pytest.approx(ssim, abs=1e-9)
    assert results["metrics"]["psnr"] == pytest.approx(psnr, abs=1e-9)
    assert results["counts"] == {"pairs": 5, "pixel_pairs": 5} and "oracle" not in results
    table = evaluation.format_table(results)
    assert "protocol: standard" in table and f"{ssim:.4f}" in table


def test_pcdms_pairs_by_target_name_and_resizes_with_cv2_cubic(tmp_path):
    """Re-enacts PCDMs' script with torch's bicubic (= cv2 INTER_CUBIC) and scikit-image: float32 [0, 1] images
    at 256x176... here 32x22; SSIM sigma 1.2 on x255 data with R = the prediction's range; PSNR R=1."""
    rng = np.random.default_rng(5)
    expected_ssim, expected_uniform, expected_psnr = [], [], []
    for i in range(3):
        target = _smooth_image(rng, 64, 44)
        generated = _noisy(rng, np.asarray(Image.fromarray(target).resize((48, 48), Image.BICUBIC)), 20)
        _save(tmp_path / "ref", f"t{i}.png", target)
        _save(tmp_path / "gen", f"s{i}_to_t{i}.png", generated)
        pred = _torch_resize(generated.astype(np.float32), (32, 22), "bicubic").astype(np.float32) / 255
        gt = _torch_resize(target.astype(np.float32), (32, 22), "bicubic").astype(np.float32) / 255
        expected_ssim.append(structural_similarity(gt * 255, pred * 255, gaussian_weights=True, sigma=1.2,
                                                   use_sample_covariance=False, channel_axis=2,
                                                   data_range=pred.max() * 255 - pred.min() * 255))
        expected_uniform.append(structural_similarity(gt, pred, win_size=21, channel_axis=2, data_range=1))
        expected_psnr.append(peak_signal_noise_ratio(gt, pred, data_range=1))
    protocol = protocols.get_protocol("pcdms", (32, 22))
    protocol = dataclasses.replace(protocol, ssim=(protocol.ssim[0], protocols.SSIMSetting(
        "ssim_uniform21", "uniform", 0.0, 21, True, 1.0, 1.0)))
    results = evaluation.score_folders(str(tmp_path / "gen"), str(tmp_path / "ref"), "ssim,psnr", protocol)
    assert results["metrics"]["ssim"] == pytest.approx(np.mean(expected_ssim), abs=2e-6)
    assert results["metrics"]["ssim_uniform21"] == pytest.approx(np.mean(expected_uniform), abs=2e-6)
    assert results["metrics"]["psnr"] == pytest.approx(np.mean(expected_psnr), abs=1e-4)


def test_fpdm_pairs_the_originals_names_with_an_in_shop_tree(tmp_path):
    """C2.eval.caculate_metrics.py's pairing: generated `<src>.jpg_2_<tgt>.jpg.png` (the original's flat names and
    ours, made from DPTN's flat record names) against the In-shop `img/` tree searched recursively; both sides
    resized with PIL bicubic, PSNR with R = 1 on [0, 1] (scikit-image)."""
    rng = np.random.default_rng(8)
    cases = [("MEN/Tees_Tanks/id_00007301/04_1_front.jpg",
              "MENTees_Tanksid_0000730104_7_additional.jpg_2_MENTees_Tanksid_0000730104_1_front.jpg.png"),
             ("WOMEN/Dresses/id_00007132/04_3_back.jpg",
              "fashionWOMENDressesid0000713204_4full.jpg_2_fashionWOMENDressesid0000713204_3back.jpg.png")]
    expected = []
    for path, generated_name in cases:
        target = _smooth_image(rng, 64, 44)
        (tmp_path / "img" / os.path.dirname(path)).mkdir(parents=True)
        Image.fromarray(target).save(tmp_path / "img" / path, quality=100)
        generated = _noisy(rng, target, 30)
        _save(tmp_path / "gen", generated_name, generated)
        stored = np.asarray(Image.open(tmp_path / "img" / path).convert("RGB"))
        gt, pred = (np.asarray(Image.fromarray(x).resize((22, 32), Image.BICUBIC)).astype(np.float64) / 255
                    for x in (stored, generated))
        expected.append(peak_signal_noise_ratio(gt, pred, data_range=1))
    assert images.fpdm_key(cases[0][0]) == images.fpdm_key(cases[0][1]) == "MENTeesTanksid00007301041front"
    assert images.fpdm_key("fashionWOMENDressesid0000713204_3back.png") == images.fpdm_key(cases[1][0])
    results = evaluation.score_folders(str(tmp_path / "gen"), str(tmp_path / "img"), "psnr", "fpdm",
                                       eval_size=(32, 22))
    assert results["counts"]["pairs"] == 2
    assert results["metrics"]["psnr"] == pytest.approx(np.mean(expected), abs=1e-5)
    _save(tmp_path / "img", "fashionMENTees_Tanksid0000730104_1front.png", _smooth_image(rng, 64, 44))
    with pytest.raises(UserError, match="two images named MENTeesTanksid00007301041front"):
        evaluation.score_folders(str(tmp_path / "gen"), str(tmp_path / "img"), "psnr", "fpdm")


def test_oracle_keeps_the_candidate_closest_to_the_reference(tmp_path):
    rng = np.random.default_rng(6)
    best = [2, 0, 3]
    expected = []
    for i, k_best in enumerate(best):
        reference = _smooth_image(rng, 48, 32)
        for k in range(4):
            candidate = _noisy(rng, reference, 4 if k == k_best else 40 + 10 * k)
            _save(tmp_path / "gen" / f"sample_{k}", f"p{i}.png", candidate)
            if k == k_best:
                expected.append(peak_signal_noise_ratio(reference, candidate, data_range=255))
        _save(tmp_path / "ref", f"p{i}.png", reference)
    protocol = dataclasses.replace(protocols.STANDARD, oracle_candidates=4,
                                             oracle_ssim=protocols.PCDMS.oracle_ssim)
    results = evaluation.score_folders(str(tmp_path / "gen"), str(tmp_path / "ref"), "psnr", protocol)
    assert results["oracle"]["chosen_per_candidate"] == [1, 0, 1, 1]
    assert results["metrics"]["psnr"] == pytest.approx(np.mean(expected), abs=1e-9)
    assert "oracle: best of 4" in evaluation.format_table(results)
    with pytest.raises(UserError, match="one sample per pair"):
        evaluation.score_folders(str(tmp_path / "gen"), str(tmp_path / "ref"), "psnr", "cfld")


def test_unmatched_and_unreadable_files_are_one_error(folders, tmp_path):
    generated_dir, reference_dir, _ = folders
    _save(generated_dir, "orphan.png", np.zeros((40, 32, 3), np.uint8))
    with open(os.path.join(generated_dir, "broken.png"), "wb") as f:
        f.write(b"not a png")
    with open(os.path.join(reference_dir, "broken.png"), "wb") as f:
        f.write(b"not a png either")
    with pytest.raises(UserError) as error:
        evaluation.score_folders(generated_dir, reference_dir, "ssim")
    message = str(error.value)
    assert "1 generated images" in message and "orphan.png" in message and "2 unreadable image files" in message
    assert os.path.join(generated_dir, "broken.png") in message and os.path.join(reference_dir, "broken.png") in message
    assert "\n" not in message


def test_bad_inputs_are_user_errors(folders, tmp_path):
    generated_dir, reference_dir, _ = folders
    with pytest.raises(UserError, match="metrics bogus unknown"):
        evaluation.score_folders(generated_dir, reference_dir, "ssim,bogus")
    with pytest.raises(UserError, match="--real_dir"):
        evaluation.score_folders(generated_dir, reference_dir, "fid", "cfld")
    with pytest.raises(UserError, match="inside the image folder"):
        evaluation.score_folders(generated_dir, reference_dir, "fid", stats_cache_dir=os.path.join(reference_dir, "c"))
    with pytest.raises(UserError, match="_to_"):
        evaluation.score_folders(generated_dir, reference_dir, "ssim", "pidm")
    Image.fromarray(np.zeros((40, 30, 3), np.uint8)).save(os.path.join(generated_dir, "im0.png"))
    with pytest.raises(UserError, match=r"1 pairs differ: .*im0.png 40x30 vs .*im0.png 40x32"):
        evaluation.score_folders(generated_dir, reference_dir, "psnr")
    with pytest.raises(UserError, match="at least 51 pixels a side; 5 are smaller"):
        evaluation.score_folders(generated_dir, reference_dir, "ssim", "fpdm", eval_size=(60, 40))
    os.makedirs(os.path.join(generated_dir, "extra"))
    with pytest.raises(UserError, match="not image files"):
        evaluation.score_folders(generated_dir, reference_dir, "psnr")


def _channel_statistics(batch):
    """A tiny fake feature function: per-image channel means, standard deviations and a gradient energy."""
    batch = np.asarray(batch, np.float64)
    gradient = np.abs(np.diff(batch, axis=1)).mean(axis=(1, 2))
    return np.concatenate([batch.mean(axis=(1, 2)), batch.std(axis=(1, 2)), gradient], axis=1)


def test_fid_of_a_folder_against_itself_is_zero_and_matches_numpy(folders, tmp_path):
    generated_dir, reference_dir, pairs = folders
    itself = evaluation.score_folders(reference_dir, reference_dir, "fid", fid_features=_channel_statistics)
    assert abs(itself["metrics"]["fid"]) < 1e-6
    assert itself["counts"]["fid_generated"] == itself["counts"]["fid_real"] == 5

    calls = []

    def counting(batch):
        calls.append(len(batch))
        return _channel_statistics(batch)

    cache = str(tmp_path / "cache")
    results = evaluation.score_folders(generated_dir, reference_dir, "fid", stats_cache_dir=cache,
                                       fid_features=counting)
    fake = _channel_statistics(np.stack([g for g, _ in pairs]) / 255.0)
    real = _channel_statistics(np.stack([r for _, r in pairs]) / 255.0)
    mu1, mu2 = fake.mean(0), real.mean(0)
    s1, s2 = np.cov(fake, rowvar=False), np.cov(real, rowvar=False)
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert results["metrics"]["fid"] == pytest.approx(expected, rel=1e-6)
    assert sum(calls) == 10 and len(os.listdir(cache)) == 1
    calls.clear()
    again = evaluation.score_folders(generated_dir, reference_dir, "fid", stats_cache_dir=cache, fid_features=counting)
    assert sum(calls) == 5 and again["metrics"]["fid"] == results["metrics"]["fid"]


def test_lpips_inputs_follow_the_protocol(folders):
    generated_dir, reference_dir, pairs = folders
    seen = []

    def distance(x, y):
        seen.append((x.min(), x.max()))
        return np.abs(x - y).mean(axis=(1, 2, 3))

    results = evaluation.score_folders(generated_dir, reference_dir, "lpips", lpips_distance=distance)
    expected = np.mean([np.abs(g / 127.5 - r / 127.5).mean() for g, r in pairs])
    assert results["metrics"]["lpips"] == pytest.approx(expected, rel=1e-6)
    assert min(lo for lo, _ in seen) < -0.5
    pcdms = dataclasses.replace(protocols.get_protocol("pcdms", (40, 32)), lpips_whole_batches_of=2)
    seen.clear()
    generated_dir_to = generated_dir + "_to"
    os.makedirs(generated_dir_to)
    for name in sorted(os.listdir(generated_dir)):
        os.link(os.path.join(generated_dir, name), os.path.join(generated_dir_to, f"src_to_{name}"))
    results = evaluation.score_folders(generated_dir_to, reference_dir, "lpips", pcdms, lpips_distance=distance)
    assert results["counts"]["lpips_pairs"] == 4 and min(lo for lo, _ in seen) >= -1e-3


def test_evaluate_method_outputs_reads_config_eval_and_writes_json(folders, tmp_path):
    generated_dir, reference_dir, pairs = folders
    config = ml_collections.ConfigDict({"method": "x", "eval": evaluation.default_eval_config()})
    config.eval.metrics = "psnr"
    output_dir = str(tmp_path / "out")
    results = evaluation.evaluate_method_outputs(config, output_dir, generated_dir, reference_dir)
    with open(os.path.join(output_dir, "metrics.json")) as f:
        written = json.load(f)
    expected = np.mean([peak_signal_noise_ratio(r, g, data_range=255) for g, r in pairs])
    assert written["metrics"] == results["metrics"] == {"psnr": pytest.approx(expected, abs=1e-9)}
    config.eval = ml_collections.ConfigDict({"metrics": "psnr", "bogus": 1})
    with pytest.raises(UserError, match="unknown config.eval fields bogus"):
        evaluation.evaluate_method_outputs(config, output_dir, generated_dir, reference_dir)


def _random_inception_params(module, rng):
    """He-scaled kernels, BatchNorm with unit scale, zero shift and mean, variances in [0.5, 1.5]."""
    import jax
    import jax.numpy as jnp

    abstract = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 75, 75, 3)))["params"]

    def leaf(path, value):
        name = jax.tree_util.keystr(path)
        if "kernel" in name:
            return rng.normal(0, np.sqrt(2 / np.prod(value.shape[:-1])), value.shape).astype(value.dtype)
        if "running_var" in name:
            return rng.uniform(0.5, 1.5, value.shape).astype(value.dtype)
        return np.full(value.shape, 1.0 if "scale" in name else 0.0, value.dtype)

    return jax.tree_util.tree_map_with_path(leaf, abstract)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")
def test_real_inception_features_give_fid_zero_for_a_folder_against_itself(tmp_path):
    """One tiny run of the Flax Inception-v3 (random weights; no weight files offline) through score_folders."""
    from pgpis_jax.metrics import inception

    rng = np.random.default_rng(7)
    for i in range(3):
        _save(tmp_path / "ref", f"im{i}.png", _smooth_image(rng, 40, 32))
    module = inception.InceptionV3(variant="torchvision")
    calls = []
    network = inception.make_feature_fn(module, _random_inception_params(module, rng), "legacy_pidm", batch_size=3)

    def features(batch):
        calls.append(network(batch))
        return calls[-1]

    results = evaluation.score_folders(str(tmp_path / "ref"), str(tmp_path / "ref"), "fid", fid_features=features)
    assert np.isfinite(calls[0]).all() and calls[0].std() > 1e-3
    assert abs(results["metrics"]["fid"]) < 1e-4 * np.trace(np.cov(calls[0], rowvar=False))
    with pytest.raises(UserError, match="inception_v3_google-0cc3c7bd.pth"):
        evaluation.score_folders(str(tmp_path / "ref"), str(tmp_path / "ref"), "fid", "fpdm",
                                 weights_dir=str(tmp_path))
