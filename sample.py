"""Samples with a trained run. The run directory is all it needs: its saved config (--config is optional; inference
settings such as --config.sampling.num_inference_steps=50 may be overridden), network configs and checkpoints.
Nothing is written into a run.

PCDMs (--workdir is the stage-2 run; see pgpis_jax/methods/pcdm/pipeline.py for the ablations):

    python sample.py --workdir=runs/pcdm_inpaint --prior_workdir=runs/pcdm_prior \
        --refine_workdir=runs/pcdm_refine --split=test --output_dir=out/test [--best_of=4]
    python sample.py --workdir=runs/pcdm_inpaint --prior_workdir=... --refine_workdir=... \
        --source_image=a.png --source_pose=a.txt --target_pose=b.txt --output=b_pred.png

CFLD (pgpis_jax/methods/cfld/pipeline.py; also the appearance editing modes --style_image / --interpolation and
--reference_image / --mask):

    python sample.py --workdir=runs/cfld --split=test --output_dir=out/test
    python sample.py --workdir=runs/cfld --source_image=a.png --target_pose=b.txt --output=b_pred.png

The toy denoiser: python sample.py --workdir=runs/toy --output_dir=out/toy (a grid of samples).
"""

from absl import flags

from pgpis_jax import cli

_FLAGS = {
    "ablation": flags.DEFINE_enum("ablation", None, ["full", "B1", "B2", "B3", "true"],
                                  "PCDMs: which stages run (default: full when all workdirs are given, else "
                                  "the stages given)."),
    "prior_workdir": flags.DEFINE_string("prior_workdir", None, "PCDMs: the trained stage-1 workdir."),
    "refine_workdir": flags.DEFINE_string("refine_workdir", None, "PCDMs: the trained stage-3 workdir."),
    "split": flags.DEFINE_string("split", None, "Generate every pair of this split (e.g. test, train)."),
    "output_dir": flags.DEFINE_string("output_dir", None, "Where split mode writes <stage>/<source>_to_<target>.png "
                                      "(the toy denoiser: samples.png)."),
    "batch_size": flags.DEFINE_integer("batch_size", None, "Pairs per sampling call in split mode."),
    "best_of": flags.DEFINE_integer("best_of", 1, "Split mode: N candidates per pair and stage, all kept in "
                                    "<stage>_candidates/sample_<k>; <stage>/ gets the one of highest SSIM against "
                                    "the ground truth (PCDMs' oracle selection; the original uses 4)."),
    "source_image": flags.DEFINE_string("source_image", None, "Single mode: the source photo."),
    "source_pose": flags.DEFINE_string("source_pose", None, "Single mode: 18-line 'x y' keypoints or a pose image."),
    "target_pose": flags.DEFINE_string("target_pose", None, "Single mode: 18-line 'x y' keypoints or a pose image."),
    "output": flags.DEFINE_string("output", None, "Single mode: the output PNG."),
    "style_image": flags.DEFINE_string("style_image", None, "CFLD style interpolation: the second appearance."),
    "interpolation": flags.DEFINE_string("interpolation", None, "CFLD style interpolation: weights of the style "
                                         "image, e.g. 0,0.5,1 (one image each, side by side)."),
    "reference_image": flags.DEFINE_string("reference_image", None, "CFLD masked style transfer: the image kept "
                                           "outside the mask (--target_pose: its keypoints)."),
    "mask": flags.DEFINE_string("mask", None, "CFLD masked style transfer: white where the source's appearance is "
                                "generated."),
    "joints_outside_image": flags.DEFINE_enum("joints_outside_image", "error", ["error", "clip", "drop"],
                                              "Single mode: a pose keypoint outside the source photo is an error, "
                                              "or is clipped to the nearest pixel inside, or dropped (missing); "
                                              "the count is printed."),
}


def _given():
    return {name: flag.value for name, flag in _FLAGS.items() if flag.present}


if __name__ == "__main__":
    cli.run_method("sample", _given)
