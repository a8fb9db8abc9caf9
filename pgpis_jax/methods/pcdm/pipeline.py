"""The three-stage PCDMs sampler: prior -> inpainting -> refining, over a split or for one image.

Each stage is a trained run directory, opened read-only (pgpis_jax/methods/common/run.py: its saved config,
network configs and checkpoints; no dataset or pretrained directory is needed for one image); the stage-2 run is
sample.py's --workdir, the others come as options. Which stages run:

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
    <output_dir>/scores.<process>.json         that similarity per pair, kept across resumed runs
    <output_dir>/sample_config.json            what the images depend on: the stage-2 config (without the keys
                                               only training reads, where the data lies and the eval settings),
                                               the ablation, best_of, split, sampling batch size and the
                                               checkpoint step of each stage

Intact outputs are kept (a batch whose outputs all decode at the right size is skipped, broken ones are generated
again; pgpis_jax/methods/common/split_sampler.py); an output directory holding images of other settings is refused.
Every flag and input file is checked before a checkpoint is loaded.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from pgpis_jax import config_checks, evaluation, input_pipeline, poses
from pgpis_jax.errors import UserError
from pgpis_jax.methods.common import single_image
from pgpis_jax.methods.common.hosts import with_batch_size
from pgpis_jax.methods.common.run import Trained, inference_config, load_trained, saved_config
from pgpis_jax.methods.common.sample_modes import is_split_mode
from pgpis_jax.methods.common.split_sampler import (Generated, SplitSampler, candidate_folders, check_settings,
                                                    oracle_best_of, save_png_atomic)
from pgpis_jax.methods.common.stage import check_same_data
from pgpis_jax.methods.pcdm.prior import cosine_similarity
from pgpis_jax.preprocessing import clip_preprocess
from pgpis_jax.trainer.checkpoints import LOCATION_KEYS, RESUMABLE_KEYS

ABLATIONS = ("full", "B1", "B2", "B3", "true")
_NEEDS = {"full": ("prior", "refine"), "B1": (), "B2": ("prior",), "B3": ("refine",), "true": ()}
PRIOR_SCORE = "prior_cosine_similarity"


def check_stages(ablation: str, prior: bool, refine: bool) -> None:
    """UserError unless `ablation` is known and the stages given (prior, refine: whether their runs are) are those
    it uses."""
    if ablation not in ABLATIONS:
        raise UserError(f"--ablation={ablation!r}; expected one of {', '.join(ABLATIONS)}")
    needed = _NEEDS[ablation]
    for name, given in (("prior", prior), ("refine", refine)):
        if name in needed and not given:
            raise UserError(f"--ablation={ablation} needs --{name}_workdir")
        if name not in needed and given:
            raise UserError(f"--ablation={ablation} does not use --{name}_workdir")


class PCDMPipeline:
    """Stages loaded for one ablation; `run_split` and `run_single` produce images."""

    def __init__(self, inpaint: Trained, ablation: str, prior: Optional[Trained] = None,
                 refine: Optional[Trained] = None, seed: int = 42):
        check_stages(ablation, prior is not None, refine is not None)
        self.inpaint, self.prior, self.refine, self.ablation = inpaint, prior, refine, ablation
        self.rng = jax.random.key(seed)
        s = inpaint.config.sampling
        self._stage2 = jax.jit(lambda p, src, pose, dino, g, rng: inpaint.method.generate(
            p, src, pose, dino, g, rng, s.num_inference_steps, s.guidance_scale, s.guidance_rescale))
        self._embed = jax.jit(lambda p, pixels: inpaint.method.encoders.encode(p, "target_embedding", pixels))
        if prior is not None:
            ps = prior.config.sampling
            self._stage1 = jax.jit(lambda p, clip, sp, tp, rng: prior.method.generate(
                p, clip, sp, tp, rng, ps.num_inference_steps, ps.get("guidance_scale", 1.0)))
            self._prior_embed = jax.jit(lambda p, pixels: prior.method.encoders.encode(p, "target_embedding",
                                                                                       pixels))
        if refine is not None:
            rs = refine.config.sampling
            self._stage3 = jax.jit(lambda p, coarse, dino, rng: refine.method.generate(
                p, coarse, dino, rng, rs.num_inference_steps, rs.guidance_scale, rs.guidance_rescale))

    @property
    def stages(self):
        return ["stage2"] + (["stage3"] if self.refine is not None else [])

    # ------------------------------------------------------------------------------------------ stages

    def _global_embedding(self, batch, prior_inputs, rng):
        """(global embeddings [B, E], cosine similarities to the true embedding [B] or None)."""
        p = self.inpaint.params
        if self.ablation == "true":
            return self._embed(p, batch["target_clip"]), None
        if self.prior is None:
            blank = jnp.zeros_like(batch["source_dino"])
            return self._embed(p, blank), None
        pp = self.prior.params
        predicted = self._stage1(pp, prior_inputs["source_clip"], prior_inputs["source_pose_coords"],
                                 prior_inputs["target_pose_coords"], rng)
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
        draws = {"stage2": (lambda key: self._stage2(self.inpaint.params, source, batch["pose"],
                                                     batch["source_dino"], g, key), stage2_key)}
        if self.refine is not None:
            draws["stage3"] = (lambda key: self._stage3(self.refine.params, out["stage2"], batch["source_dino"], key),
                               stage3_key)
        out = {}
        for stage, (draw, key) in draws.items():
            if best_of == 1:
                out[stage] = draw(jax.random.fold_in(key, 0))   # stays on the device for stage 3
            else:
                out[stage], out[f"{stage}_candidates"] = oracle_best_of(draw, truth, best_of, key)
        return out, cosine

    # ------------------------------------------------------------------------------------------ split mode

    def output_folders(self, best_of: int) -> Dict[str, list]:
        """{output key of generate(): [folder relative to the output directory, per candidate]}."""
        folders = {stage: [stage] for stage in self.stages}
        if best_of > 1:
            folders.update({f"{stage}_candidates": candidate_folders(stage, best_of) for stage in self.stages})
        return folders

    def run_split(self, split: str, output_dir: str, batch_size: int, best_of: int = 1,
                  reference: Optional[str] = None) -> Dict[str, Any]:
        """Generates every pair of `split` (sharded over processes, resumable) into output_dir/stage2 and, when
        refining, output_dir/stage3; with best_of = N > 1 also every candidate into
        output_dir/<stage>_candidates/sample_<k> (see generate). With `reference` (a folder name) also writes each
        pair's ground-truth target (S x S) to output_dir/<reference>. Returns the totals over all processes."""
        if best_of < 1:
            raise UserError(f"--best_of={best_of}: expected a number of candidates >= 1")
        options = dict(split=split, train=False, include_names=True, process_index=jax.process_index(),
                       process_count=jax.process_count())
        pipe = input_pipeline.from_config(with_batch_size(self.inpaint.config, batch_size), **options)
        prior_pipe = None
        if self.prior is not None:
            prior_pipe = input_pipeline.from_config(with_batch_size(self.prior.config, batch_size), **options)
        folders = self.output_folders(best_of)
        if reference is not None:
            folders["reference"] = [reference]

        def batches():
            for batch in pipe:
                yield dict(batch, prior=next(prior_pipe) if prior_pipe is not None else None)

        def generate(batch, rng):
            out, cosine = self.generate(batch, batch["prior"], rng, best_of)
            if reference is not None:
                out["reference"] = np.split(np.asarray(batch["image"]), 2, axis=2)[1]
            images = {folder: (out[key][k] if len(group) > 1 else out[key])
                      for key, group in folders.items() for k, folder in enumerate(group)}
            return Generated(images, {PRIOR_SCORE: cosine} if cosine is not None else {})

        info = {"split": split, "ablation": self.ablation, "best_of": best_of,
                "steps": {name: stage.step for name, stage in (("prior", self.prior), ("inpaint", self.inpaint),
                                                               ("refine", self.refine)) if stage is not None}}
        size = int(input_pipeline.layout_options("pcdm_inpaint", self.inpaint.config.data.get("pipeline", {}))[
            "image_size"])
        settings = dict(sample_settings(self.inpaint.config, self.ablation, best_of, split, batch_size),
                        steps=info["steps"])
        sampler = SplitSampler(output_dir, [f for group in folders.values() for f in group],
                               scores=(PRIOR_SCORE,) if self.prior is not None else (), image_hw=(size, size),
                               settings=settings)
        if best_of > 1:
            info["selection"] = (f"oracle: per pair and stage the candidate of highest SSIM against the ground truth "
                                 f"(Gaussian sigma 1.2, population covariance, data range of the candidate, on "
                                 f"uint8), as the original's --calculate_metrics; scores of the selected images are "
                                 f"best-of-{best_of} oracle numbers")
        return sampler.run(batches(), generate, self.rng, info)

    # ------------------------------------------------------------------------------------------ single mode

    def run_single(self, inputs: single_image.Inputs, output_path: str) -> None:
        """One source photo and two poses (single_image.read_inputs: 18-line `x y` keypoint files in the photo's
        pixels, or rendered pose images) -> output_path (PNG, S x S), written under a temporary name and renamed."""
        o = input_pipeline.layout_options("pcdm_inpaint", self.inpaint.config.data.get("pipeline", {}))
        size = int(o["image_size"])
        image = inputs.image
        hw = image.shape[:2]
        from PIL import Image

        squashed = np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC), np.float32) / 127.5 - 1
        clip_in = clip_preprocess(Image.fromarray(image).resize((o["clip_size"],) * 2, Image.BICUBIC),
                                  size=o["clip_size"], crop=o["clip_size"])
        pose_images = [single_image.render_pose(pose, hw, size, "pcdms") for pose in (inputs.source, inputs.target)]
        batch = {"image": np.concatenate([squashed, squashed], axis=1)[None],
                 "pose": np.concatenate(pose_images, axis=1)[None],
                 "source_dino": clip_in[None]}
        prior_inputs = None
        if self.prior is not None:
            prior_inputs = {"source_clip": clip_in[None],
                            "source_pose_coords": poses.normalize_keypoints(inputs.source.keypoints, hw)[None],
                            "target_pose_coords": poses.normalize_keypoints(inputs.target.keypoints, hw)[None]}
        out, _ = self.generate(batch, prior_inputs, self.rng)
        final = out.get("stage3", out["stage2"])
        os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
        save_png_atomic(output_path, np.asarray(final[0]))


def sample_settings(config, ablation: str, best_of: int, split: str, batch_size: int) -> Dict[str, Any]:
    """What split-mode images depend on besides the checkpoints (recorded in sample_config.json): the stage-2 config
    without what only training reads or may change between runs (trainer.checkpoints.RESUMABLE_KEYS: run length,
    logging, the mesh, where the data lies, ...; `sampling` stays), how it is evaluated and its batch size (the
    sampling batch size is one of the options), and the options."""
    recorded = json.loads(config.to_json_best_effort(sort_keys=True))
    for key in [k for k in RESUMABLE_KEYS if k != "sampling"] + ["eval", "batch_size"]:
        *groups, leaf = key.split(".")
        node = recorded
        for group in groups:
            node = node.get(group, {})
        node.pop(leaf, None)
    return {"config": recorded, "ablation": ablation, "best_of": best_of, "split": split, "batch_size": batch_size}


def _default_ablation(prior_workdir: Optional[str], refine_workdir: Optional[str]) -> str:
    return {(True, True): "full", (True, False): "B2", (False, True): "B3", (False, False): "B1"}[
        (bool(prior_workdir), bool(refine_workdir))]


def _with_moved_data(run: str, workdir: str, stage2) -> Any:
    """The saved config of the stage run `run`, with the data locations (trainer.checkpoints.LOCATION_KEYS) that the
    stage-2 config `stage2` moves away from what the stage-2 run `workdir` recorded."""
    own, recorded = saved_config(run), saved_config(workdir)
    for key in LOCATION_KEYS:
        group, leaf = key.split(".")
        value = stage2.get(group, {}).get(leaf)
        if leaf in own.get(group, {}) and value != recorded.get(group, {}).get(leaf):
            own[group][leaf] = value
    return own


def check_data(workdir: str, split: str, config=None, prior_workdir: Optional[str] = None) -> None:
    """Before anything is loaded: the dataset the stage-2 config (and the prior's) points at is the one each run
    was trained on (stage.check_same_data) and has `split`."""
    stage2 = inference_config(workdir, config)
    check_same_data(workdir, stage2)
    if prior_workdir:
        check_same_data(prior_workdir, _with_moved_data(prior_workdir, workdir, stage2))
    builder = input_pipeline.load_builder(input_pipeline.dataset_name(stage2.data), stage2.data.get("data_dir") or None)
    if split not in builder.info.splits:
        raise UserError(f"--split={split}: dataset {builder.name} has the splits {', '.join(builder.info.splits)}")


def open_pipeline(workdir: str, config=None, ablation: Optional[str] = None, prior_workdir: Optional[str] = None,
                  refine_workdir: Optional[str] = None) -> PCDMPipeline:
    """The stages of an ablation from their run directories (default ablation: the stages given). Data that `config`
    moves (another data_dir than the stage-2 run recorded) is looked for there by the prior and refining runs too."""
    ablation = ablation or _default_ablation(prior_workdir, refine_workdir)
    inpaint = load_trained(workdir, ("pcdm_inpaint",), config)
    prior = load_trained(prior_workdir, ("pcdm_prior",), _with_moved_data(prior_workdir, workdir, inpaint.config)) \
        if prior_workdir else None
    refine = load_trained(refine_workdir, ("pcdm_refine",), _with_moved_data(refine_workdir, workdir,
                                                                               inpaint.config)) \
        if refine_workdir else None
    return PCDMPipeline(inpaint, ablation, prior, refine, seed=inpaint.config.seed)


def sample_command(workdir: str, config=None, ablation: Optional[str] = None, prior_workdir: Optional[str] = None,
                   refine_workdir: Optional[str] = None, split: Optional[str] = None,
                   output_dir: Optional[str] = None, batch_size: Optional[int] = None, best_of: int = 1,
                   source_image: Optional[str] = None, source_pose: Optional[str] = None,
                   target_pose: Optional[str] = None, output: Optional[str] = None,
                   joints_outside_image: str = "error") -> Optional[Dict[str, Any]]:
    """sample.py for PCDMs: split mode (--split, --output_dir, optionally --best_of) or single mode
    (--source_image, --source_pose, --target_pose, --output; joints_outside_image: "error", "clip" or "drop" for
    pose keypoints outside the photo). `config`: the stage-2 config with inference overrides (None: the run's own).
    Every flag and input file is checked before anything is loaded or written. Returns split mode's results (also
    written by process 0 to output_dir/results.json)."""
    split_mode = is_split_mode(split, output_dir, dict(source_image=source_image, source_pose=source_pose,
                                                       target_pose=target_pose, output=output))
    if not split_mode and best_of != 1:
        raise UserError("--best_of selects by SSIM against the ground truth, which only split mode has")
    if batch_size is not None and batch_size < 1:
        raise UserError(f"--batch_size={batch_size}: expected a positive number of pairs")
    ablation = ablation or _default_ablation(prior_workdir, refine_workdir)
    check_stages(ablation, bool(prior_workdir), bool(refine_workdir))
    if not split_mode:
        config_checks.check_writable_directory(os.path.dirname(os.path.abspath(output)), "--output's folder")
        inputs = single_image.read_inputs(source_image, source_pose, target_pose, joints_outside_image)
        if "prior" in _NEEDS[ablation] and (inputs.source.keypoints is None or inputs.target.keypoints is None):
            raise UserError("the prior needs keypoint files for --source_pose and --target_pose (pose images "
                            "carry no coordinates); use --ablation=B1 or B3 with pose images")
        pipe = open_pipeline(workdir, config, ablation, prior_workdir, refine_workdir)
        pipe.run_single(inputs, output)
        print(f"wrote {output}", flush=True)
        return None
    config_checks.check_writable_directory(output_dir, "--output_dir")
    check_data(workdir, split, config, prior_workdir)
    stage2 = inference_config(workdir, config)
    batch_size = batch_size or stage2.batch_size
    check_settings(output_dir, sample_settings(stage2, ablation, best_of, split, batch_size))
    pipe = open_pipeline(workdir, config, ablation, prior_workdir, refine_workdir)
    results = pipe.run_split(split, output_dir, batch_size, best_of)
    print(json.dumps(results), flush=True)
    return results


def generate_test_set(workdir: str, output_dir: str, config=None):
    """The test split through this stage-2 run alone (ablation B1: blank global token) into output_dir/stage2,
    with the ground truth in output_dir/reference; existing images are kept. A protocol with best-of-N selection
    (config.eval.protocol, e.g. pcdms) gets N candidates in output_dir/stage2_candidates. Returns (the folder to
    score, the reference folder, the config used)."""
    from pgpis_jax.metrics import protocols

    check_data(workdir, "test", config)
    pipe = open_pipeline(workdir, config, "B1")
    config = pipe.inpaint.config
    protocol = (config.get("eval") or {}).get("protocol", evaluation.default_eval_config().protocol)
    best_of = protocols.get_protocol(protocol).oracle_candidates
    results = pipe.run_split("test", output_dir, config.batch_size, best_of, reference="reference")
    folders = results["folders"]
    generated = os.path.dirname(folders["stage2_candidates/sample_0"]) if best_of > 1 else folders["stage2"]
    return generated, folders["reference"], config


def evaluate_command(workdir: str, output_dir: str, config=None) -> Dict[str, Any]:
    """eval.py --workdir --output_dir: generate_test_set into output_dir/test_set, then the metrics of config.eval
    -> output_dir/metrics.json."""
    if not output_dir:
        raise UserError("--output_dir is required: where the test set and metrics.json go (nothing is written "
                        "into the run)")
    generated, reference, config = generate_test_set(workdir, os.path.join(output_dir, "test_set"), config)
    return evaluation.evaluate_method_outputs(config, output_dir, generated, reference)
