"""The demos.

    python demo.py --config=configs/toy_mixture.py --workdir=runs/demo          # samplers on a toy mixture
    python demo.py --config=configs/pcdm_inpaint.py:demo --workdir=runs/pcdm_demo --output_dir=demo_out
                                                                                  # PCDMs end to end (CPU)
"""

from absl import flags

from pgpis_jax import cli, toy_demo
from pgpis_jax.errors import UserError

_OUTPUT_DIR = flags.DEFINE_string("output_dir", "demo_out", "PCDMs demo: where grid.png and metrics.json go.")


def main(config, workdir):
    if config.get("method") == "pcdm_inpaint":
        if config.data.dataset != "synthetic_people":
            raise UserError("the PCDMs demo runs configs/pcdm_inpaint.py:demo (synthetic people, tiny networks)")
        from pgpis_jax.methods.pcdm import demo

        demo.run(workdir, _OUTPUT_DIR.value)
        return
    if config.get("method"):
        raise UserError(f"demo.py runs configs/toy_mixture.py or configs/pcdm_inpaint.py:demo, not {config.method!r}")
    cli.write_config_json(config, workdir)
    toy_demo.run(config, workdir)


if __name__ == "__main__":
    cli.run(main)
