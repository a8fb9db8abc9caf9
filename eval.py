"""Evaluates generated images with FID, LPIPS, SSIM and PSNR.

Config mode: a trained run generates its test set into --output_dir and scores it (settings in config.eval;
--config is optional, the run's saved config is used, e.g. --config.eval.metrics=ssim,psnr overrides it):

    python eval.py --workdir=runs/pcdm_inpaint --output_dir=out/eval

Folder mode: scores a folder of generated images against the reference images of the same names:

    python eval.py --generated_dir=G --reference_dir=R [--real_dir=T] --metrics=fid,lpips,ssim,psnr \
        --protocol=cfld --weights_dir=W --output=metrics.json
"""

import os
import sys

from absl import app, flags

from pgpis_jax import cli

FOLDER_FLAGS = (
    flags.DEFINE_string("generated_dir", None, "Folder mode: folder of generated images (or of sample_0, "
                        "sample_1, ... folders of candidates for a protocol with best-of-N selection)."),
    flags.DEFINE_string("reference_dir", None, "Folder mode: folder of the reference (ground-truth) images."),
    flags.DEFINE_string("real_dir", None, "Folder mode: FID real images (all training images for pcdms, cfld, "
                        "pidm); searched recursively."),
    flags.DEFINE_string("metrics", "fid,lpips,ssim,psnr", "Folder mode: comma-separated metrics."),
    flags.DEFINE_string("protocol", "standard", "Folder mode: evaluation protocol: standard, pcdms, cfld, fpdm, "
                        "pidm (pgpis_jax/metrics/protocols.py)."),
    flags.DEFINE_string("eval_size", None, "Folder mode: HEIGHTxWIDTH replacing a paper protocol's evaluation "
                        "size, e.g. 512x352."),
    flags.DEFINE_string("match", None, "Folder mode: pairing rule replacing the protocol's: 'name', "
                        "'target_after_to' (<src>_to_<tgt>.png -> <tgt>.*) or 'fpdm' (FPDM's <src>.jpg_2_<tgt>.jpg.png "
                        "names against a reference tree)."),
    flags.DEFINE_string("weights_dir", None, "Folder mode: folder holding the metric networks' weight files "
                        "(default: $PGPIS_METRIC_WEIGHTS, then torch's hub cache)."),
    flags.DEFINE_string("stats_cache", None, "Folder mode: folder caching the FID statistics of the real set "
                        "(default: no cache)."),
    flags.DEFINE_string("output", None, "Folder mode: JSON file for the results."),
)
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Config mode: where the generated test set (test_set/) and "
                                  "metrics.json go; nothing is written into the run.")
CONFIG_MODE_FLAGS = (cli.CONFIG_FLAG, "workdir", "output_dir")


def _given(argv, name: str) -> bool:
    return any(a in (f"--{name}", f"--no{name}") or a.startswith((f"--{name}=", f"--{name}."))
               for a in argv[1:])


def _parse_folder_flags(argv):
    program = os.path.basename(argv[0])
    try:
        return flags.FLAGS(argv)
    except flags.Error as error:
        sys.exit(f"{program}: error: {error}")


def _score_folders(argv):
    from pgpis_jax import evaluation
    from pgpis_jax.errors import UserError
    from pgpis_jax.metrics.protocols import parse_size

    program = os.path.basename(argv[0])
    if len(argv) > 1:
        sys.exit(f"{program}: error: unexpected arguments: {' '.join(argv[1:])}")
    values = {flag.name: flag.value for flag in FOLDER_FLAGS}
    try:
        if values["reference_dir"] is None:
            raise UserError("--reference_dir is required with --generated_dir")
        results = evaluation.score_folders(
            values["generated_dir"], values["reference_dir"], values["metrics"], values["protocol"],
            real_dir=values["real_dir"], weights_dir=values["weights_dir"], stats_cache_dir=values["stats_cache"],
            eval_size=parse_size(values["eval_size"]) if values["eval_size"] else None, match=values["match"])
        print(evaluation.format_table(results), flush=True)
        if values["output"]:
            evaluation.write_results(results, values["output"])
            print(f"metrics -> {values['output']}", flush=True)
    except UserError as error:
        sys.exit(f"{program}: error: {error}")


def main(argv):
    program = os.path.basename(argv[0])
    folder_flags = [flag.name for flag in FOLDER_FLAGS if _given(argv, flag.name)]
    if _given(argv, "generated_dir"):
        config_flags = [name for name in CONFIG_MODE_FLAGS if _given(argv, name)]
        if config_flags:
            sys.exit(f"{program}: error: --generated_dir scores a folder and --{config_flags[0]} belongs to "
                     "config mode; give one of them")
        app.run(_score_folders, flags_parser=_parse_folder_flags, argv=argv)
    elif folder_flags:
        sys.exit(f"{program}: error: --{folder_flags[0]} belongs to folder mode (with --generated_dir); in config "
                 "mode set config.eval instead, e.g. --config.eval.metrics=ssim,psnr")
    else:
        cli.run_method("eval", lambda: {"output_dir": _OUTPUT_DIR.value})


if __name__ == "__main__":
    main(sys.argv)
