"""RePoseDM sampling from a run directory (opened read-only): every pair of a split, or one image; the test set that
eval.py scores (protocol "pidm" by default: PIDM's evaluation, which RePoseDM reports against).

Split mode (sample.py --workdir=<reposedm run> --split=test --output_dir=OUT):

    OUT/generated/<source stem>_to_<target stem>.png    at the run's image size (256x256 for DeepFashion, as PIDM)
    OUT/warped/<source stem>_to_<target stem>.png       the aligned source (not for B1)
    OUT/reference/<source stem>_to_<target stem>.png    ground-truth targets (eval.py's test set only)
    OUT/results.json, OUT/sample_config.json

Single mode (--source_image, --target_pose, --output): the photo is squashed to the run's size and the target pose is
an 18-line `x y` keypoint file in the photo's pixels (OpenPose-18, -1 missing); gradient guidance uses the same
keypoints. Sampling settings come from config.sampling (sampler, steps, guidance_scale, gradient_scale, ...).
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional

import jax
import numpy as np
from PIL import Image

from pgpis_jax import evaluation, input_pipeline, poses
from pgpis_jax.errors import UserError
from pgpis_jax.methods.common import single_image
from pgpis_jax.methods.common.hosts import with_batch_size
from pgpis_jax.methods.common.run import Trained, load_trained
from pgpis_jax.methods.common.sample_modes import is_split_mode, sample_split
from pgpis_jax.methods.common.split_sampler import Generated, SplitSampler, save_png_atomic

GENERATED = "generated"
WARPED = "warped"
REFERENCE = "reference"


class RePoseDMSampler:
    """A trained RePoseDM run with its jitted `generate`; `run_split` and `run_single` produce images."""

    def __init__(self, trained: Trained):
        self.trained = trained
        method, s = trained.method, trained.config.sampling
        self._generate = jax.jit(lambda params, batch, rng: method.generate(
            params, batch, rng, int(s.num_inference_steps), float(s.guidance_scale), method.sampling_gradient_scale()))
        self.rng = jax.random.key(trained.config.seed)

    def generate(self, batch, rng):
        """(images, warped sources) [B, H, W, 3] in [-1, 1] (NumPy) for a batch holding the method's condition keys."""
        inputs = {k: batch[k] for k in self.trained.method.condition_keys()}
        images, warped = self._generate(self.trained.params, inputs, rng)
        return np.asarray(images), np.asarray(warped)

    def run_split(self, split: str, output_dir: str, batch_size: int,
                  reference: Optional[str] = None) -> Dict[str, Any]:
        """Every pair of `split` into output_dir/generated (and warped; the ground truth into <reference>); sharded
        over processes, resumable. Returns the totals over all processes."""
        config = with_batch_size(self.trained.config, batch_size)
        pipe = input_pipeline.from_config(config, split=split, train=False, include_names=True,
                                          process_index=jax.process_index(), process_count=jax.process_count())
        aligned = self.trained.method.use_alignment
        folders = [GENERATED] + ([WARPED] if aligned else []) + ([reference] if reference else [])

        def generate(batch, rng):
            images, warped = self.generate(batch, rng)
            out = {GENERATED: images}
            if aligned:
                out[WARPED] = warped
            if reference is not None:
                out[reference] = batch["target_image"]
            return Generated(out)

        s = self.trained.config.sampling
        info = {"split": split, "step": self.trained.step, "params": self.trained.which,
                "num_inference_steps": int(s.num_inference_steps), "guidance_scale": float(s.guidance_scale),
                "gradient_scale": self.trained.method.sampling_gradient_scale()}
        return SplitSampler(output_dir, folders, image_hw=self.trained.method.image_hw, settings=info).run(
            pipe, generate, self.rng, info)

    def single_inputs(self, source_image: str, target_pose: str) -> Dict[str, np.ndarray]:
        """The condition inputs of one photo and a target keypoint file, prepared as the reposedm layout's test
        mode."""
        if not target_pose.endswith(".txt"):
            raise UserError(f"--target_pose={target_pose}: RePoseDM needs keypoints (an 18-line 'x y' .txt file in the "
                            "source photo's pixels) to draw its 20-channel pose map")
        inputs = single_image.read_inputs(source_image, target_pose, target_pose)
        method = self.trained.method
        hw = method.image_hw
        options = method.pipeline
        keypoints = poses.resize_keypoints(inputs.target.keypoints, inputs.image.shape[:2], hw)
        photo = np.asarray(Image.fromarray(inputs.image).resize((hw[1], hw[0]), Image.BICUBIC), np.float32)
        batch = {"source_image": photo / 127.5 - 1,
                 "target_pose": poses.pidm_pose_map(keypoints, hw, stickwidth=options["stickwidth"],
                                                    radius=options["radius"]),
                 "target_keypoints": keypoints.astype(np.float32)}
        return {key: value[None] for key, value in batch.items()}

    def run_single(self, source_image: str, target_pose: str, output_path: str) -> None:
        """One photo and a target pose -> output_path (PNG at the run's size), written under a temporary name and
        renamed."""
        images, _ = self.generate(self.single_inputs(source_image, target_pose), self.rng)
        os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
        save_png_atomic(output_path, images[0])


def sample_command(workdir: str, config=None, split: Optional[str] = None, output_dir: Optional[str] = None,
                   batch_size: Optional[int] = None, source_image: Optional[str] = None,
                   target_pose: Optional[str] = None, output: Optional[str] = None) -> Optional[Dict[str, Any]]:
    """sample.py for RePoseDM: split mode (--split, --output_dir) or single mode (--source_image, --target_pose,
    --output). Every flag is checked before anything is loaded or written."""
    split_mode = is_split_mode(split, output_dir, dict(source_image=source_image, target_pose=target_pose,
                                                       output=output))
    sampler = RePoseDMSampler(load_trained(workdir, ("reposedm",), config))
    if not split_mode:
        sampler.run_single(source_image, target_pose, output)
        print(f"wrote {output}", flush=True)
        return None
    return sample_split(sampler.run_split, sampler.trained.config, split, output_dir, batch_size)


def evaluate_command(workdir: str, output_dir: str, config=None) -> Dict[str, Any]:
    """eval.py --workdir --output_dir: the test split with its ground truth into output_dir/test_set, then the metrics
    of config.eval -> output_dir/metrics.json."""
    if not output_dir:
        raise UserError("--output_dir is required: where the test set and metrics.json go (nothing is written "
                        "into the run)")
    sampler = RePoseDMSampler(load_trained(workdir, ("reposedm",), config))
    config = sampler.trained.config
    folders = sampler.run_split("test", os.path.join(output_dir, "test_set"), config.batch_size,
                                reference=REFERENCE)["folders"]
    return evaluation.evaluate_method_outputs(config, output_dir, folders[GENERATED], folders[REFERENCE])
