"""`make demo`: python demo.py --config=configs/toy_mixture.py --workdir=runs/demo"""

from pgpis_jax import cli, toy_demo


def main(config, workdir):
    cli.write_config_json(config, workdir)
    toy_demo.run(config, workdir)


if __name__ == "__main__":
    cli.run(main)
