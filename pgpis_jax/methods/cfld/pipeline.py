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

Appearance editing (the paper's Sec. 4.6), single-image modes of sample.py, all with the same initial noise:
  --interpolation=w1,w2,...   style interpolation: prompt and HGA biases (1 - w) x those of --source_image + w x
                              those of --style_image, one image per weight side by side in --output (w = 0 is
                              plain sampling of the source, w = 1 of the style image)
  --reference_image, --mask   masked style transfer: the appearance of --source_image generated inside the mask's
                              white regions (the mask image, resized by area to the latent grid, gives the weight
                              of the generation per latent), the reference image kept outside; --target_pose is
                              the reference's keypoints (in its pixels)
"""

from __future__ import annotations

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
from pgpis_jax.methods.common.sample_modes import is_split_mode, sample_split
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
        method = trained.method
        self._generate = jax.jit(lambda p, condition, pose, rng: method.generate(p, condition, pose, rng, sampling))

        def interpolated(p, condition, style, weight, pose, rng):
            (prompt_a, biases_a), (prompt_b, biases_b) = (method.encode_appearance(p, x) for x in (condition, style))
            mix = lambda a, b: (1.0 - weight) * a + weight * b   # noqa: E731
            biases = jax.tree.map(mix, biases_a, biases_b)
            return method.generate_from_appearance(p, mix(prompt_a, prompt_b), biases, pose, rng, sampling)

        def transferred(p, condition, pose, reference, mask, rng):
            keep = (method.reference_latents(p, reference, jax.random.fold_in(rng, 1)), mask)
            return method.generate(p, condition, pose, rng, sampling, keep=keep)

        # jitted: (params, condition, style, weight, pose, rng) and (params, condition, pose, reference, mask, rng)
        # -> generated images [B, S, S, 3] in [-1, 1]
        self.interpolated = jax.jit(interpolated)
        self.transferred = jax.jit(transferred)

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

    def _layout_options(self):
        return input_pipeline.layout_options("cfld", self.config.data.get("pipeline", {}))

    def condition_input(self, path: str) -> np.ndarray:
        """The condition image [1, C, C, 3] in [-1, 1] of a photo (bicubic resize, as the pipeline's)."""
        return _resized(single_image.read_rgb(path), _hw(self._layout_options()["condition_size"]))

    def pose_input(self, target_pose: str, frame_hw) -> np.ndarray:
        """The 21-channel pose map [1, P, P, 21] of an 18-line `x y` keypoint file in the pixels of a frame of
        size frame_hw (h, w)."""
        o = self._layout_options()
        pose_hw = _hw(o["pose_size"])
        if not target_pose.endswith(".txt"):
            raise UserError(f"--target_pose={target_pose}: CFLD needs keypoints (an 18-line 'x y' .txt file) to draw "
                            f"its 21-channel pose map; a pose image has no heatmaps")
        try:
            keypoints = formats.read_keypoint_txt(target_pose)
        except formats.DataError as error:
            raise UserError(str(error)) from None
        resized = poses.resize_keypoints(keypoints, tuple(frame_hw), pose_hw)
        return poses.cfld_pose_map(resized, pose_hw, sigma=float(o["sigma"]))[None]

    def single_inputs(self, source_image: str, target_pose: str) -> Dict[str, np.ndarray]:
        """The condition image and 21-channel target pose map (a batch of one) of a photo and an 18-line `x y`
        keypoint file in the photo's pixels."""
        image = single_image.read_rgb(source_image)
        return {"condition_image": _resized(image, _hw(self._layout_options()["condition_size"])),
                "target_pose": self.pose_input(target_pose, image.shape[:2])}

    def run_single(self, source_image: str, target_pose: str, output_path: str) -> None:
        """One photo and target keypoints -> output_path (PNG at output_size), written under a temporary name."""
        image = self.images(self.single_inputs(source_image, target_pose), self.rng)[0]
        _save(output_path, image)

    def interpolate(self, source_image: str, style_image: str, target_pose: str, weights) -> np.ndarray:
        """Style interpolation: [len(weights), h, w, 3] outputs (see to_output), one per weight w of the appearance
        (1 - w) source + w style, with the target keypoints in the source photo's pixels."""
        inputs = self.single_inputs(source_image, target_pose)
        style = self.condition_input(style_image)
        outputs = [self.interpolated(self.trained.params, inputs["condition_image"], style, np.float32(weight),
                                      inputs["target_pose"], self.rng) for weight in weights]
        return to_output(np.concatenate(outputs), self.output_size)

    def style_transfer(self, source_image: str, reference_image: str, mask: str, target_pose: str) -> np.ndarray:
        """Masked style transfer: [1, h, w, 3], the appearance of source_image generated where the mask is white,
        the reference image kept elsewhere, in the reference's pose (keypoints in its pixels)."""
        reference = single_image.read_rgb(reference_image)
        size = _hw(self._layout_options()["image_size"])
        latent_hw = tuple(v // self.trained.method.codec.factor for v in size)
        weights = _mask_weights(mask, latent_hw)
        generated = self.transferred(self.trained.params, self.condition_input(source_image),
                                      self.pose_input(target_pose, reference.shape[:2]), _resized(reference, size),
                                      weights, self.rng)
        return to_output(generated, self.output_size)

    def run_edit(self, source_image: str, target_pose: str, output_path: str, style_image=None, interpolation=None,
                 reference_image=None, mask=None) -> None:
        """The editing modes (module docstring) -> output_path, written under a temporary name."""
        if interpolation is not None:
            images = self.interpolate(source_image, style_image, target_pose, interpolation)
        else:
            images = self.style_transfer(source_image, reference_image, mask, target_pose)
        _save(output_path, np.concatenate(list(images), axis=1))


def _save(path: str, image) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_png_atomic(path, image)


def _resized(image: np.ndarray, hw) -> np.ndarray:
    """uint8 [H, W, 3] -> [1, h, w, 3] in [-1, 1] (PIL bicubic)."""
    resized = Image.fromarray(image).resize(tuple(hw)[::-1], Image.BICUBIC)
    return (np.asarray(resized, np.float32) / 127.5 - 1)[None]


def _mask_weights(path: str, latent_hw) -> np.ndarray:
    """The generation weight per latent [1, h, w, 1] in [0, 1]: a mask image (white = generate) in grey levels,
    averaged over each latent's pixels (PIL box resize)."""
    grey = Image.fromarray(single_image.read_rgb(path)).convert("L")
    resized = np.asarray(grey.resize(tuple(latent_hw)[::-1], Image.BOX), np.float32) / 255.0
    return resized[None, :, :, None]


def _hw(size):
    return (int(size), int(size)) if np.ndim(size) == 0 else tuple(int(v) for v in size)


def open_pipeline(workdir: str, config=None) -> CFLDPipeline:
    return CFLDPipeline(load_trained(workdir, ("cfld",), config))


def parse_weights(text: str):
    """--interpolation: comma-separated finite numbers -> a tuple of floats."""
    try:
        weights = tuple(float(item) for item in text.split(","))
    except ValueError:
        weights = ()
    if not weights or not all(np.isfinite(weights)):
        raise UserError(f"--interpolation={text}: expected comma-separated weights such as 0,0.5,1 (0: the source "
                        f"image's appearance, 1: the style image's)")
    return weights


def _check_edit(style_image, interpolation, reference_image, mask) -> Optional[str]:
    """The editing mode the flags ask for ("interpolate", "style_transfer" or None); UserError on a mix."""
    interpolating = style_image is not None or interpolation is not None
    transferring = reference_image is not None or mask is not None
    if interpolating and transferring:
        raise UserError("--style_image / --interpolation (style interpolation) cannot be combined with "
                        "--reference_image / --mask (masked style transfer)")
    if interpolating and (style_image is None or interpolation is None):
        raise UserError("style interpolation needs --style_image and --interpolation (e.g. 0,0.5,1)")
    if transferring and (reference_image is None or mask is None):
        raise UserError("masked style transfer needs --reference_image and --mask (white = generate)")
    return "interpolate" if interpolating else ("style_transfer" if transferring else None)


def sample_command(workdir: str, config=None, split: Optional[str] = None, output_dir: Optional[str] = None,
                   batch_size: Optional[int] = None, source_image: Optional[str] = None,
                   target_pose: Optional[str] = None, output: Optional[str] = None, style_image: Optional[str] = None,
                   interpolation: Optional[str] = None, reference_image: Optional[str] = None,
                   mask: Optional[str] = None) -> Optional[Dict[str, Any]]:
    """sample.py for CFLD: split mode (--split, --output_dir), single mode (--source_image, --target_pose,
    --output) or an editing mode (single mode plus --style_image and --interpolation, or --reference_image and
    --mask; module docstring). Every flag is checked before anything is loaded or written."""
    edit = _check_edit(style_image, interpolation, reference_image, mask)
    weights = parse_weights(interpolation) if interpolation is not None else None
    if edit and split is not None:
        raise UserError("the editing flags (--style_image, --interpolation, --reference_image, --mask) make one "
                        "image: give --source_image, --target_pose and --output instead of --split")
    split_mode = is_split_mode(split, output_dir, dict(source_image=source_image, target_pose=target_pose,
                                                       output=output))
    inputs = dict(source_image=source_image, target_pose=target_pose, style_image=style_image,
                  reference_image=reference_image, mask=mask)
    for flag, path in inputs.items():
        if path is not None and not os.path.isfile(path):
            raise UserError(f"--{flag}={path}: file not found")
    pipe = open_pipeline(workdir, config)
    if edit:
        pipe.run_edit(source_image, target_pose, output, style_image, weights, reference_image, mask)
        print(f"wrote {output}", flush=True)
        return None
    if not split_mode:
        pipe.run_single(source_image, target_pose, output)
        print(f"wrote {output}", flush=True)
        return None
    return sample_split(pipe.run_split, pipe.config, split, output_dir, batch_size)


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
