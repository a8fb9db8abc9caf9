"""eval.py as a user runs it: folder mode on plain PNG folders (numbers equal scikit-image's), one-line
errors for bad files and mixed modes, config mode still going through the method registry."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _eval(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "eval.py", *args], cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=300)


def _error_lines(result):
    return [line for line in result.stderr.splitlines() if line.startswith("eval.py: error")]


@pytest.fixture
def folders(tmp_path):
    rng = np.random.default_rng(0)
    pairs = []
    for i in range(4):
        y, x = np.mgrid[0:48, 0:36]
        reference = np.stack([(x * (3 + i) + y * c * 2) % 256 for c in range(3)], axis=-1).astype(np.uint8)
        generated = np.clip(reference + rng.integers(-25, 26, reference.shape), 0, 255).astype(np.uint8)
        for folder, image in (("gen", generated), ("ref", reference)):
            os.makedirs(tmp_path / folder, exist_ok=True)
            Image.fromarray(image).save(tmp_path / folder / f"person_{i}.png")
        pairs.append((generated, reference))
    return str(tmp_path / "gen"), str(tmp_path / "ref"), pairs


def test_folder_mode_ssim_psnr_equal_scikit_image(folders, tmp_path):
    generated_dir, reference_dir, pairs = folders
    output = str(tmp_path / "out" / "m.json")
    result = _eval(f"--generated_dir={generated_dir}", f"--reference_dir={reference_dir}", "--metrics=ssim,psnr",
                   f"--output={output}")
    assert result.returncode == 0, result.stderr
    with open(output) as f:
        metrics = json.load(f)["metrics"]
    ssim = np.mean([structural_similarity(r, g, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                          data_range=255, channel_axis=2) for g, r in pairs])
    psnr = np.mean([peak_signal_noise_ratio(r, g, data_range=255) for g, r in pairs])
    assert metrics == {"ssim": pytest.approx(ssim, abs=1e-9), "psnr": pytest.approx(psnr, abs=1e-9)}
    rows = [line.split() for line in result.stdout.splitlines()]
    assert ["ssim", f"{ssim:.4f}", "4", "pairs"] in rows and ["psnr", f"{psnr:.4f}", "4", "pairs"] in rows


def test_unmatched_and_unreadable_files_fail_with_one_line(folders):
    generated_dir, reference_dir, _ = folders
    Image.fromarray(np.zeros((48, 36, 3), np.uint8)).save(os.path.join(generated_dir, "stray.png"))
    with open(os.path.join(reference_dir, "person_2.png"), "wb") as f:
        f.write(b"\x89PNG truncated")
    result = _eval(f"--generated_dir={generated_dir}", f"--reference_dir={reference_dir}", "--metrics=ssim,psnr")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    (line,) = _error_lines(result)
    assert "stray.png" in line and os.path.join(reference_dir, "person_2.png") in line


def test_mixed_modes_and_bad_flags_are_one_line_errors(folders, tmp_path):
    generated_dir, reference_dir, _ = folders
    mixed = _eval(f"--generated_dir={generated_dir}", f"--reference_dir={reference_dir}",
                  "--config=configs/toy_denoiser.py")
    assert mixed.returncode == 1 and _error_lines(mixed) == [
        "eval.py: error: --generated_dir scores a folder and --config belongs to config mode; give one of them"]
    folder_flag_in_config_mode = _eval("--config=configs/toy_denoiser.py", f"--workdir={tmp_path}", "--metrics=fid")
    assert folder_flag_in_config_mode.returncode == 1
    assert "--metrics belongs to folder mode" in _error_lines(folder_flag_in_config_mode)[0]
    unknown = _eval(f"--generated_dir={generated_dir}", f"--reference_dir={reference_dir}", "--protocol=nope")
    assert unknown.returncode == 1 and len(_error_lines(unknown)) == 1
    assert "unknown evaluation protocol 'nope'" in _error_lines(unknown)[0]


def test_config_mode_goes_through_the_method_and_writes_nothing_on_failure(tmp_path):
    run, out = tmp_path / "run", tmp_path / "out"
    run.mkdir()
    missing_output = _eval("--config=configs/toy_denoiser.py:demo", f"--workdir={run}")
    assert missing_output.returncode == 1
    assert _error_lines(missing_output) == [
        "eval.py: error: --output_dir is required (nothing is written into the run)"]
    untrained = _eval("--config=configs/toy_denoiser.py:demo", f"--workdir={run}", f"--output_dir={out}")
    assert untrained.returncode == 1
    assert _error_lines(untrained) == [f"eval.py: error: no checkpoint in {run}/checkpoints; train first "
                                       f"(python train.py --config=... --workdir={run})"]
    no_run = _eval(f"--workdir={run}", f"--output_dir={out}")
    assert _error_lines(no_run) == [f"eval.py: error: {run}/config.json not found: --workdir={run} is not a trained "
                                    f"run directory (or give --config)"]
    assert os.listdir(tmp_path) == ["run"] and os.listdir(run) == []
