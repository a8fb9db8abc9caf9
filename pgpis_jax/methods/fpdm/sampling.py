"""FPDM sampling from a stage-2 run directory (opened read-only; the run holds the frozen fusion model, so the
stage-1 run is not needed): every pair of a split, or one image; the test set that eval.py scores.

Split mode (sample.py --workdir=<fpdm run> --split=test --output_dir=OUT) writes the images as the original's C1
names them, `<source>_2_<target>.png` (the records' image names, "/" removed, extensions kept, e.g.
fashionMENDenimid0000008001_1front.jpg_2_fashionMENDenimid0000008002_2side.jpg.png), at the run's target size:

    OUT/generated/<source>_2_<target>.png
    OUT/reference/<target stem>.png         ground-truth targets (eval.py's test set only)
    OUT/results.json, OUT/sample_config.json

`eval.py --protocol=fpdm` pairs such names with the ground truth by FPDM's normalisation
(pgpis_jax/metrics/images.py, match rule "fpdm"). Single mode (--source_image, --target_pose, --output) takes the
target pose as an 18-line `x y` keypoint file in the source photo's pixels or as a rendered skeleton image.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional

import jax
import numpy as np
from PIL import Image

from pgpis_jax import evaluation, input_pipeline, poses
from pgpis_jax.datasets import formats as data_formats
from pgpis_jax.errors import UserError
from pgpis_jax.methods.common import single_image
from pgpis_jax.methods.common.hosts import with_batch_size
from pgpis_jax.methods.common.run import Trained, load_trained
from pgpis_jax.methods.common.sample_modes import is_split_mode, sample_split
from pgpis_jax.methods.common.split_sampler import SplitSampler, Generated, save_png_atomic
from pgpis_jax.preprocessing import (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD,
                                     normalize_pixels)

GENERATED = "generated"
REFERENCE = "reference"
CONDITION_INPUTS = ("target_pose", "source_dino", "source_clip", "target_pose_clip")


def _text(name) -> str:
    return name.decode() if isinstance(name, bytes) else str(name)


def fpdm_name(source_name, target_name) -> str:
    """The original's output stem `<source>_2_<target>` of two record names (bytes or str): "/" removed,
    extensions kept."""
    return f"{_text(source_name).replace('/', '')}_2_{_text(target_name).replace('/', '')}"


def target_stem(source_name, target_name) -> str:
    """The reference file stem of a pair: its target's name without folders and extension."""
    del source_name
    return os.path.splitext(os.path.basename(_text(target_name)))[0]


def _resized(image: np.ndarray, hw) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [h, w, 3], PIL bicubic (as the original's PIL resizes)."""
    return np.asarray(Image.fromarray(image).resize((int(hw[1]), int(hw[0])), Image.BICUBIC))


class FPDMSampler:
    """A trained stage 2 with its jitted `generate`; `run_split` and `run_single` produce images."""

    def __init__(self, trained: Trained):
        self.trained = trained
        s = trained.config.sampling
        self._generate = jax.jit(lambda params, batch, rng: trained.method.generate(
            params, batch, rng, s.num_inference_steps, s.guidance_scale))
        self.rng = jax.random.key(trained.config.seed)

    def generate(self, batch, rng) -> np.ndarray:
        """Images [B, H, W, 3] in [-1, 1] for a batch holding CONDITION_INPUTS."""
        return np.asarray(self._generate(self.trained.params, {k: batch[k] for k in CONDITION_INPUTS}, rng))

    def run_split(self, split: str, output_dir: str, batch_size: int,
                  reference: Optional[str] = None) -> Dict[str, Any]:
        """Every pair of `split` into output_dir/generated (and the ground truth into output_dir/<reference>);
        sharded over processes, resumable. Returns the totals over all processes."""
        config = with_batch_size(self.trained.config, batch_size)
        pipe = input_pipeline.from_config(config, split=split, train=False, include_names=True,
                                          process_index=jax.process_index(), process_count=jax.process_count())
        folders, naming = [GENERATED], {GENERATED: fpdm_name}
        if reference is not None:
            folders.append(reference)
            naming[reference] = target_stem

        def generate(batch, rng):
            images = {GENERATED: self.generate(batch, rng)}
            if reference is not None:
                images[reference] = batch["target_image"]
            return Generated(images)

        s = self.trained.config.sampling
        info = {"split": split, "step": self.trained.step, "params": self.trained.which,
                "num_inference_steps": int(s.num_inference_steps), "guidance_scale": float(s.guidance_scale)}
        return SplitSampler(output_dir, folders, naming=naming).run(pipe, generate, self.rng, info)

    def single_inputs(self, source_image: str, target_pose: str) -> Dict[str, np.ndarray]:
        """The condition inputs of one photo and a target pose file, prepared as the `fpdm` layout's test mode."""
        o = self.trained.method.layout_options
        image_hw, canvas = tuple(o["image_size"]), tuple(o["pose_canvas"])
        dino, clip = (int(o["dino_size"]),) * 2, (int(o["clip_size"]),) * 2
        photo = single_image.read_rgb(source_image)
        source = _resized(photo, dino)
        if target_pose.endswith(".txt"):
            try:
                keypoints = data_formats.read_keypoint_txt(target_pose)
            except data_formats.DataError as error:
                raise UserError(str(error)) from None
            keypoints = poses.resize_keypoints(keypoints, photo.shape[:2], canvas)
            skeleton = poses.draw_skeleton(keypoints, canvas, "pidm", stickwidth=o["stickwidth"], radius=o["radius"])
        else:
            skeleton = single_image.read_rgb(target_pose)
        batch = {"target_pose": _resized(skeleton, image_hw).astype(np.float32) / 255,
                 "source_dino": normalize_pixels(source, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
                 "source_clip": normalize_pixels(_resized(source, clip), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
                 "target_pose_clip": normalize_pixels(_resized(skeleton, clip), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)}
        return {key: value[None] for key, value in batch.items()}

    def run_single(self, source_image: str, target_pose: str, output_path: str) -> None:
        """One photo and a target pose -> output_path (PNG at the run's target size), written under a temporary
        name and renamed."""
        image = self.generate(self.single_inputs(source_image, target_pose), self.rng)[0]
        os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
        save_png_atomic(output_path, image)


def sample_command(workdir: str, config=None, split: Optional[str] = None, output_dir: Optional[str] = None,
                   batch_size: Optional[int] = None, source_image: Optional[str] = None,
                   target_pose: Optional[str] = None, output: Optional[str] = None) -> Optional[Dict[str, Any]]:
    """sample.py for FPDM: split mode (--split, --output_dir) or single mode (--source_image, --target_pose,
    --output). `config`: the stage-2 config with inference overrides (None: the run's own). Every flag is checked
    before anything is loaded or written."""
    split_mode = is_split_mode(split, output_dir, dict(source_image=source_image, target_pose=target_pose,
                                                       output=output))
    sampler = FPDMSampler(load_trained(workdir, ("fpdm",), config))
    if not split_mode:
        sampler.run_single(source_image, target_pose, output)
        print(f"wrote {output}", flush=True)
        return None
    return sample_split(sampler.run_split, sampler.trained.config, split, output_dir, batch_size)


def generate_test_set(workdir: str, output_dir: str, config=None):
    """The test split into output_dir/generated with the ground truth in output_dir/reference (existing images are
    kept). Returns (the generated folder, the reference folder, the config used)."""
    sampler = FPDMSampler(load_trained(workdir, ("fpdm",), config))
    config = sampler.trained.config
    folders = sampler.run_split("test", output_dir, config.batch_size, reference=REFERENCE)["folders"]
    return folders[GENERATED], folders[REFERENCE], config


def evaluate_command(workdir: str, output_dir: str, config=None) -> Dict[str, Any]:
    """eval.py --workdir --output_dir: generate_test_set into output_dir/test_set, then the metrics of config.eval
    (protocol fpdm by default) -> output_dir/metrics.json."""
    if not output_dir:
        raise UserError("--output_dir is required: where the test set and metrics.json go (nothing is written "
                        "into the run)")
    generated, reference, config = generate_test_set(workdir, os.path.join(output_dir, "test_set"), config)
    return evaluation.evaluate_method_outputs(config, output_dir, generated, reference)
