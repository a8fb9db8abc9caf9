"""notebooks/eval_colab.ipynb runs headless (nbclient) outside Colab on two small PNG pairs with its path
variables overridden: SSIM and PSNR (no weight files), a picture grid, the table, the JSON."""

import json
import os

import nbformat
import numpy as np
import pytest
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

nbclient = pytest.importorskip("nbclient")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "eval_colab.ipynb")


def test_notebook_runs_on_synthetic_images(tmp_path):
    rng = np.random.default_rng(0)
    pairs = []
    for i in range(2):
        source = rng.integers(0, 256, (64, 56, 3), dtype=np.uint8)
        reference = np.clip(source.astype(np.int32)[::-1] + 30, 0, 255).astype(np.uint8)
        generated = np.clip(reference + rng.integers(-30, 31, reference.shape), 0, 255).astype(np.uint8)
        for folder, name, image in (("src", f"a{i}.png", source), ("ref", f"b{i}.png", reference),
                                    ("gen", f"a{i}_to_b{i}.png", generated)):
            os.makedirs(tmp_path / folder, exist_ok=True)
            Image.fromarray(image).save(tmp_path / folder / name)
        pairs.append((generated, reference))
    output = tmp_path / "metrics.json"

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    (index,) = [i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", [])]
    overrides = {"DRIVE_ROOT": str(tmp_path), "GENERATED_DIR": str(tmp_path / "gen"),
                 "REFERENCE_DIR": str(tmp_path / "ref"), "SOURCE_DIR": str(tmp_path / "src"), "REAL_DIR": "",
                 "WEIGHTS_DIR": "", "CHECKPOINT_WORKDIR": "", "STATS_CACHE": "", "OUTPUT_JSON": str(output),
                 "PROTOCOL": "pidm", "METRICS": "ssim,psnr"}
    notebook.cells.insert(index + 1, nbformat.v4.new_code_cell(
        "\n".join(f"{name} = {value!r}" for name, value in overrides.items())))
    nbclient.NotebookClient(notebook, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()

    with open(output) as f:
        results = json.load(f)
    ssim = np.mean([structural_similarity(r, g, gaussian_weights=True, sigma=1.2, use_sample_covariance=False,
                                          data_range=float(g.max()) - float(g.min()), channel_axis=2)
                    for g, r in pairs])
    psnr = np.mean([peak_signal_noise_ratio(r / 255, g / 255, data_range=1) for g, r in pairs])
    assert results["metrics"]["ssim"] == pytest.approx(ssim, abs=1e-6)
    assert results["metrics"]["psnr"] == pytest.approx(psnr, abs=1e-4)
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])]
    pictures = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(pictures) == 1
    texts = "".join(o.get("text", "") for o in outputs)
    assert "protocol: pidm" in texts and f"{ssim:.4f}" in texts
