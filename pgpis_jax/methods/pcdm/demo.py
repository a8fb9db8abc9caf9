"""`make demo`: PCDMs end to end on a 2-core CPU, on procedurally generated people at 64x64.

1. builds `synthetic_people/64x64_demo` (320 train / 48 test identities, 2 photos each, plain backdrops: 640 / 96
   pairs) into <workdir>/data;
2. trains the three `:demo` stages (tiny random networks, a parameter-free DCT autoencoder) in <workdir>/<stage>;
   stage 3's training inputs are stage 2's results on the training pairs with the true target embedding,
   as the original makes them (with the config's DDIM steps, as the test pairs);
3. samples every held-out test pair through prior -> inpainting -> refining and writes
   <out_dir>/grid.png (source | target pose | ground truth | stage 2 | stage 3) and <out_dir>/metrics.json:
   SSIM (Wang et al.: Gaussian 11x11, sigma 1.5, per channel, uint8, range 255) and PSNR (uint8, range 255) of
   stage 2, stage 3 and of the source image itself as the prediction (`copy_source`), plus the prior's cosine
   similarity. Finished stages are reused when the demo runs again.
"""

from __future__ import annotations

import os
import time

import jax
import ml_collections
import numpy as np

from pgpis_jax import input_pipeline
from pgpis_jax.methods.common.demo import prepare_data, score, train_stage, uint8, write_outputs
from pgpis_jax.methods.common.hosts import with_batch_size
from pgpis_jax.methods.common.run import load_trained
from pgpis_jax.methods.pcdm import pipeline

GRID_ROWS = 8


def stage_config(name: str, data_dir: str, **data_options) -> ml_collections.ConfigDict:
    import importlib

    config = importlib.import_module(f"configs.pcdm_{name}").get_config("demo")
    config.data.data_dir = data_dir
    config.data.pipeline = dict(config.data.pipeline, **data_options)
    return config


def run(workdir: str, out_dir: str) -> dict:
    started = time.time()
    data_dir = prepare_data(workdir)
    stages = {"prior": stage_config("prior", data_dir), "inpaint": stage_config("inpaint", data_dir)}
    for name, config in stages.items():
        train_stage(config, os.path.join(workdir, name))
    inpaint = load_trained(os.path.join(workdir, "inpaint"), ("pcdm_inpaint",), stages["inpaint"])
    coarse_dir = pipeline.PCDMPipeline(inpaint, "true").run_split(
        "train", os.path.join(workdir, "coarse_train"), batch_size=128)["folders"]["stage2"]
    print(f"[demo] stage-2 results for the training pairs -> {coarse_dir}", flush=True)
    stages["refine"] = stage_config("refine", data_dir, coarse_dir=coarse_dir)
    train_stage(stages["refine"], os.path.join(workdir, "refine"))

    pipe = pipeline.PCDMPipeline(
        inpaint, "full", prior=load_trained(os.path.join(workdir, "prior"), ("pcdm_prior",), stages["prior"]),
        refine=load_trained(os.path.join(workdir, "refine"), ("pcdm_refine",), stages["refine"]))
    results = {k: [] for k in ("source", "pose", "target", "stage2", "stage3", "cosine")}
    common = dict(split="test", train=False, process_index=0, process_count=1)
    batches = zip(input_pipeline.from_config(with_batch_size(stages["inpaint"], 48), **common),
                  input_pipeline.from_config(with_batch_size(stages["prior"], 48), **common))
    for index, (batch, prior_inputs) in enumerate(batches):
        out, cosine = pipe.generate(batch, prior_inputs, jax.random.fold_in(jax.random.key(0), index))
        real = batch["mask"]
        half = batch["image"].shape[2] // 2
        results["source"].append(uint8(batch["image"][real, :, :half]))
        results["target"].append(uint8(batch["image"][real, :, half:]))
        results["pose"].append(uint8(batch["pose"][real, :, half:]))
        results["stage2"].append(uint8(out["stage2"])[real])
        results["stage3"].append(uint8(out["stage3"])[real])
        results["cosine"].append(np.asarray(cosine)[real])
    arrays = {k: np.concatenate(v) for k, v in results.items()}
    scores = {name: score(arrays[key], arrays["target"])
              for name, key in (("stage2", "stage2"), ("stage3", "stage3"), ("copy_source", "source"))}
    metrics = {"ssim": {k: v["ssim"] for k, v in scores.items()}, "psnr": {k: v["psnr"] for k, v in scores.items()},
               "prior_cosine_similarity": float(np.mean(arrays["cosine"])), "test_pairs": int(len(arrays["target"])),
               "seconds": round(time.time() - started)}
    write_outputs(out_dir, {"source": arrays["source"], "target pose": arrays["pose"], "ground truth": arrays["target"],
                            "stage 2": arrays["stage2"], "stage 3": arrays["stage3"]}, metrics, GRID_ROWS)
    return metrics
