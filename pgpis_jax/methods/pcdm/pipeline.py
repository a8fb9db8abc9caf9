"""The three-stage PCDMs sampler: prior -> inpainting -> refining, over a split or for one image.

Each stage is a trained workdir (its config.json and checkpoints); the stage-2 workdir is the one sample.py is
given, the others come as options. Which stages run:

    full   prior, inpaint, refine                  (needs prior_workdir and refine_workdir)
    B1     inpaint only; global token = the embedding of a blank image (what training's condition dropout
           showed the network for "no global information")
    B2     prior + inpaint                         (needs prior_workdir)
    B3     inpaint + refine, blank global token    (needs refine_workdir)
    true   inpaint with the true target embedding (how the original makes stage-3 training data)

Split mode writes images named as the original names them, `<source stem>_to_<target stem>.png` (S x S, the
squashed canvas half), one folder per stage so that each can be scored by eval.py:

    <output_dir>/stage2/                       stage-2 results (with --ablation=true: stage 3's training inputs)
    <output_dir>/stage3/                       stage-3 results, when refining
    <output_dir>/stage{2,3}_candidates/sample_<k>/   with --best_of=N > 1: all N candidates per pair; the stage
                                               folder then holds the one of highest SSIM against the ground
                                               truth (the original's oracle selection), which stage 3 refines
    <output_dir>/results.json                  counts, folders and the stage-1 cosine similarity between
                                               predicted and true target embeddings (when the prior ran)
    <output_dir>/prior_cosine.<process>.json   that similarity per pair, kept across resumed runs

Existing outputs are kept (a batch whose outputs all exist is skipped).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

from pgpis_jax import input_pipeline, poses
from pgpis_jax.datasets import formats
from pgpis_jax.errors import UserError
from pgpis_jax.methods.pcdm.prior import cosine_similarity
from pgpis_jax.metrics import protocols
from pgpis_jax.preprocessing import clip_preprocess

# PCDMs' selection SSIM: Gaussian sigma 1.2, population covariance, data range of the candidate, uint8 scale.
ORACLE_SSIM = protocols.PCDMS.oracle_ssim
ABLATIONS = ("full", "B1", "B2", "B3", "true")
_NEEDS = {"full": ("prior", "refine"), "B1": (), "B2": ("prior",), "B3": ("refine",), "true": ()}


@dataclasses.dataclass
class Stage:
    config: Any
    method: Any
    params: Any
    step: int


def load_stage(workdir: str, expected_method: str, config=None) -> Stage:
    """A trained stage: the config recorded in workdir/config.json (or `config`), its method and the newest
    checkpoint's (EMA) parameters."""
    from pgpis_jax import methods
    from pgpis_jax.trainer import inference

    if config is None:
        path = os.path.join(workdir, "config.json")
        if not os.path.isfile(path):
            raise UserError(f"{path} not found: {workdir} is not a trained {expected_method} workdir")
        with open(path) as f:
            config = ml_collections.ConfigDict(json.load(f))
    if config.method != expected_method:
        raise UserError(f"{workdir} holds a {config.method!r} run; expected {expected_method!r}")
    method = methods.get_method(expected_method).build(config)
    params, step = inference.load_params(method, config, workdir)
    return Stage(config, method, params, step)


class PCDMPipeline:
    """Stages loaded for one ablation; `run_split` and `run_single` produce images."""

    def __init__(self, inpaint: Stage, ablation: str, prior: Optional[Stage] = None,
                 refine: Optional[Stage] = None, seed: int = 42):
        if ablation not in ABLATIONS:
            raise UserError(f"--ablation={ablation!r}; expected one of {', '.join(ABLATIONS)}")
        needed = _NEEDS[ablation]
        for name, stage in (("prior", prior), ("refine", refine)):
            if name in needed and stage is None:
                raise UserError(f"--ablation={ablation} needs --{name}_workdir")
            if name not in needed and stage is not None:
                raise UserError(f"--ablation={ablation} does not use --{name}_workdir")
        self.inpaint, self.prior, self.refine, self.ablation = inpaint, prior, refine, ablation
        self.rng = jax.random.key(seed)
        s = inpaint.config.sampling
        self._stage2 = jax.jit(lambda p, src, pose, dino, g, rng: inpaint.method.generate(
            p, src, pose, dino, g, rng, s.num_inference_steps, s.guidance_scale, s.guidance_rescale))
        self._embed = jax.jit(inpaint.method.encoders.embed)
        if prior is not None:
            ps = prior.config.sampling
            self._stage1 = jax.jit(lambda p, e, sp, tp, rng: prior.method.generate(p, e, sp, tp, rng,
                                                                                    ps.num_inference_steps))
            self._prior_embed = jax.jit(prior.method.encoders.embed)
        if refine is not None:
            rs = refine.config.sampling
            self._stage3 = jax.jit(lambda p, coarse, dino, rng: refine.method.generate(
                p, coarse, dino, rng, rs.num_inference_steps, rs.guidance_scale, rs.guidance_rescale))

    # ------------------------------------------------------------------------------------------ stages

    def _global_embedding(self, batch, prior_inputs, rng):
        """(global embeddings [B, E], cosine similarities to the true embedding [B] or None)."""
        p = self.inpaint.params
        if self.ablation == "true":
            return self._embed(p, batch["target_clip"]), None
        if self.prior is None:
            blank = jnp.zeros_like(batch["target_clip"])
            return self._embed(p, blank), None
        pp = self.prior.params
        predicted = self._stage1(pp, self._prior_embed(pp, prior_inputs["source_clip"]),
                                 prior_inputs["source_pose_coords"], prior_inputs["target_pose_coords"], rng)
        cosine = None
        if "target_clip" in prior_inputs:
            cosine = cosine_similarity(predicted, self._prior_embed(pp, prior_inputs["target_clip"]))
        return predicted, cosine

    def generate(self, batch, prior_inputs, rng, best_of: int = 1):
        """Images per stage in [-1, 1], {"stage2": [B, S, S, 3], "stage3": ... (if refining)}, and the prior's
        cosine similarities [B] (or None).

        best_of = N > 1: each stage draws N candidates per pair, also returned as "<stage>_candidates"
        [N, B, S, S, 3], and keeps the one of highest oracle SSIM against the ground truth (the right half of
        batch["image"]); stage 3 refines stage 2's choice, as the original's scripts chain them."""
        prior_key, stage2_key, stage3_key = jax.random.split(rng, 3)
        g, cosine = self._global_embedding(batch, prior_inputs, prior_key)
        source, truth = np.split(np.asarray(batch["image"]), 2, axis=2)
        out = {}

        def run_stage(name, generate_one, key):
            if best_of == 1:
                out[name] = generate_one(jax.random.fold_in(key, 0))   # stays on the device for stage 3
                return
            out[f"{name}_candidates"] = np.stack([np.asarray(generate_one(jax.random.fold_in(key, k)))
                                                  for k in range(best_of)])
            chosen = oracle_choice(out[f"{name}_candidates"], truth)
            out[name] = out[f"{name}_candidates"][chosen, np.arange(len(chosen))]

        run_stage("stage2", lambda key: self._stage2(self.inpaint.params, source, batch["pose"],
                                                     batch["source_dino"], g, key), stage2_key)
        if self.refine is not None:
            run_stage("stage3", lambda key: self._stage3(self.refine.params, out["stage2"], batch["source_dino"],
                                                         key), stage3_key)
        return out, cosine

    # ------------------------------------------------------------------------------------------ split mode

    def output_folders(self, output_dir: str, best_of: int) -> Dict[str, list]:
        """{output key of generate(): [folder per candidate]} for split mode."""
        stages = ["stage2"] + (["stage3"] if self.refine is not None else [])
        folders = {stage: [os.path.join(output_dir, stage)] for stage in stages}
        if best_of > 1:
            folders.update({f"{stage}_candidates": [os.path.join(output_dir, f"{stage}_candidates", f"sample_{k}")
                                                    for k in range(best_of)] for stage in stages})
        return folders

    def run_split(self, split: str, output_dir: str, batch_size: int, best_of: int = 1,
                  reference_dir: Optional[str] = None) -> Dict[str, Any]:
        """Generates every pair of `split` (sharded over processes, resumable) into output_dir/stage2 and, when
        refining, output_dir/stage3; with best_of = N > 1 also every candidate into
        output_dir/<stage>_candidates/sample_<k> (see generate). With reference_dir also writes each pair's
        ground-truth target (S x S) there under the same name. Returns the totals over all processes."""
        if best_of < 1:
            raise UserError(f"--best_of={best_of}: expected a number of candidates >= 1")
        common = dict(split=split, train=False, include_names=True, process_index=jax.process_index(),
                      process_count=jax.process_count())
        pipe = input_pipeline.from_config(with_batch_size(self.inpaint.config, batch_size), **common)
        prior_pipe = None
        if self.prior is not None:
            prior_pipe = input_pipeline.from_config(with_batch_size(self.prior.config, batch_size), **common)
        folders = self.output_folders(output_dir, best_of)
        if reference_dir is not None:
            folders["reference"] = [reference_dir]
        os.makedirs(output_dir, exist_ok=True)
        cosine_path = os.path.join(output_dir, f"prior_cosine.{jax.process_index()}.json")
        cosines = {}
        if self.prior is not None and os.path.exists(cosine_path):
            with open(cosine_path) as f:
                cosines = json.load(f)
        written = 0
        for index, batch in enumerate(pipe):
            prior_inputs = next(prior_pipe) if prior_pipe is not None else None
            real = np.asarray(batch["mask"])
            names = [pair_stem(s, t) for s, t, r in zip(batch["source_name"], batch["target_name"], real) if r]
            finished = all(os.path.exists(os.path.join(folder, f"{name}.png"))
                           for group in folders.values() for folder in group for name in names)
            if finished and (self.prior is None or all(name in cosines for name in names)):
                continue
            out, cosine = self.generate(batch, prior_inputs, jax.random.fold_in(self.rng, index), best_of)
            if cosine is not None:
                cosines.update((n, float(c)) for n, c in zip(names, np.asarray(cosine)[real]))
                with open(cosine_path, "w") as f:
                    json.dump(cosines, f)
            if reference_dir is not None:
                out["reference"] = np.split(np.asarray(batch["image"]), 2, axis=2)[1]
            for key, group in folders.items():
                candidates = np.asarray(out[key]) if len(group) > 1 else np.asarray(out[key])[None]
                for folder, images in zip(group, candidates):
                    written += save_images(folder, names, images[real])
        written, cosine_sum, cosine_count = summed_over_processes(
            [written, sum(cosines.values()), len(cosines)])
        results = {"split": split, "ablation": self.ablation, "best_of": best_of, "images_written": int(written),
                   "folders": {key: os.path.commonpath(group) for key, group in folders.items()},
                   "steps": {name: stage.step for name, stage in (("prior", self.prior), ("inpaint", self.inpaint),
                                                                  ("refine", self.refine)) if stage is not None}}
        if best_of > 1:
            results["selection"] = (f"oracle: per pair and stage the candidate of highest SSIM against the ground "
                                    f"truth (Gaussian sigma 1.2, population covariance, data range of the candidate, on uint8), "
                                    f"as the original's --calculate_metrics; scores of the selected images are "
                                    f"best-of-{best_of} oracle numbers")
        if cosine_count:
            results["prior_cosine_similarity"] = float(cosine_sum / cosine_count)
            results["prior_pairs"] = int(cosine_count)
        return results

    # ------------------------------------------------------------------------------------------ single mode

    def run_single(self, source_image: str, source_pose: str, target_pose: str, output_path: str) -> None:
        """One source image file and two poses (18-line `x y` keypoint files in their image's pixels, or
        rendered pose images) -> output_path (PNG, S x S)."""
        o = input_pipeline.method_options("pcdm_inpaint", self.inpaint.config.data.get("pipeline", {}))
        size = int(o["image_size"])
        image = _read_rgb(source_image)
        hw = image.shape[:2]
        source_kp, source_pose_image = _pose(source_pose, hw, size)
        target_kp, target_pose_image = _pose(target_pose, hw, size)
        squashed = np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC), np.float32) / 127.5 - 1
        clip_in = clip_preprocess(Image.fromarray(image).resize((o["clip_size"],) * 2, Image.BICUBIC),
                                  size=o["clip_size"], crop=o["clip_size"])
        batch = {"image": np.concatenate([squashed, squashed], axis=1)[None],
                 "pose": np.concatenate([source_pose_image, target_pose_image], axis=1)[None],
                 "source_dino": clip_in[None]}
        prior_inputs = None
        if self.prior is not None:
            if source_kp is None or target_kp is None:
                raise UserError("the prior needs keypoint files for --source_pose and --target_pose (pose images "
                                "carry no coordinates); use --ablation=B1 or B3 with pose images")
            prior_inputs = {"source_clip": clip_in[None],
                            "source_pose_coords": poses.normalize_keypoints(source_kp, hw)[None],
                            "target_pose_coords": poses.normalize_keypoints(target_kp, hw)[None]}
        out, _ = self.generate(batch, prior_inputs, self.rng)
        final = out.get("stage3", out["stage2"])
        os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
        Image.fromarray(to_uint8(np.asarray(final[0]))).save(output_path)


def oracle_choice(candidates, truth) -> np.ndarray:
    """Index [B] of the candidate [N, B, S, S, 3] in [-1, 1] of highest SSIM against truth [B, S, S, 3], both
    as saved (uint8), with the SSIM of PCDMs' scripts (ORACLE_SSIM)."""
    count, batch = candidates.shape[:2]
    generated = to_uint8(candidates).reshape((count * batch,) + candidates.shape[2:]).astype(np.float64)
    reference = np.tile(to_uint8(truth).astype(np.float64), (count, 1, 1, 1))
    return np.argmax(ORACLE_SSIM.score(generated, reference).reshape(count, batch), axis=0)


def summed_over_processes(values) -> np.ndarray:
    """The element-wise sum over all processes of a few numbers (every process calls this)."""
    values = np.asarray(values, np.float64)
    if jax.process_count() == 1:
        return values
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(values)).sum(axis=0)


def with_batch_size(config, batch_size: int):
    """A copy of `config` with another batch_size (sampling batches need not be the training batch)."""
    config = ml_collections.ConfigDict(config.to_dict())
    config.batch_size = batch_size
    return config


def pair_stem(source_name, target_name) -> str:
    """"<source stem>_to_<target stem>" of two record names (bytes or str)."""
    def stem(name):
        name = name.decode() if isinstance(name, bytes) else str(name)
        return os.path.splitext(os.path.basename(name))[0]
    return f"{stem(source_name)}_to_{stem(target_name)}"


def to_uint8(image) -> np.ndarray:
    """[-1, 1] float -> uint8, rounded (as the original's x/2 + 0.5, clamp, x 255, round)."""
    return np.round(np.clip(np.asarray(image, np.float32) / 2 + 0.5, 0, 1) * 255).astype(np.uint8)


def save_images(folder: str, names, images) -> int:
    """Writes images [N, H, W, 3] in [-1, 1] as folder/<name>.png, keeping existing files; returns the count
    written."""
    os.makedirs(folder, exist_ok=True)
    written = 0
    for name, image in zip(names, images):
        path = os.path.join(folder, f"{name}.png")
        if not os.path.exists(path):
            Image.fromarray(to_uint8(image)).save(path)
            written += 1
    return written


def _read_rgb(path: str) -> np.ndarray:
    if not os.path.isfile(path):
        raise UserError(f"{path}: image not found")
    try:
        return np.asarray(Image.open(path).convert("RGB"))
    except OSError as error:
        raise UserError(f"{path}: cannot read image ({error})") from None


def _pose(path: str, image_hw, size: int):
    """(keypoints or None, pose image [size, size, 3] in [-1, 1]) from a keypoint .txt or a pose image."""
    if path.endswith(".txt"):
        try:
            kp = formats.read_keypoint_txt(path)
        except formats.DataError as error:
            raise UserError(str(error)) from None
        resized = poses.resize_keypoints(kp, image_hw, (size, size))
        stick = poses.scaled_width(4, size, 512)
        rendered = poses.draw_skeleton(resized, (size, size), "pcdms", stickwidth=stick, radius=stick)
        return kp, rendered.astype(np.float32) / 127.5 - 1
    image = Image.fromarray(_read_rgb(path)).resize((size, size), Image.BICUBIC)
    return None, np.asarray(image, np.float32) / 127.5 - 1


def sample_command(config, workdir: str, ablation: Optional[str] = None, prior_workdir: Optional[str] = None,
                   refine_workdir: Optional[str] = None, split: Optional[str] = None,
                   output_dir: Optional[str] = None, batch_size: Optional[int] = None, best_of: int = 1,
                   source_image: Optional[str] = None, source_pose: Optional[str] = None,
                   target_pose: Optional[str] = None, output: Optional[str] = None) -> Optional[Dict[str, Any]]:
    """sample.py for PCDMs: split mode (--split, --output_dir, optionally --best_of) or single mode
    (--source_image, --source_pose, --target_pose, --output). Returns split mode's results (also written by
    process 0 to output_dir/results.json)."""
    single = (source_image, source_pose, target_pose, output)
    if split is None and not any(single):
        raise UserError("give --split and --output_dir (every pair of a split) or --source_image, --source_pose, "
                        "--target_pose and --output (one image)")
    if split is not None and any(single):
        raise UserError("--split cannot be combined with --source_image / --source_pose / --target_pose / --output")
    if split is None and best_of != 1:
        raise UserError("--best_of selects by SSIM against the ground truth, which only split mode has")
    if ablation is None:
        ablation = {(True, True): "full", (True, False): "B2", (False, True): "B3", (False, False): "B1"}[
            (prior_workdir is not None, refine_workdir is not None)]
    prior = load_stage(prior_workdir, "pcdm_prior") if prior_workdir else None
    refine = load_stage(refine_workdir, "pcdm_refine") if refine_workdir else None
    pipe = PCDMPipeline(load_stage(workdir, "pcdm_inpaint", config), ablation, prior, refine, seed=config.seed)
    if split is not None:
        if not output_dir:
            raise UserError("--split needs --output_dir")
        results = pipe.run_split(split, output_dir, batch_size or config.batch_size, best_of)
        if jax.process_index() == 0:
            with open(os.path.join(output_dir, "results.json"), "w") as f:
                json.dump(results, f, indent=2)
            print(json.dumps(results), flush=True)
        return results
    if not all(single):
        raise UserError("single mode needs --source_image, --source_pose, --target_pose and --output")
    pipe.run_single(source_image, source_pose, target_pose, output)
    print(f"wrote {output}", flush=True)
    return None
