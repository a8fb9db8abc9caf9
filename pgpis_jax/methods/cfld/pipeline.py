"""CFLD sampling from a trained (or imported) run directory: every pair of a split, one image, and the test set of
eval.py. The run is opened read-only (pgpis_jax/methods/common/run.py); nothing is written into it.

Outputs as the original computes its metrics' inputs: the decoded S x S image in [0, 1] (clamped) is resized to
config.sampling.output_size (256x176, or 512x352) with torch's antialiased bicubic (F.interpolate(mode="bicubic",
antialias=True)), times 255, clamped and truncated to uint8 (not rounded). Split mode writes

    <output_dir>/cfld/<source stem>_to_<target stem>.png    the generated image at output_size
    <output_dir>/reference/...                              (eval) the stored ground-truth target
    <output_dir>/results.json, sample_config.json           counts and folders; the config sampled with

which `eval.py --generated_dir=<output_dir>/cfld --reference_dir=... --protocol=cfld` scores unchanged (the cfld
protocol's resize of a 256x176 image to 256x176 is the identity, its truncation of integer levels too).
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional

import jax
import numpy as np
from PIL import Image

from pgpis_jax import evaluation, input_pipeline, poses
from pgpis_jax.datasets import formats
from pgpis_jax.errors import UserError
from pgpis_jax.methods.common import single_image
from pgpis_jax.methods.common.hosts import with_batch_size
from pgpis_jax.methods.common.run import Trained, load_trained
from pgpis_jax.methods.common.split_sampler import Generated, SplitSampler, save_png_atomic
from pgpis_jax.metrics.images import resize

FOLDER = "cfld"
REFERENCE = "reference"


def to_output(images, output_size) -> np.ndarray:
    """Generated images [B, S, S, 3] in [-1, 1] -> [B, h, w, 3] in [-1, 1] on uint8 levels (u / 127.5 - 1), as the
    original makes its predictions: x / 2 + 1/2 clamped to [0, 1], antialiased bicubic resize to (h, w), x 255,
    clamped, truncated."""
    unit = np.clip(np.asarray(images, np.float64) / 2 + 0.5, 0.0, 1.0)
    resized = np.stack([resize(image, tuple(output_size), "bicubic_aa") for image in unit])
    levels = np.floor(np.clip(resized * 255.0, 0.0, 255.0))
    return (levels / 127.5 - 1.0).astype(np.float32)


class CFLDPipeline:
    """A trained CFLD run for sampling: `images(batch, rng)`, `run_split`, `run_single`."""

    def __init__(self, trained: Trained):
        self.trained = trained
        self.config = trained.config
        self.rng = jax.random.key(self.config.seed)
        sampling = self.config.sampling
        self.output_size = tuple(int(v) for v in sampling.output_size)
        self._generate = jax.jit(lambda p, condition, pose, rng: trained.method.generate(p, condition, pose, rng,
                                                                                         sampling))

    def images(self, batch, rng) -> np.ndarray:
        """Outputs [B, h, w, 3] (see to_output) of a cfld batch (condition_image, target_pose)."""
        generated = self._generate(self.trained.params, batch["condition_image"], batch["target_pose"], rng)
        return to_output(generated, self.output_size)

    def run_split(self, split: str, output_dir: str, batch_size: int, reference: bool = False) -> Dict[str, Any]:
        """Every pair of `split` into output_dir/cfld (sharded over processes, resumable); with `reference` also the
        stored targets into output_dir/reference. Returns the totals over all processes."""
        options = dict(reference=True) if reference else {}
        config = with_batch_size(self.config, batch_size)
        config.data.pipeline = dict(config.data.get("pipeline", {}), **options)
        pipe = input_pipeline.from_config(config, split=split, train=False, include_names=True,
                                          process_index=jax.process_index(), process_count=jax.process_count())
        folders = [FOLDER] + ([REFERENCE] if reference else [])

        def generate(batch, rng):
            images = {FOLDER: self.images(batch, rng)}
            if reference:
                images[REFERENCE] = batch["reference_image"]
            return Generated(images)

        info = {"split": split, "step": self.trained.step, "output_size": list(self.output_size),
                "guidance": self.config.sampling.guidance,
                "num_inference_steps": int(self.config.sampling.num_inference_steps)}
        return SplitSampler(output_dir, folders).run(pipe, generate, self.rng, info)

    def single_inputs(self, source_image: str, target_pose: str) -> Dict[str, np.ndarray]:
        """The condition image and 21-channel target pose map (a batch of one) of a photo and an 18-line `x y`
        keypoint file in the photo's pixels."""
        o = input_pipeline.layout_options("cfld", self.config.data.get("pipeline", {}))
        condition_hw, pose_hw = _hw(o["condition_size"]), _hw(o["pose_size"])
        image = single_image.read_rgb(source_image)
        if not target_pose.endswith(".txt"):
            raise UserError(f"--target_pose={target_pose}: CFLD needs keypoints (an 18-line 'x y' .txt file) to draw "
                            f"its 21-channel pose map; a pose image has no heatmaps")
        try:
            keypoints = formats.read_keypoint_txt(target_pose)
        except formats.DataError as error:
            raise UserError(str(error)) from None
        resized = poses.resize_keypoints(keypoints, image.shape[:2], pose_hw)
        condition = Image.fromarray(image).resize(condition_hw[::-1], Image.BICUBIC)
        return {"condition_image": (np.asarray(condition, np.float32) / 127.5 - 1)[None],
                "target_pose": poses.cfld_pose_map(resized, pose_hw, sigma=float(o["sigma"]))[None]}

    def run_single(self, source_image: str, target_pose: str, output_path: str) -> None:
        """One photo and target keypoints -> output_path (PNG at output_size), written under a temporary name."""
        image = self.images(self.single_inputs(source_image, target_pose), self.rng)[0]
        os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
        save_png_atomic(output_path, image)


def _hw(size):
    return (int(size), int(size)) if np.ndim(size) == 0 else tuple(int(v) for v in size)


def open_pipeline(workdir: str, config=None) -> CFLDPipeline:
    return CFLDPipeline(load_trained(workdir, ("cfld",), config))


def sample_command(workdir: str, config=None, split: Optional[str] = None, output_dir: Optional[str] = None,
                   batch_size: Optional[int] = None, source_image: Optional[str] = None,
                   target_pose: Optional[str] = None, output: Optional[str] = None) -> Optional[Dict[str, Any]]:
    """sample.py for CFLD: split mode (--split, --output_dir) or single mode (--source_image, --target_pose,
    --output). Every flag is checked before anything is loaded or written."""
    single = (source_image, target_pose, output)
    if split is None and not any(single):
        raise UserError("give --split and --output_dir (every pair of a split) or --source_image, --target_pose and "
                        "--output (one image)")
    if split is not None and any(single):
        raise UserError("--split cannot be combined with --source_image / --target_pose / --output")
    if split is not None and not output_dir:
        raise UserError("--split needs --output_dir")
    if split is None and not all(single):
        raise UserError("single mode needs --source_image, --target_pose and --output")
    if split is None and os.path.exists(output):
        raise UserError(f"--output={output} exists; choose a new file (outputs are never overwritten)")
    pipe = open_pipeline(workdir, config)
    if split is None:
        pipe.run_single(source_image, target_pose, output)
        print(f"wrote {output}", flush=True)
        return None
    results = pipe.run_split(split, output_dir, batch_size or pipe.config.batch_size)
    if jax.process_index() == 0:
        evaluation.write_results(pipe.config.to_dict(), os.path.join(output_dir, "sample_config.json"))
    print(json.dumps(results), flush=True)
    return results


def generate_test_set(workdir: str, output_dir: str, config=None):
    """The test split of this run into output_dir/cfld with the stored targets in output_dir/reference (existing
    images are kept). Returns (generated folder, reference folder, the config used)."""
    pipe = open_pipeline(workdir, config)
    folders = pipe.run_split("test", output_dir, pipe.config.batch_size, reference=True)["folders"]
    return folders[FOLDER], folders[REFERENCE], pipe.config


def evaluate_command(workdir: str, output_dir: str, config=None) -> Dict[str, Any]:
    """eval.py --workdir --output_dir: generate_test_set into output_dir/test_set, then the metrics of config.eval
    (protocol cfld by default) -> output_dir/metrics.json."""
    if not output_dir:
        raise UserError("--output_dir is required: where the test set and metrics.json go (nothing is written "
                        "into the run)")
    generated, reference, config = generate_test_set(workdir, os.path.join(output_dir, "test_set"), config)
    return evaluation.evaluate_method_outputs(config, output_dir, generated, reference)
