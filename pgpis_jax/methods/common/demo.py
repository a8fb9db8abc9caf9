"""What the methods' CPU demos share: the synthetic data set, training a stage, the scores, the grid image and
metrics.json.

Scores: SSIM (Wang et al.: Gaussian 11x11, sigma 1.5, per channel, uint8, range 255) and PSNR (uint8, range 255)
of predictions against targets, the mean over the pairs.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Dict, Sequence

import numpy as np

from pgpis_jax.methods.common.split_sampler import to_uint8

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..")


def build_data(data_dir: str) -> None:
    """synthetic_people/64x64_demo (320 train / 48 test identities: 640 / 96 pairs) in data_dir, unless already
    prepared."""
    sys.path.insert(0, os.path.join(REPO, "data"))
    from synthetic_people import synthetic_people_dataset_builder as module

    builder = module.Builder(config="64x64_demo", data_dir=data_dir)
    if not builder.is_prepared():
        builder.download_and_prepare()


def prepare_data(workdir: str) -> str:
    """`build_data` in <workdir>/data; that data_dir."""
    data_dir = os.path.join(workdir, "data")
    build_data(data_dir)
    print(f"[demo] data: synthetic_people/64x64_demo in {data_dir}", flush=True)
    return data_dir


def train_stage(config, workdir: str) -> None:
    """Trains (or resumes, or finds finished) the stage `config` in workdir, printing the time it took."""
    from pgpis_jax import methods, trainer

    started = time.time()
    trainer.train(methods.get_method(config.method).build(config), config, workdir)
    print(f"[demo] {config.method}: trained in {time.time() - started:.0f} s -> {workdir}", flush=True)


def uint8(images) -> np.ndarray:
    """[-1, 1] images -> uint8, as they are saved."""
    return to_uint8(np.asarray(images))


def score(predictions, targets) -> dict:
    """{"ssim", "psnr"}: means over uint8 predictions and targets [N, H, W, 3]."""
    from pgpis_jax.metrics.ssim import psnr, ssim

    return {"ssim": float(np.mean(ssim(predictions, targets, data_range=255))),
            "psnr": float(np.mean(psnr(predictions, targets, data_range=255)))}


def save_grid(columns: Sequence[np.ndarray], rows: int, path: str) -> None:
    """A PNG of the first `rows` examples, one row each, the uint8 image arrays [N, H, W, 3] of `columns` side by
    side, doubled in size (nearest neighbour)."""
    from PIL import Image

    count = min(rows, len(columns[0]))
    grid = np.concatenate([np.concatenate([column[i] for column in columns], axis=1) for i in range(count)], axis=0)
    image = Image.fromarray(grid)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    image.resize((image.width * 2, image.height * 2), Image.NEAREST).save(path + ".tmp", format="PNG")
    os.replace(path + ".tmp", path)


def write_outputs(out_dir: str, columns: Dict[str, np.ndarray], metrics: dict, rows: int = 8) -> None:
    """out_dir/grid.png (`save_grid` of the uint8 image arrays of `columns`, {column title: [N, H, W, 3]}, in
    order) and out_dir/metrics.json, each written under a temporary name and renamed; prints both."""
    from pgpis_jax import evaluation

    grid = os.path.join(out_dir, "grid.png")
    save_grid(list(columns.values()), rows, grid)
    evaluation.write_results(metrics, os.path.join(out_dir, "metrics.json"))
    print(json.dumps(metrics, indent=2), flush=True)
    print(f"[demo] done in {metrics['seconds']} s: {grid} (rows: {' | '.join(columns)}), "
          f"{os.path.join(out_dir, 'metrics.json')}", flush=True)
