"""`make demo-cfld`: CFLD end to end on a 2-core CPU, on procedurally generated people at 64x64.

1. builds `synthetic_people/64x64_demo` (320 train / 48 test identities, 2 photos each, plain backdrops: 640 / 96
   pairs) into <workdir>/data;
2. trains `configs/cfld.py:demo` (a tiny Swin, PRD, HGA, pose adapter and UNet over a parameter-free DCT code;
   only the UNet's up-block attn2.to_k / to_v and the conditioner train, as in CFLD) in <workdir>/cfld;
3. samples every held-out test pair with the config's guidance and writes <out_dir>/grid.png (source | target pose
   | ground truth | CFLD) and <out_dir>/metrics.json: SSIM and PSNR (methods/common/demo.py) of CFLD and of the
   source image itself as the prediction (`copy_source`); the generated images and the ground truth as the
   split mode of sample.py names them into <out_dir>/test_set/{cfld,reference}, which `eval.py --protocol=cfld`
   scores (the command is printed).
A finished run is reused when the demo runs again.
"""

from __future__ import annotations

import os
import time

import jax
import numpy as np

from pgpis_jax import input_pipeline
from pgpis_jax.methods.cfld.pipeline import CFLDPipeline
from pgpis_jax.methods.common.demo import prepare_data, score, train_stage, uint8, write_outputs
from pgpis_jax.methods.common.hosts import with_batch_size
from pgpis_jax.methods.common.run import load_trained
from pgpis_jax.methods.common.split_sampler import pair_stem, save_png_atomic

GRID_ROWS = 8
BATCH = 48


def demo_config(data_dir: str):
    from configs import cfld

    config = cfld.get_config("demo")
    config.data.data_dir = data_dir
    return config


def run(workdir: str, out_dir: str) -> dict:
    started = time.time()
    data_dir = prepare_data(workdir)
    config = demo_config(data_dir)
    run_dir = os.path.join(workdir, "cfld")
    train_stage(config, run_dir)

    pipe = CFLDPipeline(load_trained(run_dir, ("cfld",), config))
    arrays = {k: [] for k in ("source", "pose", "target", "cfld")}
    test = input_pipeline.from_config(with_batch_size(config, BATCH), split="test", train=False, process_index=0,
                                      process_count=1)
    folders = {name: os.path.join(out_dir, "test_set", name) for name in ("cfld", "reference")}
    for folder in folders.values():
        os.makedirs(folder, exist_ok=True)
    for index, batch in enumerate(test):
        real = np.asarray(batch["mask"])
        generated = pipe.images(batch, jax.random.fold_in(pipe.rng, index))
        for i in np.flatnonzero(real):
            stem = pair_stem(batch["source_name"][i], batch["target_name"][i])
            save_png_atomic(os.path.join(folders["cfld"], stem + ".png"), generated[i])
            save_png_atomic(os.path.join(folders["reference"], stem + ".png"), batch["target_image"][i])
        arrays["cfld"].append(uint8(generated[real]))
        arrays["pose"].append(uint8(batch["target_pose"][real, ..., :3] * 2 - 1))
        arrays["target"].append(uint8(batch["target_image"][real]))
        arrays["source"].append(uint8(batch["source_image"][real]))
    arrays = {k: np.concatenate(v) for k, v in arrays.items()}
    scores = {name: score(arrays[key], arrays["target"]) for name, key in (("cfld", "cfld"), ("copy_source", "source"))}
    metrics = {"ssim": {k: v["ssim"] for k, v in scores.items()}, "psnr": {k: v["psnr"] for k, v in scores.items()},
               "test_pairs": int(len(arrays["target"])), "seconds": round(time.time() - started)}
    write_outputs(out_dir, {"source": arrays["source"], "target pose": arrays["pose"], "ground truth": arrays["target"],
                            "CFLD": arrays["cfld"]}, metrics, GRID_ROWS)
    print(f"[demo] score the test set with: python eval.py --generated_dir={folders['cfld']} "
          f"--reference_dir={folders['reference']} --metrics=ssim,psnr --protocol=cfld", flush=True)
    return metrics
