"""`make demo-fpdm`: FPDM end to end on a 2-core CPU, on procedurally generated people at 64x64.

1. builds `synthetic_people/64x64_demo` (320 train / 48 test identities, 2 photos each, plain backdrops: 640 / 96
   pairs) into <workdir>/data;
2. trains stage 1 (`configs/fpdm_fusion.py:demo`: a tiny CLIP and Combiner, contrastively) in <workdir>/fusion and
   validates it on the held-out pairs;
3. trains stage 2 (`configs/fpdm_diffusion.py:demo`: a tiny UNet over a parameter-free DCT code, tiny DINOv2, the
   stage-1 fusion model frozen) in <workdir>/diffusion;
4. samples every held-out test pair and writes <out_dir>/grid.png (source | target pose | ground truth | FPDM) and
   <out_dir>/metrics.json: SSIM and PSNR (methods/common/demo.py) of FPDM and of the source image itself as the
   prediction (`copy_source`), and `fusion_cosine`, the mean cosine similarity of the stage-1 fusion vector to the
   target's CLIP embedding on the held-out pairs (with the stage-1 validation loss and ranks under "fusion").
Finished stages are reused when the demo runs again.
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np

from pgpis_jax import input_pipeline
from pgpis_jax.methods.common.demo import prepare_data, score, train_stage, uint8, write_outputs
from pgpis_jax.methods.common.hosts import with_batch_size
from pgpis_jax.methods.common.run import load_trained
from pgpis_jax.methods.fpdm import fusion, sampling

GRID_ROWS = 8
BATCH = 48


def stage_configs(data_dir: str, fusion_workdir: str):
    """The `:demo` configs of both stages reading data_dir; stage 2 reads the stage-1 run in fusion_workdir."""
    from configs import fpdm_diffusion, fpdm_fusion

    stage1, stage2 = fpdm_fusion.get_config("demo"), fpdm_diffusion.get_config("demo")
    stage1.data.data_dir = stage2.data.data_dir = data_dir
    stage2.model.fusion_model.workdir = fusion_workdir
    return stage1, stage2


def test_pairs(config):
    """(fpdm batches, the same pairs' 64x64 source and target images) of the test split, BATCH at a time."""
    common = dict(split="test", train=False, process_index=0, process_count=1)
    config = with_batch_size(config, BATCH)
    pairs = with_batch_size(config, BATCH)
    pairs.data.layout, pairs.data.pipeline = "pairs", {}
    return zip(input_pipeline.from_config(config, **common), input_pipeline.from_config(pairs, **common))


def run(workdir: str, out_dir: str) -> dict:
    started = time.time()
    data_dir = prepare_data(workdir)
    runs = {"fusion": os.path.join(workdir, "fusion"), "diffusion": os.path.join(workdir, "diffusion")}
    stage1, stage2 = stage_configs(data_dir, runs["fusion"])
    train_stage(stage1, runs["fusion"])
    validation = fusion.validate(load_trained(runs["fusion"], ("fpdm_fusion",), stage1))
    print(f"[demo] stage 1 on the test pairs: {json.dumps(validation)}", flush=True)
    train_stage(stage2, runs["diffusion"])

    sampler = sampling.FPDMSampler(load_trained(runs["diffusion"], ("fpdm",), stage2))
    arrays = {k: [] for k in ("source", "pose", "target", "fpdm")}
    for index, (batch, pair) in enumerate(test_pairs(stage2)):
        real = np.asarray(batch["mask"])
        generated = sampler.generate(batch, jax.random.fold_in(sampler.rng, index))
        arrays["fpdm"].append(uint8(generated[real]))
        arrays["pose"].append(uint8(batch["target_pose"][real] * 2 - 1))
        arrays["target"].append(uint8(batch["target_image"][real]))
        arrays["source"].append(uint8(pair["source_image"][real]))
    arrays = {k: np.concatenate(v) for k, v in arrays.items()}
    scores = {name: score(arrays[name], arrays["target"]) for name in ("fpdm", "source")}
    scores["copy_source"] = scores.pop("source")
    metrics = {"ssim": {k: v["ssim"] for k, v in scores.items()}, "psnr": {k: v["psnr"] for k, v in scores.items()},
               "fusion_cosine": validation["fusion_cosine"],
               "fusion": {k: validation[k] for k in ("val_loss", "top1", "top5", "mean_position")},
               "test_pairs": int(len(arrays["target"])), "seconds": round(time.time() - started)}
    write_outputs(out_dir, {"source": arrays["source"], "target pose": arrays["pose"], "ground truth": arrays["target"],
                            "FPDM": arrays["fpdm"]}, metrics, GRID_ROWS)
    return metrics
