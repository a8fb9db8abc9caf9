"""Evaluates a trained method.

    python eval.py --config=configs/pcdm_inpaint.py --workdir=runs/pcdm_inpaint
"""

from pgpis_jax import cli

if __name__ == "__main__":
    cli.run_method("eval", "eval_config.json")
