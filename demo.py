"""The demos.

    python demo.py --config=configs/toy_mixture.py --workdir=runs/demo          # samplers on a toy mixture
    python demo.py --config=configs/pcdm_inpaint.py:demo --workdir=runs/pcdm_demo --output_dir=demo_out
                                                                                  # PCDMs end to end (CPU)
    python demo.py --config=configs/fpdm_diffusion.py:demo --output_dir=demo_out/fpdm
                                                                                  # FPDM end to end (CPU)
    python demo.py --config=configs/cfld.py:demo --output_dir=demo_out/cfld        # CFLD end to end (CPU)
    python demo.py --config=configs/reposedm.py:demo --output_dir=demo_out/reposedm
                                                                                  # RePoseDM and B1 (CPU)

The method demos train into --workdir (default runs/<method>_demo, e.g. runs/pcdm_demo) and reuse finished stages
there.
"""

from absl import flags

from pgpis_jax import cli, toy_demo
from pgpis_jax.errors import UserError

_OUTPUT_DIR = flags.DEFINE_string("output_dir", "demo_out", "Method demos: where grid.png and metrics.json go.")
# config.method -> (the config the demo runs, its default workdir, its module)
METHOD_DEMOS = {
    "pcdm_inpaint": ("configs/pcdm_inpaint.py:demo", "runs/pcdm_demo", "pgpis_jax.methods.pcdm.demo"),
    "fpdm": ("configs/fpdm_diffusion.py:demo", "runs/fpdm_demo", "pgpis_jax.methods.fpdm.demo"),
    "cfld": ("configs/cfld.py:demo", "runs/cfld_demo", "pgpis_jax.methods.cfld.demo"),
    "reposedm": ("configs/reposedm.py:demo", "runs/reposedm_demo", "pgpis_jax.methods.reposedm.demo"),
}


def main(config):
    import importlib

    method = config.get("method")
    workdir = flags.FLAGS.workdir
    if method in METHOD_DEMOS:
        name, default_workdir, module = METHOD_DEMOS[method]
        if config.data.dataset != "synthetic_people":
            raise UserError(f"the {method} demo runs {name} (synthetic people, tiny networks)")
        importlib.import_module(module).run(workdir or default_workdir, _OUTPUT_DIR.value)
        return
    if method:
        raise UserError(f"demo.py runs configs/toy_mixture.py, {' or '.join(n for n, _, _ in METHOD_DEMOS.values())}, "
                        f"not {method!r}")
    if workdir is None:
        raise UserError("--workdir is required")
    cli.write_config_json(config, workdir)
    toy_demo.run(config, workdir)


if __name__ == "__main__":
    cli.run_with_config(main)
