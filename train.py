"""Trains the method a config names.

    python train.py --config=configs/pcdm_inpaint.py --workdir=runs/pcdm_inpaint
"""

from pgpis_jax import cli

if __name__ == "__main__":
    cli.run_method("train")
