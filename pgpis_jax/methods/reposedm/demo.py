"""`make demo-reposedm`: RePoseDM and its baseline B1 (PIDM) end to end on a 2-core CPU, on procedurally generated
people (configs/reposedm.py:demo: tiny networks at 32x32).

1. builds `synthetic_people/64x64_demo` (640 train / 96 test pairs) into <workdir>/data;
2. trains RePoseDM (`:demo`) in <workdir>/reposedm and B1 (`:demo,B1`: no alignment, no gradient guidance) in
   <workdir>/b1_pidm;
3. samples every held-out test pair with both, RePoseDM also without gradient guidance (scale 0), and writes
   <out_dir>/grid.png (source | target pose | warped source | ground truth | RePoseDM) and <out_dir>/metrics.json:
   SSIM and PSNR (methods/common/demo.py) of RePoseDM, B1 and the source copied as the prediction; `warp_ssim`, the
   SSIM of the alignment's warped source (the source's is copy_source's); `heatmap_distance`, the pose distance G
   of RePoseDM's samples to the target keypoints under its pose estimator with and without gradient guidance.
Finished runs are reused when the demo runs again.
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from pgpis_jax import input_pipeline
from pgpis_jax.methods.common.demo import prepare_data, score, train_stage, uint8, write_outputs
from pgpis_jax.methods.common.hosts import with_batch_size
from pgpis_jax.methods.common.run import load_trained

GRID_ROWS = 8
BATCH = 48


def run_configs(data_dir: str):
    """{"reposedm", "b1_pidm": the demo configs reading data_dir}."""
    from configs import reposedm

    configs = {"reposedm": reposedm.get_config("demo"), "b1_pidm": reposedm.get_config("demo,B1")}
    for config in configs.values():
        config.data.data_dir = data_dir
    return configs


def sample_test_pairs(trained, gradient_scales=(None,)):
    """{"source", "pose", "target", "warped": uint8 arrays over the test pairs, per gradient scale "sample/<scale>"
    (uint8) and, with a pose estimator, "distance/<scale>" and "distance/truth" (G per pair of the samples and of
    the ground truth)}."""
    method, params, config = trained.method, trained.params, trained.config
    s = config.sampling
    steps, scale = int(s.num_inference_steps), float(s.guidance_scale)
    run = jax.jit(lambda batch, rng, g: method.generate(params, batch, rng, steps, scale, g))
    run_plain = jax.jit(lambda batch, rng: method.generate(params, batch, rng, steps, scale))
    distance = jax.jit(lambda images, keypoints: method.heatmap_distance(params, images, keypoints,
                                                                         float(s.heatmap_threshold)))
    pipe = input_pipeline.from_config(with_batch_size(config, BATCH), split="test", train=False, process_index=0,
                                      process_count=1)
    arrays = {}

    def add(name, values):
        arrays.setdefault(name, []).append(np.asarray(values))

    for index, batch in enumerate(pipe):
        real = np.asarray(batch["mask"])
        inputs = {k: jnp.asarray(batch[k]) for k in method.condition_keys()}
        rng = jax.random.fold_in(jax.random.key(config.seed), index)
        for g in gradient_scales:
            images, warped = run(inputs, rng, jnp.float32(g)) if g is not None else run_plain(inputs, rng)
            add(f"sample/{g}", uint8(np.asarray(images)[real]))
            if method.use_estimator:
                add(f"distance/{g}", np.asarray(distance(images, batch["target_keypoints"]))[real])
        if method.use_estimator:
            add("distance/truth", np.asarray(distance(batch["target_image"], batch["target_keypoints"]))[real])
        add("warped", uint8(np.asarray(warped)[real]))
        add("source", uint8(batch["source_image"][real]))
        add("target", uint8(batch["target_image"][real]))
        add("pose", uint8(batch["target_pose"][real][..., :3] * 2 - 1))
    return {name: np.concatenate(values) for name, values in arrays.items()}


def run(workdir: str, out_dir: str) -> dict:
    started = time.time()
    data_dir = prepare_data(workdir)
    configs = run_configs(data_dir)
    runs = {name: os.path.join(workdir, name) for name in configs}
    for name, config in configs.items():
        train_stage(config, runs[name])

    full = load_trained(runs["reposedm"], ("reposedm",), configs["reposedm"])
    scale = float(full.config.sampling.gradient_scale)
    ours = sample_test_pairs(full, (0.0, scale))
    baseline = sample_test_pairs(load_trained(runs["b1_pidm"], ("reposedm",), configs["b1_pidm"]))
    predictions = {"reposedm": ours[f"sample/{scale}"], "reposedm_no_gradient_guidance": ours["sample/0.0"],
                   "b1_pidm": baseline["sample/None"], "copy_source": ours["source"]}
    scores = {name: score(images, ours["target"]) for name, images in predictions.items()}
    metrics = {"ssim": {k: v["ssim"] for k, v in scores.items()}, "psnr": {k: v["psnr"] for k, v in scores.items()},
               "warp_ssim": score(ours["warped"], ours["target"])["ssim"],
               "heatmap_distance": {"gradient_scale": scale, "with": float(np.mean(ours[f"distance/{scale}"])),
                                    "without": float(np.mean(ours["distance/0.0"])),
                                    "ground_truth": float(np.mean(ours["distance/truth"]))},
               "test_pairs": int(len(ours["target"])), "seconds": round(time.time() - started)}
    write_outputs(out_dir, {"source": ours["source"], "target pose": ours["pose"], "warped source": ours["warped"],
                            "ground truth": ours["target"], "RePoseDM": predictions["reposedm"]}, metrics, GRID_ROWS)
    return metrics
